"""Training throughput: the DeepSpeed engine vs a plain PyTorch loop on the same model, same run.

For each model the script builds two copies of the same GPT (same seed, same backends): one under
``create_engine`` (our ds_config, ZeRO stage from --zero, LR schedule, clipping, NaN guard) and one
driven by a bare loop (torch AdamW with the same weight-decay groups, clip_grad_norm_, LambdaLR).
Steps alternate between the two (engine step, plain step, ...) so that load from other processes
hits both equally. Batches are random tokens (the data loader has its own benchmark). Reported:
tokens/s of each, the engine's overhead ``1 - engine/plain`` (goal <= 20 %), peak memory, and on a
GPU MFU = tokens/s * flops_per_token / peak (flops_per_token = ModelArgs.flops_per_token(seq):
6N + 12·L·H·Q·T; peak = the dense bf16 peak of train/metrics.py's table).

    python benchmarks/bench_train.py                      # CPU: tiny + 124m at seq 256 (~5 min on 2 cores)
    python benchmarks/bench_train.py --models 124m --seq 1024 --precision bf16 --micro 8   # GPU

Writes benchmarks/results/bench_train-<host>-<time>.json (or --out).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported

from megapt.config import load_config  # noqa: E402
from megapt.model import ops  # noqa: E402
from megapt.model.gpt import GPT, ModelArgs  # noqa: E402
from megapt.train import dist  # noqa: E402
from megapt.train.engine import create_engine, lr_schedule, param_groups  # noqa: E402
from megapt.train.metrics import mfu, peak_flops  # noqa: E402

GOAL_OVERHEAD = 0.20


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bench_model(preset: str, *, seq: int, micro: int, steps: int, warmup: int, precision: str, zero: int,
                device: str, vocab: int) -> dict:
    cfg = load_config([], [f"--model.preset={preset}", f"--data.seq_len={seq}", f"--train.micro_batch={micro}",
                           f"--train.precision={precision}", f"--deepspeed.zero_stage={zero}",
                           f"--train.max_steps={steps + warmup}", "--train.warmup_steps=1"])
    args = ModelArgs.from_config(cfg.model, vocab, seq)
    backends = ops.select_backends(cfg.model, device)
    seed = cfg.run.seed
    bundle = create_engine(cfg, lambda: GPT(args, backends, seed=seed), world_size=1,
                           init_weights=lambda m, n, p: m.init_parameter(n, p, seed))
    engine = bundle.engine

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    plain = GPT(args, backends, seed=seed).to(device)
    t = cfg.train
    opt = torch.optim.AdamW(param_groups(plain, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps,
                            foreach=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(cfg))
    autocast = torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32)

    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (micro, seq + 1), generator=g) for _ in range(4)]

    def engine_step(i):
        b = batches[i % len(batches)].to(engine.device)
        loss = engine(b[:, :-1], labels=b[:, 1:]).loss
        engine.backward(loss)
        engine.step()
        return loss.item()

    def plain_step(i):
        b = batches[i % len(batches)].to(device)
        with autocast:
            loss = plain(b[:, :-1], labels=b[:, 1:]).loss
        loss.backward()
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(plain.parameters(), t.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    times = {"engine": [], "plain": []}
    for i in range(warmup + steps):
        for name, fn in (("engine", engine_step), ("plain", plain_step)):
            _sync(device)
            t0 = time.perf_counter()
            fn(i)
            _sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    tokens = micro * seq
    out = {"preset": preset, "params_m": round(args.num_params() / 1e6, 2), "seq_len": seq, "micro_batch": micro,
           "precision": precision, "zero_stage": zero, "steps_timed": steps, "warmup_steps": warmup,
           "flops_per_token": args.flops_per_token(seq)}
    peak = peak_flops(precision) if device == "cuda" else None
    for name, ts in times.items():
        med = sorted(ts)[len(ts) // 2]
        out[name] = {"step_s": ts, "median_step_s": med, "tokens_per_s": tokens / med,
                     "mfu": mfu(tokens / med, out["flops_per_token"], peak)}
    out["engine_over_plain"] = out["engine"]["tokens_per_s"] / out["plain"]["tokens_per_s"]
    out["engine_overhead"] = 1.0 - out["engine_over_plain"]
    out["meets_goal"] = out["engine_overhead"] <= GOAL_OVERHEAD
    out["peak_flops_used"] = peak
    out["mfu_formula"] = "tokens_per_s * (6*N + 12*L*H*Q*T) / peak_flops (dense, per device)"
    if device == "cuda":
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    del engine, bundle, plain, opt
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    on_gpu = torch.cuda.is_available()
    p.add_argument("--models", default="124m" if on_gpu else "tiny,124m")
    p.add_argument("--seq", type=int, default=1024 if on_gpu else 256)
    p.add_argument("--micro", default="8" if on_gpu else "8,2", help="micro batch per model (comma list)")
    p.add_argument("--steps", default="20" if on_gpu else "8,2", help="timed steps per model (comma list)")
    p.add_argument("--warmup", type=int, default=3 if on_gpu else 1)
    p.add_argument("--precision", default="bf16" if on_gpu else "fp32")
    p.add_argument("--zero", type=int, default=0)
    p.add_argument("--vocab", type=int, default=4096 if not on_gpu else 32000)
    p.add_argument("--out", default="")
    a = p.parse_args(argv)
    device = "cuda" if on_gpu else "cpu"
    dist.init_distributed(dist.detect_launcher_env(), device, 600)
    models = a.models.split(",")
    micros = [int(x) for x in a.micro.split(",")] + [int(a.micro.split(",")[-1])] * len(models)
    steps = [int(x) for x in a.steps.split(",")] + [int(a.steps.split(",")[-1])] * len(models)
    try:
        from megapt.benchmarking.hardware import fingerprint, hostname_tag

        fp = fingerprint(measure=on_gpu)
        host = hostname_tag()
    except ImportError:  # pragma: no cover
        import platform

        fp, host = {"python": platform.python_version(), "torch": torch.__version__}, "host"
    results = []
    for i, m in enumerate(models):
        r = bench_model(m, seq=a.seq, micro=micros[i], steps=steps[i], warmup=a.warmup, precision=a.precision,
                        zero=a.zero, device=device, vocab=a.vocab)
        print(f"{m}: engine {r['engine']['tokens_per_s']:,.0f} tok/s | plain {r['plain']['tokens_per_s']:,.0f} tok/s "
              f"| engine/plain {r['engine_over_plain']:.3f} (overhead {100 * r['engine_overhead']:.1f} %, goal <= "
              f"{100 * GOAL_OVERHEAD:.0f} %)" + (f" | MFU {100 * r['engine']['mfu']:.1f} %" if r['engine']['mfu'] else ""),
              flush=True)
        results.append(r)
    doc = {"benchmark": "bench_train", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
           "fingerprint": fp, "load_avg_end": os.getloadavg()[0], "goal": f"engine overhead <= {GOAL_OVERHEAD:.0%}",
           "data": "random tokens (loader excluded; see bench_loader)", "results": results}
    out = Path(a.out) if a.out else (Path(__file__).parent / "results" /
                                      f"bench_train-{host}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    print(f"wrote {out}")
    dist.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
