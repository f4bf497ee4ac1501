"""`python -m LymphNodeClassifierLib.phantoms ...`: the `phantoms` command."""

import sys

from .cohort import main

sys.exit(main())
