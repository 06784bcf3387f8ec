"""Tokenize the cleaned corpus in parallel and write WebDataset tar shards + a manifest.

The cleaned corpus (sources weighted and mixed, seeded) is grouped into blocks of ~1 MB of
consecutive documents. A process pool (``data.num_proc``, 0 = the cores this process may use)
tokenizes the blocks, results are taken in order; within a block each document is followed by
EOS, packed back to back and cut into samples of ``seq_len + 1`` tokens (no overlap); the
block's trailing partial sample is dropped and counted (``dropped_tokens``, ~0.1% of the tokens
at seq_len 256). A document goes to ``val`` when a hash of its text falls under
``data.val_fraction``, so the split depends neither on the order nor on the number of jobs or
processes. Blocks being the packing unit, a K-way split run (job i takes blocks i, i+K, ...)
produces exactly the samples of a single job.

Every shard is written to ``<name>.tmp`` and renamed when complete; the (partial) manifest is
written last. A rerun removes this job's leftover ``.tmp`` files and skips the job when its
manifest matches the current inputs, tokenizer and parameters; otherwise it rewrites the job's
shards from scratch. A split run (``--data.num_shards=K --data.shard_index=i``) takes every K-th
document and writes ``manifest-part-i-of-K.json``; ``megapt data merge`` joins them.

    write_token_dataset(out_dir, {"train": arrays, "val": arrays}, seq_len=16, vocab_size=500)
    shard_corpus(cfg)              # what `megapt data shard` runs
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from megapt.data.manifest import (
    MANIFEST,
    atomic_write_json,
    build_manifest,
    merge_manifests,
    part_name,
    read_manifest,
)
from megapt.data.remote import RemoteStore, Store, cache_root, open_store, set_dirname, write_json
from megapt.data.tarformat import ShardError, ShardWriter, dtype_for_vocab, write_shards
from megapt.data.workers import die_with_parent
from megapt.urls import location

# --------------------------------------------------------------------------------------------
# Token arrays -> a complete shard set (reusable by tests and other tools)
# --------------------------------------------------------------------------------------------


def write_token_dataset(
    out_dir: str | os.PathLike,
    splits: dict[str, Iterable[np.ndarray]],
    *,
    seq_len: int,
    vocab_size: int,
    eos_id: int = 1,
    pad_id: int = 2,
    tokenizer_sha256: str = "",
    shard_samples: int = 2048,
    job: int = 0,
    num_jobs: int = 1,
) -> dict:
    """Write complete shards + ``manifest.json`` (or a partial manifest when ``num_jobs > 1``).

    ``splits`` maps "train"/"val" to iterables of ``seq_len + 1``-token arrays. Handy to build
    test fixtures for the loader without a tokenizer.
    """
    out_dir = Path(out_dir)
    dtype = dtype_for_vocab(vocab_size)
    entries = {
        split: write_shards(
            arrs,
            out_dir,
            split,
            job,
            sample_len=seq_len + 1,
            dtype=dtype,
            shard_samples=shard_samples,
        )
        for split, arrs in splits.items()
    }
    m = build_manifest(
        seq_len=seq_len,
        vocab_size=vocab_size,
        eos_id=eos_id,
        pad_id=pad_id,
        tokenizer_sha256=tokenizer_sha256,
        splits=entries,
        num_jobs=num_jobs,
        done=[job],
        docs={s: 0 for s in ("train", "val")},
    )
    atomic_write_json(out_dir / (MANIFEST if num_jobs == 1 else part_name(job, num_jobs)), m)
    return m


# --------------------------------------------------------------------------------------------
# Tokenize + pack (runs in worker processes)
# --------------------------------------------------------------------------------------------

BLOCK_BYTES = 1 << 20  # packing unit: documents are grouped into ~1 MB blocks of the input stream

_WORKER: dict = {}


def is_val(text: str, val_fraction: float) -> bool:
    """Deterministic held-out choice from the document text alone (order/job/process independent)."""
    if val_fraction <= 0:
        return False
    h = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < val_fraction


def _init_worker(
    tokenizer, sample_len: int, dtype: str, val_fraction: float, parent_pid: int = 0
) -> None:
    if parent_pid:  # a pool worker: die with the shard job (megapt.data.workers)
        die_with_parent(parent_pid)
    _WORKER.update(
        tok=tokenizer, sample_len=sample_len, dtype=np.dtype(dtype), val_fraction=val_fraction
    )


def _pack(docs: list[np.ndarray], eos: int, sample_len: int, dtype) -> tuple[np.ndarray, int]:
    """Join docs (each + EOS), cut into rows of sample_len; returns (samples, dropped tail tokens)."""
    if not docs:
        return np.empty((0, sample_len), dtype=dtype), 0
    eos_arr = np.array([eos], dtype=dtype)
    flat = np.concatenate([a for d in docs for a in (d, eos_arr)])
    n = len(flat) // sample_len
    return flat[: n * sample_len].reshape(n, sample_len), len(flat) - n * sample_len


def _process_block(lines: list[bytes]) -> dict:
    """Parse, split, tokenize and pack one block of jsonl lines."""
    import json

    w = _WORKER
    tok = w["tok"]
    texts: dict[str, list[str]] = {"train": [], "val": []}
    nbytes = 0
    for line in lines:
        text = json.loads(line)["text"]
        nbytes += len(line)
        texts["val" if is_val(text, w["val_fraction"]) else "train"].append(text)
    out: dict = {"bytes": nbytes}
    for split, tx in texts.items():
        ids = tok.encode_arrays(tx, w["dtype"]) if tx else []
        samples, dropped = _pack(ids, tok.eos_id, w["sample_len"], w["dtype"])
        out[split] = samples
        out[f"{split}_docs"] = len(tx)
        out[f"{split}_dropped"] = dropped
        out[f"{split}_tokens_in"] = sum(len(d) + 1 for d in ids)
    return out


def iter_blocks(
    lines: Iterable[bytes], block_bytes: int, num_jobs: int = 1, job: int = 0
) -> Iterator[list[bytes]]:
    """Group the stream into ~block_bytes blocks; yield the blocks b with b % num_jobs == job."""
    buf: list[bytes] = []
    size = b = 0
    for line in lines:
        buf.append(line)
        size += len(line)
        if size >= block_bytes:
            if b % num_jobs == job:
                yield buf
            buf, size, b = [], 0, b + 1
    if buf and b % num_jobs == job:
        yield buf


def _ordered_map(fn, items: Iterator, num_proc: int, initargs: tuple) -> Iterator:
    """``map`` in order over a process pool with a bounded number of blocks in flight."""
    if num_proc <= 1:
        _init_worker(*initargs)
        for it in items:
            yield fn(it)
        return
    import collections
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # no fork of a parent that may hold torch/OpenMP threads
    with ctx.Pool(num_proc, initializer=_init_worker, initargs=(*initargs, os.getpid())) as pool:
        pending: collections.deque = collections.deque()
        for it in items:
            pending.append(pool.apply_async(fn, (it,)))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# --------------------------------------------------------------------------------------------
# The shard job
# --------------------------------------------------------------------------------------------


def available_cores() -> int:
    """Cores this process may run on (Slurm/cgroup affinity), not the machine's total."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _input_fingerprint(clean_dir: Path) -> str:
    from megapt.data.clean import clean_files

    h = hashlib.sha256()
    for files in clean_files(clean_dir):
        for f in files:
            st = f.stat()
            h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _job_is_done(store: Store, part: str, params: dict) -> bool:
    try:
        m = read_manifest(store, part)
    except ShardError:
        return False
    if m.get("params") != params:
        return False
    listing = store.list()
    return all(
        listing.get(e["name"]) == e["bytes"] for s in m["splits"].values() for e in s["shards"]
    )


