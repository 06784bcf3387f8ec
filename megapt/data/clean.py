"""Normalise, filter and deduplicate raw documents (``data.clean``); count what was dropped and why.

Per document, in order: newlines to ``\\n``; Unicode NFKC (``nfkc``); control characters removed
except ``\\n`` and ``\\t`` (``strip_control``); trailing spaces stripped and runs of more than two
blank lines collapsed to two, leading/trailing blank lines removed (``normalize_whitespace``).
Then filters, each counted under its reason: ``too_short`` (< ``min_chars``), ``too_long``
(> ``max_chars``), ``symbols`` (non-alphanumeric, non-space share > ``max_non_alnum_frac``),
``few_letters`` (letter share < ``min_alpha_frac``), ``duplicate`` (same cleaned text seen before
in this job, ``dedup``).

`megapt data clean` writes ``<work_dir>/clean/src{j:02d}-part{i:03d}-of{K:03d}.jsonl`` (one
``{"text": ...}`` per line, source j, job i of K) and ``stats-part{i:03d}-of{K:03d}.json``;
each file is written to ``.tmp`` and renamed, the stats file last (it marks the job as done).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import string
import time
import unicodedata
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Iterator, Optional

from megapt.config import CleanConfig
from megapt.data.sources import (DataError, ReadStats, apply_split_args, describe_sources, iter_source,
                                 sources_of)

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # Unicode category Cc except \t (09) and \n (0a)
_CONTROL_BYTES = bytes([*range(0x00, 0x09), *range(0x0B, 0x20), 0x7F])  # the ASCII part of _CONTROL
_BLANKS = re.compile(r"\n{4,}")  # more than two blank lines
_NON_ASCII = re.compile(r"[^\x00-\x7f]+")
_ASCII_LETTERS = string.ascii_letters.encode()
_ASCII_ALNUM_SPACE = (string.ascii_letters + string.digits + string.whitespace).encode()

REASONS = ("empty", "too_short", "too_long", "symbols", "few_letters", "duplicate")


def normalize(text: str, cc: CleanConfig) -> str:
    """Apply the text transformations of ``cc`` (no filtering). Fast paths for clean ASCII."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    ascii_ = text.isascii()
    if cc.nfkc and not ascii_:
        text = unicodedata.normalize("NFKC", text)
    if cc.strip_control:
        if ascii_:
            b = text.encode("ascii")
            stripped = b.translate(None, _CONTROL_BYTES)
            if len(stripped) != len(b):
                text = stripped.decode("ascii")
        else:
            text = _CONTROL.sub("", text)
    if cc.normalize_whitespace:
        if " \n" in text or "\t\n" in text or text.endswith((" ", "\t")):
            text = "\n".join(line.rstrip(" \t") for line in text.split("\n"))
        if "\n\n\n\n" in text:
            text = _BLANKS.sub("\n\n\n", text)
        text = text.strip("\n")
    return text


def char_fractions(text: str) -> tuple[float, float]:
    """(letter share, share of characters that are neither alphanumeric nor whitespace)."""
    n = len(text)
    if n == 0:
        return 0.0, 0.0
    b = text.encode("utf-8", "surrogatepass")
    # ASCII characters counted on the bytes (non-ASCII bytes are >= 0x80 and never deleted) ...
    letters = len(b) - len(b.translate(None, _ASCII_LETTERS))
    alnum_space = len(b) - len(b.translate(None, _ASCII_ALNUM_SPACE))
    if len(b) != n:  # ... and the rare non-ASCII characters one by one
        for run in _NON_ASCII.findall(text):
            for ch in run:
                if ch.isalpha():
                    letters += 1
                    alnum_space += 1
                elif ch.isalnum() or ch.isspace():
                    alnum_space += 1
    return letters / n, (n - alnum_space) / n


def reject_reason(text: str, cc: CleanConfig) -> Optional[str]:
    """Why a cleaned document is dropped (one of REASONS except duplicate), or None to keep it."""
    if not text.strip():
        return "empty"
    if len(text) < cc.min_chars:
        return "too_short"
    if len(text) > cc.max_chars:
        return "too_long"
    alpha, symbols = char_fractions(text)
    if symbols > cc.max_non_alnum_frac:
        return "symbols"
    if alpha < cc.min_alpha_frac:
        return "few_letters"
    return None


