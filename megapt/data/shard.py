"""Tokenize the cleaned corpus in parallel and write WebDataset tar shards + a manifest.

Documents are tokenized by a process pool (``data.num_proc``, 0 = all cores; ``imap`` keeps the
order), each followed by EOS, packed back to back and cut into samples of ``seq_len + 1`` tokens.
A document goes to ``val`` when a hash of its text falls under ``data.val_fraction``, so the split
does not depend on the order, the number of jobs or the number of processes.

Every shard is written to ``<name>.tmp`` and renamed when complete; the (partial) manifest is
written last. A rerun removes this job's leftover ``.tmp`` files and skips the job when its
manifest matches the current inputs, tokenizer and parameters; otherwise it rewrites the job's
shards from scratch. A split run (``--data.num_shards=K --data.shard_index=i``) takes every K-th
document and writes ``manifest-part-i-of-K.json``; ``megapt data merge`` joins them.

    write_token_dataset(out_dir, {"train": arrays, "val": arrays}, seq_len=16, vocab_size=500)
    shard_corpus(cfg)              # what `megapt data shard` runs
"""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from megapt.data.manifest import (
    MANIFEST, ShardError, atomic_write_json, build_manifest, dtype_for_vocab, merge_manifests, part_name,
    read_manifest_file, sample_key, sha256_file, shard_name)


# --------------------------------------------------------------------------------------------
# Shard writer: token arrays -> tar shards (reusable by tests and other tools)
# --------------------------------------------------------------------------------------------


class ShardWriter:
    """Write fixed-size samples into ``{split}-{job:03d}-{n:05d}.tar`` shards, atomically.

    ``add(sample)`` takes one array of ``sample_len`` tokens; a shard is closed (``.tmp`` renamed
    to ``.tar``) every ``shard_samples`` samples and by ``close()``, which returns the manifest
    entries ``{name, samples, tokens, bytes, sha256}`` of the shards written.
    """

    def __init__(self, out_dir: str | os.PathLike, split: str, job: int = 0, *, sample_len: int,
                 dtype: str = "uint16", shard_samples: int = 2048):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.split, self.job, self.sample_len = split, int(job), int(sample_len)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.shard_samples = int(shard_samples)
        self.entries: list[dict] = []
        self.n_samples = 0  # global (job-wide) sample index of the next sample
        self._tar: tarfile.TarFile | None = None
        self._file = None
        self._in_shard = 0

    def _open(self) -> None:
        name = shard_name(self.split, self.job, len(self.entries))
        self._final = self.out_dir / name
        self._tmp = self.out_dir / (name + ".tmp")
        self._file = open(self._tmp, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self._in_shard = 0

    def add(self, sample: np.ndarray) -> None:
        sample = np.asarray(sample)
        if sample.shape != (self.sample_len,):
            raise ValueError(f"sample of shape {sample.shape}, expected ({self.sample_len},)")
        if self._tar is None:
            self._open()
        data = sample.astype(self.dtype, copy=False).tobytes()
        info = tarfile.TarInfo(sample_key(self.split, self.job, self.n_samples) + ".tokens")
        info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed metadata: reproducible sha256
        self._tar.addfile(info, io.BytesIO(data))
        self.n_samples += 1
        self._in_shard += 1
        if self._in_shard >= self.shard_samples:
            self._finish()

    def _finish(self) -> None:
        assert self._tar is not None and self._file is not None
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self._final)
        self.entries.append({"name": self._final.name, "samples": self._in_shard,
                             "tokens": self._in_shard * self.sample_len, "bytes": self._final.stat().st_size,
                             "sha256": sha256_file(self._final)})
        self._tar = self._file = None

    def close(self) -> list[dict]:
        if self._tar is not None:
            self._finish()
        return self.entries

    def abort(self) -> None:
        """Drop the shard being written (its ``.tmp``); completed shards stay."""
        if self._tar is not None:
            try:
                self._file.close()
            finally:
                self._tmp.unlink(missing_ok=True)
                self._tar = self._file = None


def write_shards(samples: Iterable[np.ndarray], out_dir: str | os.PathLike, split: str, job: int = 0, *,
                 sample_len: int, dtype: str = "uint16", shard_samples: int = 2048) -> list[dict]:
    """Write an iterable of ``sample_len``-token arrays as shards; returns the manifest entries."""
    w = ShardWriter(out_dir, split, job, sample_len=sample_len, dtype=dtype, shard_samples=shard_samples)
    try:
        for s in samples:
            w.add(s)
    except BaseException:
        w.abort()
        raise
    return w.close()


def write_token_dataset(out_dir: str | os.PathLike, splits: dict[str, Iterable[np.ndarray]], *, seq_len: int,
                        vocab_size: int, eos_id: int = 1, pad_id: int = 2, tokenizer_sha256: str = "",
                        shard_samples: int = 2048, job: int = 0, num_jobs: int = 1) -> dict:
    """Write complete shards + ``manifest.json`` (or a partial manifest when ``num_jobs > 1``).

    ``splits`` maps "train"/"val" to iterables of ``seq_len + 1``-token arrays. Handy to build
    test fixtures for the loader without a tokenizer.
    """
    out_dir = Path(out_dir)
    dtype = dtype_for_vocab(vocab_size)
    entries = {split: write_shards(arrs, out_dir, split, job, sample_len=seq_len + 1, dtype=dtype,
                                   shard_samples=shard_samples) for split, arrs in splits.items()}
    m = build_manifest(seq_len=seq_len, vocab_size=vocab_size, eos_id=eos_id, pad_id=pad_id,
                       tokenizer_sha256=tokenizer_sha256, splits=entries, num_jobs=num_jobs, done=[job],
                       docs={s: 0 for s in ("train", "val")})
    atomic_write_json(out_dir / (MANIFEST if num_jobs == 1 else part_name(job, num_jobs)), m)
    return m


class Packer:
    """Concatenate token arrays and cut them into consecutive ``sample_len`` chunks (no overlap)."""

    def __init__(self, sample_len: int, dtype: str):
        self.sample_len = sample_len
        self.dtype = np.dtype(dtype)
        self._buf = np.empty(0, dtype=self.dtype)

    def add(self, tokens: np.ndarray) -> Iterator[np.ndarray]:
        buf = np.concatenate([self._buf, tokens.astype(self.dtype, copy=False)]) if len(self._buf) else tokens
        n = len(buf) // self.sample_len
        for i in range(n):
            yield buf[i * self.sample_len:(i + 1) * self.sample_len]
        self._buf = np.array(buf[n * self.sample_len:], dtype=self.dtype)

    @property
    def leftover(self) -> int:
        """Tokens of the trailing partial chunk (dropped at the end of a job)."""
        return len(self._buf)
