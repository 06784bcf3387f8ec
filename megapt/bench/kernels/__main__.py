"""``python -m megapt.bench.kernels ARGS`` == ``megapt bench kernels --script-args "ARGS"``."""

import sys

from megapt.bench.kernels.run import main

if __name__ == "__main__":
    sys.exit(main())
