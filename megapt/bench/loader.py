"""Loader throughput per rank: samples/s and tokens/s of ``build_loader`` at seq_len 1024.

Writes synthetic shards (megapt's writer, data.shard.write_token_dataset; 2048 samples a shard),
then times rank 0 of a simulated job for DataLoader workers in {0, 2}, world sizes in {1, 8, 64} and
verify_checksums true (each process reads and hashes whole shards: with world size W a rank
uses 1/W of every shard it reads) and false (each process reads only its members). The target
is what one H100 eats when it trains the 124M model (~500k tokens/s, the reference consumption
rate; goal for the loader: > 2M tokens/s per rank). The measured baseline in the same run is a
bare reader: shard bytes -> numpy view -> batches of consecutive samples, no checks, no shuffle,
no DataLoader.

    megapt bench loader                                    # ~2 min on 2 cores
    megapt bench loader --script-args "--seconds 2 --workers 0 --world-sizes 1 --verify true"
    megapt bench loader --script-args "--source remote"    # local S3 server vs disk, ~3 min
    python -m megapt.bench.loader --seconds 2              # the same, directly

``--source remote`` (or ``both``) compares the same shards read from disk and from an S3 server:
by default moto's server (``moto[server]``, in the dev extra) started on 127.0.0.1 and the shards
uploaded to it; ``--s3-url s3://bucket/prefix`` uploads to another store instead (endpoint and
credentials from the usual AWS variables). For disk, a cold cache (an empty
``data.remote.cache_dir``: every shard is downloaded) and a warm one (the shards already cached),
it times ``--batches`` batches of rank 0 twice: as fast as the loader goes (tokens/s per rank)
and behind a simulated training step of ``--step-ms`` (default: the time one H100 takes for the
batch's tokens at the 124M reference rate), where it reports the stall: the share of the wall
time the step waited for data.

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
    write_token_dataset(
        out, {"train": rows}, seq_len=seq_len, vocab_size=vocab, shard_samples=shard_samples
    )


def time_loader(
    shard_dir: Path,
    *,
    seq_len: int,
    micro_batch: int,
    workers: int,
    world_size: int,
    seconds: float,
    verify: bool,
    pin_memory: bool,
) -> dict:
    cfg = DataConfig(seq_len=seq_len, loader_workers=workers, verify_checksums=verify)
    ld = build_loader(
        cfg,
        shard_dir,
        "train",
        rank=0,
        world_size=world_size,
        micro_batch=micro_batch,
        seed=0,
        pin_memory=pin_memory,
    )
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
    return {
        "workers": workers,
        "world_size": world_size,
        "micro_batch": micro_batch,
        "verify_checksums": verify,
        "pin_memory": pin_memory,
        "batches": n,
        "seconds": round(dt, 3),
        "first_batch_s": round(first, 3),
        "samples_per_s": round(samples, 1),
        "tokens_per_s": round(samples * seq_len),
        "global_epochs_covered": round(ld.state_dict()["position"] / ld.samples_per_epoch[0], 3),
    }


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
            rows = np.lib.stride_tricks.as_strided(
                base, (e["samples"], seq_len + 1), (stride, 2), writeable=False
            )
            for k in range(0, e["samples"] - micro_batch + 1, micro_batch):
                t = torch.from_numpy(rows[k : k + micro_batch].astype(np.int64))
                _x, _y = t[:, :-1].contiguous(), t[:, 1:].contiguous()
                n += 1
            if time.perf_counter() - t1 >= seconds:
                break
    dt = time.perf_counter() - t1
    samples = n * micro_batch / dt
    return {
        "batches": n,
        "seconds": round(dt, 3),
        "samples_per_s": round(samples, 1),
        "tokens_per_s": round(samples * seq_len),
    }


# --------------------------------------------------------------------------------------------
# Remote shards (S3) vs disk: throughput, cold and warm cache, step-time stall
# --------------------------------------------------------------------------------------------


class LocalS3:
    """moto's standalone S3 server on 127.0.0.1 (a real S3 HTTP API), for the benchmark."""

    def __init__(self, log_path: Path):
        import socket
        import subprocess

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.time() + 60
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(
                    f"moto.server exited ({self.proc.returncode}): install the dev "
                    f"extra (moto[server]) or pass --s3-url"
                )
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                break
            except OSError:
                if time.time() > deadline:
                    self.stop()
                    raise SystemExit("moto.server did not start within 60 s") from None
                time.sleep(0.1)
        # fake credentials, this endpoint only; never the instance metadata service
        os.environ.update(
            AWS_ACCESS_KEY_ID="bench",
            AWS_SECRET_ACCESS_KEY="bench",
            AWS_DEFAULT_REGION="us-east-1",
            AWS_ENDPOINT_URL=self.url,
            AWS_EC2_METADATA_DISABLED="true",
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        self._log.close()


def upload(shard_dir: Path, url: str, remote_cfg) -> float:
    """Copy a local shard set to ``url`` (shards, then the manifest); returns seconds."""
    from megapt.data.remote import open_store

    store = open_store(url, remote_cfg)
    if url.startswith("s3://"):
        store.fs.mkdirs(url.split("/")[2], exist_ok=True)
    t = time.perf_counter()
    names = sorted(p.name for p in shard_dir.iterdir() if p.suffix == ".tar")
    for name in names + ["manifest.json"]:
        store.put(shard_dir / name, name)
    return time.perf_counter() - t


def time_stream(
    source,
    *,
    seq_len: int,
    micro_batch: int,
    workers: int,
    world_size: int,
    batches: int,
    step_s: float,
    shuffle_buffer: int,
    remote_cfg=None,
) -> dict:
    """Rank 0 of ``world_size`` takes a first batch, then ``batches`` more, spending ``step_s``
    on each (a training step). Returns tokens/s after the first batch and from the start
    (manifest, first shards), the time to the first batch and the stall: the share of the wall
    time after the first batch spent waiting for batches."""
    from megapt.config import RemoteConfig

    cfg = DataConfig(
        seq_len=seq_len,
        loader_workers=workers,
        shuffle_buffer=shuffle_buffer,
        remote=remote_cfg if remote_cfg is not None else RemoteConfig(),
    )
    t0 = time.perf_counter()
    ld = build_loader(
        cfg,
        source,
        "train",
        rank=0,
        world_size=world_size,
        micro_batch=micro_batch,
        seed=0,
        pin_memory=False,
    )
    it = iter(ld)
    next(it)
    first = time.perf_counter() - t0
    wait = 0.0
    t1 = time.perf_counter()
    for _ in range(batches):
        tw = time.perf_counter()
        b = next(it)
        wait += time.perf_counter() - tw
        if step_s:
            time.sleep(step_s)
    wall = time.perf_counter() - t1
    assert b["input_ids"].shape == (micro_batch, seq_len)
    stats = ld.remote_stats
    it.close()
    tokens = batches * micro_batch * seq_len
    out = {
        "workers": workers,
        "world_size": world_size,
        "micro_batch": micro_batch,
        "batches": batches,
        "step_ms": round(step_s * 1e3, 2),
        "first_batch_s": round(first, 3),
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall),
        "tokens_per_s_from_start": round((tokens + micro_batch * seq_len) / (first + wall)),
        "wait_s": round(wait, 3),
        "stall_fraction": round(wait / wall, 4),
        "mean_wait_ms": round(wait / batches * 1e3, 3),
    }
    if stats["downloads"] or stats["hits"]:
        out.update(
            downloaded_mb=round(stats["bytes"] / 1e6, 2),
            downloads=stats["downloads"],
            reader_wait_s=round(stats["wait_s"], 3),
        )
    return out


