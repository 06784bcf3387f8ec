"""Loader throughput per rank: samples/s and tokens/s of ``build_loader`` at seq_len 1024.

Writes synthetic shards (the DATA writer, 2048 samples a shard), then times rank 0 of a
simulated job for DataLoader workers in {0, 2}, world sizes in {1, 8, 64} and
verify_checksums true (each process reads and hashes whole shards: with world size W a rank
uses 1/W of every shard it reads) and false (each process reads only its members). The target is what one H100 eats when it trains the 124M
model (~500k tokens/s, the reference consumption rate; goal for the loader: > 2M tokens/s per
rank). The measured baseline in the same run is a bare reader: shard bytes -> numpy view ->
batches of consecutive samples, no checks, no shuffle, no DataLoader.

    megapt bench loader                                    # ~2 min on 2 cores
    megapt bench loader --script-args "--seconds 2 --workers 0 --world-sizes 1 --verify true"
    python -m megapt.bench.loader --seconds 2              # the same, directly

Writes benchmarks/results/bench_loader-<host>-<time>.json under the current folder (or --out).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from megapt.bench.fingerprint import fingerprint, hostname_tag
from megapt.config import DataConfig
from megapt.data.loader import build_loader
from megapt.data.manifest import load_manifest
from megapt.data.shard import write_token_dataset

CONSUMPTION_124M_H100 = 500_000  # tokens/s one H100 trains the 124M model at (reference rate)
GOAL = 2_000_000  # loader tokens/s per rank we aim for


def make_shards(out: Path, samples: int, seq_len: int, vocab: int, shard_samples: int) -> None:
    rng = np.random.default_rng(0)
    rows = (rng.integers(0, vocab, seq_len + 1, dtype=np.uint16) for _ in range(samples))
    write_token_dataset(out, {"train": rows}, seq_len=seq_len, vocab_size=vocab, shard_samples=shard_samples)


def time_loader(shard_dir: Path, *, seq_len: int, micro_batch: int, workers: int, world_size: int,
                seconds: float, verify: bool, pin_memory: bool) -> dict:
    cfg = DataConfig(seq_len=seq_len, loader_workers=workers, verify_checksums=verify)
    ld = build_loader(cfg, shard_dir, "train", rank=0, world_size=world_size, micro_batch=micro_batch, seed=0,
                      pin_memory=pin_memory)
    t0 = time.perf_counter()
    it = iter(ld)
    next(it)
    first = time.perf_counter() - t0
    n = 0
    t1 = time.perf_counter()
    while time.perf_counter() - t1 < seconds:
        b = next(it)
        n += 1
    dt = time.perf_counter() - t1
    assert b["input_ids"].shape == (micro_batch, seq_len)
    it.close()
    samples = n * micro_batch / dt
    return {"workers": workers, "world_size": world_size, "micro_batch": micro_batch, "verify_checksums": verify,
            "pin_memory": pin_memory,
            "batches": n, "seconds": round(dt, 3), "first_batch_s": round(first, 3),
            "samples_per_s": round(samples, 1), "tokens_per_s": round(samples * seq_len),
            "global_epochs_covered": round(ld.state_dict()["position"] / ld.samples_per_epoch[0], 3)}


def time_bare_reader(shard_dir: Path, *, seq_len: int, micro_batch: int, seconds: float) -> dict:
    """Baseline: read each shard, view its payloads, cut consecutive batches, convert to int64."""
    m = load_manifest(shard_dir)
    entries = m["splits"]["train"]["shards"]
    stride = 512 + -(-(seq_len + 1) * 2 // 512) * 512
    n = 0
    t1 = time.perf_counter()
    while time.perf_counter() - t1 < seconds:
        for e in entries:
            buf = (shard_dir / e["name"]).read_bytes()
            base = np.frombuffer(buf, dtype="<u2", offset=512, count=(len(buf) - 512) // 2)
            rows = np.lib.stride_tricks.as_strided(base, (e["samples"], seq_len + 1), (stride, 2), writeable=False)
            for k in range(0, e["samples"] - micro_batch + 1, micro_batch):
                t = torch.from_numpy(rows[k:k + micro_batch].astype(np.int64))
                _x, _y = t[:, :-1].contiguous(), t[:, 1:].contiguous()
                n += 1
            if time.perf_counter() - t1 >= seconds:
                break
    dt = time.perf_counter() - t1
    samples = n * micro_batch / dt
    return {"batches": n, "seconds": round(dt, 3), "samples_per_s": round(samples, 1),
            "tokens_per_s": round(samples * seq_len)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--samples", type=int, default=16384, help="synthetic samples (8 shards of 2048)")
    ap.add_argument("--shard-samples", type=int, default=2048)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--world-sizes", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--seconds", type=float, default=4.0, help="timed seconds per setting")
    ap.add_argument("--verify", choices=["true", "false", "both"], default="both",
                    help="data.verify_checksums: true = whole shards hashed, false = single-member reads")
    ap.add_argument("--pin-memory", choices=["auto", "true", "false"], default="auto",
                    help="pin batches (auto: when CUDA is available, as the trainer does)")
    ap.add_argument("--shard-dir", default="", help="use existing shards instead of synthetic ones")
    ap.add_argument("--out", default="", help="JSON path (default benchmarks/results/bench_loader-<host>-<time>.json)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        shard_dir = Path(args.shard_dir) if args.shard_dir else Path(tmp)
        if not args.shard_dir:
            t = time.perf_counter()
            make_shards(shard_dir, args.samples, args.seq_len, 32000, args.shard_samples)
            print(f"wrote {args.samples} samples x {args.seq_len + 1} tokens in {time.perf_counter() - t:.1f}s")
        m = load_manifest(shard_dir)
        seq_len = m["seq_len"]
        base = time_bare_reader(shard_dir, seq_len=seq_len, micro_batch=args.micro_batch, seconds=args.seconds)
        print(f"baseline bare reader: {base['tokens_per_s'] / 1e6:.2f}M tokens/s")
        runs = []
        pin = torch.cuda.is_available() if args.pin_memory == "auto" else args.pin_memory == "true"
        for verify in {"true": [True], "false": [False], "both": [True, False]}[args.verify]:
            for world in args.world_sizes:
                for workers in args.workers:
                    r = time_loader(shard_dir, seq_len=seq_len, micro_batch=args.micro_batch, workers=workers,
                                    world_size=world, seconds=args.seconds, verify=verify, pin_memory=pin)
                    r["vs_124m_h100_consumption"] = round(r["tokens_per_s"] / CONSUMPTION_124M_H100, 2)
                    r["vs_goal"] = round(r["tokens_per_s"] / GOAL, 2)
                    r["vs_bare_reader"] = round(r["tokens_per_s"] / base["tokens_per_s"], 3)
                    runs.append(r)
                    print(f"W={world:<3d} workers={workers} verify={verify}: {r['samples_per_s']:8.0f} samples/s "
                          f"{r['tokens_per_s'] / 1e6:6.2f}M tokens/s = {r['vs_124m_h100_consumption']:.1f}x the "
                          f"124M/H100 rate, {r['vs_goal']:.2f}x goal (first batch {r['first_batch_s']}s)")

    result = {
        "benchmark": "loader",
        "what": "tokens/s one rank of build_loader yields (rank 0 of a simulated world size), seq_len "
                f"{seq_len}, micro_batch {args.micro_batch}, synthetic uint16 shards of {args.shard_samples} samples",
        "config": vars(args),
        "reference": {"consumption_124m_h100_tokens_per_s": CONSUMPTION_124M_H100,
                      "note": "reference rate a single H100 trains the 124M model at (stated, not measured here)",
                      "goal_tokens_per_s_per_rank": GOAL},
        "baseline_bare_reader": base,
        "runs": runs,
        "hardware": fingerprint(measure=False),
        "load_average_1_5_15min": list(os.getloadavg()),  # other work on the machine skews the numbers
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out = Path(args.out) if args.out else (Path("benchmarks") / "results" /
                                           f"bench_loader-{hostname_tag()}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
