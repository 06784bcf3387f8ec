"""Shard manifests: load, validate, verify shards, merge the partial manifests of split jobs.

A shard directory holds ``manifest.json`` and tar files ``{split}-{job:03d}-{n:05d}.tar`` (the
format: megapt.data.tarformat).
A job of a split run (``--data.num_shards=K --data.shard_index=i``) writes
``manifest-part-{i:03d}-of-{K:03d}.json``; ``megapt data merge`` joins them, in job order, into
``manifest.json``. Every write is atomic (``.tmp`` + ``os.replace``) so a reader never sees a
half-written shard or manifest.

    m = load_manifest(shard_dir)                 # ShardError naming the file when missing/invalid
    for entry in m["splits"]["train"]["shards"]:
        verify_shard(shard_dir / entry["name"], entry, sample_len=m["seq_len"] + 1, dtype=m["dtype"])
    check_tokenizer(m, Tokenizer.load(path))     # shards were made with this tokenizer?
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from megapt.config import RemoteConfig
from megapt.data.remote import LocalStore, Store, open_store, write_json
from megapt.data.tarformat import MEMBER_DTYPES, ShardError, dtype_for_vocab, verify_shard
from megapt.urls import join, location

FORMAT = "megapt-shards"
VERSION = 1
SPLITS = ("train", "val")
MANIFEST = "manifest.json"
PART_RE = re.compile(r"^manifest-part-(\d{3,})-of-(\d{3,})\.json$")


# --------------------------------------------------------------------------------------------
# Small helpers shared by the writer side
# --------------------------------------------------------------------------------------------


def part_name(job: int, num_jobs: int) -> str:
    return f"manifest-part-{job:03d}-of-{num_jobs:03d}.json"


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON to ``path.tmp``, fsync, then rename: readers see the old or the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Manifest(dict):
    """A manifest dict that remembers the file or URL it came from (``.path``) for messages."""

    path: Path | str | None = None


# --------------------------------------------------------------------------------------------
# Load and validate
# --------------------------------------------------------------------------------------------


def _schema_errors(m: Any) -> list[str]:
    e: list[str] = []
    if not isinstance(m, dict):
        return [f"top level must be an object, got {type(m).__name__}"]
    if m.get("format") != FORMAT:
        e.append(f"format: expected {FORMAT!r}, got {m.get('format')!r}")
    if m.get("version") != VERSION:
        e.append(
            f"version: expected {VERSION}, got {m.get('version')!r} (written by another megapt version?)"
        )
    for key in ("seq_len", "vocab_size", "eos_id", "pad_id"):
        if not isinstance(m.get(key), int) or isinstance(m.get(key), bool):
            e.append(f"{key}: expected an integer, got {m.get(key)!r}")
    if m.get("dtype") not in ("uint16", "uint32"):
        e.append(f"dtype: expected 'uint16' or 'uint32', got {m.get('dtype')!r}")
    elif isinstance(m.get("vocab_size"), int) and m["dtype"] != dtype_for_vocab(m["vocab_size"]):
        e.append(f"dtype: {m['dtype']} does not match vocab_size {m['vocab_size']}")
    if not isinstance(m.get("tokenizer_sha256"), str):
        e.append("tokenizer_sha256: expected a hex string")
    if "member" in m:  # foreign WebDataset shards (megapt data index); absent: <key>.tokens, raw
        mem = m["member"]
        if (
            not isinstance(mem, dict)
            or not isinstance(mem.get("ext"), str)
            or not mem["ext"]
            or "/" in mem["ext"]
            or mem.get("encoding") not in ("raw", "npy")
            or mem.get("dtype") not in (None, *MEMBER_DTYPES)
        ):
            e.append(
                f"member: expected {{ext: str, encoding: raw|npy, dtype: one of "
                f"{MEMBER_DTYPES} or null}}, got {mem!r}"
            )
    splits = m.get("splits")
    if not isinstance(splits, dict) or "train" not in splits:
        e.append("splits: expected an object with at least 'train'")
        return e
    seq = m.get("seq_len") if isinstance(m.get("seq_len"), int) else None
    for split, s in splits.items():
        where = f"splits.{split}"
        if split not in SPLITS:
            e.append(f"{where}: unknown split (expected one of {SPLITS})")
            continue
        if not isinstance(s, dict) or not isinstance(s.get("shards"), list):
            e.append(f"{where}: expected an object with a 'shards' list")
            continue
        samples = tokens = 0
        for k, sh in enumerate(s["shards"]):
            w = f"{where}.shards[{k}]"
            if not isinstance(sh, dict):
                e.append(f"{w}: expected an object")
                continue
            name = sh.get("name")
            if (
                not isinstance(name, str)
                or not name
                or "/" in name
                or "\\" in name
                or name in (".", "..")
            ):
                e.append(
                    f"{w}.name: must be a plain file name inside the shard directory, got {name!r}"
                )
            for key in ("samples", "tokens", "bytes"):
                if not isinstance(sh.get(key), int) or sh[key] < 0:
                    e.append(f"{w}.{key}: expected a non-negative integer, got {sh.get(key)!r}")
            if not isinstance(sh.get("sha256"), str) or len(sh["sha256"]) != 64:
                e.append(f"{w}.sha256: expected 64 hex digits, got {sh.get('sha256')!r}")
            if (
                seq is not None
                and isinstance(sh.get("samples"), int)
                and isinstance(sh.get("tokens"), int)
            ):
                if sh["tokens"] != sh["samples"] * (seq + 1):
                    e.append(f"{w}: tokens {sh['tokens']} != samples {sh['samples']} x (seq_len+1)")
                samples += sh["samples"]
                tokens += sh["tokens"]
        if s.get("samples") != samples or s.get("tokens") != tokens:
            e.append(
                f"{where}: totals samples={s.get('samples')!r} tokens={s.get('tokens')!r} do not match "
                f"the sum over its shards ({samples}, {tokens})"
            )
    return e


def validate_manifest(m: Any, where: str = "manifest") -> None:
    """Raise ShardError listing every schema problem of a manifest dict."""
    errors = _schema_errors(m)
    if errors:
        raise ShardError(
            f"{where}: invalid shard manifest, {len(errors)} problem(s):\n  " + "\n  ".join(errors)
        )


def parse_manifest(text: str | bytes, where: str | Path) -> Manifest:
    """Parse and validate the text of one manifest (or partial manifest)."""
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ShardError(
            f"{where}: not valid JSON ({exc}); the file is corrupt - rerun "
            f"`megapt data shard` (or `megapt data merge` for a split job)"
        ) from None
    validate_manifest(data, str(where))
    m = Manifest(data)
    m.path = where
    return m


def read_manifest(store: Store, name: str) -> Manifest:
    """Read and validate manifest ``name`` of a shard folder or URL (ShardError when missing)."""
    where = store.local_path(name) or store.url(name)
    try:
        text = store.read_bytes(name)
    except FileNotFoundError:
        raise ShardError(f"{where}: manifest not found") from None
    return parse_manifest(text, where)


def read_manifest_file(path: str | os.PathLike) -> Manifest:
    """Read and validate one local manifest (or partial manifest) file."""
    path = Path(path)
    return read_manifest(LocalStore(path.parent), path.name)


def load_manifest(shard_dir: str | os.PathLike, remote: RemoteConfig | None = None) -> Manifest:
    """Load ``<shard_dir>/manifest.json`` (a folder or URL: fetched first, with retries); a clear
    ShardError when missing, unmerged or invalid."""
    store = open_store(shard_dir, remote)
    where = location(shard_dir if isinstance(shard_dir, Path) else str(shard_dir))
    path = join(where, MANIFEST)
    try:
        text = store.read_bytes(MANIFEST)
    except FileNotFoundError:
        try:
            parts = sorted(n for n in store.list() if PART_RE.match(n))
        except ShardError:
            parts = []
        if parts:
            raise ShardError(
                f"{path}: not found, but {len(parts)} partial manifest(s) are there "
                f"({parts[0]} ...): run `megapt data merge --data.shard_dir={where}` "
                f"once every job has finished"
            ) from None
        raise ShardError(
            f"{path}: not found - no shards prepared in {where}. Run `megapt data "
            f"prepare` (or `megapt data shard`) with the same config first"
        ) from None
    except IsADirectoryError:
        raise ShardError(f"{path}: is a folder, not a manifest file") from None
    return parse_manifest(text, path)


# --------------------------------------------------------------------------------------------
# Verify a shard directory
# --------------------------------------------------------------------------------------------


def verify_dir(
    shard_dir: str | os.PathLike,
    *,
    check_sha: bool = True,
    deep: bool = True,
    remote: RemoteConfig | None = None,
) -> tuple[int, list[str]]:
    """Verify every shard listed in ``<shard_dir>/manifest.json``; returns (checked, errors).
    A URL's shards are downloaded one at a time into a temporary folder and checked there."""
    import tempfile

    from megapt.data.tarformat import MemberSpec

    store = open_store(shard_dir, remote)
    m = load_manifest(shard_dir, remote)
    spec = MemberSpec.of(m)
    errors, checked = [], 0
    with tempfile.TemporaryDirectory(prefix="megapt-verify-") as tmp:
        for s in m["splits"].values():
            for entry in s["shards"]:
                checked += 1
                path = store.local_path(entry["name"])
                try:
                    if path is None:
                        path = Path(tmp) / entry["name"]
                        try:
                            store.get(entry["name"], path)
                        except FileNotFoundError:
                            raise ShardError(
                                f"{store.url(entry['name'])}: shard file missing "
                                f"(listed in the manifest)"
                            ) from None
                    verify_shard(
                        path,
                        entry,
                        check_sha=check_sha,
                        sample_len=m["seq_len"] + 1 if deep else None,
                        dtype=m["dtype"] if deep else None,
                        vocab_size=m["vocab_size"],
                        spec=spec,
                    )
                except ShardError as exc:
                    text = str(exc)
                    if store.is_remote:  # name the URL, not the temporary copy
                        text = text.replace(str(path), store.url(entry["name"]))
                    errors.append(text)
                finally:
                    if store.is_remote and path is not None:
                        Path(path).unlink(missing_ok=True)
    return checked, errors


