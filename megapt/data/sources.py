"""Read documents from the configured sources (``data.sources``), or the built-in corpus.

Formats: plain text files (one document per file), jsonl (one object per line, ``text_field``),
parquet (pyarrow, column ``text_field``), Hugging Face ``datasets`` saved with
``save_to_disk`` or local data files read by ``datasets.load_dataset("json"|"parquet"|"text",
data_files=...)`` - never the Hub. A path may be a file, a directory (read recursively, sorted)
or a glob. With no sources the corpus is every ``.py`` file of the running interpreter's standard
library (sorted; site-packages excluded; files that are not UTF-8 are skipped and counted).

Rows without text: a jsonl line, parquet row or HF row whose ``text_field`` is missing or null is
dropped and counted (``ReadStats.no_text``; ``dropped.no_text`` in the clean stats), the same in
every reader; a source none of whose rows has a text is an error naming the field. A text of
another type (a number, a list) is an error naming the file and row, as is a jsonl line that is
not a JSON object, a parquet/HF column that does not hold strings, and (``format: hf``) a file
``datasets`` cannot read (invalid UTF-8, mixed file kinds in one source).

Splitting for Slurm arrays: with ``num_shards=K, shard_index=i`` a reader yields only the
documents whose index (per source, in the order above) is ``i mod K``; files and rows of other
jobs are skipped without being decoded where possible.

Mixing: ``mix_streams`` interleaves several document streams with a seeded weighted choice; a
source of weight ``w`` contributes ``floor(w)`` full passes plus a hash-chosen fraction ``w - floor(w)``.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
import random
import sysconfig
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from megapt.config import ConfigError, SourceConfig
from megapt.errors import EXIT_DATA, UserError

TEXT_EXT = {
    ".txt",
    ".md",
    ".rst",
    ".py",
    ".text",
    ".c",
    ".h",
    ".cpp",
    ".js",
    ".java",
    ".go",
    ".rs",
    ".tex",
}
JSONL_EXT = {".jsonl", ".json", ".ndjson"}
PARQUET_EXT = {".parquet"}


class DataError(UserError, RuntimeError):
    """Bad or empty input data; the message names the file (and line/column) and what to do."""

    exit_code = EXIT_DATA
    kind = "data error"


@dataclass
class ReadStats:
    """What a reader saw: documents yielded, files read, files skipped because not UTF-8, rows
    dropped because their text is missing or null (and where the first of them was)."""

    docs: int = 0
    files: int = 0
    undecodable: list[str] = field(default_factory=list)
    no_text: int = 0
    no_text_example: str = ""

    def count_no_text(self, where: str) -> None:
        self.no_text += 1
        if not self.no_text_example:
            self.no_text_example = where


# --------------------------------------------------------------------------------------------
# Resolving a source to files
# --------------------------------------------------------------------------------------------


def stdlib_files() -> list[Path]:
    """Every .py file of this interpreter's standard library, sorted, without site/dist-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__")
        )
        out += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def _is_hf_dir(p: Path) -> bool:
    return p.is_dir() and (
        (p / "dataset_info.json").is_file()
        or (p / "dataset_dict.json").is_file()
        or (p / "state.json").is_file()
    )


