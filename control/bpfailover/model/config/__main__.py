"""`python -m bpfailover.model.config --reference | --check FILE`."""

import sys

from bpfailover.model.config.doc import main

sys.exit(main())
