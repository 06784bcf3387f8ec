"""`prepare_data(cfg)`: clean -> tokenizer -> shards, each step skipped when already done.

Used by `megapt train` when the shards are missing and by `megapt data prepare`. Each step
prints what it did or why it was skipped:

- clean: skipped when every ``stats-part*.json`` in ``<work_dir>/clean`` matches the current
  sources and rules (a split clean job of ``data.num_shards`` parts is completed part by part);
- tokenizer: trained only when ``cfg.tokenizer_path`` does not exist;
- shards: skipped when ``manifest.json`` exists and was made with this tokenizer; otherwise the
  missing jobs of the ``data.num_shards``-way split are run here, then merged.

A ``manifest.json`` written by another tokenizer is an error (never silently overwritten).
"""
from __future__ import annotations

import copy
import time
from pathlib import Path

from megapt.data.manifest import MANIFEST, ShardError, check_tokenizer, load_manifest, merge_manifests


def prepare_data(cfg, *, log=print, progress: bool | None = None, force: bool = False) -> Path:
    """Make sure ``cfg.shard_dir`` holds shards for ``cfg``; returns the shard directory.

    ``force`` cleans and shards again (the tokenizer is kept when it exists: delete it to retrain).
    """
    from megapt.data.clean import (clean_dir_of, clean_done, clean_parts, format_stats,
                                   iter_mixed_docs, keep_masks, run_clean)
    from megapt.data.shard import shard_corpus, summary
    from megapt.data.tokenizer import Tokenizer, train_tokenizer

    progress = cfg.logging.progress if progress is None else progress
    shard_dir = cfg.shard_dir
    tok_path = cfg.tokenizer_path
    t_start = time.time()

    if (shard_dir / MANIFEST).is_file() and not force:
        m = load_manifest(shard_dir)
        if not tok_path.is_file():
            raise ShardError(f"{shard_dir / MANIFEST}: shards exist but their tokenizer {tok_path} does not; "
                             f"set tokenizer.path to the .model the shards were made with")
        check_tokenizer(m, Tokenizer.load(tok_path))
        _warn_if_stale(m, cfg, log)
        log(f"prepare: shards ready in {shard_dir} ({m['splits']['train']['samples']} train samples); nothing to do")
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
            log(f"prepare: {dups} document(s) kept by one clean job duplicate another's; skipped "
                f"when read (global exact dedup)")
    else:
        log(f"prepare: cleaned text in {clean_dir} is up to date; skipped")

    t0 = time.time()
    if tok_path.is_file():
        tok = Tokenizer.load(tok_path)
        log(f"prepare: tokenizer {tok_path} exists (vocab {tok.vocab_size}); skipped")
    else:
        tok = train_tokenizer(cfg.tokenizer, iter_mixed_docs(cfg, clean_dir), tok_path, log=log,
                              progress=progress)
        log(f"prepare: trained tokenizer ({cfg.tokenizer.model_type}, vocab {tok.vocab_size}) -> {tok_path} "
            f"({time.time() - t0:.1f}s)")

    t0 = time.time()
    for i in range(k):
        m = shard_corpus(cfg, clean_dir=clean_dir, out_dir=shard_dir, tokenizer=tok, job=i, num_jobs=k,
                         progress=progress, log=log, force=force)
        log(f"prepare: shard job {i}/{k}: {summary(m)}")
    if k > 1:
        merge_manifests(shard_dir)
    m = load_manifest(shard_dir)
    log(f"prepare: shards -> {shard_dir}: {summary(m)} ({time.time() - t0:.1f}s)")
    log(f"prepare: done in {time.time() - t_start:.1f}s")
    return shard_dir


def _warn_if_stale(m: dict, cfg, log) -> None:
    """Shards are reused as they are; say so when the configured sources no longer match them."""
    from megapt.data.sources import describe_sources, sources_of

    key = lambda srcs: [(s.get("path"), s.get("weight"), s.get("fingerprint")) for s in srcs]
    now = describe_sources(sources_of(cfg.data))
    if m.get("sources") and key(m["sources"]) != key(now):
        log(f"prepare: warning: the shards in {cfg.shard_dir} were made from other sources or files "
            f"({key(m['sources'])} != {key(now)}); using them anyway - `megapt data prepare --force` rebuilds them")


def add_args(parser) -> None:
    parser.add_argument("--force", action="store_true",
                        help="clean and shard again (keeps an existing tokenizer; delete it to retrain)")


def cli_main(cfg, args) -> int:
    """Exit codes: 0 done, 2 bad config, 5 data or tokenizer error (megapt.errors)."""
    prepare_data(cfg, force=args.force)
    return 0
