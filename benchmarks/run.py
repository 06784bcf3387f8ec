"""`python benchmarks/run.py ARGS` == `megapt bench ARGS` (for a checkout without the console script).

    python benchmarks/run.py train -c configs/tiny.yaml
    python benchmarks/run.py sweep --spec benchmarks/specs/cpu_smoke.yaml
    python benchmarks/run.py compare OLD.json NEW.json
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when megapt is not installed

from megapt.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
