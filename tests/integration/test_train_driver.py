"""Runs several Trainer scenarios in one process (or one torchrun job) to pay the import and
process-group start-up once; used by test_train.py, not a test module itself.

    python tests/integration/test_train_driver.py spec.json
    torchrun --nproc_per_node 2 tests/integration/test_train_driver.py spec.json

spec = {"common": ["--section.key=value", ...], "out": "results.json",
        "scenarios": [{"name": str, "env": {VAR: value}, "phases": [[overrides...], ...]}]}
Each phase builds a fresh Trainer (a phase with --checkpoint.resume=true resumes the previous one)
and records its exit code or exception (type + message) in the results file (rank 0 writes it).
"""
import json
import os
import sys


def main(spec_path: str) -> int:
    spec = json.loads(open(spec_path, encoding="utf-8").read())
    from megapt.config import load_config
    from megapt.train import dist
    from megapt.train.trainer import Trainer

    results: dict = {}
    for sc in spec["scenarios"]:
        env = sc.get("env", {})
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            for phase in sc["phases"]:
                cfg = load_config([], spec["common"] + phase)
                try:
                    rc = Trainer(cfg).fit()
                    results.setdefault(sc["name"], []).append({"rc": rc})
                except Exception as exc:  # recorded; the test decides whether it was expected
                    results.setdefault(sc["name"], []).append({"error": type(exc).__name__, "msg": str(exc)})
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    if dist.rank() == 0:
        with open(spec["out"], "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    dist.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
