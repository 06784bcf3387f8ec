"""The shard tar format, in one place: writer, vectorised reader, fallback reader, verification.

A megapt shard is a plain ustar archive (WebDataset layout): one member ``<key>.tokens`` per
sample, holding ``seq_len + 1`` little-endian tokens (uint16 below a 65536 vocabulary, else
uint32), keys ``{split}-{job:03d}-{index:09d}`` in order, fixed metadata (mode 0644, mtime 0, no
owner) so the same input gives the same bytes. Every member then sits at a fixed stride, which
the readers use: a whole shard is viewed as an ``(n, seq_len + 1)`` array after one vectorised
check of all headers, and single members can be read with ``pread``. A tar that is not in this
layout (pax headers, other members, a foreign WebDataset shard) goes through ``tarfile``.

``webdataset.WebDataset`` reads these shards as they are: each sample is
``{"__key__": key, "tokens": bytes}``; ``np.frombuffer(sample["tokens"], "<u2")`` gives the
tokens. Foreign WebDataset shards whose samples carry token arrays (``megapt data index``) are
described by a ``member`` spec (the extension, ``raw`` or ``npy`` encoding, the stored dtype) and
read through ``tarfile``; see ``MemberSpec``.

    w = ShardWriter(out_dir, "train", job=0, sample_len=257, dtype="uint16", shard_samples=2048)
    w.add_many(rows); entries = w.close()         # manifest entries, one per finished shard
    rows = read_rows(buf, path, entry, sample_len=257, dtype="uint16", vocab_size=4096)
    verify_shard(path, entry, sample_len=257, dtype="uint16")   # ShardError naming the file
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import numpy as np

from megapt.errors import EXIT_DATA, UserError


class ShardError(UserError, RuntimeError):
    """A shard or manifest is missing, corrupt or inconsistent; the message names the file."""

    exit_code = EXIT_DATA
    kind = "data error"


# --------------------------------------------------------------------------------------------
# Names and dtypes
# --------------------------------------------------------------------------------------------

TOKENS_EXT = "tokens"  # the member extension megapt writes


def shard_name(split: str, job: int, n: int) -> str:
    return f"{split}-{job:03d}-{n:05d}.tar"


def sample_key(split: str, job: int, idx: int) -> str:
    return f"{split}-{job:03d}-{idx:09d}"


def dtype_for_vocab(vocab_size: int) -> str:
    return "uint16" if vocab_size < 65536 else "uint32"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_member_name(name: str, shard: str | os.PathLike) -> None:
    """Refuse tar member names that would escape the shard directory (absolute, ``..``)."""
    p = PurePosixPath(name)
    if (
        not name
        or name.startswith(("/", "\\"))
        or p.is_absolute()
        or ".." in p.parts
        or "\\" in name
        or re.match(r"^[A-Za-z]:", name)
    ):
        raise ShardError(
            f"{shard}: unsafe tar member name {name!r} (absolute path or '..'); "
            f"the shard is corrupt or not from megapt - delete it and re-shard"
        )


def split_key(name: str) -> tuple[str, str]:
    """WebDataset's rule: ``dir/stem.ext.more`` -> (``dir/stem``, ``ext.more``)."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (head + "/" + stem if head else stem), ext


# --------------------------------------------------------------------------------------------
# Member spec: which member of a sample holds the tokens, and how they are stored
# --------------------------------------------------------------------------------------------

# dtypes a foreign shard may store tokens in (npy or raw); ids must be >= 0 and < vocab_size
MEMBER_DTYPES = ("uint16", "uint32", "int32", "int64")