class Cleaner:
    """Stateful cleaner: normalises, filters, deduplicates and counts."""

    def __init__(self, cc: CleanConfig):
        self.cc = cc
        self.seen: set[bytes] = set()
        self.dropped: Counter = Counter()
        self.docs_in = self.docs_out = self.chars_in = self.chars_out = self.changed = 0

    def __call__(self, text: str) -> Optional[str]:
        self.docs_in += 1
        self.chars_in += len(text)
        out = normalize(text, self.cc)
        if out != (text.strip("\n") if self.cc.normalize_whitespace else text):  # not counting the final newline
            self.changed += 1
        reason = reject_reason(out, self.cc)
        if reason is None and self.cc.dedup:
            h = hashlib.blake2b(out.encode("utf-8", "surrogatepass"), digest_size=16).digest()
            if h in self.seen:
                reason = "duplicate"
            else:
                self.seen.add(h)
        if reason is not None:
            self.dropped[reason] += 1
            return None
        self.docs_out += 1
        self.chars_out += len(out)
        return out

    def stats(self) -> dict:
        return {"docs_in": self.docs_in, "docs_out": self.docs_out, "chars_in": self.chars_in,
                "chars_out": self.chars_out, "changed": self.changed,
                "dropped": {r: self.dropped.get(r, 0) for r in REASONS}}


# --------------------------------------------------------------------------------------------
# Clean job: sources -> jsonl parts
# --------------------------------------------------------------------------------------------


def clean_dir_of(cfg) -> Path:
    return Path(cfg.run.work_dir) / "clean"


def stats_name(i: int, k: int) -> str:
    return f"stats-part{i:03d}-of{k:03d}.json"


def part_file(j: int, i: int, k: int) -> str:
    return f"src{j:02d}-part{i:03d}-of{k:03d}.jsonl"


def clean_signature(cfg) -> dict:
    """What a clean job's output depends on; a rerun with the same signature is skipped."""
    return {"clean": asdict(cfg.data.clean), "sources": describe_sources(sources_of(cfg.data))}


def clean_done(out_dir: Path, cfg, jobs: Optional[list[int]] = None) -> bool:
    """True when the parts ``jobs`` (default: all) of the clean job exist with the current signature."""
    k = cfg.data.num_shards
    sig = clean_signature(cfg)
    for i in (range(k) if jobs is None else jobs):
        p = out_dir / stats_name(i, k)
        try:
            st = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            return False
        if st.get("signature") != sig or not all((out_dir / f).is_file() for f in st.get("files", [])):
            return False
    return True


def _atomic_jsonl(path: Path, docs: Iterator[str]) -> int:
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for d in docs:
                f.write(json.dumps({"text": d}, ensure_ascii=False))
                f.write("\n")
                n += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return n


