"""Runs several Trainer scenarios in one process (or one torchrun job) to pay the import and
process-group start-up once; used by test_train.py, not a test module itself.

    python tests/integration/train_driver.py spec.json
    torchrun --nproc_per_node 2 tests/integration/train_driver.py spec.json

spec = {"common": ["--section.key=value", ...], "out": "results.json",
        "scenarios": [{"name": str, "env": {VAR: value}, "phases": [[overrides...], ...],
                       "dump": "optimizer.pt"}]}
Each phase builds a fresh Trainer (a phase with --checkpoint.resume=true resumes the previous one)
and records its exit code or exception (type + message) in the results file (rank 0 writes it).
With "dump", the live optimizer after the last phase is written there (``dump_optimizer``).
"""

import json
import os
import sys


def dump_optimizer(engine, path: str) -> None:
    """What the optimizer holds, read through DeepSpeed's public API (every rank takes part; rank 0
    writes): each group's hyperparameters, the set of Adam steps over all state entries, and every
    parameter's full fp32 weight, exp_avg and exp_avg_sq."""
    import torch
    import torch.distributed as tdist
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    opt = engine.optimizer
    plain = isinstance(opt, torch.optim.Optimizer)  # ZeRO-0: the client optimizer itself
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        # DeepSpeed 0.19.8's ZeRO-1/2 links each parameter to its slice of the optimizer state once,
        # right after group 0's first step, when the other groups have no state yet: its
        # safe_get_full_optimizer_state then fails for them ("exp_avg not found"). Link again.
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()
    base = opt if plain else opt.optimizer
    keys = ("name", "lr", "weight_decay", "betas", "eps")
    groups = [{k: (list(g[k]) if k == "betas" else g[k]) for k in keys} for g in base.param_groups]
    steps = sorted({int(st["step"]) for st in base.state.values() if "step" in st})
    tensors = {}
    for name, p in engine.module.named_parameters():
        fp32 = p.detach() if plain else safe_get_full_fp32_param(p)
        tensors[f"{name}/fp32"] = fp32.float().cpu().clone()
        for key in ("exp_avg", "exp_avg_sq"):
            t = base.state[p][key] if plain else safe_get_full_optimizer_state(p, key)
            tensors[f"{name}/{key}"] = t.float().cpu().clone()
    if not tdist.is_initialized() or tdist.get_rank() == 0:
        torch.save({"groups": groups, "steps": steps, "tensors": tensors}, path)


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
                    trainer = Trainer(cfg)
                    rc = trainer.fit()
                    results.setdefault(sc["name"], []).append({"rc": rc})
                    if sc.get("dump") and phase is sc["phases"][-1]:
                        dump_optimizer(trainer.engine, sc["dump"])
                except Exception as exc:  # noqa: BLE001 - recorded; the test decides whether it was expected
                    results.setdefault(sc["name"], []).append(
                        {"error": type(exc).__name__, "msg": str(exc)}
                    )
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    if dist.rank() == 0:
        with open(spec["out"], "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    from megapt.train.dist import exit_process

    exit_process(main(sys.argv[1]))  # destroys the group; no SIGABRT in interpreter tear-down
