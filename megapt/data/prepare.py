"""`prepare_data(cfg)`: clean -> tokenizer -> shards, each step skipped when already done.

Used by `megapt train` when the shards are missing and by `megapt data prepare`. Each step
prints what it did or why it was skipped:

- clean: skipped when every ``stats-part*.json`` in ``<work_dir>/clean`` matches the current
  sources and rules (a split clean job of ``data.num_shards`` parts is completed part by part);
- tokenizer: trained only when ``cfg.tokenizer_path`` does not exist;
- shards: skipped when ``manifest.json`` exists and was made with this tokenizer; otherwise the
  missing jobs of the ``data.num_shards``-way split are run here, then merged.

A ``manifest.json`` written by another tokenizer is an error (never silently overwritten). The
shard folder may be a URL (s3://, gs://): shards are uploaded as they are written, the manifest
last. ``ensure_data_for_ranks`` is what `megapt train` runs on every rank: rank 0 prepares while
the others wait on a status file, not in a collective.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from megapt.data.manifest import MANIFEST, check_tokenizer, load_manifest, merge_manifests
from megapt.data.remote import open_store
from megapt.data.tarformat import ShardError
from megapt.errors import UserError
from megapt.urls import join


def prepare_data(
    cfg, *, log=print, progress: bool | None = None, force: bool = False
) -> Path | str:
    """Make sure ``cfg.shard_dir`` holds shards for ``cfg``; returns the shard directory (or URL:
    the shards are uploaded there as they are written, the manifest last).

    ``force`` cleans and shards again (the tokenizer is kept when it exists: delete it to retrain).
    """
    from megapt.data.clean import (
        clean_dir_of,
        clean_done,
        clean_parts,
        format_stats,
        iter_mixed_docs,
        keep_masks,
        run_clean,
    )
    from megapt.data.shard import shard_corpus, summary
    from megapt.data.tokenizer import Tokenizer, train_tokenizer

    progress = cfg.logging.progress if progress is None else progress
    shard_dir = cfg.shard_dir
    tok_path = cfg.tokenizer_path
    t_start = time.time()

    store = open_store(shard_dir, cfg.data.remote)
    if not force and store.exists(MANIFEST):
        m: dict = load_manifest(shard_dir, cfg.data.remote)
        if not tok_path.is_file():
            raise ShardError(
                f"{join(shard_dir, MANIFEST)}: shards exist but their tokenizer "
                f"{tok_path} does not; set tokenizer.path to the .model the shards "
                f"were made with"
            )
        check_tokenizer(m, Tokenizer.load(tok_path))
        _warn_if_stale(m, cfg, log)
        log(
            f"prepare: shards ready in {shard_dir} ({m['splits']['train']['samples']} train samples); nothing to do"
        )
        return shard_dir

    k = cfg.data.num_shards
    clean_dir = clean_dir_of(cfg)
    t0 = time.time()
    todo = [i for i in range(k) if force or not clean_done(clean_dir, cfg, [i])]
    if todo:
        for i in todo:
            c = copy.deepcopy(cfg)
            c.data.shard_index = i
            st = run_clean(c, clean_dir, progress=progress)
            log(format_stats(st))
        log(f"prepare: cleaned text -> {clean_dir} ({time.time() - t0:.1f}s)")
        if k > 1 and cfg.data.clean.dedup:
            _, dups = keep_masks(clean_parts(clean_dir, k))
            log(
                f"prepare: {dups} document(s) kept by one clean job duplicate another's; skipped "
                f"when read (global exact dedup)"
            )
    else:
        log(f"prepare: cleaned text in {clean_dir} is up to date; skipped")

    t0 = time.time()
    if tok_path.is_file():
        tok = Tokenizer.load(tok_path)
        log(f"prepare: tokenizer {tok_path} exists (vocab {tok.vocab_size}); skipped")
    else:
        tok = train_tokenizer(
            cfg.tokenizer, iter_mixed_docs(cfg, clean_dir), tok_path, log=log, progress=progress
        )
        log(
            f"prepare: trained tokenizer ({cfg.tokenizer.model_type}, vocab {tok.vocab_size}) -> {tok_path} "
            f"({time.time() - t0:.1f}s)"
        )

    t0 = time.time()
    for i in range(k):
        m = shard_corpus(
            cfg,
            clean_dir=clean_dir,
            out_dir=shard_dir,
            tokenizer=tok,
            job=i,
            num_jobs=k,
            progress=progress,
            log=log,
            force=force,
        )
        log(f"prepare: shard job {i}/{k}: {summary(m)}")
    if k > 1:
        merge_manifests(shard_dir, remote=cfg.data.remote)
    m = load_manifest(shard_dir, cfg.data.remote)
    log(f"prepare: shards -> {shard_dir}: {summary(m)} ({time.time() - t0:.1f}s)")
    log(f"prepare: done in {time.time() - t_start:.1f}s")
    return shard_dir


def _warn_if_stale(m: dict, cfg, log) -> None:
    """Shards are reused as they are; say so when the configured sources no longer match them."""
    from megapt.data.sources import describe_sources, sources_of

    def key(srcs):
        return [(s.get("path"), s.get("weight"), s.get("fingerprint")) for s in srcs]

    now = describe_sources(sources_of(cfg.data))
    if m.get("sources") and key(m["sources"]) != key(now):
        log(
            f"prepare: warning: the shards in {cfg.shard_dir} were made from other sources or files "
            f"({key(m['sources'])} != {key(now)}); using them anyway - `megapt data prepare --force` rebuilds them"
        )


def add_args(parser) -> None:
    parser.add_argument(
        "--force",
        action="store_true",
        help="clean and shard again (keeps an existing tokenizer; delete it to retrain)",
    )


def cli_main(cfg, args) -> int:
    """Exit codes: 0 done, 2 bad config, 5 data or tokenizer error (megapt.errors)."""
    prepare_data(cfg, force=args.force)
    return 0


# --------------------------------------------------------------------------------------------
# Every rank of a training job: data ready before the model is built
# --------------------------------------------------------------------------------------------

POLL_S = 1.0  # how often waiting ranks look at rank 0's status file
REPORT_S = 30.0  # how often they log that they are still waiting
HEARTBEAT_S = 5.0  # how often rank 0 refreshes its status file while it prepares
STALE_S = 900.0  # a status file this old: rank 0 died while preparing
PROBE_WAIT_S = 60.0  # how long ranks look for rank 0's probe file (attribute caches of NFS)
PROBE_WAIT_ENV = "MEGAPT_PROBE_WAIT_S"  # overrides PROBE_WAIT_S


def ensure_data_for_ranks(
    cfg,
    *,
    rank: int,
    world_size: int,
    gather: Callable[[Any], list],
    log: Callable[[str], None] = print,
) -> Path | str:
    """Shards and tokenizer ready on every rank of a job; returns the shard folder or URL.

    ``gather(obj)`` is an all-gather over the job's ranks (megapt.train.dist.all_gather_object);
    it is only used for short exchanges that every rank reaches at once, so no rank ever waits
    inside a collective while the data is prepared (that would fail after
    ``train.collective_timeout_s`` on any corpus that takes longer):

    1. every rank checks for ``manifest.json`` and the tokenizer; the ranks agree on the result.
    2. a URL ``shard_dir`` is never prepared here: without its manifest every rank stops with an
       error saying to run ``megapt data prepare`` (which uploads) first.
    3. otherwise rank 0 writes a probe file into the shard and tokenizer folders and every rank
       looks for it (every second, all together, for up to ``$MEGAPT_PROBE_WAIT_S``, default
       60 s, as NFS may show a new file late): a rank that does not see it (another node
       without shared storage) makes every rank stop with an error saying to prepare the data
       on shared storage or on every node first.
    4. rank 0 prepares the data and writes its progress to a status file in the shard folder
       every few seconds; the other ranks poll that file (logging every 30 s) without a timeout,
       and end with rank 0's error when it fails (or when the file goes stale: rank 0 died).
    """
    shard_dir, tok_path = cfg.shard_dir, cfg.tokenizer_path
    remote = isinstance(shard_dir, str)
    store = open_store(shard_dir, cfg.data.remote)
    have = store.exists(MANIFEST) and tok_path.is_file()
    states = gather((bool(have), socket.gethostname()))
    if all(ok for ok, _ in states):
        return shard_dir
    missing = [r for r, (ok, _) in enumerate(states) if not ok]
    if remote:
        what = (
            f"{join(shard_dir, MANIFEST)} not found"
            if not store.exists(MANIFEST)
            else f"ranks {missing} have no tokenizer {tok_path}"
        )
        raise ShardError(
            f"{what}: train reads shards from a URL but does not make them; run "
            f"`megapt data prepare --data.shard_dir={shard_dir}` (it uploads the "
            f"shards, the manifest last) or check the URL"
        )
    if world_size == 1:
        return prepare_data(cfg, log=log)

    nonce = uuid.uuid4().hex[:12] if rank == 0 else None
    probe_dirs = [Path(shard_dir), tok_path.parent]
    if rank == 0:
        for d in probe_dirs:
            d.mkdir(parents=True, exist_ok=True)
            (d / f".megapt-probe-{nonce}").write_text(socket.gethostname())
    nonce = gather(nonce)[0]
    probes = [d / f".megapt-probe-{nonce}" for d in probe_dirs]
    # a shared filesystem may show a new file to other nodes only after its attribute cache
    # expires (NFS: up to ~30-60 s): look again every second, all ranks together, a while
    wait_s = float(os.environ.get(PROBE_WAIT_ENV, PROBE_WAIT_S))
    deadline = time.monotonic() + wait_s
    while True:
        seen = gather(all(p.is_file() for p in probes))
        if all(seen) or time.monotonic() >= deadline:
            break
        time.sleep(POLL_S)
    if rank == 0:
        for p in probes:
            p.unlink(missing_ok=True)
    blind = [r for r, ok in enumerate(seen) if not ok]
    if blind:
        hosts = sorted({states[r][1] for r in blind})
        raise ShardError(
            f"data is missing ({join(shard_dir, MANIFEST)} or {tok_path} on ranks {missing}) and "
            f"ranks {blind} (host(s) {', '.join(hosts)}) do not see the files rank 0 writes to "
            f"{shard_dir} and {tok_path.parent}: they are not on storage shared by every node, so "
            f"data prepared by rank 0 would never reach them. Prepare the data before training: "
            f"`megapt data prepare -c <config>` on every node (or on shared storage, or one Slurm "
            f"array job per data.shard_index then `megapt data merge`), or set data.shard_dir to "
            f"a shared folder or an s3:// / gs:// URL"
        )

    status = Path(shard_dir) / f".megapt-prepare-{nonce}.json"
    if rank == 0:
        _prepare_on_rank0(cfg, status, log)
    else:
        _wait_for_rank0(status, rank, log)
    gather(None)  # every rank is past preparation: a short exchange
    if rank == 0:
        status.unlink(missing_ok=True)
    return shard_dir


def _write_status(path: Path, **fields: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"time": time.time(), **fields}))
    os.replace(tmp, path)


def _prepare_on_rank0(cfg, status: Path, log: Callable[[str], None]) -> None:
    last = {"line": "starting"}
    stop = threading.Event()

    def tee(line: str) -> None:
        last["line"] = str(line).splitlines()[-1][:300] if str(line) else last["line"]
        log(line)

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            _write_status(status, state="running", last=last["line"])

    log(
        f"prepare: rank 0 prepares the data; the other ranks wait on {status.name} "
        f"(no collective timeout)"
    )
    _write_status(status, state="running", last=last["line"])
    t = threading.Thread(target=beat, daemon=True, name="megapt-prepare-heartbeat")
    t.start()
    try:
        prepare_data(cfg, log=tee)
    except BaseException as exc:
        stop.set()
        t.join()
        user = exc if isinstance(exc, UserError) else None
        _write_status(
            status,
            state="failed",
            message=str(exc) if user else repr(exc),
            exit_code=user.exit_code if user else None,
            kind=user.kind if user else None,
        )
        raise
    stop.set()
    t.join()
    _write_status(status, state="done")


def _wait_for_rank0(status: Path, rank: int, log: Callable[[str], None]) -> None:
    t0 = next_report = time.monotonic()
    while True:
        try:
            st = json.loads(status.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            st = {"state": "starting", "time": time.time()}
        if st["state"] == "done":
            log(f"prepare: rank {rank}: data ready after {time.monotonic() - t0:.1f} s of waiting")
            return
        if st["state"] == "failed":
            if st.get("exit_code") is None:  # a bug on rank 0: its traceback is there
                raise RuntimeError(f"rank 0 failed to prepare the data: {st['message']}")
            err = UserError(f"rank 0 failed to prepare the data: {st['message']}")
            err.exit_code, err.kind = st["exit_code"], st["kind"]
            raise err
        age = time.time() - float(st.get("time", time.time()))
        if age > STALE_S:
            raise ShardError(
                f"{status}: rank 0 has not updated its data preparation status for "
                f"{age:.0f} s (killed?); run `megapt data prepare` before training"
            )
        now = time.monotonic()
        if now >= next_report:
            if now > t0:
                log(
                    f"prepare: rank {rank}: waiting for rank 0 to prepare the data "
                    f"({now - t0:.0f} s so far; rank 0: {st.get('last', '...')})"
                )
            next_report = now + REPORT_S
        time.sleep(POLL_S)
