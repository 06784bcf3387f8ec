"""`python -m megapt ...` == `megapt ...` (launchers that need a Python module use this)."""
import sys

from megapt.cli import main

sys.exit(main())