# --------------------------------------------------------------------------------------------
# Tokenizer consistency
# --------------------------------------------------------------------------------------------


def check_tokenizer(manifest: dict, tokenizer: Any) -> None:
    """Raise ShardError when the shards were not written with ``tokenizer``.

    ``tokenizer`` is a megapt Tokenizer (``.sha256``, ``.vocab_size``, ``.eos_id``, ``.path``)
    or a sha256 hex string.
    """
    where = getattr(manifest, "path", None) or "manifest"
    sha = tokenizer if isinstance(tokenizer, str) else tokenizer.sha256
    tpath = getattr(tokenizer, "path", "the tokenizer")
    problems = []
    if manifest["tokenizer_sha256"] and manifest["tokenizer_sha256"] != sha:
        problems.append(
            f"tokenizer sha256 {sha[:12]}... != manifest {manifest['tokenizer_sha256'][:12]}..."
        )
    if not isinstance(tokenizer, str):
        if tokenizer.vocab_size != manifest["vocab_size"]:
            problems.append(
                f"vocab_size {tokenizer.vocab_size} != manifest {manifest['vocab_size']}"
            )
        if tokenizer.eos_id != manifest["eos_id"]:
            problems.append(f"eos_id {tokenizer.eos_id} != manifest {manifest['eos_id']}")
    if problems:
        raise ShardError(
            f"{where}: shards were written with a different tokenizer than {tpath} ("
            + "; ".join(problems)
            + "). Re-shard with this tokenizer (`megapt data shard --force`) "
            "or set tokenizer.path to the one the shards were made with"
        )


