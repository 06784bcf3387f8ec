"""Normalise, filter and deduplicate raw documents (``data.clean``); count what was dropped and why.

Per document, in order: newlines to ``\\n``; Unicode NFKC (``nfkc``); control characters removed
except ``\\n`` and ``\\t`` (``strip_control``); trailing spaces stripped and runs of more than two
blank lines collapsed to two, leading/trailing blank lines removed (``normalize_whitespace``).
Then filters, each counted under its reason: ``too_short`` (< ``min_chars``), ``too_long``
(> ``max_chars``), ``symbols`` (non-alphanumeric, non-space share > ``max_non_alnum_frac``),
``few_letters`` (letter share < ``min_alpha_frac``), ``duplicate`` (same cleaned text seen before,
``dedup``). Rows whose text is missing or null never reach the cleaner; they are counted as
``no_text`` (see megapt.data.sources).

`megapt data clean` writes ``<work_dir>/clean/src{j:02d}-part{i:03d}-of{K:03d}.jsonl`` (one
``{"text": ...}`` per line, source j, job i of K) and ``stats-part{i:03d}-of{K:03d}.json``;
each file is written to ``.tmp`` and renamed, the stats file last (it marks the job as done).

Exact dedup is global, whatever the number of jobs: a job drops the duplicates it sees, and with
``dedup`` it also writes ``src{j:02d}-part{i:03d}-of{K:03d}.hashes`` (the 16-byte blake2b of each
kept text, in line order). Whoever reads the cleaned text (``iter_mixed_docs`` for the
tokenizer, ``iter_mixed_lines`` for the shard jobs) keeps only the first copy of a text across
all jobs, in source-then-job order: the texts kept per source are those a single job would keep
(their order differs).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import string
import time
import unicodedata
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from megapt.config import CleanConfig
from megapt.data.sources import (
    DataError,
    ReadStats,
    apply_split_args,
    describe_sources,
    iter_source,
    sources_of,
)

_CONTROL = re.compile(
    r"[\x00-\x08\x0b-\x1f\x7f-\x9f]"
)  # Unicode category Cc except \t (09) and \n (0a)
_CONTROL_BYTES = bytes([*range(0x00, 0x09), *range(0x0B, 0x20), 0x7F])  # the ASCII part of _CONTROL
_BLANKS = re.compile(r"\n{4,}")  # more than two blank lines
_NON_ASCII = re.compile(r"[^\x00-\x7f]+")
_ASCII_LETTERS = string.ascii_letters.encode()
_ASCII_ALNUM_SPACE = (string.ascii_letters + string.digits + string.whitespace).encode()

REASONS = ("no_text", "empty", "too_short", "too_long", "symbols", "few_letters", "duplicate")


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


def reject_reason(text: str, cc: CleanConfig) -> str | None:
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
        self.last_hash = b""  # blake2b-16 of the last kept text (with dedup)
        self.dropped: Counter = Counter()
        self.docs_in = self.docs_out = self.chars_in = self.chars_out = self.changed = 0

    def __call__(self, text: str) -> str | None:
        self.docs_in += 1
        self.chars_in += len(text)
        out = normalize(text, self.cc)
        if out != (
            text.strip("\n") if self.cc.normalize_whitespace else text
        ):  # not counting the final newline
            self.changed += 1
        reason = reject_reason(out, self.cc)
        if reason is None and self.cc.dedup:
            h = hashlib.blake2b(out.encode("utf-8", "surrogatepass"), digest_size=16).digest()
            if h in self.seen:
                reason = "duplicate"
            else:
                self.seen.add(h)
                self.last_hash = h
        if reason is not None:
            self.dropped[reason] += 1
            return None
        self.docs_out += 1
        self.chars_out += len(out)
        return out

    def stats(self) -> dict:
        return {
            "docs_in": self.docs_in,
            "docs_out": self.docs_out,
            "chars_in": self.chars_in,
            "chars_out": self.chars_out,
            "changed": self.changed,
            "dropped": {r: self.dropped.get(r, 0) for r in REASONS},
        }


# --------------------------------------------------------------------------------------------
# Clean job: sources -> jsonl parts
# --------------------------------------------------------------------------------------------


def clean_dir_of(cfg) -> Path:
    return Path(cfg.run.work_dir) / "clean"


HASH_BYTES = 16  # blake2b digest size of the dedup hashes


def stats_name(i: int, k: int) -> str:
    return f"stats-part{i:03d}-of{k:03d}.json"


def part_file(j: int, i: int, k: int) -> str:
    return f"src{j:02d}-part{i:03d}-of{k:03d}.jsonl"


def clean_signature(cfg) -> dict:
    """What a clean job's output depends on; a rerun with the same signature is skipped."""
    return {"clean": asdict(cfg.data.clean), "sources": describe_sources(sources_of(cfg.data))}