def run_clean(cfg, out_dir: str | os.PathLike | None = None, *, progress: bool = True) -> dict:
    """Clean this job's part (data.shard_index of data.num_shards) of every source; returns stats."""
    from tqdm import tqdm

    out_dir = Path(out_dir) if out_dir else clean_dir_of(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    k, i = cfg.data.num_shards, cfg.data.shard_index
    for stale in out_dir.glob(f"*part{i:03d}-of{k:03d}*.tmp"):
        stale.unlink()
    for p in out_dir.glob("*-part*-of*"):  # outputs of an earlier run split into another number of jobs
        if not p.name.split("-of")[-1].startswith(f"{k:03d}"):
            p.unlink()
    (out_dir / stats_name(i, k)).unlink(missing_ok=True)  # this part is not done until its stats are back
    t0 = time.time()
    cleaner = Cleaner(cfg.data.clean)
    srcs = sources_of(cfg.data)
    files, per_source = [], []
    bar = tqdm(desc="clean", unit="doc", disable=not progress, mininterval=1.0)
    for j, src in enumerate(srcs):
        rs = ReadStats()

        def docs(src=src, rs=rs):
            for text in iter_source(src, rs, num_shards=k, shard_index=i):
                bar.update(1)
                out = cleaner(text)
                if out is not None:
                    yield out

        name = part_file(j, i, k)
        n = _atomic_jsonl(out_dir / name, docs())
        files.append(name)
        per_source.append({"path": src.path, "docs_read": rs.docs, "files_read": rs.files, "docs_kept": n,
                           "undecodable_files": len(rs.undecodable), "undecodable": rs.undecodable[:50]})
    bar.close()
    stats = cleaner.stats()
    stats.update(job=i, num_jobs=k, files=files, sources=per_source, seconds=round(time.time() - t0, 2),
                 signature=clean_signature(cfg))
    if stats["docs_out"] == 0:
        raise DataError(f"clean: no documents left from {[s.path for s in srcs]} (read {stats['docs_in']}, "
                        f"dropped {dict(cleaner.dropped)}); check data.sources and the data.clean filters")
    from megapt.data.manifest import atomic_write_json

    atomic_write_json(out_dir / stats_name(i, k), stats)
    return stats


def format_stats(st: dict) -> str:
    dropped = ", ".join(f"{r} {n}" for r, n in st["dropped"].items() if n) or "none"
    undec = sum(s["undecodable_files"] for s in st["sources"])
    return (f"clean: kept {st['docs_out']}/{st['docs_in']} docs ({st['chars_out'] / 1e6:.1f}/"
            f"{st['chars_in'] / 1e6:.1f} M chars) in {st['seconds']:.1f}s; dropped: {dropped}; "
            f"changed by normalisation: {st['changed']}; skipped non-UTF-8 files: {undec}")


_STATS_RE = re.compile(r"^stats-part(\d{3,})-of(\d{3,})\.json$")


def clean_files(clean_dir: str | os.PathLike, num_jobs: Optional[int] = None) -> list[list[Path]]:
    """The cleaned jsonl files per source (outer list: source j; inner: parts in job order).

    Uses the parts of the ``num_jobs``-way clean run, or (None) the one complete run in the
    folder, whatever its number of jobs. Raises DataError naming the folder and the missing parts.
    """
    clean_dir = Path(clean_dir)
    runs: dict[int, dict[int, Path]] = {}
    for p in clean_dir.glob("stats-part*-of*.json") if clean_dir.is_dir() else []:
        mt = _STATS_RE.match(p.name)
        if mt:
            runs.setdefault(int(mt.group(2)), {})[int(mt.group(1))] = p
    complete = sorted(k for k, parts in runs.items() if len(parts) == k)
    k = num_jobs if num_jobs is not None else (complete[0] if len(complete) == 1 else None)
    if k is None or k not in complete:
        have = {kk: sorted(parts) for kk, parts in runs.items()}
        raise DataError(f"{clean_dir}: no complete cleaned text (parts found per job count: {have or 'none'}"
                        f"{'' if num_jobs is None else f', wanted {num_jobs} jobs'}); run `megapt data clean` "
                        f"first (for a split run, every --data.shard_index=<i> of --data.num_shards=K)")
    per_source: list[list[Path]] = []
    for i in range(k):
        st = json.loads(runs[k][i].read_text())
        for j, name in enumerate(st["files"]):
            while len(per_source) <= j:
                per_source.append([])
            per_source[j].append(clean_dir / name)
    return per_source


def iter_clean_docs(clean_dir: str | os.PathLike, num_jobs: Optional[int] = None) -> Iterator[str]:
    """Texts of all cleaned jsonl files (source by source, parts in job order)."""
    for files in clean_files(clean_dir, num_jobs):
        for f in files:
            with open(f, encoding="utf-8") as fh:
                for line in fh:
                    yield json.loads(line)["text"]


# --------------------------------------------------------------------------------------------
# CLI: `megapt data clean`
# --------------------------------------------------------------------------------------------


def add_args(parser) -> None:
    parser.add_argument("--out", default="", help="output folder (default: <work_dir>/clean)")
    parser.add_argument("--num-shards", type=int, default=None, help="same as --data.num_shards (split job)")
    parser.add_argument("--shard-index", type=int, default=None, help="same as --data.shard_index")
    parser.add_argument("--force", action="store_true", help="clean again even if the output is up to date")


def cli_main(cfg, args) -> int:
    error = apply_split_args(cfg.data, args)
    if error:
        print(f"megapt: {error}")
        return 2
    out = Path(args.out) if args.out else clean_dir_of(cfg)
    if not args.force and clean_done(out, cfg, [cfg.data.shard_index]):
        print(f"clean: {out} is up to date (same sources and rules); --force to redo")
        return 0
    try:
        st = run_clean(cfg, out, progress=cfg.logging.progress)
    except DataError as exc:
        print(f"megapt: {exc}")
        return 1
    print(format_stats(st))
    print(f"clean: wrote {', '.join(st['files'])} and {stats_name(st['job'], st['num_jobs'])} to {out}")
    return 0


def iter_mixed_lines(cfg, clean_dir: str | os.PathLike | None = None) -> Iterator[bytes]:
    """Raw jsonl lines of the cleaned corpus, sources weighted and mixed (seeded by run.seed).

    The stream is the same for every job of a split run, so jobs can take disjoint parts of it.
    """
    from megapt.data.sources import mix_streams, repeat_weighted

    clean_dir = Path(clean_dir) if clean_dir else clean_dir_of(cfg)
    per_source = clean_files(clean_dir)
    srcs = sources_of(cfg.data)
    if len(per_source) != len(srcs):
        raise DataError(f"{clean_dir}: cleaned text has {len(per_source)} source(s) but data.sources lists "
                        f"{len(srcs)}; run `megapt data clean --force`")

    def lines(files: list[Path]) -> Iterator[bytes]:
        for f in files:
            with open(f, "rb") as fh:
                yield from fh

    seed = cfg.run.seed
    streams = [repeat_weighted(lambda fs=fs: lines(fs), s.weight, seed, j)
               for j, (fs, s) in enumerate(zip(per_source, srcs))]
    return streams[0] if len(streams) == 1 else mix_streams(streams, [s.weight for s in srcs], seed)


def iter_mixed_docs(cfg, clean_dir: str | os.PathLike | None = None) -> Iterator[str]:
    for line in iter_mixed_lines(cfg, clean_dir):
        yield json.loads(line)["text"]