@dataclass(frozen=True)
class MemberSpec:
    """``ext``: the member extension holding the tokens (``tokens`` for megapt shards);
    ``encoding``: ``raw`` (little-endian array, ``dtype``) or ``npy`` (a ``.npy`` file: 1-D,
    little-endian, one of MEMBER_DTYPES); ``dtype``: the stored dtype (raw) or the one every
    sample's npy header declares."""

    ext: str = TOKENS_EXT
    encoding: str = "raw"
    dtype: str | None = None  # None: the manifest's dtype (megapt's own shards)
    strict: bool = True  # every member is <key>.tokens (megapt's shards); False: others skipped

    @classmethod
    def of(cls, manifest: dict) -> MemberSpec:
        """The spec of a manifest: megapt's own without a ``member`` entry, else foreign."""
        m = manifest.get("member")
        if not m:
            return cls()
        return cls(m["ext"], m["encoding"], m.get("dtype"), strict=False)

    def is_native(self, dtype: str) -> bool:
        """Raw ``.tokens`` members of the manifest's dtype: the fixed-stride readers may apply
        (they check the layout and give way to ``tarfile`` when it differs)."""
        return self.ext == TOKENS_EXT and self.encoding == "raw" and self.dtype in (None, dtype)

    def as_dict(self) -> dict:
        return {"ext": self.ext, "encoding": self.encoding, "dtype": self.dtype}


def decode_member(data: bytes, spec: MemberSpec, default_dtype: str, where: str) -> np.ndarray:
    """One member's payload -> 1-D int64-safe token array (the stored dtype)."""
    if spec.encoding == "npy":
        try:
            arr = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise ShardError(f"{where}: not a readable .npy array ({exc})") from None
        if arr.ndim != 1 or arr.dtype.kind not in "iu" or arr.dtype.name not in MEMBER_DTYPES:
            raise ShardError(
                f"{where}: .npy holds {arr.dtype} of shape {arr.shape}; megapt "
                f"reads 1-D token arrays of {', '.join(MEMBER_DTYPES)}"
            )
        return arr
    dt = np.dtype(spec.dtype or default_dtype).newbyteorder("<")
    if len(data) % dt.itemsize:
        raise ShardError(f"{where}: {len(data)} bytes is not a whole number of {dt.name} tokens")
    return np.frombuffer(data, dtype=dt)


# --------------------------------------------------------------------------------------------
# Writer: token arrays -> tar shards
# --------------------------------------------------------------------------------------------

_HEADER_TEMPLATE: dict[int, tuple[np.ndarray, int]] = {}


def _header_template(size: int) -> tuple[np.ndarray, int]:
    """A ustar header as ``tarfile`` writes it (mode 0644, mtime 0, no owner) with an empty name
    and the checksum field blank (8 spaces), and the sum of its bytes.

    Fixed metadata keeps shards byte-reproducible (same input -> same sha256).
    """
    if size not in _HEADER_TEMPLATE:
        info = tarfile.TarInfo("x")
        info.size, info.mtime, info.mode = size, 0, 0o644
        buf = info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")
        h = np.frombuffer(buf, dtype=np.uint8).copy()
        h[0:100] = 0
        h[148:156] = ord(" ")
        _HEADER_TEMPLATE[size] = (h, int(h.sum()))
    return _HEADER_TEMPLATE[size]


def _tar_headers(names: list[str], size: int) -> np.ndarray:
    """The (len(names), 512) uint8 headers of members ``names``, each of ``size`` bytes."""
    tmpl, base = _header_template(size)
    raw = [n.encode("ascii") for n in names]
    widths = set(map(len, raw))
    if max(widths, default=0) > 100:
        raise ValueError(f"tar member name too long: {max(raw, key=len)!r}")
    h = np.repeat(tmpl[None, :], len(raw), axis=0)
    if len(widths) == 1:  # the usual case: fixed-width sample keys
        h[:, : len(raw[0])] = np.frombuffer(b"".join(raw), dtype=np.uint8).reshape(len(raw), -1)
    else:
        for row, r in zip(h, raw):
            row[: len(r)] = np.frombuffer(r, dtype=np.uint8)
    # checksum: sum of the header bytes with the field blank, as "%06o\0" then the space left there
    chk = base + h[:, :100].sum(axis=1, dtype=np.int64)
    h[:, 148:154] = ord("0") + ((chk[:, None] >> np.arange(15, -1, -3)) & 7)
    h[:, 154] = 0
    return h