def clean_done(out_dir: Path, cfg, jobs: list[int] | None = None) -> bool:
    """True when the parts ``jobs`` (default: all) of the clean job exist with the current signature."""
    k = cfg.data.num_shards
    sig = clean_signature(cfg)
    for i in range(k) if jobs is None else jobs:
        p = out_dir / stats_name(i, k)
        try:
            st = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            return False
        outputs = st.get("files", []) + st.get("hash_files", [])
        if st.get("signature") != sig or not all((out_dir / f).is_file() for f in outputs):
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
    for p in out_dir.glob(
        "*-part*-of*"
    ):  # outputs of an earlier run split into another number of jobs
        if not p.name.split("-of")[-1].startswith(f"{k:03d}"):
            p.unlink()
    (out_dir / stats_name(i, k)).unlink(
        missing_ok=True
    )  # this part is not done until its stats are back
    t0 = time.time()
    cleaner = Cleaner(cfg.data.clean)
    srcs = sources_of(cfg.data)
    dedup = cfg.data.clean.dedup
    files, hash_files, per_source = [], [], []
    bar = tqdm(desc="clean", unit="doc", disable=not progress, mininterval=1.0)
    try:
        for j, src in enumerate(srcs):
            rs = ReadStats()
            hashes: list[bytes] = []

            def docs(src=src, rs=rs, hashes=hashes):
                for text in iter_source(src, rs, num_shards=k, shard_index=i):
                    bar.update(1)
                    out = cleaner(text)
                    if out is not None:
                        if dedup:
                            hashes.append(cleaner.last_hash)
                        yield out

            name = part_file(j, i, k)
            n = _atomic_jsonl(out_dir / name, docs())
            files.append(name)
            if dedup:
                hash_files.append(name[: -len(".jsonl")] + ".hashes")
                _atomic_bytes(out_dir / hash_files[-1], b"".join(hashes))
            cleaner.dropped["no_text"] += rs.no_text
            per_source.append(
                {
                    "path": src.path,
                    "docs_read": rs.docs,
                    "files_read": rs.files,
                    "docs_kept": n,
                    "no_text": rs.no_text,
                    "undecodable_files": len(rs.undecodable),
                    "undecodable": rs.undecodable[:50],
                }
            )
            if rs.no_text and not rs.docs:
                raise DataError(
                    f"{src.path}: none of the {rs.no_text} row(s) read has a text in "
                    f"field {src.text_field!r} (first: {rs.no_text_example}); set the "
                    f"source's text_field"
                )
    finally:
        bar.close()
    stats = cleaner.stats()
    stats["docs_in"] += cleaner.dropped["no_text"]  # read, then dropped: kept + dropped == read
    stats.update(
        job=i,
        num_jobs=k,
        files=files,
        hash_files=hash_files,
        sources=per_source,
        seconds=round(time.time() - t0, 2),
        signature=clean_signature(cfg),
    )
    if stats["docs_out"] == 0:
        raise DataError(_nothing_left(srcs, per_source, stats))
    from megapt.data.manifest import atomic_write_json

    atomic_write_json(out_dir / stats_name(i, k), stats)
    return stats