def _remove_job_outputs(store: Store, job: int, num_jobs: int) -> None:
    names = list(store.list())
    stale = {
        n
        for n in names
        if fnmatch.fnmatch(n, f"*-{job:03d}-*.tar*") and n.split("-")[0] in ("train", "val")
    }  # *.tar and leftover *.tar.tmp
    # an earlier run split into another number of jobs: its partial manifests (and the shards of
    # jobs that no longer exist) would make `data merge` fail or waste space
    stale |= {
        n
        for n in names
        if fnmatch.fnmatch(n, "manifest-part-*-of-*.json")
        and not n.endswith(f"-of-{num_jobs:03d}.json")
    }
    for n in names:
        parts = n.split("-")
        if (
            len(parts) == 3
            and parts[0] in ("train", "val")
            and parts[1].isdigit()
            and int(parts[1]) >= num_jobs
            and ".tar" in parts[2]
        ):
            stale.add(n)
    # first the manifests that list this job's shards (stale from now on), then the files
    for n in [MANIFEST, part_name(job, num_jobs)] + sorted(stale):
        if n in names:
            store.delete(n)


def shard_corpus(
    cfg,
    *,
    clean_dir: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    tokenizer=None,
    job: int | None = None,
    num_jobs: int | None = None,
    num_proc: int | None = None,
    block_bytes: int = BLOCK_BYTES,
    force: bool = False,
    progress: bool = True,
    log=print,
) -> dict:
    """Tokenize this job's part of the cleaned corpus into shards; returns its (partial) manifest.

    With one job the manifest is also merged into ``manifest.json``. The returned dict has an
    extra ``"_run"`` entry with timing (not written to disk); ``"_run"["skipped"]`` is True when
    the job was already complete.
    """
    import time

    from tqdm import tqdm

    from megapt.data.clean import clean_dir_of, clean_files, iter_mixed_lines
    from megapt.data.sources import DataError, describe_sources, sources_of
    from megapt.data.tokenizer import Tokenizer

    d = cfg.data
    k = d.num_shards if num_jobs is None else num_jobs
    i = d.shard_index if job is None else job
    clean_dir = Path(clean_dir) if clean_dir else clean_dir_of(cfg)
    out_dir = (
        location(out_dir if isinstance(out_dir, Path) else str(out_dir))
        if out_dir
        else cfg.shard_dir
    )
    store = open_store(out_dir, d.remote)
    tok = tokenizer if tokenizer is not None else Tokenizer.load(cfg.tokenizer_path)
    nproc = num_proc if num_proc is not None else (d.num_proc or available_cores())
    params = {
        "seq_len": d.seq_len,
        "shard_samples": d.shard_samples,
        "val_fraction": d.val_fraction,
        "tokenizer_sha256": tok.sha256,
        "num_shards": k,
        "shard_index": i,
        "block_bytes": block_bytes,
        "seed": cfg.run.seed,
        "weights": [s.weight for s in sources_of(d)],
        "input": _input_fingerprint(clean_dir),
    }
    if isinstance(store, RemoteStore):  # shards are written here, each uploaded once finished
        store.check_writable()
        stage = cache_root(d.remote) / "upload" / set_dirname(store.root)
    else:
        stage = store.root
    stage.mkdir(parents=True, exist_ok=True)
    part = part_name(i, k)
    for stale in stage.glob(f"*-{i:03d}-*.tar*"):  # a killed run of this job
        if stale.name.endswith(".tmp") or store.is_remote:
            stale.unlink()
    m: dict
    if not force and _job_is_done(store, part, params):
        m = read_manifest(store, part)
        if k == 1 and not store.exists(MANIFEST):
            merge_manifests(out_dir, remote=d.remote)
        log(
            f"shard: job {i}/{k} already complete in {out_dir} ({m['splits']['train']['samples']} train samples); "
            f"--force to redo"
        )
        m["_run"] = {"skipped": True}
        return m
    _remove_job_outputs(store, i, k)

    total_bytes = sum(f.stat().st_size for files in clean_files(clean_dir) for f in files)
    log(
        f"shard: job {i}/{k} of {total_bytes / 1e6:.1f} MB cleaned text -> {out_dir}, {nproc} proc, "
        f"tokenizer encoder {tok.encoder_path}"
        + (f" ({tok.encoder_note})" if tok.encoder_note else "")
    )
    sample_len = d.seq_len + 1
    dtype = dtype_for_vocab(tok.vocab_size)

    def upload(path: Path, entry: dict) -> None:  # atomic: the object appears once complete
        store.put(path, entry["name"])
        path.unlink()

    writers = {
        s: ShardWriter(
            stage,
            s,
            i,
            sample_len=sample_len,
            dtype=dtype,
            shard_samples=d.shard_samples,
            on_shard=upload if store.is_remote else None,
        )
        for s in ("train", "val")
    }
    docs = {"train": 0, "val": 0}
    dropped = nbytes = tokens_in = 0
    t0 = time.time()
    bar = tqdm(
        total=total_bytes // k,
        unit="B",
        unit_scale=True,
        desc=f"shard {i}/{k}",
        disable=not progress,
        mininterval=1.0,
    )
    try:
        blocks = iter_blocks(iter_mixed_lines(cfg, clean_dir), block_bytes, k, i)
        for res in _ordered_map(
            _process_block, blocks, nproc, (tok, sample_len, dtype, d.val_fraction)
        ):
            for split in ("train", "val"):
                writers[split].add_many(res[split])
                docs[split] += res[f"{split}_docs"]
                dropped += res[f"{split}_dropped"]
                tokens_in += res[f"{split}_tokens_in"]
            nbytes += res["bytes"]
            bar.update(res["bytes"])
        entries = {s: w.close() for s, w in writers.items()}
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        bar.close()
    seconds = time.time() - t0
    if docs["train"] + docs["val"] == 0 and k == 1:
        raise DataError(
            f"shard: no documents in {clean_dir} (empty input); check data.sources and run "
            f"`megapt data clean`"
        )
    if k == 1 and not entries["train"]:
        raise DataError(
            f"shard: the corpus is too small: {tokens_in} tokens in {docs['train']} training documents "
            f"give no complete sample of seq_len+1={sample_len} tokens; add text or lower data.seq_len"
        )
    m = build_manifest(
        seq_len=d.seq_len,
        vocab_size=tok.vocab_size,
        eos_id=tok.eos_id,
        pad_id=tok.pad_id,
        tokenizer_sha256=tok.sha256,
        splits=entries,
        sources=describe_sources(sources_of(d)),
        docs=docs,
        dropped_tokens=dropped,
        num_jobs=k,
        done=[i],
        params=params,
    )
    write_json(store, part, m)  # after every shard of the job is in place
    if k == 1:
        merge_manifests(out_dir, remote=d.remote)  # manifest.json last
    if d.val_fraction > 0 and not entries["val"] and k == 1:
        log(
            f"shard: warning: no validation sample (val_fraction={d.val_fraction}, {docs['val']} val docs); "
            f"raise data.val_fraction or add text"
        )
    m["_run"] = {
        "skipped": False,
        "seconds": seconds,
        "bytes": nbytes,
        "tokens": tokens_in,
        "num_proc": nproc,
        "mb_per_s": nbytes / 1e6 / max(seconds, 1e-9),
    }
    return m


