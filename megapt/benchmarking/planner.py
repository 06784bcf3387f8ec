"""The planner's memory prediction for a benchmark point, next to what was measured.

megapt.planner.plan_memory (workstream SCALE) predicts per-GPU memory from the config alone. We
ask it for the GPU we run on (mapped to its GPU table; the device's real capacity when CUDA is
present) at this process's world size. Its ``allocator_peak_bytes`` (model states + the larger of
the forward/backward and optimizer-step transients) is what ``torch.cuda.max_memory_allocated``
measures; ``peak_bytes`` adds the fragmentation margin and the CUDA context and compares with
``max_memory_reserved`` + context. On CPU the prediction is for ``plan.gpu`` and is not comparable
with the RSS we measure; the record says so.
"""
from __future__ import annotations

import re
import traceback

# torch.cuda.get_device_name() pattern -> megapt.planner.GPUS key (first match wins)
_PLANNER_GPUS = [(r"H200", "h200"), (r"H100", "h100"), (r"A100.*40GB", "a100-40"), (r"A100", "a100"),
                 (r"L40S", "l40s"), (r"A10G", "a10g"), (r"RTX 4090", "rtx4090"), (r"V100", "v100"), (r"\bT4\b", "t4")]


def planner_gpu(device_name: str | None) -> str | None:
    for pattern, key in _PLANNER_GPUS:
        if device_name and re.search(pattern, device_name, flags=re.IGNORECASE):
            return key
    return None


def predict_memory(cfg, world_size: int = 1) -> dict:
    try:
        from megapt import planner
    except ImportError as exc:
        return {"available": False, "reason": f"megapt.planner not importable ({exc})"}
    try:
        import torch

        cuda = torch.cuda.is_available() and cfg.train.device != "cpu"
        over = {"nodes": 1, "gpus_per_node": world_size}
        note = None
        if cuda:
            name = torch.cuda.get_device_name(0)
            key = planner_gpu(name)
            over["gpu"] = key or cfg.plan.gpu
            over["gpu_mem_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
            if key is None:
                note = f"GPU {name!r} not in the planner's table: planned as {cfg.plan.gpu} with this device's memory"
        else:
            note = (f"no GPU: the prediction is for one {cfg.plan.gpu} (plan.gpu) and is not comparable with "
                    "the CPU RSS measured here")
        hw = planner.Hardware.from_config(cfg, **over)
        plan = planner.plan_memory(cfg, hw)
    except Exception as exc:  # noqa: BLE001 - a planner problem must not stop a benchmark
        return {"available": False, "reason": f"megapt.planner.plan_memory failed: {type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc()[-2000:]}
    gib = planner.GIB
    context = planner.OVERHEAD_GIB * gib
    frag = plan.row("fragmentation margin")
    return {
        "available": True,
        "function": "megapt.planner.plan_memory",
        "gpu": hw.gpu,
        "world_size": hw.world,
        "peak_bytes": plan.peak,
        "allocator_peak_bytes": plan.peak - frag - context,
        "fits_gpu": plan.fits_gpu,
        "rows": [{"component": n, "bytes": b, "note": t} for n, b, t in plan.rows],
        "warnings": list(plan.warnings),
        "note": note,
    }