# --------------------------------------------------------------------------------------------
# Build and merge
# --------------------------------------------------------------------------------------------


def build_manifest(
    *,
    seq_len: int,
    vocab_size: int,
    eos_id: int,
    pad_id: int,
    tokenizer_sha256: str,
    splits: dict[str, list[dict]],
    sources: list | None = None,
    docs: dict | None = None,
    dropped_tokens: int = 0,
    num_jobs: int = 1,
    done: list[int] | None = None,
    params: dict | None = None,
) -> dict:
    """Assemble a manifest dict (schema in the module docstring) from shard entries per split."""
    out_splits = {}
    for split in SPLITS:
        shards = list(splits.get(split, []))
        out_splits[split] = {
            "samples": sum(s["samples"] for s in shards),
            "tokens": sum(s["tokens"] for s in shards),
            "shards": shards,
        }
    m = {
        "format": FORMAT,
        "version": VERSION,
        "seq_len": int(seq_len),
        "dtype": dtype_for_vocab(vocab_size),
        "vocab_size": int(vocab_size),
        "eos_id": int(eos_id),
        "pad_id": int(pad_id),
        "tokenizer_sha256": tokenizer_sha256,
        "splits": out_splits,
        "sources": list(sources or []),
        "docs": dict(docs or {"train": 0, "val": 0}),
        "dropped_tokens": int(dropped_tokens),
        "jobs": {
            "num_shards": int(num_jobs),
            "done": sorted(done if done is not None else range(num_jobs)),
        },
    }
    if params is not None:
        m["params"] = params
    validate_manifest(m)
    return m


_SAME_KEYS = ("seq_len", "dtype", "vocab_size", "eos_id", "pad_id", "tokenizer_sha256")


