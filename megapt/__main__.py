"""`python -m megapt ...` == `megapt ...` (launchers that need a Python module use this)."""

from megapt.cli import run

run()