def _format_of(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    ext = path.suffix.lower()
    if ext in JSONL_EXT:
        return "jsonl"
    if ext in PARQUET_EXT:
        return "parquet"
    return "text"


def resolve_files(src: SourceConfig) -> list[Path]:
    """Files of a source (file, directory recursively, or glob), sorted; error if none."""
    path = src.path
    p = Path(path).expanduser()
    if any(ch in path for ch in "*?["):
        files = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
    elif p.is_dir():
        files = sorted(
            (q for q in p.rglob("*") if q.is_file() and not q.name.startswith(".")),
            key=lambda q: q.relative_to(p).as_posix(),
        )
        if src.format == "python":
            files = [f for f in files if f.suffix == ".py"]
        elif src.format == "auto":
            files = [f for f in files if f.suffix.lower() in TEXT_EXT | JSONL_EXT | PARQUET_EXT]
    elif p.is_file():
        files = [p]
    else:
        raise DataError(f"data source {path!r}: no such file or directory")
    if not files:
        raise DataError(f"data source {path!r}: matched no input files")
    return files


# --------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------


def _take(idx: int, num_shards: int, shard_index: int) -> bool:
    return idx % num_shards == shard_index


def _read_text_files(
    files: list[Path], stats: ReadStats, start: int, k: int, i: int
) -> Iterator[str]:
    for n, f in enumerate(files, start):
        if not _take(n, k, i):
            continue
        raw = f.read_bytes()
        stats.files += 1
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            stats.undecodable.append(str(f))
            continue
        stats.docs += 1
        yield text


def _read_jsonl(
    f: Path, field_: str, stats: ReadStats, start: int, k: int, i: int
) -> Iterator[tuple[int, str]]:
    """Yield (global index, text); only lines of this job are parsed."""
    stats.files += 1
    n = start
    with open(f, "rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            n += 1
            if not _take(n - 1, k, i):
                continue
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise DataError(f"{f}:{lineno}: invalid JSON line ({exc})") from None
            if not isinstance(obj, dict):
                raise DataError(
                    f"{f}:{lineno}: a JSON {type(obj).__name__}, expected an object "
                    f"with field {field_!r}"
                )
            text = obj.get(field_)
            if text is None:  # missing or null: dropped and counted, as in every reader
                stats.count_no_text(f"{f}:{lineno} (keys {sorted(obj)})")
                continue
            if not isinstance(text, str):
                raise DataError(
                    f"{f}:{lineno}: field {field_!r} is {type(text).__name__}, expected a string"
                )
            stats.docs += 1
            yield n, text
    yield n, None  # type: ignore[misc]  # end marker carries the running index


def _read_parquet(
    f: Path, field_: str, stats: ReadStats, start: int, k: int, i: int
) -> Iterator[tuple[int, str]]:
    import pyarrow.parquet as pq

    stats.files += 1
    try:
        pf = pq.ParquetFile(f)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise DataError(f"{f}: not a readable parquet file ({exc})") from None
    import pyarrow as pa

    names = pf.schema_arrow.names
    if field_ not in names:
        raise DataError(
            f"{f}: no column {field_!r} (columns: {names}); set the source's text_field"
        )
    col_type = pf.schema_arrow.field(field_).type
    if not (pa.types.is_string(col_type) or pa.types.is_large_string(col_type)):
        raise DataError(
            f"{f}: column {field_!r} holds {col_type}, expected strings; set the "
            f"source's text_field"
        )
    n = start
    for batch in pf.iter_batches(columns=[field_], batch_size=1024):
        for v in batch.column(0).to_pylist():
            if _take(n, k, i):
                if v is None:  # null: dropped and counted, as in every reader
                    stats.count_no_text(f"{f}:row {n - start + 1}")
                else:
                    stats.docs += 1
                    yield n, v
            n += 1
    yield n, None  # type: ignore[misc]


def _builder(f: Path) -> str:
    ext = f.suffix.lower()
    return "json" if ext in JSONL_EXT else "parquet" if ext in PARQUET_EXT else "text"


def _first_undecodable(files: list[Path]) -> tuple[Path, int] | None:
    """The first file that is not valid UTF-8 and the byte offset of its first bad byte."""
    import codecs

    for f in files:
        dec = codecs.getincrementaldecoder("utf-8")()
        offset = 0
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                try:
                    dec.decode(chunk)
                except UnicodeDecodeError as exc:
                    return f, offset + exc.start
                offset += len(chunk)
        try:
            dec.decode(b"", final=True)
        except UnicodeDecodeError as exc:
            return f, offset + exc.start
    return None


def _open_hf(src: SourceConfig, stats: ReadStats | None = None):
    """``(dataset, files)`` of a ``format: hf`` source (files: the data files given to
    ``load_dataset``, empty for a saved dataset folder); DataError naming the file or folder for
    anything ``datasets`` cannot read."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local files only, never the Hub
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    datasets.disable_progress_bars()  # our clean bar counts the documents; keep stderr for errors
    p = Path(src.path).expanduser()
    files: list[Path] = []
    if _is_hf_dir(p):
        try:
            ds = datasets.load_from_disk(str(p))
        except Exception as exc:  # noqa: BLE001 - datasets raises many types for a damaged folder
            why = f"{type(exc).__name__}: {exc}"
            raise DataError(f"{p}: not a readable HF dataset folder ({why})") from None
        if isinstance(ds, datasets.DatasetDict):
            if src.split not in ds:
                raise DataError(
                    f"{p}: HF dataset has splits {list(ds)}, not {src.split!r}; set the source's split"
                )
            ds = ds[src.split]
        if stats is not None:
            stats.files += 1
    else:
        files = resolve_files(src)
        kinds: dict[str, Path] = {}
        for f in files:
            kinds.setdefault(_builder(f), f)
        if len(kinds) > 1:
            seen = ", ".join(f"{f.name} ({kind})" for kind, f in kinds.items())
            raise DataError(
                f"{src.path}: format hf reads one kind of file per source, found "
                f"{seen}; list each kind as its own source (or use format auto)"
            )
        ((builder, _),) = kinds.items()
        try:
            ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train")
        except Exception as exc:  # noqa: BLE001 - datasets wraps the reader's error in its own (or none)
            _raise_if_undecodable(files if builder in ("json", "text") else [])
            cause = exc.__cause__ or exc.__context__ or exc
            why = f"{type(cause).__name__}: {(str(cause).splitlines() or [''])[0]}"
            raise DataError(
                f"{src.path}: datasets.load_dataset({builder!r}) cannot read "
                f"{len(files)} file(s) ({why})"
            ) from None
        if stats is not None:
            stats.files += len(files)
    if src.text_field not in ds.column_names:
        raise DataError(
            f"{p}: HF dataset has no column {src.text_field!r} (columns: {ds.column_names}); "
            f"set the source's text_field"
        )
    feat = ds.features[src.text_field]
    if getattr(feat, "dtype", None) not in ("string", "large_string"):
        holds = getattr(feat, "dtype", None) or feat
        raise DataError(
            f"{p}: HF column {src.text_field!r} holds {holds}, expected strings; set "
            f"the source's text_field"
        )
    return ds, files


def _raise_if_undecodable(files: list[Path]) -> None:
    bad = _first_undecodable(files)
    if bad is not None:
        raise DataError(
            f"{bad[0]}: not valid UTF-8 (first bad byte at offset {bad[1]}); datasets "
            f"cannot read it. Re-encode the file as UTF-8 or drop it from the source"
        )


def _read_hf(src: SourceConfig, stats: ReadStats, k: int, i: int) -> Iterator[str]:
    ds, files = _open_hf(src, stats)
    if k > 1:
        ds = ds.select(range(i, len(ds), k))
    batches = iter(ds.select_columns([src.text_field]).iter(batch_size=1024))
    row = 0
    while True:
        try:
            batch = next(batches, None)
        except UnicodeDecodeError as exc:  # datasets stores invalid UTF-8 unchecked; it fails here
            _raise_if_undecodable(files)
            raise DataError(
                f"{src.path}: rows {row + 1}-{row + 1024} of this job hold text that "
                f"is not valid UTF-8 ({exc})"
            ) from None
        if batch is None:
            return
        for v in batch[src.text_field]:
            row += 1
            if v is None:  # null: dropped and counted, as in every reader
                stats.count_no_text(f"{src.path}:row {i + (row - 1) * k + 1}")
                continue
            stats.docs += 1
            yield v


def iter_source(
    src: SourceConfig, stats: ReadStats | None = None, *, num_shards: int = 1, shard_index: int = 0
) -> Iterator[str]:
    """Documents of one source (this job's part of them when ``num_shards > 1``)."""
    stats = stats if stats is not None else ReadStats()
    k, i = num_shards, shard_index
    if src.path == "stdlib" or src.format == "python" and src.path == "":
        yield from _read_text_files(stdlib_files(), stats, 0, k, i)
        return
    if src.format == "hf" or (src.format == "auto" and _is_hf_dir(Path(src.path).expanduser())):
        yield from _read_hf(src, stats, k, i)
        return
    files = resolve_files(src)
    n = 0
    for f in files:
        fmt = _format_of(f, src.format)
        if fmt in ("text", "python"):
            for text in _read_text_files([f], stats, n, k, i):
                yield text
            n += 1
            continue
        reader = _read_jsonl if fmt == "jsonl" else _read_parquet if fmt == "parquet" else None
        if reader is None:
            raise DataError(f"{f}: format {fmt!r} cannot be read file by file")
        # the reader yields (row number, text) and last (rows read, None): n carries on to the next file
        for n, text in reader(f, src.text_field, stats, n, k, i):  # noqa: B007, B020
            if text is not None:
                yield text


def apply_split_args(data_cfg, args) -> None:
    """``--num-shards K --shard-index i`` (a split job) over ``data.*``; ConfigError if invalid."""
    k = args.num_shards if args.num_shards is not None else data_cfg.num_shards
    i = args.shard_index if args.shard_index is not None else data_cfg.shard_index
    if k < 1 or not 0 <= i < k:
        raise ConfigError(
            f"--num-shards/--shard-index: need 0 <= shard index < num shards, got {i}/{k}"
        )
    data_cfg.num_shards, data_cfg.shard_index = k, i


def default_sources() -> list[SourceConfig]:
    return [SourceConfig(path="stdlib", format="python")]


def sources_of(data_cfg) -> list[SourceConfig]:
    return list(data_cfg.sources) or default_sources()


def describe_sources(sources: list[SourceConfig]) -> list[dict]:
    """JSON-able description of the sources, with a fingerprint of the files behind them."""
    out = []
    for s in sources:
        d = {
            "path": s.path,
            "format": s.format,
            "text_field": s.text_field,
            "weight": s.weight,
            "split": s.split,
        }
        try:
            files = (
                stdlib_files()
                if s.path == "stdlib"
                else ([Path(s.path)] if _is_hf_dir(Path(s.path)) else resolve_files(s))
            )
            h = hashlib.sha256()
            for f in files:
                st = f.stat()
                h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            d["files"] = len(files)
            d["fingerprint"] = h.hexdigest()[:16]
            if s.path == "stdlib":
                d["root"] = sysconfig.get_paths()["stdlib"]
        except DataError:
            d["files"] = 0
        out.append(d)
    return out


# --------------------------------------------------------------------------------------------
# Weighted mixing
# --------------------------------------------------------------------------------------------


def _frac_keep(seed: int, src: int, rep: int, idx: int, frac: float) -> bool:
    h = hashlib.blake2b(f"{seed}:{src}:{rep}:{idx}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < frac


def repeat_weighted(
    make_stream: Callable[[], Iterable], weight: float, seed: int, src: int
) -> Iterator:
    """``floor(weight)`` passes over the stream, then a hash-chosen ``weight - floor(weight)`` share."""
    if weight <= 0:
        raise ConfigError(f"data.sources[{src}].weight: must be > 0, got {weight}")
    full = int(weight)
    frac = weight - full
    for rep in range(full + (1 if frac > 1e-9 else 0)):
        for idx, item in enumerate(make_stream()):
            if rep < full or _frac_keep(seed, src, rep, idx, frac):
                yield item


def mix_streams(streams: Sequence[Iterable], weights: list[float], seed: int) -> Iterator:
    """Interleave streams: each next item comes from a source picked with probability ~ weight.

    Deterministic for a given seed; every item of every stream is yielded exactly once.
    """
    rng = random.Random(seed)
    its = [iter(s) for s in streams]
    live = list(range(len(its)))
    w = [float(x) for x in weights]
    while live:
        j = rng.choices(live, weights=[w[k] for k in live])[0] if len(live) > 1 else live[0]
        try:
            yield next(its[j])
        except StopIteration:
            live.remove(j)


def iter_documents(
    data_cfg,
    stats: list[ReadStats] | None = None,
    *,
    seed: int = 0,
    num_shards: int | None = None,
    shard_index: int | None = None,
) -> Iterator[str]:
    """All documents of ``data_cfg.sources`` (weighted and mixed), this job's part only."""
    k = data_cfg.num_shards if num_shards is None else num_shards
    i = data_cfg.shard_index if shard_index is None else shard_index
    srcs = sources_of(data_cfg)
    st = [ReadStats() for _ in srcs]
    if stats is not None:
        stats[:] = st
    streams = [
        repeat_weighted(
            functools.partial(iter_source, s, r, num_shards=k, shard_index=i), s.weight, seed, j
        )
        for j, (s, r) in enumerate(zip(srcs, st))
    ]
    if len(streams) == 1:
        return streams[0]
    return mix_streams(streams, [s.weight for s in srcs], seed)