def _nothing_left(srcs, per_source: list[dict], stats: dict) -> str:
    """Why a clean job kept nothing: files skipped as not UTF-8 first, then the filters' counts."""
    undecodable = [f for s in per_source for f in s["undecodable"]]
    n_undec = sum(s["undecodable_files"] for s in per_source)
    read = stats["docs_in"]
    dropped = {r: n for r, n in stats["dropped"].items() if n}
    parts = []
    if n_undec:
        parts.append(
            f"{n_undec} file(s) skipped as not UTF-8 text (binary or another encoding): "
            + ", ".join(undecodable[:5])
            + (" ..." if n_undec > 5 else "")
        )
    if read or not n_undec:
        parts.append(f"{read} document(s) read, dropped {dropped or 'none'}")
    hint = (
        "re-encode the files as UTF-8 or drop them from data.sources"
        if n_undec and not read
        else "check data.sources and the data.clean filters"
    )
    where = [s.path for s in srcs]
    return f"clean: no documents left from {where}: " + "; ".join(parts) + f"; {hint}"


def _atomic_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def format_stats(st: dict) -> str:
    dropped = ", ".join(f"{r} {n}" for r, n in st["dropped"].items() if n) or "none"
    undec = sum(s["undecodable_files"] for s in st["sources"])
    return (
        f"clean: kept {st['docs_out']}/{st['docs_in']} docs ({st['chars_out'] / 1e6:.1f}/"
        f"{st['chars_in'] / 1e6:.1f} M chars) in {st['seconds']:.1f}s; dropped: {dropped}; "
        f"changed by normalisation: {st['changed']}; skipped non-UTF-8 files: {undec}"
    )


_STATS_RE = re.compile(r"^stats-part(\d{3,})-of(\d{3,})\.json$")


def clean_files(clean_dir: str | os.PathLike, num_jobs: int | None = None) -> list[list[Path]]:
    """The cleaned jsonl files per source (outer list: source j; inner: parts in job order).

    Uses the parts of the ``num_jobs``-way clean run, or (None) the one complete run in the
    folder, whatever its number of jobs. Raises DataError naming the folder and the missing parts.
    """
    return [[f for f, _ in parts] for parts in clean_parts(clean_dir, num_jobs)]


def clean_parts(clean_dir: str | os.PathLike, num_jobs: int | None = None) -> list[list[tuple]]:
    """Per source, per job: ``(jsonl path, hashes path or None)`` (see ``clean_files``)."""
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
        raise DataError(
            f"{clean_dir}: no complete cleaned text (parts found per job count: {have or 'none'}"
            f"{'' if num_jobs is None else f', wanted {num_jobs} jobs'}); run `megapt data clean` "
            f"first (for a split run, every --data.shard_index=<i> of --data.num_shards=K)"
        )
    per_source: list[list[tuple]] = []
    for i in range(k):
        st = json.loads(runs[k][i].read_text())
        hashes = st.get("hash_files") or [None] * len(st["files"])
        for j, (name, hname) in enumerate(zip(st["files"], hashes)):
            while len(per_source) <= j:
                per_source.append([])
            per_source[j].append((clean_dir / name, clean_dir / hname if hname else None))
    return per_source


def keep_masks(parts: list[list[tuple]]) -> tuple[list[list], int]:
    """Global exact dedup over the parts of a split clean run (``clean_parts``): per source and
    part, a boolean mask over its lines (None: keep all), True on the first copy of each text in
    source-then-job order; and the number of lines masked out. One job, or a run without hash
    files (``data.clean.dedup=false``), needs no mask: a job already drops its own duplicates."""
    flat = [h for src in parts for _, h in src]
    if len(parts[0] if parts else []) <= 1 or not flat or any(h is None for h in flat):
        return [[None] * len(src) for src in parts], 0
    import numpy as np

    arrays = []
    for h in flat:
        raw = h.read_bytes()
        if len(raw) % HASH_BYTES:
            raise DataError(
                f"{h}: truncated dedup hash file ({len(raw)} bytes); run "
                f"`megapt data clean --force`"
            )
        arrays.append(np.frombuffer(raw, dtype=f"V{HASH_BYTES}"))
    every = np.concatenate(arrays)
    keep = np.zeros(len(every), dtype=bool)
    keep[np.unique(every, return_index=True)[1]] = True  # index of each text's first copy
    masks, at, sizes = [], 0, iter(len(a) for a in arrays)
    for src in parts:
        row = []
        for _ in src:
            n = next(sizes)
            row.append(keep[at : at + n])
            at += n
        masks.append(row)
    return masks, int(len(every) - keep.sum())


