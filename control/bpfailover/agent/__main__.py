"""`python -m bpfailover.agent`: failoverd."""

import sys

from bpfailover.agent.main import main

sys.exit(main())