def merge_manifests(
    shard_dir: str | os.PathLike, *, write: bool = True, remote: RemoteConfig | None = None
) -> dict:
    """Join ``manifest-part-*-of-K.json`` (all K jobs) into ``manifest.json``, in job order. The
    folder may be a URL (Slurm array jobs that uploaded their shards)."""
    store = open_store(shard_dir, remote)
    where = store.root
    listing = store.list()
    found: dict[int, dict[int, str]] = {}
    for name in sorted(listing):
        mt = PART_RE.match(name)
        if mt:
            found.setdefault(int(mt.group(2)), {})[int(mt.group(1))] = name
    if not found:
        raise ShardError(
            f"{where}: no partial manifests (manifest-part-*-of-*.json) to merge; "
            f"run `megapt data shard --data.num_shards=K --data.shard_index=i` for "
            f"each i first"
        )
    if len(found) > 1:
        raise ShardError(
            f"{where}: partial manifests of different splits {sorted(found)} "
            f"(jobs counts); delete the stale ones and merge again"
        )
    ((k, parts),) = found.items()
    missing = [i for i in range(k) if i not in parts]
    if missing:
        raise ShardError(
            f"{where}: {len(missing)} of {k} jobs have not finished (no partial "
            f"manifest for shard_index {missing[:20]}"
            f"{' ...' if len(missing) > 20 else ''}); run `megapt data shard "
            f"--data.num_shards={k} --data.shard_index=<i>` for them, then merge"
        )
    ms = [read_manifest(store, parts[i]) for i in range(k)]
    first = ms[0]
    for i, m in enumerate(ms):
        diff = [key for key in _SAME_KEYS if m[key] != first[key]]
        if diff:
            raise ShardError(
                f"{m.path}: differs from {parts[0]} in {diff}; all jobs must use "
                f"the same config and tokenizer - re-run that job"
            )
        for s in m["splits"].values():
            for entry in s["shards"]:
                if listing.get(entry["name"]) != entry["bytes"]:
                    raise ShardError(
                        f"{join(where, entry['name'])}: listed in {parts[i]} but "
                        f"missing or of the wrong size; re-run job {i}"
                    )
    splits = {s: [e for m in ms for e in m["splits"].get(s, {}).get("shards", [])] for s in SPLITS}
    sources: list = []
    for m in ms:
        for src in m.get("sources", []):
            if src not in sources:
                sources.append(src)
    merged = build_manifest(
        seq_len=first["seq_len"],
        vocab_size=first["vocab_size"],
        eos_id=first["eos_id"],
        pad_id=first["pad_id"],
        tokenizer_sha256=first["tokenizer_sha256"],
        splits=splits,
        sources=sources,
        docs={s: sum(m.get("docs", {}).get(s, 0) for m in ms) for s in SPLITS},
        dropped_tokens=sum(m.get("dropped_tokens", 0) for m in ms),
        num_jobs=k,
        done=list(range(k)),
        params={key: v for key, v in first.get("params", {}).items() if key != "shard_index"}
        or None,
    )
    if merged["splits"]["train"]["samples"] == 0:
        raise ShardError(
            f"{where}: the {k} job(s) wrote no training sample (input too small for "
            f"seq_len={merged['seq_len']}?); add text or lower data.seq_len, then "
            f"re-shard with --force"
        )
    if write:
        write_json(store, MANIFEST, merged)
    return merged


# --------------------------------------------------------------------------------------------
# CLI: `megapt data merge` and `megapt data verify`
# --------------------------------------------------------------------------------------------


def add_args(parser, verb=("data", "verify")) -> None:
    parser.add_argument(
        "--dir", default="", help="shard directory (default: data.shard_dir / derived)"
    )
    if tuple(verb)[-1] == "verify":
        parser.add_argument(
            "--quick", action="store_true", help="check sizes and tar structure only, no sha256"
        )


def cli_main(cfg, args) -> int:
    """Exit codes: 0 ok, 2 bad config, 5 data error: a missing/invalid manifest, unfinished jobs
    (merge), one or more bad shards (verify: each printed as ``BAD <shard>: <why>``)."""
    shard_dir = location(args.dir) if getattr(args, "dir", "") else cfg.shard_dir
    remote = cfg.data.remote
    if tuple(args.verb)[-1] == "merge":
        m = merge_manifests(shard_dir, remote=remote)
        print(
            f"merged {m['jobs']['num_shards']} partial manifest(s) -> "
            f"{join(shard_dir, MANIFEST)}: "
            + ", ".join(
                f"{s} {m['splits'][s]['samples']} samples / {len(m['splits'][s]['shards'])} shards"
                for s in SPLITS
            )
        )
        return 0
    checked, errors = verify_dir(
        shard_dir, check_sha=not getattr(args, "quick", False), remote=remote
    )
    for e in errors:
        print(f"BAD  {e}")
    print(
        f"verified {checked} shard(s) in {shard_dir}: {checked - len(errors)} ok, {len(errors)} bad"
    )
    if errors:
        raise ShardError(
            f"{len(errors)} of {checked} shard(s) in {shard_dir} are bad (listed "
            f"above); re-run the shard jobs that wrote them "
            f"(`megapt data shard --force`)"
        )
    return 0