def _kept_lines(path: Path, mask) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        if mask is None:
            yield from fh
            return
        n = 0
        for n, line in enumerate(fh, 1):
            if n > len(mask):
                break
            if mask[n - 1]:
                yield line
        if n != len(mask):
            raise DataError(
                f"{path}: {n} lines but its .hashes file lists {len(mask)} texts; "
                f"the cleaned text changed after cleaning - run `megapt data clean "
                f"--force`"
            )


# --------------------------------------------------------------------------------------------
# CLI: `megapt data clean`
# --------------------------------------------------------------------------------------------


def add_args(parser) -> None:
    parser.add_argument("--out", default="", help="output folder (default: <work_dir>/clean)")
    parser.add_argument(
        "--num-shards", type=int, default=None, help="same as --data.num_shards (split job)"
    )
    parser.add_argument("--shard-index", type=int, default=None, help="same as --data.shard_index")
    parser.add_argument(
        "--force", action="store_true", help="clean again even if the output is up to date"
    )


def cli_main(cfg, args) -> int:
    """Exit codes: 0 done, 2 bad config / split flags, 5 data error (megapt.errors)."""
    apply_split_args(cfg.data, args)
    out = Path(args.out) if args.out else clean_dir_of(cfg)
    if not args.force and clean_done(out, cfg, [cfg.data.shard_index]):
        print(f"clean: {out} is up to date (same sources and rules); --force to redo")
        return 0
    st = run_clean(cfg, out, progress=cfg.logging.progress)
    print(format_stats(st))
    k = cfg.data.num_shards
    if k > 1 and cfg.data.clean.dedup and clean_done(out, cfg):  # the last job of a split run
        _, dups = keep_masks(clean_parts(out, k))
        print(
            f"clean: all {k} jobs done; {dups} document(s) kept by one job are duplicates of "
            f"another's and are skipped wherever the cleaned text is read (global exact dedup)"
        )
    print(
        f"clean: wrote {', '.join(st['files'])} and {stats_name(st['job'], st['num_jobs'])} to {out}"
    )
    return 0


def iter_mixed_lines(cfg, clean_dir: str | os.PathLike | None = None) -> Iterator[bytes]:
    """Raw jsonl lines of the cleaned corpus, sources weighted and mixed (seeded by run.seed).

    The stream is the same for every job of a split run, so jobs can take disjoint parts of it.
    """
    from megapt.data.sources import mix_streams, repeat_weighted

    clean_dir = Path(clean_dir) if clean_dir else clean_dir_of(cfg)
    parts = clean_parts(clean_dir)
    srcs = sources_of(cfg.data)
    if len(parts) != len(srcs):
        raise DataError(
            f"{clean_dir}: cleaned text has {len(parts)} source(s) but data.sources "
            f"lists {len(srcs)}; run `megapt data clean --force`"
        )
    masks, _ = keep_masks(parts)

    def lines(src: list[tuple], src_masks: list) -> Iterator[bytes]:
        for (f, _), mask in zip(src, src_masks):
            yield from _kept_lines(f, mask)

    seed = cfg.run.seed
    streams = [
        repeat_weighted(functools.partial(lines, src, m), s.weight, seed, j)
        for j, (src, m, s) in enumerate(zip(parts, masks, srcs))
    ]
    return streams[0] if len(streams) == 1 else mix_streams(streams, [s.weight for s in srcs], seed)


def iter_mixed_docs(cfg, clean_dir: str | os.PathLike | None = None) -> Iterator[str]:
    for line in iter_mixed_lines(cfg, clean_dir):
        yield json.loads(line)["text"]