class ShardWriter:
    """Write fixed-size samples into ``{split}-{job:03d}-{n:05d}.tar`` shards, atomically.

    ``add(sample)`` takes one array of ``sample_len`` tokens; a shard is closed (``.tmp`` renamed
    to ``.tar``) every ``shard_samples`` samples and by ``close()``, which returns the manifest
    entries ``{name, samples, tokens, bytes, sha256}`` of the shards written. ``on_shard(path,
    entry)``, when given, is called with each finished shard (an upload, see megapt.data.remote).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        split: str,
        job: int = 0,
        *,
        sample_len: int,
        dtype: str = "uint16",
        shard_samples: int = 2048,
        on_shard: Callable[[Path, dict], None] | None = None,
    ):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.split, self.job, self.sample_len = split, int(job), int(sample_len)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.shard_samples = int(shard_samples)
        self.on_shard = on_shard
        self.entries: list[dict] = []
        self.n_samples = 0  # global (job-wide) sample index of the next sample
        self._file: BinaryIO | None = None
        self._in_shard = 0

    def _open(self) -> BinaryIO:
        name = shard_name(self.split, self.job, len(self.entries))
        self._final = self.out_dir / name
        self._tmp = self.out_dir / (name + ".tmp")
        self._in_shard = 0
        return open(self._tmp, "wb")

    def add(self, sample: np.ndarray) -> None:
        sample = np.asarray(sample)
        if sample.shape != (self.sample_len,):
            raise ValueError(f"sample of shape {sample.shape}, expected ({self.sample_len},)")
        self.add_many(sample[None, :])

    def add_many(self, samples: np.ndarray) -> None:
        """Append the rows of a (n, sample_len) array, opening/closing shards as they fill."""
        data = np.ascontiguousarray(samples, dtype=self.dtype)
        row_bytes = self.sample_len * self.dtype.itemsize
        member = 512 + row_bytes + (-row_bytes % 512)  # header + payload padded to the block size
        i = 0
        while i < len(data):
            if self._file is None:
                self._file = self._open()
            take = min(len(data) - i, self.shard_samples - self._in_shard)
            names = [
                sample_key(self.split, self.job, n) + "." + TOKENS_EXT
                for n in range(self.n_samples, self.n_samples + take)
            ]
            block = np.zeros((take, member), dtype=np.uint8)  # one buffer, one member a row
            block[:, :512] = _tar_headers(names, row_bytes)
            block[:, 512 : 512 + row_bytes] = (
                data[i : i + take].view(np.uint8).reshape(take, row_bytes)
            )
            self._file.write(block.data.cast("B"))
            self.n_samples += take
            self._in_shard += take
            i += take
            if self._in_shard >= self.shard_samples:
                self._finish()

    def _finish(self) -> None:
        assert self._file is not None
        # end-of-archive: two zero blocks, padded to tar's 10240-byte record size
        size = self._file.tell() + 1024
        self._file.write(b"\0" * (1024 + (-size % tarfile.RECORDSIZE)))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        os.replace(self._tmp, self._final)
        entry = {
            "name": self._final.name,
            "samples": self._in_shard,
            "tokens": self._in_shard * self.sample_len,
            "bytes": self._final.stat().st_size,
            "sha256": sha256_file(self._final),
        }
        if self.on_shard is not None:
            self.on_shard(self._final, entry)
        self.entries.append(entry)

    def close(self) -> list[dict]:
        if self._file is not None:
            self._finish()
        return self.entries

    def abort(self) -> None:
        """Drop the shard being written (its ``.tmp``); completed shards stay."""
        if self._file is not None:
            try:
                self._file.close()
            finally:
                self._tmp.unlink(missing_ok=True)
                self._file = None


def write_shards(
    samples: Iterable[np.ndarray],
    out_dir: str | os.PathLike,
    split: str,
    job: int = 0,
    *,
    sample_len: int,
    dtype: str = "uint16",
    shard_samples: int = 2048,
) -> list[dict]:
    """Write an iterable of ``sample_len``-token arrays as shards; returns the manifest entries."""
    w = ShardWriter(
        out_dir, split, job, sample_len=sample_len, dtype=dtype, shard_samples=shard_samples
    )
    try:
        for s in samples:
            w.add(s)
    except BaseException:
        w.abort()
        raise
    return w.close()


# --------------------------------------------------------------------------------------------
# Fallback reader: tarfile, any layout
# --------------------------------------------------------------------------------------------


def _open_tar(src: str | os.PathLike | bytes) -> tarfile.TarFile:
    if isinstance(src, (bytes, bytearray, memoryview)):
        return tarfile.open(fileobj=io.BytesIO(src), mode="r:")
    return tarfile.open(src, mode="r:")


def iter_shard(
    path: str | os.PathLike,
    *,
    sample_len: int,
    dtype: str,
    spec: MemberSpec | None = None,
    data: bytes | None = None,
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(key, tokens)`` for every sample of one shard tar, checking its structure.

    ``data``: the shard's bytes when already read (``path`` then only names it in errors).
    With megapt's own (strict) spec every member must be a ``<key>.tokens`` regular file of the
    right size; a foreign spec takes the ``<key>.<ext>`` member of each sample in tar order and
    skips the others. Raises ShardError naming the shard for a truncated or unreadable tar,
    unsafe or unexpected member names and payloads of the wrong size.
    """
    spec = spec or MemberSpec()
    native = spec.strict
    want = sample_len * np.dtype(dtype).itemsize
    out_dtype = np.dtype(dtype).newbyteorder("<")
    try:
        with _open_tar(data if data is not None else path) as tf:
            while True:
                try:
                    info = tf.next()
                except tarfile.ReadError as exc:
                    raise ShardError(f"{path}: truncated or corrupt tar ({exc})") from None
                if info is None:
                    break
                check_member_name(info.name, path)
                if native:
                    key, ext = info.name[: -len(".tokens")], info.name[-len(".tokens") :]
                    if not info.isfile():
                        raise ShardError(f"{path}: member {info.name!r} is not a regular file")
                    if ext != ".tokens":
                        raise ShardError(
                            f"{path}: unexpected member {info.name!r} (expected <key>.tokens)"
                        )
                    if info.size != want:
                        raise ShardError(
                            f"{path}: member {info.name!r} has {info.size} bytes, "
                            f"expected {want} ({sample_len} x {dtype})"
                        )
                else:
                    key, ext = split_key(info.name)
                    if ext != spec.ext or not info.isfile():
                        continue
                f = tf.extractfile(info)
                payload = f.read() if f is not None else b""
                if len(payload) != info.size:
                    raise ShardError(
                        f"{path}: truncated tar: member {info.name!r} has "
                        f"{len(payload)} of {info.size} bytes"
                    )
                if native:
                    yield key, np.frombuffer(payload, dtype=out_dtype)
                    continue
                tokens = decode_member(payload, spec, dtype, f"{path}: member {info.name!r}")
                if len(tokens) != sample_len:
                    raise ShardError(
                        f"{path}: member {info.name!r} holds {len(tokens)} tokens, "
                        f"the manifest says {sample_len} (seq_len + 1)"
                    )
                yield key, tokens
    except FileNotFoundError:
        raise ShardError(f"{path}: shard file missing") from None
    except (tarfile.TarError, EOFError, OSError) as exc:
        why = f"{type(exc).__name__}: {exc}"
        raise ShardError(f"{path}: truncated or corrupt tar ({why})") from None