def summary(m: dict) -> str:
    r = m.get("_run", {})
    tr, va = m["splits"]["train"], m["splits"]["val"]
    s = (
        f"train {tr['samples']} samples / {len(tr['shards'])} shards, val {va['samples']} samples / "
        f"{len(va['shards'])} shards, docs {m['docs']['train']}+{m['docs']['val']}, "
        f"dropped tail tokens {m['dropped_tokens']}"
    )
    if r and not r.get("skipped"):
        s += (
            f"; {r['bytes'] / 1e6:.1f} MB -> {r['tokens']} tokens in {r['seconds']:.1f}s "
            f"({r['mb_per_s']:.2f} MB/s with {r['num_proc']} proc)"
        )
    return s


# --------------------------------------------------------------------------------------------
# CLI: `megapt data shard`
# --------------------------------------------------------------------------------------------


def add_args(parser) -> None:
    parser.add_argument(
        "--input", default="", help="cleaned-text folder (default: <work_dir>/clean)"
    )
    parser.add_argument(
        "--out",
        default="",
        help="shard folder or s3:// / gs:// URL (shards are "
        "uploaded as they finish, the manifest last; default: data.shard_dir)",
    )
    parser.add_argument("--num-shards", type=int, default=None, help="same as --data.num_shards")
    parser.add_argument("--shard-index", type=int, default=None, help="same as --data.shard_index")
    parser.add_argument(
        "--force", action="store_true", help="rewrite this job's shards even if complete"
    )


def cli_main(cfg, args) -> int:
    """Exit codes: 0 done, 2 bad config / split flags, 5 data or tokenizer error (megapt.errors)."""
    from megapt.data.sources import apply_split_args

    apply_split_args(cfg.data, args)
    out = location(args.out) if args.out else cfg.shard_dir
    m = shard_corpus(
        cfg,
        clean_dir=args.input or None,
        out_dir=out,
        force=args.force,
        progress=cfg.logging.progress,
    )
    k, i = cfg.data.num_shards, cfg.data.shard_index
    print(f"shard: job {i}/{k}: {summary(m)} -> {out}")
    if k > 1:
        print(
            f"shard: wrote {part_name(i, k)}; once all {k} jobs are done run `megapt data merge` "
            f"with the same config"
        )
    return 0
