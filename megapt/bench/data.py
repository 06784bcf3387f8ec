"""Tokenize + shard throughput on the built-in corpus (Python stdlib), 1 vs 2 processes.

Cleans the stdlib corpus and trains the tokenizer once (cached in --work-dir), then times
``shard_corpus`` (read cleaned jsonl -> split -> tokenize -> pack -> tar shards + sha256 +
manifest) with each process count. Reports MB of cleaned text per second (wall clock), the same
per core, the scaling 1 -> N processes, and MB per CPU-second (robust when other jobs share the
machine; the load average is recorded too). Goal: >= 5 MB/s per core, near-linear scaling.

The baseline measured in the same run is plain ``SentencePieceProcessor.encode`` (one thread, no
segment cache, no packing or writing) on the same documents, beside the encoder the shard job
uses (``Tokenizer.encoder_path``: the C segment cache when built) and the pure-Python segment
cache it falls back to, each checked to give the baseline's ids; the prepare_data time of the
whole chain (clean + tokenizer + shards) is recorded when it runs cold.

    megapt bench data                                                  # ~1-2 min on 2 cores
    megapt bench data --script-args "--procs 1 2 4 --vocab 4096 --seq-len 256"
    python -m megapt.bench.data --procs 1 2                            # the same, directly

Writes benchmarks/results/bench_data-<host>-<time>.json under the current folder (or --out).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import sentencepiece

from megapt.bench.fingerprint import fingerprint, hostname_tag
from megapt.config import load_config
from megapt.data.clean import clean_dir_of, iter_mixed_docs
from megapt.data.prepare import prepare_data
from megapt.data.shard import shard_corpus
from megapt.data.tarformat import dtype_for_vocab
from megapt.data.tokenizer import Tokenizer

GOAL_MB_S_PER_CORE = 5.0


def _fingerprint() -> dict:
    fp = fingerprint(measure=False)
    fp["software"]["sentencepiece"] = sentencepiece.__version__
    return fp


@contextlib.contextmanager
def _without_c_extension():
    """Inside, `import megapt.data._segcache` fails: a Tokenizer made here takes its Python fallback."""
    name = "megapt.data._segcache"
    saved = sys.modules.get(name)
    sys.modules[name] = None
    try:
        yield
    finally:
        if saved is None:
            del sys.modules[name]
        else:
            sys.modules[name] = saved


def _cpu_seconds() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--work-dir", default=".megapt_cache/bench_data", help="cache for cleaned text + tokenizer"
    )
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    ap.add_argument(
        "--input-sentence-size",
        type=int,
        default=None,
        help="tokenizer training sample (text pieces of <= 2048 chars); default: the config's",
    )
    ap.add_argument(
        "--baseline-docs", type=int, default=300, help="documents for the plain-encode baseline"
    )
    ap.add_argument(
        "--source",
        action="append",
        default=[],
        help="extra/other input (a folder of .py files, text, jsonl...); default: the built-in stdlib "
        "corpus only. A bigger input shows the process scaling once fixed start-up costs amortise",
    )
    ap.add_argument(
        "--out",
        default="",
        help="output JSON (default: benchmarks/results/bench_data-<host>-<time>.json)",
    )
    args = ap.parse_args(argv)

    work = Path(args.work_dir)
    cfg = load_config(
        None,
        [
            f"--run.work_dir={work}",
            f"--tokenizer.vocab_size={args.vocab}",
            f"--tokenizer.model_type={args.model_type}",
            f"--data.seq_len={args.seq_len}",
            "--logging.progress=false",
        ]
        + (
            [f"--tokenizer.input_sentence_size={args.input_sentence_size}"]
            if args.input_sentence_size
            else []
        )
        + (
            [
                f"--data.sources={json.dumps([{'path': 'stdlib'}] + [{'path': x} for x in args.source])}"
            ]
            if args.source
            else []
        ),
    )
    cold = not cfg.tokenizer_path.is_file()
    t0, c0 = time.time(), _cpu_seconds()
    prepare_data(cfg, log=lambda s: print("  " + s))
    prepare = {
        "cold": cold,
        "seconds": round(time.time() - t0, 2),
        "cpu_seconds": round(_cpu_seconds() - c0, 2),
        "loadavg_after": os.getloadavg(),
    }
    clean_mb = sum(f.stat().st_size for f in clean_dir_of(cfg).glob("src*.jsonl")) / 1e6

    # baseline: plain sentencepiece encode, one thread, no cache
    tok = Tokenizer.load(cfg.tokenizer_path)
    docs = [d for _, d in zip(range(args.baseline_docs), iter_mixed_docs(cfg))]
    mb = sum(len(d.encode()) for d in docs) / 1e6
    c = time.process_time()
    t = time.time()
    base_ids = tok.sp.encode(docs, num_threads=1)
    base = {
        "what": "SentencePieceProcessor.encode, 1 thread, no segment cache",
        "docs": len(docs),
        "mb": round(mb, 2),
        "mb_per_s": round(mb / (time.time() - t), 3),
        "mb_per_cpu_s": round(mb / (time.process_time() - c), 3),
    }
    # the encoder the shard job uses (cold cache: every segment is new at first), then the pure-Python
    # segment cache it falls back to without the C extension; both must give the plain ids
    dtype = np.dtype(dtype_for_vocab(tok.vocab_size))
    want = [np.array(ids, dtype=dtype) for ids in base_ids]
    encoders = {}
    for name, ctx in (
        ("active", contextlib.nullcontext()),
        ("python_fallback", _without_c_extension()),
    ):
        with ctx:
            fresh = Tokenizer.load(cfg.tokenizer_path)
        if name != "active" and fresh.encoder_path == tok.encoder_path:
            continue  # no C extension here: the active encoder is the fallback already
        c = time.process_time()
        got = fresh.encode_arrays(docs, dtype)
        cpu = time.process_time() - c
        encoders[name] = {
            "encoder_path": fresh.encoder_path,
            "mb_per_cpu_s": round(mb / cpu, 3),
            "identical_ids": len(got) == len(want) and all(map(np.array_equal, got, want)),
        }
    base["encoder_path"] = tok.encoder_path
    base["encoder_note"] = tok.encoder_note
    base["encoders"] = encoders
    print(
        f"baseline encode: {base['mb_per_cpu_s']:.2f} MB/cpu-s plain sentencepiece; "
        + ", ".join(
            f"{e['encoder_path']} {e['mb_per_cpu_s']:.2f} (identical ids: {e['identical_ids']})"
            for e in encoders.values()
        )
    )

    runs = []
    for n in args.procs:
        out = Path(tempfile.mkdtemp(prefix=f"bench_data_p{n}_"))
        try:
            load0 = os.getloadavg()[0]
            c0 = _cpu_seconds()
            t0 = time.time()
            m = shard_corpus(
                cfg,
                out_dir=out,
                tokenizer=Tokenizer.load(cfg.tokenizer_path),
                num_proc=n,
                progress=False,
                force=True,
                log=lambda s: None,
            )
            wall = time.time() - t0
            cpu = _cpu_seconds() - c0
            r = m["_run"]
            runs.append(
                {
                    "num_proc": n,
                    "seconds": round(wall, 2),
                    "cpu_seconds": round(cpu, 2),
                    "mb": round(r["bytes"] / 1e6, 2),
                    "tokens": r["tokens"],
                    "mb_per_s": round(r["bytes"] / 1e6 / wall, 3),
                    "mb_per_s_per_core": round(r["bytes"] / 1e6 / wall / n, 3),
                    "mb_per_cpu_s": round(r["bytes"] / 1e6 / cpu, 3),
                    "tokens_per_s": round(r["tokens"] / wall),
                    "train_samples": m["splits"]["train"]["samples"],
                    "encoder_path": tok.encoder_path,
                    "shards": len(m["splits"]["train"]["shards"])
                    + len(m["splits"]["val"]["shards"]),
                    "loadavg_1m_before": load0,
                    "loadavg_1m_after": os.getloadavg()[0],
                }
            )
            print(
                f"shard with {n} proc: {runs[-1]['mb_per_s']:.2f} MB/s = "
                f"{runs[-1]['mb_per_s_per_core']:.2f} MB/s/core "
                f"({runs[-1]['mb_per_cpu_s']:.2f} MB/cpu-s), {wall:.1f}s, load {load0:.1f}"
            )
        finally:
            shutil.rmtree(out, ignore_errors=True)
    one = next((r for r in runs if r["num_proc"] == 1), None)
    for r in runs:
        r["speedup_vs_1"] = round(one["seconds"] / r["seconds"], 3) if one else None
        r["scaling_efficiency"] = round(r["speedup_vs_1"] / r["num_proc"], 3) if one else None
        r["vs_plain_encode_baseline"] = round(r["mb_per_s_per_core"] / base["mb_per_s"], 3)

    doc = {
        "benchmark": "bench_data",
        "what": "tokenize + pack + write shards of the cleaned stdlib corpus",
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "argv": sys.argv[1:],
        "config": {
            "vocab_size": args.vocab,
            "model_type": args.model_type,
            "seq_len": args.seq_len,
            "input_sentence_size": cfg.tokenizer.input_sentence_size,
            "shard_samples": cfg.data.shard_samples,
            "val_fraction": cfg.data.val_fraction,
            "clean_mb": round(clean_mb, 2),
        },
        "goal": {"mb_per_s_per_core": GOAL_MB_S_PER_CORE, "scaling": "near-linear"},
        "fingerprint": _fingerprint(),
        "loadavg_at_end": os.getloadavg(),
        "note": "the machine may be shared: compare mb_per_cpu_s when the load average exceeds the core count",
        "prepare_data": prepare,
        "baseline": base,
        "runs": runs,
    }
    stamp = time.strftime("%Y%m%d-%H%M%S")
    default = Path("benchmarks") / "results" / f"bench_data-{hostname_tag()}-{stamp}.json"
    path = Path(args.out) if args.out else default
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