# --------------------------------------------------------------------------------------------
# Vectorised reader for the layout megapt writes (the structure checks of iter_shard at numpy
# speed: a Python tarfile walk costs ~50 us a member, which caps a rank at a few thousand
# samples/s when many ranks share each shard)
# --------------------------------------------------------------------------------------------

BLOCK = 512
_NAME_CHARS = np.zeros(256, dtype=bool)  # bytes of a plain member name
_NAME_CHARS[
    np.frombuffer(
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-", dtype=np.uint8
    )
] = True


def _octal(fields: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Numeric tar header fields (n, width) uint8 -> (value, well-formed) per row."""
    f = fields.astype(np.int64)
    digit = (f >= 48) & (f <= 55)
    lead = np.cumprod(f == 32, axis=1).astype(bool)  # leading spaces are allowed
    run = np.cumprod(digit | lead, axis=1).astype(bool)
    d = digit & run
    after = np.cumsum(d[:, ::-1], axis=1)[:, ::-1] - d  # digits to the right of each digit
    value = np.where(d, (f - 48) << (3 * after), 0).sum(axis=1)
    ok = d.any(axis=1) & np.all(run | (f == 0) | (f == 32), axis=1)
    return value, ok


def member_stride(sample_len: int, dtype: str) -> int:
    """Bytes from one member's header to the next: 512 header + payload padded to 512."""
    return BLOCK + -(-sample_len * np.dtype(dtype).itemsize // BLOCK) * BLOCK


def _headers_ok(h: np.ndarray, payload: int) -> bool:
    """Are the (m, 512) headers plain ustar regular files of ``payload`` bytes with valid
    checksums?"""
    size, size_ok = _octal(h[:, 124:136])
    chk, chk_ok = _octal(h[:, 148:156])
    unsigned = h.sum(axis=1, dtype=np.int64) - h[:, 148:156].sum(axis=1, dtype=np.int64) + 8 * 32
    chk_ok &= chk == unsigned
    if not chk_ok.all():  # some tars sum signed chars (tarfile accepts both)
        high = (h >= 128).sum(axis=1) - (h[:, 148:156] >= 128).sum(axis=1)
        chk_ok |= chk == unsigned - 256 * high
    ok = (
        size_ok
        & chk_ok
        & (size == payload)
        & ((h[:, 156] == ord("0")) | (h[:, 156] == 0))  # regular file
        & np.all(h[:, 257:262] == np.frombuffer(b"ustar", dtype=np.uint8), axis=1)
        & ~h[:, 345:500].any(axis=1)
    )  # no ustar name prefix
    return bool(ok.all())


def _check_names(h: np.ndarray, path: str | os.PathLike) -> None:
    """Member names of the (m, 512) headers: plain ``[A-Za-z0-9_][A-Za-z0-9_.-]*.tokens`` names
    (no '/', so no '..' part) pass here; any other gets check_member_name (unsafe ->
    ShardError) and must end in .tokens."""
    m = len(h)
    field_ = h[:, :100]
    length = np.where(field_.all(axis=1), 100, np.argmax(field_ == 0, axis=1))
    inside = np.arange(100)[None, :] < length[:, None]
    plain = (
        np.all(_NAME_CHARS[field_] | ~inside, axis=1)
        & (field_[:, 0] != ord("."))
        & np.all(
            field_[np.arange(m)[:, None], np.maximum(length - 7, 0)[:, None] + np.arange(7)]
            == np.frombuffer(b".tokens", dtype=np.uint8),
            axis=1,
        )
        & (length > 7)
    )
    for k in np.nonzero(~plain)[0]:
        text = bytes(field_[k, : length[k]]).decode("utf-8", "replace")
        check_member_name(text, path)
        if not text.endswith(".tokens"):
            raise ShardError(f"{path}: unexpected member {text!r} (expected <key>.tokens)")


def fixed_stride_rows(
    buf: bytes, path: str | os.PathLike, n: int, sample_len: int, dtype: str
) -> np.ndarray | None:
    """(n, sample_len) read-only view of the payloads when the tar is n regular members of equal
    size, back to back (one ustar header each), then zero blocks; None when the layout differs.

    Every header's checksum, type, size and name is checked; an unsafe, unexpected or repeated
    name raises ShardError.
    """
    itemsize = np.dtype(dtype).itemsize
    stride = member_stride(sample_len, dtype)
    end = n * stride
    if n == 0 or len(buf) < end + 2 * BLOCK:
        return None
    raw = np.frombuffer(buf, dtype=np.uint8)
    h = raw[:end].reshape(n, stride)[:, :BLOCK]  # (n, 512) headers
    if not _headers_ok(h, sample_len * itemsize) or raw[end:].any():
        return None
    _check_names(h, path)
    unique = len(np.unique(np.ascontiguousarray(h[:, :100]).view(np.dtype((np.void, 100)))))
    if unique != n:
        raise ShardError(f"{path}: duplicate member names ({n - unique} repeated keys)")
    base = np.frombuffer(
        buf,
        dtype=np.dtype(dtype).newbyteorder("<"),
        offset=BLOCK,
        count=(len(buf) - BLOCK) // itemsize,
    )
    return np.lib.stride_tricks.as_strided(
        base, shape=(n, sample_len), strides=(stride, itemsize), writeable=False
    )


def read_rows(
    buf: bytes,
    path: str | os.PathLike,
    entry: dict,
    *,
    sample_len: int,
    dtype: str,
    vocab_size: int,
    check_sha: bool,
    spec: MemberSpec | None = None,
) -> np.ndarray:
    """A whole shard's bytes -> its (samples, sample_len) token rows, checked.

    Checks the size, the sha256 (``check_sha``), the tar structure (vectorised for megapt's own
    layout, ``tarfile`` otherwise), the sample count and the token ids (< vocab_size). Raises
    ShardError naming ``path``.
    """
    if len(buf) != entry["bytes"]:
        raise ShardError(
            f"{path}: changed while being read ({len(buf)} bytes, manifest says {entry['bytes']})"
        )
    if check_sha:
        digest = hashlib.sha256(buf).hexdigest()
        if digest != entry["sha256"]:
            raise ShardError(
                f"{path}: sha256 mismatch: {digest[:16]}... read, manifest says "
                f"{entry['sha256'][:16]}... (corrupt shard)"
            )
    spec = spec or MemberSpec()
    arr = None
    if spec.is_native(dtype):
        arr = fixed_stride_rows(buf, path, entry["samples"], sample_len, dtype)
    if arr is None:  # not the plain layout megapt writes (pax headers, foreign): walk it
        arr = np.empty((entry["samples"], sample_len), dtype=np.dtype(dtype).newbyteorder("<"))
        n = 0
        for key, tokens in iter_shard(
            path, sample_len=sample_len, dtype=dtype, spec=spec, data=buf
        ):
            if n >= len(arr):
                raise ShardError(
                    f"{path}: more samples than the {entry['samples']} the manifest lists"
                )
            if tokens.dtype.kind == "i" and len(tokens) and int(tokens.min()) < 0:
                raise ShardError(f"{path}: sample {key}: negative token id {int(tokens.min())}")
            if len(tokens) and int(tokens.max()) >= vocab_size:
                raise ShardError(
                    f"{path}: sample {key}: token id {int(tokens.max())} >= "
                    f"vocab_size {vocab_size} (corrupt shard or wrong manifest)"
                )
            arr[n] = tokens
            n += 1
        if n != entry["samples"]:
            raise ShardError(
                f"{path}: truncated or corrupt tar: {n} readable samples, manifest "
                f"says {entry['samples']}"
            )
    if len(arr) and int(arr.max()) >= vocab_size:
        raise ShardError(
            f"{path}: token id {int(arr.max())} >= vocab_size {vocab_size} "
            f"(corrupt shard or wrong manifest)"
        )
    return arr


# --------------------------------------------------------------------------------------------
# Member reads (verify_checksums=false): only the members a process uses
# --------------------------------------------------------------------------------------------


def _octal_field(f: bytes) -> int | None:
    """A numeric tar header field (leading spaces, octal digits, then NULs/spaces) -> int or
    None."""
    f = f.lstrip(b" ")
    rest = f.lstrip(b"01234567")
    digits = f[: len(f) - len(rest)]
    return int(digits, 8) if digits and not rest.strip(b"\0 ") else None


_PLAIN_NAME = re.compile(rb"[A-Za-z0-9_][A-Za-z0-9_.-]*\.tokens")  # no '/', so no '..' part


def _key_index(name: bytes) -> int | None:
    """The sample index at the end of a key ``{split}-{job}-{idx}.tokens``; None for other
    names."""
    stem = name[:-7] if name.endswith(b".tokens") else b""
    tail = stem.rsplit(b"-", 1)[-1]
    return int(tail) if tail.isdigit() else None


def _member_ok(hdr: bytes, payload: int, key: int, path: str | os.PathLike) -> bool:
    """One member header, checked in plain Python (cheaper than numpy for a few members): a ustar
    regular file of ``payload`` bytes, valid checksum, safe ``.tokens`` name with sample
    ``key``."""
    if (
        _octal_field(hdr[124:136]) != payload
        or hdr[156] not in (0, ord("0"))
        or hdr[257:262] != b"ustar"
        or hdr[345:500].strip(b"\0")
    ):
        return False
    chk = _octal_field(hdr[148:156])
    unsigned = sum(hdr) - sum(hdr[148:156]) + 8 * 32
    if chk != unsigned:  # some tars sum signed chars (tarfile accepts both)
        high = sum(b >= 128 for b in hdr) - sum(b >= 128 for b in hdr[148:156])
        if chk != unsigned - 256 * high:
            return False
    name = hdr[:100].split(b"\0", 1)[0]
    if not _PLAIN_NAME.fullmatch(name):
        text = name.decode("utf-8", "replace")
        try:
            check_member_name(text, path)  # absolute / '..' names are unsafe
        except ShardError:
            return False
        if not text.endswith(".tokens"):
            return False
    return _key_index(name) == key


class NotFixedLayout(Exception):
    """The shard is not n equal members back to back: read it whole."""


class PartialShard:
    """A shard read member by member (``os.pread``, or from one whole read with ``preload``);
    used when ``verify_checksums=false``.

    Opening checks the fixed layout (first and last header valid, keys ``n - 1`` apart, the
    end-of-archive blocks right after member ``n - 1``); every member read has its header
    (checksum, type, size), name (safe, ``.tokens``, key = first key + row) and token ids
    checked. A process then reads only the members it needs instead of whole shards. Raises
    NotFixedLayout for any other layout.
    """

    def __init__(
        self,
        path: Path,
        entry: dict,
        sample_len: int,
        dtype: str,
        vocab_size: int,
        *,
        preload: bool = False,
    ):
        self.path, self.n, self.vocab_size = path, int(entry["samples"]), vocab_size
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.payload = sample_len * self.dtype.itemsize
        self.stride = member_stride(sample_len, dtype)
        if self.n == 0 or entry["bytes"] < self.n * self.stride + 2 * BLOCK:
            raise NotFixedLayout
        self.fd = None
        self.members = None  # preload: the (n, stride) member blocks, read in one go
        if preload:  # the process uses much of the shard: one read beats a pread per member
            buf = path.read_bytes()
            if len(buf) != entry["bytes"]:
                raise ShardError(
                    f"{path}: changed while being read ({len(buf)} bytes, manifest "
                    f"says {entry['bytes']})"
                )
            end = self.n * self.stride
            self.members = np.frombuffer(buf, dtype=np.uint8)[:end].reshape(self.n, self.stride)
            first, last = buf[:BLOCK], buf[end - self.stride : end - self.stride + BLOCK]
            eof = buf[end : end + 2 * BLOCK]
        else:
            self.fd = os.open(path, os.O_RDONLY)
            first = os.pread(self.fd, BLOCK, 0)
            last = os.pread(self.fd, BLOCK, (self.n - 1) * self.stride)
            eof = os.pread(self.fd, 2 * BLOCK, self.n * self.stride)
        self.key0 = _key_index(first[:100].split(b"\0", 1)[0])
        if (
            self.key0 is None
            or len(first) != BLOCK
            or not _member_ok(first, self.payload, self.key0, path)
            or len(last) != BLOCK
            or not _member_ok(last, self.payload, self.key0 + self.n - 1, path)
            or eof != bytes(2 * BLOCK)
        ):
            raise NotFixedLayout
        if self.members is not None:  # every member's verdict at once (the checks of read())
            self.data, self.ok = self._check(self.members, np.arange(self.n))

    def __len__(self) -> int:
        return self.n

    def __del__(self):
        fd, self.fd = getattr(self, "fd", None), None
        if fd is not None:
            try:
                os.close(fd)
            except Exception:  # noqa: BLE001 - interpreter shutdown
                pass

    def read(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """-> (data (m, sample_len), ok (m,)): ok is False for a member that fails a check."""
        if self.members is not None:
            return self.data[rows], self.ok[rows]
        assert self.fd is not None
        uniq, inverse = np.unique(rows, return_inverse=True)
        buf = bytearray(len(uniq) * self.stride)
        view = memoryview(buf)
        for i, k in enumerate(uniq.tolist()):
            part = view[i * self.stride : (i + 1) * self.stride]
            if os.preadv(self.fd, [part], k * self.stride) != self.stride:
                raise ShardError(
                    f"{self.path}: truncated: member {k} ends past the end of the file"
                )
        raw = np.frombuffer(buf, dtype=np.uint8).reshape(len(uniq), self.stride)
        data, ok = self._check(raw, uniq)
        return data[inverse], ok[inverse]

    def _check(self, raw: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Member blocks (m, stride) at rows ``index`` -> (payloads (m, sample_len), ok (m,))."""
        ok = np.array(
            [
                _member_ok(raw[i, :BLOCK].tobytes(), self.payload, self.key0 + k, self.path)
                for i, k in enumerate(index.tolist())
            ],
            dtype=bool,
        )
        data = raw[:, BLOCK : BLOCK + self.payload].view(self.dtype)  # (m, sample_len)
        ok &= data.max(axis=1) < self.vocab_size
        return data, ok


# --------------------------------------------------------------------------------------------
# Verification against a manifest entry
# --------------------------------------------------------------------------------------------


def verify_shard(
    path: str | os.PathLike,
    entry: dict,
    *,
    sample_len: int | None = None,
    dtype: str | None = None,
    check_sha: bool = True,
    vocab_size: int | None = None,
    spec: MemberSpec | None = None,
) -> None:
    """Check one shard against its manifest entry; raise ShardError naming the file.

    Checks, in order: the file exists, its size, its sha256 (``check_sha``), and - when
    ``sample_len`` and ``dtype`` are given - the tar structure: member names, payload sizes and
    the sample count, and (``vocab_size``) that every token id is below the vocabulary size, as
    training checks it.
    """
    path = Path(path)
    if not path.is_file():
        raise ShardError(
            f"{path}: shard file missing (listed in the manifest); re-run the shard "
            f"job that wrote it"
        )
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise ShardError(
            f"{path}: size mismatch: {size} bytes on disk, manifest says "
            f"{entry['bytes']} (truncated or replaced shard)"
        )
    if check_sha:
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise ShardError(
                f"{path}: sha256 mismatch: {digest[:16]}... on disk, manifest says "
                f"{entry['sha256'][:16]}... (corrupt shard)"
            )
    if sample_len is not None and dtype is not None:
        n = 0
        for key, tokens in iter_shard(path, sample_len=sample_len, dtype=dtype, spec=spec):
            n += 1
            if tokens.dtype.kind == "i" and len(tokens) and int(tokens.min()) < 0:
                raise ShardError(f"{path}: sample {key}: negative token id {int(tokens.min())}")
            if vocab_size is not None and len(tokens) and int(tokens.max()) >= vocab_size:
                raise ShardError(
                    f"{path}: sample {key}: token id {int(tokens.max())} >= "
                    f"vocab_size {vocab_size} (corrupt shard or wrong manifest)"
                )
        if n != entry["samples"]:
            raise ShardError(
                f"{path}: truncated tar: {n} samples, manifest says {entry['samples']}"
            )
