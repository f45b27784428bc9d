"""`python -m bpfailover.agent`: failoverd."""

import sys

from bpfailover.agent.core import main

sys.exit(main())
