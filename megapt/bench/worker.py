"""One benchmark point in a fresh process: ``python -m megapt.bench.worker SPEC.json OUT.json``.

SPEC: {"config_files": [...], "overrides": ["--model.preset=tiny", ...], "runners": ["engine", "plain"],
       "warmup": 2, "steps": 5, "data": "synthetic"|"loader", "measured": {key: tflops}, "comm_timers": false}
Under torchrun (``--nproc N``) every rank runs it; only rank 0 writes OUT.
OUT is rewritten (atomically) after every runner, so a crash in the next runner keeps what was
measured before it; the parent sweep reads it whatever the exit code.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch.distributed as dist

from megapt.bench.fingerprint import measured_peaks
from megapt.bench.planner import predict_memory
from megapt.bench.runners import run_one
from megapt.config import load_config
from megapt.train.process import resolve_device


def write_json_atomic(path: Path, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str), encoding="utf-8")
    os.replace(tmp, path)


def run_spec(spec: dict, out_path: Path) -> dict:
    cfg = load_config(spec.get("config_files", []), spec.get("overrides", []))
    # {key: TFLOP/s} (from the parent's fingerprint) or {key: {"tflops": ...}} (measure_matmul_tflops rows)
    measured = {
        k: (v.get("tflops") if isinstance(v, dict) else v)
        for k, v in (spec.get("measured") or {}).items()
    }
    if not measured:
        dev = resolve_device(cfg.train.device)
        keys = ("bf16", "fp16", "tf32", "fp32") if dev == "cuda" else ("fp32", cfg.train.precision)
        measured = {
            k: v.get("tflops") for k, v in measured_peaks(dev, tuple(dict.fromkeys(keys))).items()
        }
    out = {
        "pid": os.getpid(),
        "started": time.time(),
        "planner": predict_memory(cfg, int(os.environ.get("WORLD_SIZE", "1"))),
        "runners": {},
    }
    write_json_atomic(out_path, out)
    for name in spec["runners"]:
        print(f"[bench worker] runner {name}: {spec.get('overrides')}", file=sys.stderr, flush=True)
        out["runners"][name] = run_one(
            name,
            cfg,
            warmup=spec["warmup"],
            steps=spec["steps"],
            data=spec.get("data", "synthetic"),
            measured=measured,
            comm_timers=bool(spec.get("comm_timers")),
        )
        write_json_atomic(out_path, out)
    out["finished"] = time.time()
    write_json_atomic(out_path, out)
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    out = Path(argv[1])
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:  # under torchrun every rank runs the engine; rank 0's numbers are the record
        out = out.with_name(f"{out.name}.rank{rank}")
    run_spec(spec, out)
    return 0


if __name__ == "__main__":
    from megapt.train.dist import exit_process

    exit_process(main())
