"""The memory planner held against what DeepSpeed really allocates, and its prediction for a
benchmark point.

``predict_memory(cfg, world_size)``: megapt.planner.plan_memory's per-GPU prediction for a sweep
point, next to what was measured. We ask it for the GPU we run on (its ``megapt.hardware`` row;
the device's real capacity when CUDA is present) at this process's world size. Its
``allocator_peak_bytes`` (model states + the larger of the forward/backward and optimizer-step
transients) is what ``torch.cuda.max_memory_allocated`` measures; ``peak_bytes`` adds the
fragmentation margin and the CUDA context and compares with ``max_memory_reserved`` + context. On
CPU the prediction is for ``plan.gpu`` and is not comparable with the RSS we measure; the record
says so.

``megapt bench planner``: two modes, both run under torchrun (one process per rank; ``--nproc``)
and writing one JSON:

* ``--mode states`` (CPU or GPU): builds a small GPT engine per (precision, ZeRO stage) with
  ``megapt.train.engine.create_engine`` and sums, on each rank, the bytes of the tensors that hold
  parameters, gradients and optimizer states (storages de-duplicated, so flat buffers and the views
  into them count once), then compares each component with ``megapt.planner.model_states``.

      DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 megapt bench planner --nproc 2 \\
          --script-args "--mode states --out benchmarks/results/planner_states_cpu.json"

* ``--mode peak`` (GPU): trains a few steps of several configs and compares
  ``torch.cuda.max_memory_allocated`` with the planner's allocator peak (model states + the larger
  of the forward/backward and optimizer-step transients), and ``max_memory_reserved`` + context
  with its full peak. Needs CUDA.

      megapt bench planner --nproc 1 --script-args "--mode peak" --out benchmarks/results/planner_peak.json
      megapt bench planner --nproc 8 --script-args "--mode peak --cases 1b,3b --out ..."

(``python -m torch.distributed.run --nproc_per_node N -m megapt.bench.planner ARGS`` is the same.)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import psutil
import torch
import torch.distributed as dist

from megapt import planner as P
from megapt.bench.fingerprint import fingerprint as full_fingerprint
from megapt.config import load_config
from megapt.hardware import GPUS, match_gpu
from megapt.model.gpt import GPT
from megapt.model.ops import select_backends
from megapt.train.engine import engine_stage


def predict_memory(cfg, world_size: int = 1) -> dict:
    """The planner's prediction for this point on this machine; never raises (a planner problem
    must not stop a benchmark): ``available: False`` and the reason instead."""
    try:
        cuda = torch.cuda.is_available() and cfg.train.device != "cpu"
        over = {"nodes": 1, "gpus_per_node": world_size}
        note = None
        if cuda:
            name = torch.cuda.get_device_name(0)
            key = match_gpu(name)
            over["gpu"] = key or cfg.plan.gpu
            over["gpu_mem_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
            if key is None:
                note = (
                    f"GPU {name!r} not in megapt.hardware.GPUS: planned as {cfg.plan.gpu} "
                    "with this device's memory"
                )
            if not (GPUS[over["gpu"]].host_gib or cfg.plan.cpu_mem_gb):
                over["cpu_mem_gib"] = psutil.virtual_memory().total / 2**30  # this node's RAM
        else:
            note = (
                f"no GPU: the prediction is for one {cfg.plan.gpu} (plan.gpu) and is not "
                "comparable with the CPU RSS measured here"
            )
        hw = P.Hardware.from_config(cfg, **over)
        plan = P.plan_memory(cfg, hw)
    except Exception as exc:  # noqa: BLE001 - a planner problem must not stop a benchmark
        return {
            "available": False,
            "reason": f"megapt.planner.plan_memory failed: {type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc()[-2000:],
        }
    gib = P.GIB
    context = P.OVERHEAD_GIB * gib
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


# ---------------------------------------------------------------------------------------------
# The planner against a real DeepSpeed engine
# ---------------------------------------------------------------------------------------------

# small model for the state accounting: big enough that flat-buffer padding is noise
STATE_MODEL = [
    "--model.preset=tiny",
    "--model.n_layers=2",
    "--model.d_model=128",
    "--model.n_heads=4",
    "--model.n_kv_heads=2",
    "--model.ffn_hidden=384",
    "--tokenizer.vocab_size=512",
    "--data.seq_len=32",
]

# (name, overrides) for the GPU peak mode; sized for one 80 GB GPU at world size 1..8
PEAK_CASES = [
    (
        "124m-z1-mb8",
        [
            "--model.preset=124m",
            "--tokenizer.vocab_size=50304",
            "--data.seq_len=1024",
            "--train.micro_batch=8",
            "--deepspeed.zero_stage=1",
        ],
    ),
    (
        "124m-z1-mb16-eagerloss",
        [
            "--model.preset=124m",
            "--tokenizer.vocab_size=50304",
            "--data.seq_len=1024",
            "--train.micro_batch=16",
            "--deepspeed.zero_stage=1",
            "--model.loss=eager",
        ],
    ),
    (
        "350m-z2-mb4",
        [
            "--model.preset=350m",
            "--tokenizer.vocab_size=50304",
            "--data.seq_len=2048",
            "--train.micro_batch=4",
            "--deepspeed.zero_stage=2",
        ],
    ),
    (
        "1b-z2-mb2",
        [
            "--model.preset=1b",
            "--tokenizer.vocab_size=32000",
            "--data.seq_len=2048",
            "--train.micro_batch=2",
            "--deepspeed.zero_stage=2",
        ],
    ),
    (
        "1b-z2-mb4-ckpt",
        [
            "--model.preset=1b",
            "--tokenizer.vocab_size=32000",
            "--data.seq_len=2048",
            "--train.micro_batch=4",
            "--deepspeed.zero_stage=2",
            "--train.activation_checkpointing=true",
        ],
    ),
    (
        "1b-z3-mb4-ckpt",
        [
            "--model.preset=1b",
            "--tokenizer.vocab_size=32000",
            "--data.seq_len=2048",
            "--train.micro_batch=4",
            "--deepspeed.zero_stage=3",
            "--train.activation_checkpointing=true",
        ],
    ),
    (
        "3b-z3-mb1-ckpt",
        [
            "--model.preset=3b",
            "--tokenizer.vocab_size=32000",
            "--data.seq_len=4096",
            "--train.micro_batch=1",
            "--deepspeed.zero_stage=3",
            "--train.activation_checkpointing=true",
        ],
    ),
]


def _storage_bytes(tensors, seen: set) -> int:
    """Bytes of the distinct storages behind ``tensors`` not already in ``seen`` (flat buffers and
    the views into them count once; a master copy aliasing the parameters counts zero)."""
    total = 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor) or t.numel() == 0:
            continue
        st = t.untyped_storage()
        key = (st.device.type, st.data_ptr())
        if key in seen:
            continue
        seen.add(key)
        total += st.nbytes()
    return total


def _tensor_bytes(tensors, seen: set) -> int:
    """Bytes of the distinct tensors (by address and size): gradients are views into DeepSpeed's
    reduce buckets, whose (config-sized) storage is accounted as a bucket, not as gradients."""
    total = 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor) or t.numel() == 0:
            continue
        key = (t.device.type, t.data_ptr(), t.numel())
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def _flat(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _flat(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _flat(v)


def measure_states(engine) -> dict:
    """Per-rank bytes of parameters, gradients and optimizer states (call after backward, before step)."""
    module, opt = engine.module, engine.optimizer
    seen: set = set()
    ptensors = [p.data for p in module.parameters()] + [
        getattr(p, "ds_tensor", None) for p in module.parameters()
    ]
    params = _tensor_bytes(ptensors, set())
    _storage_bytes(ptensors, seen)  # remember the storages, so an aliasing master copy counts 0
    # flat gradient buffers by storage first, then per-tensor gradients outside those buffers
    flat_seen: set = set()
    grads = 0
    for attr in ("grad_partitions_flat_buffer", "fp32_groups_gradients_flat"):
        grads += _storage_bytes(_flat(getattr(opt, attr, None)), flat_seen)
    loose = [p.grad for p in module.parameters()]
    for attr in ("averaged_gradients", "all_grad_tensors"):
        loose += list(_flat(getattr(opt, attr, None)))
    loose = [
        t
        for t in loose
        if t is not None and (t.device.type, t.untyped_storage().data_ptr()) not in flat_seen
    ]
    grads += _tensor_bytes(loose, set())
    inner = (
        opt
        if isinstance(opt, torch.optim.Optimizer) and not hasattr(opt, "optimizer")
        else opt.optimizer
    )
    optim = 0
    for attr in (
        "single_partition_of_fp32_groups",
        "fp32_partitioned_groups_flat",
        "fp32_groups_flat_partition",
        "fp32_groups_flat",
    ):
        optim += _storage_bytes(_flat(getattr(opt, attr, None)), seen)
    state_tensors = [
        t
        for st in inner.state.values()
        for t in st.values()
        if isinstance(t, torch.Tensor) and t.numel() > 1
    ]
    optim += _storage_bytes(state_tensors, seen)
    return {"parameters": params, "gradients": grads, "optimizer states": optim}


def _batch(cfg, vocab: int, device):
    group = cfg.train.sequence_parallel * cfg.train.tensor_parallel  # ranks sharing a batch
    g = torch.Generator().manual_seed(1234 + dist.get_rank() // group)
    x = torch.randint(0, vocab, (cfg.train.micro_batch, cfg.data.seq_len + 1), generator=g)
    return x[:, :-1].to(device), x[:, 1:].to(device)


def _engine(cfg, device):
    from megapt.train import parallel  # imports deepspeed: only when a mode runs
    from megapt.train.engine import create_engine

    args = P.model_args(cfg)
    backends = select_backends(cfg.model, device)
    layout = parallel.Layout.from_config(cfg, dist.get_world_size(), args)
    return args, create_engine(
        cfg, lambda: GPT(args, backends), world_size=layout.dp, layout=layout
    )


def run_states(
    precisions: list[str], stages: list[int], device: str, sp: int = 1, tp: int = 1
) -> list[dict]:
    """``sp``/``tp``: sequence / tensor parallelism for every engine of this process (DeepSpeed's
    groups are per process: one layout per run)."""
    world = dist.get_world_size()
    rows = []
    for precision in precisions:
        for stage in stages:
            cfg = load_config(
                [],
                STATE_MODEL
                + [
                    f"--train.precision={precision}",
                    f"--deepspeed.zero_stage={stage}",
                    "--train.micro_batch=2",
                    "--train.grad_accum=2",
                    f"--train.device={device}",
                    f"--train.sequence_parallel={sp}",
                    f"--train.tensor_parallel={tp}",
                    "--deepspeed.stage3_param_persistence_threshold=1000",
                ],
            )
            args, bundle = _engine(cfg, device)
            eng = bundle.engine
            # optimizer step 0 (2 micro-steps) creates the Adam moments; measure after the first
            # micro-step of step 1: what lives across gradient accumulation (stage 1 accumulates
            # full gradients until the boundary, stage 2 reduces every micro-step)
            for micro in range(4):
                x, y = _batch(cfg, args.vocab_size, device)
                loss = eng(x, labels=y).loss
                eng.backward(loss)
                if micro == 2:
                    measured = measure_states(eng)
                eng.step()
            eng_stage, fp32_accum = engine_stage(precision, stage)
            numels = P.rank_param_numels(args, tp)  # what one rank holds before ZeRO
            n = sum(numels)
            persistent = (
                sum(k for k in numels if k < cfg.deepspeed.stage3_param_persistence_threshold)
                if eng_stage == 3
                else 0
            )
            # ZeRO partitions over data x sequence ranks, i.e. the world over the tensor group
            pred = P.model_states(
                n,
                precision=precision,
                zero_stage=eng_stage,
                world=world // tp,
                persistent_params=persistent,
                fp32_grad_accum=fp32_accum,
            )
            predicted = {
                "parameters": pred.params,
                "gradients": pred.grads,
                "optimizer states": pred.optimizer,
            }
            gathered = [None] * world
            dist.all_gather_object(gathered, measured)
            for comp in predicted:
                vals = [g[comp] for g in gathered]
                mean = sum(vals) / len(vals)
                rows.append(
                    {
                        "precision": precision,
                        "zero_stage": stage,
                        "engine_stage": eng_stage,
                        "world_size": world,
                        "sequence_parallel": sp,
                        "tensor_parallel": tp,
                        "n_params": n,
                        "component": comp,
                        "predicted_bytes": predicted[comp],
                        "measured_bytes_per_rank": vals,
                        "ratio": (mean / predicted[comp]) if predicted[comp] else None,
                    }
                )
            del eng, bundle
            gc.collect()
    return rows


def run_peak(names: list[str], steps: int) -> list[dict]:
    world = dist.get_world_size()
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(dev)
    gpu_key = match_gpu(torch.cuda.get_device_name(dev))
    total_gib = torch.cuda.get_device_properties(dev).total_memory / P.GIB
    rows = []
    for name, over in PEAK_CASES:
        if names and not any(name.startswith(n) for n in names):
            continue
        cfg = load_config(
            [], over + ["--train.precision=bf16", "--train.device=cuda", "--train.grad_accum=1"]
        )
        hw = P.Hardware(
            1,
            world,
            gpu_key or "h100",
            gpu_mem_gib=total_gib,
            cpu_mem_gib=psutil.virtual_memory().total / 2**30,
        )
        plan = P.plan_memory(cfg, hw)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        rec = {
            "case": name,
            "overrides": over,
            "world_size": world,
            "predicted_allocator_peak_bytes": plan.allocator_peak,
            "predicted_peak_bytes": plan.peak,
            "predicted_rows": [[r, b] for r, b, _ in plan.rows],
        }
        try:
            args, bundle = _engine(cfg, "cuda")
            eng = bundle.engine
            t0 = time.time()
            for _ in range(steps):
                x, y = _batch(cfg, args.vocab_size, dev)
                loss = eng(x, labels=y).loss
                eng.backward(loss)
                eng.step()
            torch.cuda.synchronize(dev)
            rec.update(
                measured_max_allocated_bytes=torch.cuda.max_memory_allocated(dev),
                measured_max_reserved_bytes=torch.cuda.max_memory_reserved(dev),
                seconds=time.time() - t0,
            )
            rec["ratio_allocated"] = rec["measured_max_allocated_bytes"] / plan.allocator_peak
            del eng, bundle
        except torch.cuda.OutOfMemoryError as exc:
            rec.update(oom=True, error=str(exc)[:500], planner_said_fits=plan.fits_gpu)
        gc.collect()
        torch.cuda.empty_cache()
        rows.append(rec)
    return rows


def fingerprint() -> dict:
    import deepspeed

    fp = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "cpu": platform.processor() or platform.machine(),
        "host": platform.node(),
    }
    if torch.cuda.is_available():
        fp.update(
            gpu=torch.cuda.get_device_name(0),
            cuda=torch.version.cuda,
            gpu_mem_gib=torch.cuda.get_device_properties(0).total_memory / 2**30,
        )
    fp["full"] = full_fingerprint(measure=False)
    return fp


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=["states", "peak"], default="states")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--stages", default="0,1,2,3")
    ap.add_argument(
        "--cases", default="", help="peak mode: comma-separated case-name prefixes (default all)"
    )
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--sequence-parallel", type=int, default=1, help="states mode: Ulysses degree")
    ap.add_argument("--tensor-parallel", type=int, default=1, help="states mode: AutoTP degree")
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and a.mode == "peak" else "cpu"
    if not dist.is_initialized():
        backend = "nccl" if device == "cuda" else "gloo"
        dist.init_process_group(backend)
        import deepspeed  # its comm layer must know the group before zero.Init partitions anything

        deepspeed.init_distributed(dist_backend=backend)
    if a.mode == "states":
        rows = run_states(
            a.precisions.split(","),
            [int(s) for s in a.stages.split(",")],
            device,
            a.sequence_parallel,
            a.tensor_parallel,
        )
    else:
        if not torch.cuda.is_available():
            print("megapt bench planner --mode peak needs a CUDA GPU", file=sys.stderr)
            return 2
        rows = run_peak([c for c in a.cases.split(",") if c], a.steps)
    if dist.get_rank() == 0:
        result = {"benchmark": f"planner-{a.mode}", "fingerprint": fingerprint(), "rows": rows}
        text = json.dumps(result, indent=1)
        if a.out:
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(text)
        for r in rows:
            if a.mode == "states":
                meas = r["measured_bytes_per_rank"]
                print(
                    f"{r['precision']:>5} ZeRO-{r['zero_stage']} {r['component']:<17} predicted "
                    f"{r['predicted_bytes'] / 1e6:8.3f} MB  measured {'/'.join(f'{m / 1e6:.3f}' for m in meas)} MB  "
                    f"ratio {r['ratio'] if r['ratio'] is None else round(r['ratio'], 3)}"
                )
            else:
                print(json.dumps({k: v for k, v in r.items() if k != "predicted_rows"}))
    dist.barrier()
    return 0


if __name__ == "__main__":
    from megapt.train.dist import exit_process

    exit_process(main())