def run_remote(shard_dir: Path, args, tmp: Path) -> dict:
    """disk vs S3 (cold and warm cache) for each world size and worker count."""
    from megapt.config import RemoteConfig

    seq_len = load_manifest(shard_dir)["seq_len"]
    step_s = (
        args.step_ms
        if args.step_ms is not None
        else args.micro_batch * seq_len / CONSUMPTION_124M_H100 * 1e3
    ) / 1e3
    server = None if args.s3_url else LocalS3(tmp / "moto.log")
    url = args.s3_url or "s3://megapt-bench/shards"
    try:
        up = upload(shard_dir, url, RemoteConfig())
        mb = sum(p.stat().st_size for p in shard_dir.glob("*.tar")) / 1e6
        print(f"uploaded {mb:.1f} MB to {url} in {up:.1f}s ({mb / up:.0f} MB/s)")
        rows = []
        k = 0
        for world in args.world_sizes:
            for workers in args.workers:
                for step in (0.0, step_s):
                    common = dict(
                        seq_len=seq_len,
                        micro_batch=args.micro_batch,
                        workers=workers,
                        world_size=world,
                        batches=args.batches,
                        step_s=step,
                        shuffle_buffer=args.shuffle_buffer,
                    )
                    k += 1
                    cache = RemoteConfig(cache_dir=str(tmp / f"cache{k}"))
                    for source, src, rc in (
                        ("disk", shard_dir, None),
                        ("s3-cold", url, cache),
                        ("s3-warm", url, cache),
                    ):
                        r = {"source": source, **time_stream(src, remote_cfg=rc, **common)}
                        rows.append(r)
                        stall = f", stall {100 * r['stall_fraction']:5.1f}%" if step else ""
                        fetched = (
                            f", {r['downloaded_mb']} MB fetched" if "downloaded_mb" in r else ""
                        )
                        print(
                            f"{source:8s} W={world:<3d} workers={workers} "
                            f"step={r['step_ms']:6.2f}ms: {r['tokens_per_s'] / 1e6:6.2f}M "
                            f"tokens/s ({r['tokens_per_s_from_start'] / 1e6:.2f}M from the "
                            f"start){stall}, first batch {r['first_batch_s']}s{fetched}"
                        )
    finally:
        if server is not None:
            server.stop()
    return {
        "url": url,
        "server": "moto (local, 127.0.0.1)" if server else "given by --s3-url",
        "upload_s": round(up, 3),
        "set_mb": round(mb, 2),
        "step_ms_for_stall": round(step_s * 1e3, 3),
        "step_note": "stall runs sleep this long per batch: the time one H100 trains the 124M "
        "model on the batch's tokens at the reference rate",
        "shuffle_buffer": args.shuffle_buffer,
        "runs": rows,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument(
        "--samples", type=int, default=16384, help="synthetic samples (8 shards of 2048)"
    )
    ap.add_argument("--shard-samples", type=int, default=2048)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--world-sizes", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--seconds", type=float, default=4.0, help="timed seconds per setting")
    ap.add_argument(
        "--verify",
        choices=["true", "false", "both"],
        default="both",
        help="data.verify_checksums: true = whole shards hashed, false = single-member reads",
    )
    ap.add_argument(
        "--pin-memory",
        choices=["auto", "true", "false"],
        default="auto",
        help="pin batches (auto: when CUDA is available, as the trainer does)",
    )
    ap.add_argument("--shard-dir", default="", help="use existing shards instead of synthetic ones")
    ap.add_argument(
        "--out",
        default="",
        help="JSON path (default benchmarks/results/bench_loader-<host>-<time>.json)",
    )
    ap.add_argument(
        "--source",
        choices=["disk", "remote", "both"],
        default="disk",
        help="disk: the loader settings sweep; remote: disk vs S3 cold/warm cache",
    )
    ap.add_argument(
        "--s3-url",
        default="",
        help="remote: upload to this s3:// prefix instead of a local moto server",
    )
    ap.add_argument("--batches", type=int, default=600, help="remote: batches timed per run")
    ap.add_argument(
        "--shuffle-buffer",
        type=int,
        default=4096,
        help="remote: data.shuffle_buffer "
        "(smaller than the set, so later windows are fetched while the run goes on)",
    )
    ap.add_argument(
        "--step-ms",
        type=float,
        default=None,
        help="remote: simulated training step "
        "(default: micro_batch x seq_len tokens at the 124M/H100 reference rate)",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        shard_dir = Path(args.shard_dir) if args.shard_dir else Path(tmp)
        if not args.shard_dir:
            t = time.perf_counter()
            make_shards(shard_dir, args.samples, args.seq_len, 32000, args.shard_samples)
            print(
                f"wrote {args.samples} samples x {args.seq_len + 1} tokens in {time.perf_counter() - t:.1f}s"
            )
        m = load_manifest(shard_dir)
        seq_len = m["seq_len"]
        base = time_bare_reader(
            shard_dir, seq_len=seq_len, micro_batch=args.micro_batch, seconds=args.seconds
        )
        print(f"baseline bare reader: {base['tokens_per_s'] / 1e6:.2f}M tokens/s")
        runs = []
        remote = run_remote(shard_dir, args, Path(tmp)) if args.source != "disk" else None
        pin = torch.cuda.is_available() if args.pin_memory == "auto" else args.pin_memory == "true"
        verifies = {"true": [True], "false": [False], "both": [True, False]}[args.verify]
        for verify in verifies if args.source != "remote" else []:
            for world in args.world_sizes:
                for workers in args.workers:
                    r = time_loader(
                        shard_dir,
                        seq_len=seq_len,
                        micro_batch=args.micro_batch,
                        workers=workers,
                        world_size=world,
                        seconds=args.seconds,
                        verify=verify,
                        pin_memory=pin,
                    )
                    r["vs_124m_h100_consumption"] = round(
                        r["tokens_per_s"] / CONSUMPTION_124M_H100, 2
                    )
                    r["vs_goal"] = round(r["tokens_per_s"] / GOAL, 2)
                    r["vs_bare_reader"] = round(r["tokens_per_s"] / base["tokens_per_s"], 3)
                    runs.append(r)
                    print(
                        f"W={world:<3d} workers={workers} verify={verify}: {r['samples_per_s']:8.0f} samples/s "
                        f"{r['tokens_per_s'] / 1e6:6.2f}M tokens/s = {r['vs_124m_h100_consumption']:.1f}x the "
                        f"124M/H100 rate, {r['vs_goal']:.2f}x goal (first batch {r['first_batch_s']}s)"
                    )

    result = {
        "benchmark": "loader",
        "what": "tokens/s one rank of build_loader yields (rank 0 of a simulated world size), seq_len "
        f"{seq_len}, micro_batch {args.micro_batch}, synthetic uint16 shards of {args.shard_samples} samples",
        "config": vars(args),
        "reference": {
            "consumption_124m_h100_tokens_per_s": CONSUMPTION_124M_H100,
            "note": "reference rate a single H100 trains the 124M model at (stated, not measured here)",
            "goal_tokens_per_s_per_rank": GOAL,
        },
        "baseline_bare_reader": base,
        "runs": runs,
        "remote": remote,
        "hardware": fingerprint(measure=False),
        "load_average_1_5_15min": list(
            os.getloadavg()
        ),  # other work on the machine skews the numbers
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out = (
        Path(args.out)
        if args.out
        else (
            Path("benchmarks")
            / "results"
            / f"bench_loader-{hostname_tag()}-{time.strftime('%Y%m%d-%H%M%S')}.json"
        )
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
