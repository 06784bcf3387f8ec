"""Streaming loader: token shards -> deterministic, resumable (B, T) batches on every rank.

    loader = build_loader(cfg.data, cfg.shard_dir, "train", rank=r, world_size=W,
                          micro_batch=cfg.train.micro_batch, seed=cfg.run.seed)
    for batch in loader:               # dict(input_ids=LongTensor(B, T), labels=LongTensor(B, T))
        ...
        ckpt["data"] = loader.state_dict()   # small JSON-able dict
    loader.load_state_dict(ckpt["data"])     # the next iteration continues exactly there

Global order
------------
Every sample of a shard set (one shard directory + split) has a place in a global order that
depends only on ``(seed, epoch)`` and the shuffle settings, never on the number of ranks or
DataLoader workers. Epoch ``e`` of a set is built in three seeded steps: the shard order is
permuted, the samples inside each shard are permuted, and the concatenated stream is shuffled
again inside consecutive windows of ``data.shuffle_buffer`` samples (windows cross shard
boundaries, so a batch mixes neighbouring shards). With ``data.shuffle=false`` the order is the
manifest order. Several sets (``data.mix``) are interleaved by a fixed smooth weighted
round-robin pattern of 4096 slots (set ``i`` gets ``round(4096 * w_i / sum(w))`` of them), so
every stretch of the stream carries the configured proportions to within a sample or two.

Ranks and workers
-----------------
Micro-step ``k`` (counted from where this iterator started, at global position ``g0``)
consumes the ``world_size * micro_batch`` consecutive global positions starting at
``g0 + k * world_size * micro_batch``; rank ``r`` takes the slice ``[r * B, (r + 1) * B)`` of
them. DataLoader workers (``data.loader_workers`` per rank) build chunks of up to 16
consecutive micro-steps, worker ``i`` of ``n`` taking chunks ``i, i + n, ...``, and hand them
over as numpy arrays; the loader checks they arrive in order and makes the int64 tensors. So
within an epoch every sample is read exactly once globally, for any world size and worker
count.

Modes
-----
``infinite=True`` (training): the stream never ends; a set that reaches the end of its epoch
rolls over into the next, reshuffled, epoch (a batch may straddle the boundary). Batches are
always full. ``infinite=False`` (validation, coverage): one epoch of every set, the sets one
after the other in mix order; the last micro-step is cut at the end of the data, so rank ``r``
may get a shorter last batch or none at all - ranks can end with different batch counts
(``len(loader)`` gives this rank's count from the start), and globally every sample is seen
exactly once. A new ``iter()`` on a finished finite loader starts a new pass from the start.

State
-----
``state_dict()`` (JSON-able, a few hundred bytes)::

    {"format": "megapt-loader", "version": 1, "split": "train", "infinite": true,
     "position": 24576,                      # global samples consumed by the yielded batches
     "epoch": 0,                             # the smallest epoch over the sets
     "order": {"seed": 1234, "shuffle": true, "shuffle_buffer": 1024},
     "sets": [{"path": "shards/web", "weight": 3.0, "samples": 100000, "position": 18432, "epoch": 0},
              {"path": "shards/code", "weight": 1.0, "samples": 20000, "position": 6144, "epoch": 0}]}

Resume semantics
----------------
The state is the global position: how many global samples the micro-steps this loader has
*yielded to the caller* consumed (``k`` yielded batches on every rank => ``g0 + k * W * B``),
plus, for each set, how many of its samples that is (``position``, ``epoch``), the order
settings (seed, shuffle, shuffle_buffer) and the split. Batches that workers have prefetched
but the caller has not received are not counted, so they are built again after a resume.
``load_state_dict`` then continues the global stream at that position: with the same world
size, micro batch and weights the remaining stream is identical, batch for batch; with another
world size, worker count or micro batch the global stream is still identical and globally no
sample is lost or repeated (the new micro-steps start at the saved position). The state's
order settings win over the loader's (a changed seed mid-epoch would break exactly-once; a
warning is logged). Changed mix weights take effect from the saved position: each set
continues from its own saved position, so nothing of a set is lost or repeated either. Sets are
matched by their place in ``data.mix``: append new sets (they start at 0), don't reorder.
Every rank must save the state after the same number of batches (true in lock-step training);
the states of all ranks are then equal.

Bad shards
----------
At start-up: every manifest must be present and valid, list the split, match ``data.seq_len``
(and the tokenizer sha256 when given), and every shard it names must exist - otherwise an error
naming the file. Reading depends on ``data.verify_checksums`` (the config alone, never the
world size, so all ranks agree on every sample):

* ``true``: a process reads a shard whole the first time it needs it and checks its size,
  sha256, tar structure (every header, name, payload size), sample count and token ids
  (< vocab_size), then keeps it in a small cache. A bad shard is bad as a whole.
* ``false``: the file size is checked, then a process reads only the members it needs
  (``pread``), each with its header, name (safe, ``<key>.tokens``, the key the layout puts
  there) and token ids checked; a shard that is not in the plain fixed-stride layout is read
  whole. A bad member is bad alone; the shard is still counted as bad.

``bad_shard_policy=raise`` raises ShardError naming the shard. ``skip`` logs and counts the
shard and stops with ShardError once more than ``max_bad_fraction`` of a set's shards are bad;
in training mode the positions whose sample is bad are filled from the next shard of that
epoch's shard order (same row, modulo its size: deterministic on every rank, so batches stay
full and ranks agree; those fills repeat samples), in finite mode they are dropped. Data is
never silently misread.

Remote sets
-----------
A set whose path is a URL (``s3://``, ``gs://``, ``https://``; megapt.urls) has its manifest
fetched first and its shards read through a megapt.data.remote.ShardCache per process: fetched
whole into ``data.remote.cache_dir`` (size- and sha256-checked once, on download), the next
``data.remote.prefetch`` shards of this process's own positions queued ahead in the background,
so a rank downloads only the shards its positions touch. The order, the state and the resume
semantics are those of a local set; member reads are not used (a cached shard is read whole,
without hashing it again). A shard that cannot be fetched after the retries, is missing or fails
its sha256 is a bad shard.

I/O note: with ``verify_checksums=true`` and ``world_size * micro_batch`` smaller than a shard,
every rank (and worker) reads and hashes every shard of the epoch though it uses only its part;
fine on a node (page cache), costly on large jobs: there run ``megapt data verify`` once and
train with ``verify_checksums=false``, which reads only the samples each process uses.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from megapt.config import ConfigError, RemoteConfig
from megapt.data.manifest import check_tokenizer, load_manifest
from megapt.data.remote import RemoteStore, ShardCache, cache_root, open_store
from megapt.data.tarformat import (
    MemberSpec,
    NotFixedLayout,
    PartialShard,
    ShardError,
    read_rows,
    verify_shard,
)
from megapt.data.workers import die_with_parent
from megapt.errors import UserError
from megapt.urls import is_url, join

log = logging.getLogger(__name__)

STATE_FORMAT = "megapt-loader"
STATE_VERSION = 1
MIX_SLOTS = 4096  # length of the weighted round-robin pattern that interleaves the sets of a mix

# kinds of seeded permutations (part of the seed so they never collide)
_SHARD_ORDER, _IN_SHARD, _WINDOW = 1, 2, 3


# --------------------------------------------------------------------------------------------
# Plan: what the shard sets are and how positions map to samples (picklable, no file handles)
# --------------------------------------------------------------------------------------------


@dataclass
class _ShardSet:
    path: str  # shard directory or URL
    weight: float
    names: list[str]
    counts: np.ndarray  # samples per shard (int64), manifest order
    entries: list[dict]  # manifest entries (name, samples, tokens, bytes, sha256)
    remote: bool = False  # path is a URL: shards come through a ShardCache
    member: MemberSpec = field(default_factory=MemberSpec)  # where the tokens are in a sample

    @property
    def samples(self) -> int:
        return int(self.counts.sum())


@dataclass
class _Order:
    seed: int
    shuffle: bool
    shuffle_buffer: int

    def as_dict(self) -> dict:
        return {"seed": self.seed, "shuffle": self.shuffle, "shuffle_buffer": self.shuffle_buffer}


def _perm(n: int, *key: int) -> np.ndarray:
    """Seeded permutation of range(n); ``key`` = (seed, set, epoch, kind, index)."""
    ss = np.random.SeedSequence([int(k) % (1 << 63) for k in key])
    return np.random.Generator(np.random.PCG64(ss)).permutation(n)


class _LRU(OrderedDict):
    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity

    def put(self, key, value):
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.capacity:
            self.popitem(last=False)
        return value

    def hit(self, key):
        value = self.get(key)
        if value is not None:
            self.move_to_end(key)
        return value


def _mix_pattern(weights: list[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Smooth weighted round-robin over MIX_SLOTS slots.

    Returns ``(labels (S,), per_slot_counts (k,), cum (S+1, k))`` where ``cum[j, i]`` is the
    number of slots of set ``i`` among the first ``j`` slots.
    """
    k = len(weights)
    w = np.asarray(weights, dtype=np.float64)
    quota = w / w.sum() * MIX_SLOTS
    n = np.floor(quota).astype(np.int64)
    rest = MIX_SLOTS - int(n.sum())
    n[np.argsort(-(quota - n), kind="stable")[:rest]] += 1  # largest remainders
    labels = np.zeros(MIX_SLOTS, dtype=np.int64)
    if k > 1:
        current = np.zeros(k, dtype=np.int64)
        for j in range(MIX_SLOTS):
            current += n
            i = int(np.argmax(current))
            labels[j] = i
            current[i] -= MIX_SLOTS
    cum = np.zeros((MIX_SLOTS + 1, k), dtype=np.int64)
    cum[1:] = np.cumsum(labels[:, None] == np.arange(k)[None, :], axis=0)
    return labels, n, cum


@dataclass
class _Plan:
    """Everything a worker needs to turn global positions into samples."""

    split: str
    sets: list[_ShardSet]
    order: _Order
    seq_len: int
    dtype: str
    vocab_size: int
    infinite: bool
    verify_checksums: bool
    policy: str
    max_bad_fraction: float
    partial_reads: bool = False  # read single members instead of whole shards (see PartialShard)
    remote: RemoteConfig | None = None  # cache, prefetch and retry settings of URL sets
    prefetch: int = 0  # shards fetched ahead per remote set (resolved from remote.prefetch)
    mix_labels: np.ndarray = field(default=None, repr=False)  # type: ignore[arg-type]
    mix_counts: np.ndarray = field(default=None, repr=False)  # type: ignore[arg-type]
    mix_cum: np.ndarray = field(default=None, repr=False)  # type: ignore[arg-type]

    def __post_init__(self):
        if self.mix_labels is None:
            self.mix_labels, self.mix_counts, self.mix_cum = _mix_pattern(
                [s.weight for s in self.sets]
            )

    @property
    def total(self) -> int:
        """Samples in one epoch of all sets (the length of the finite stream)."""
        return sum(s.samples for s in self.sets)

    def set_counts(self, g: int) -> np.ndarray:
        """Training mode: how many of the global positions [0, g) belong to each set."""
        full, rem = divmod(int(g), MIX_SLOTS)
        return self.mix_counts * full + self.mix_cum[rem]

    def finite_positions(self, g: int) -> list[int]:
        """Finite mode: samples of each set consumed by the global positions [0, g)."""
        out, start = [], 0
        for s in self.sets:
            out.append(int(min(max(g - start, 0), s.samples)))
            start += s.samples
        return out


# --------------------------------------------------------------------------------------------
# Worker side: read shards, map positions, build batches
# --------------------------------------------------------------------------------------------


class _Reader:
    """Per-process shard cache and position -> sample mapping for one plan."""

    def __init__(self, plan: _Plan, preload: bool = True):
        self.plan = plan
        self.preload = preload  # member checks on whole-file reads (see PartialShard)
        self.sample_len = plan.seq_len + 1
        typical = max(1, int(np.median(np.concatenate([s.counts for s in plan.sets]))))
        window = plan.order.shuffle_buffer if plan.order.shuffle else 1
        # a shuffle window spans about window / typical + 1 shards; keep one more per set (a smaller
        # cache only costs re-reads, never correctness)
        self.shards = _LRU(min(32, math.ceil(max(window, 1) / typical) + 2) * len(plan.sets))
        self.perms = _LRU(256)
        self.caches: dict[int, ShardCache] = {}  # per remote set, made on first use
        self.bad: dict[tuple[int, int], str] = {}  # shards found bad (reported, counted)
        self.unusable: set[tuple[int, int]] = set()  # bad shards none of whose samples are used
        self.new_bad: list[list] = []

    # ---- the order of one set in one epoch ----

    def _cached_perm(self, n: int, *key: int) -> np.ndarray:
        p = self.perms.hit(key)
        if p is None:
            p = self.perms.put(key, _perm(n, *key))
        return p

    def _shard_order(self, si: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        key = ("order", si, epoch)
        got = self.perms.hit(key)
        if got is None:
            s = self.plan.sets[si]
            if self.plan.order.shuffle:
                order = _perm(len(s.counts), self.plan.order.seed, si, epoch, _SHARD_ORDER, 0)
            else:
                order = np.arange(len(s.counts))
            got = self.perms.put(key, (order, np.cumsum(s.counts[order])))
        return got

    def locate(self, si: int, epoch: int, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Positions ``p`` inside epoch ``epoch`` of set ``si`` -> (shard index, row in the shard)."""
        s, o = self.plan.sets[si], self.plan.order
        n_total = s.samples
        f = p.copy()
        if o.shuffle and o.shuffle_buffer > 1:
            buf = o.shuffle_buffer
            w = p // buf
            for wi in np.unique(w):
                m = w == wi
                size = min(buf, n_total - int(wi) * buf)
                tau = self._cached_perm(size, o.seed, si, epoch, _WINDOW, int(wi))
                f[m] = wi * buf + tau[p[m] - wi * buf]
        order, cum = self._shard_order(si, epoch)
        j = np.searchsorted(cum, f, side="right")
        shard = order[j]
        row = f - (cum[j] - s.counts[shard])
        if o.shuffle:
            for sh in np.unique(shard):
                m = shard == sh
                sigma = self._cached_perm(int(s.counts[sh]), o.seed, si, epoch, _IN_SHARD, int(sh))
                row[m] = sigma[row[m]]
        return shard, row

    # ---- shards ----

    def _open(self, si: int, j: int) -> np.ndarray | PartialShard | None:
        """Open shard ``j`` of set ``si``: its rows (whole read) or a PartialShard (member reads);
        None when it is unusable as a whole (policy skip)."""
        s = self.plan.sets[si]
        entry = s.entries[j]
        try:
            if self.plan.partial_reads and not s.remote and s.member.is_native(self.plan.dtype):
                path = Path(s.path) / entry["name"]
                verify_shard(path, entry, check_sha=False)  # exists, size
                try:
                    return self.shards.put(
                        (si, j),
                        PartialShard(
                            path,
                            entry,
                            self.sample_len,
                            self.plan.dtype,
                            self.plan.vocab_size,
                            preload=self.preload,
                        ),
                    )
                except NotFixedLayout:
                    pass
            return self.shards.put((si, j), self._read(si, j))
        except ShardError as exc:
            if self.plan.policy == "raise":
                raise
            self.unusable.add((si, j))
            self._mark_bad(si, j, str(exc))
            return None

    def take(self, si: int, j: int, rows: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        """Rows ``rows`` of shard ``j`` of set ``si`` -> (data (m, L), usable (m,)); with policy
        skip, unusable rows are False (a bad shard read whole: all of them)."""
        none = np.zeros(len(rows), dtype=bool)
        if (si, j) in self.unusable:
            return None, none
        arr = self.shards.hit((si, j))
        if arr is None:
            arr = self._open(si, j)
            if arr is None:
                return None, none
        if isinstance(arr, np.ndarray):
            return arr[rows], ~none
        data, ok = arr.read(rows)
        if ok.all() or (si, j) in self.bad:
            return data, ok
        # members that are not what the fixed layout promises: a full read of the shard decides
        try:
            whole = self._read(si, j)
        except ShardError as exc:
            if self.plan.policy == "raise":
                raise
            # counted and reported, but its good members stay in use: every process must agree on
            # each sample, and the others may never read the bad member
            self._mark_bad(si, j, str(exc))
            return data, ok
        self.shards.put((si, j), whole)
        return whole[rows], ~none

    def _read(self, si: int, j: int) -> np.ndarray:
        """Shard ``j`` of set ``si`` read whole and checked (a remote shard through the cache,
        whose sha256 was checked once, on download)."""
        s = self.plan.sets[si]
        entry = s.entries[j]
        if s.remote:
            buf, where, check_sha = self.cache(si).read(j), join(s.path, entry["name"]), False
        else:
            where = Path(s.path) / entry["name"]
            verify_shard(where, entry, check_sha=False)  # exists, size
            buf, check_sha = where.read_bytes(), self.plan.verify_checksums
        return read_rows(
            buf,
            where,
            entry,
            sample_len=self.sample_len,
            dtype=self.plan.dtype,
            vocab_size=self.plan.vocab_size,
            check_sha=check_sha,
            spec=s.member,
        )

    def cache(self, si: int) -> ShardCache:
        c = self.caches.get(si)
        if c is None:
            s, cfg = self.plan.sets[si], self.plan.remote
            store = open_store(s.path, cfg)
            assert isinstance(store, RemoteStore) and cfg is not None
            c = self.caches[si] = ShardCache(store, s.entries, cfg, depth=self.plan.prefetch)
        return c

    def prefetch(self, si: int, epoch: int, p: np.ndarray) -> None:
        """Queue the shards behind positions ``p`` (in order of need) of a remote set."""
        shard, _ = self.locate(si, epoch, p)
        _, first = np.unique(shard, return_index=True)
        order = shard[np.sort(first)]
        self.cache(si).prefetch(
            int(j)
            for j in order
            if (si, int(j)) not in self.shards and (si, int(j)) not in self.unusable
        )

    def remote_stats(self) -> dict:
        """This process's downloads so far (summed over the remote sets)."""
        out = {"downloads": 0, "bytes": 0, "hits": 0, "wait_s": 0.0, "evicted": 0}
        for c in self.caches.values():
            for k in out:
                out[k] += c.stats[k]
        return out

    def take_downloaded(self) -> list[list]:
        """[set, shard name] of the shards downloaded since the last call."""
        out = []
        for si, c in self.caches.items():
            with c._lock:
                names, c.downloaded = c.downloaded, []
            out += [[si, n] for n in names]
        return out

    def _mark_bad(self, si: int, j: int, reason: str) -> None:
        if (si, j) in self.bad:
            return
        self.bad[(si, j)] = reason
        self.new_bad.append([si, self.plan.sets[si].names[j], reason])
        _check_bad_fraction(
            self.plan, si, {self.plan.sets[si].names[k[1]] for k in self.bad if k[0] == si}
        )

    def rows(self, si: int, epoch: int, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Samples at positions ``p`` of (set, epoch) -> (rows (n, L), kept mask (len(p),))."""
        shard, row = self.locate(si, epoch, p)
        s = self.plan.sets[si]
        out = np.empty((len(p), self.sample_len), dtype=np.dtype(self.plan.dtype).newbyteorder("<"))
        keep = np.ones(len(p), dtype=bool)
        for sh in np.unique(shard):
            idx = np.nonzero(shard == sh)[0]
            data, ok = self.take(si, int(sh), row[idx])
            if data is not None:
                out[idx[ok]] = data[ok]
            pending = idx[~ok]
            if not len(pending):
                continue
            if not self.plan.infinite:  # finite mode: drop the samples of bad shards / members
                keep[pending] = False
                continue
            # training: fill from the next shards in this epoch's shard order (same row, modulo)
            order, _ = self._shard_order(si, epoch)
            at = int(np.nonzero(order == sh)[0][0])
            for step in range(1, len(order)):
                alt = int(order[(at + step) % len(order)])
                data, ok = self.take(si, alt, row[pending] % int(s.counts[alt]))
                if data is not None:
                    out[pending[ok]] = data[ok]
                pending = pending[~ok]
                if not len(pending):
                    break
            else:
                raise ShardError(
                    f"{s.path}: no usable {self.plan.split} shard left to fill in for bad ones"
                )
        return out[keep], keep


def _check_bad_fraction(plan: _Plan, si: int, bad_names: set) -> None:
    s = plan.sets[si]
    if len(bad_names) > plan.max_bad_fraction * len(s.names):
        raise ShardError(
            f"{s.path}: {len(bad_names)} of {len(s.names)} {plan.split} shards are bad "
            f"(> data.max_bad_fraction={plan.max_bad_fraction}): {sorted(bad_names)[:10]}; "
            f"run `megapt data verify` and re-shard"
        )


def _worker_init(parent_pid: int, worker_id: int) -> None:
    """DataLoader worker_init_fn: the worker dies with the trainer process (megapt.data.workers)."""
    die_with_parent(parent_pid)


def _as_is(record: Any) -> Any:
    """DataLoader collate_fn: keep the worker's record (numpy rows) as it is."""
    return record


class _BatchStream(IterableDataset):
    """This rank's micro-batches from global position ``g0``, in chunks of ``chunk`` micro-steps.

    Worker ``i`` of ``n`` yields chunks ``c = i, i + n, ...``; chunk ``c`` holds micro-steps
    ``c * chunk ... c * chunk + chunk - 1`` as numpy rows (a finite stream's last chunk may be
    shorter; a rank with nothing in a micro-step gets an empty array for it).
    """

    def __init__(
        self,
        plan: _Plan,
        *,
        g0: int,
        q0: list[int],
        rank: int,
        world_size: int,
        micro_batch: int,
        chunk: int,
    ):
        super().__init__()
        self.plan, self.g0, self.q0 = plan, int(g0), list(q0)
        self.rank, self.world_size, self.micro_batch, self.chunk = (
            rank,
            world_size,
            micro_batch,
            chunk,
        )

    def __iter__(self) -> Iterator[dict]:
        if get_worker_info() is None:
            yield from self._records()
            return
        try:
            yield from self._records()
        except UserError as exc:  # handed over as it is (torch would wrap it in a traceback)
            yield {"_error": exc}

    def _records(self) -> Iterator[dict]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        plan, B, M = self.plan, self.micro_batch, self.chunk
        # member reads: a process that uses >= 1/4 of each shard reads it in one go instead (the
        # same checks per member, so the same samples either way)
        reader = _Reader(plan, preload=self.world_size * nw < 4)
        step = self.world_size * B
        c0 = plan.set_counts(self.g0)
        total = plan.total
        set_start = np.cumsum([0] + [s.samples for s in plan.sets])
        ahead = self._lookahead() if any(s.remote for s in plan.sets) else 0
        next_prefetch = 0  # micro-step at which the next look ahead is due
        c = wid
        while True:
            if ahead and c * M >= next_prefetch:
                self._prefetch(reader, c, nw, ahead, c0, set_start)
                next_prefetch = c * M + max(M, ahead // (4 * nw))
            rows = []
            for k in range(c * M, c * M + M):
                if not plan.infinite and self.g0 + k * step >= total:
                    break
                rows.append(self._build(reader, self._micro_positions(k), c0, set_start))
            if not rows:
                return
            # numpy, not tensors, and several micro-steps a message: a pipe moves small arrays far
            # faster than torch's shared-memory tensor hand-over; int64 tensors are made by the caller
            rec = {"rows": rows, "_c": c, "_bad": reader.new_bad, "_w": wid}
            if reader.caches:
                rec["_remote"] = reader.remote_stats()
                rec["_downloaded"] = reader.take_downloaded()
            yield rec
            reader.new_bad = []
            c += nw

    def _lookahead(self) -> int:
        """Micro-steps of this worker to look ahead so that ``plan.prefetch`` shards are found
        even when the order is sequential (at most 64k positions per look)."""
        plan, B = self.plan, self.micro_batch
        typical = max(int(np.median(np.concatenate([s.counts for s in plan.sets]))), 1)
        want = -(-plan.prefetch * typical // (self.world_size * B))
        return int(min(max(want, self.chunk), max(1, (1 << 16) // B)))

    def _micro_positions(self, k: int) -> np.ndarray:
        start = self.g0 + k * self.world_size * self.micro_batch + self.rank * self.micro_batch
        pos = np.arange(start, start + self.micro_batch, dtype=np.int64)
        return pos if self.plan.infinite else pos[pos < self.plan.total]

    def _prefetch(
        self, reader: _Reader, c: int, nw: int, ahead: int, c0: np.ndarray, set_start: np.ndarray
    ) -> None:
        """Queue the remote shards of this worker's next ``ahead`` micro-steps, in order."""
        plan, M = self.plan, self.chunk
        ks: list[int] = []
        cc = c
        while len(ks) < ahead:
            ks += range(cc * M, cc * M + M)
            cc += nw
        pos = np.concatenate([self._micro_positions(k) for k in ks[:ahead]])
        if not len(pos):
            return
        si, q = self._where(pos, c0, set_start)
        for s in np.unique(si):
            if not plan.sets[s].remote:
                continue
            qs = q[si == s]
            n = plan.sets[s].samples
            epochs = qs // n
            for e in np.unique(epochs):  # in order: an epoch's positions come before the next's
                reader.prefetch(int(s), int(e), qs[epochs == e] - e * n)

    def _where(
        self, pos: np.ndarray, c0: np.ndarray, set_start: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Global positions -> (set, sample index within the set's own stream)."""
        plan = self.plan
        if plan.infinite:
            slot = pos % MIX_SLOTS
            si = plan.mix_labels[slot]
            # sample index within the set's own (endless) stream
            before = (pos // MIX_SLOTS) * plan.mix_counts[si] + plan.mix_cum[slot, si]
            q = np.asarray(self.q0, dtype=np.int64)[si] + before - c0[si]
        else:
            si = np.searchsorted(set_start, pos, side="right") - 1
            q = pos - set_start[si]
        return si, q

    def _build(
        self, reader: _Reader, pos: np.ndarray, c0: np.ndarray, set_start: np.ndarray
    ) -> np.ndarray:
        plan = self.plan
        si, q = self._where(pos, c0, set_start)
        out = np.empty((len(pos), plan.seq_len + 1), dtype=np.dtype(plan.dtype).newbyteorder("<"))
        keep = np.ones(len(pos), dtype=bool)
        for s in np.unique(si):
            n = plan.sets[s].samples
            ms = si == s
            epoch = q[ms] // n
            for e in np.unique(epoch):
                idx = np.nonzero(ms)[0][epoch == e]
                got, kept = reader.rows(int(s), int(e), q[idx] - e * n)
                out[idx[kept]] = got
                keep[idx[~kept]] = False
        return out[keep]


# --------------------------------------------------------------------------------------------
# The loader the trainer holds
# --------------------------------------------------------------------------------------------


class ShardLoader:
    """Iterable of batches for one rank with a resumable global position (see module docstring)."""

    def __init__(
        self,
        plan: _Plan,
        *,
        rank: int,
        world_size: int,
        micro_batch: int,
        num_workers: int = 0,
        pin_memory: bool = False,
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}"
            )
        if micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
        self.plan = plan
        self.rank, self.world_size, self.micro_batch = rank, world_size, micro_batch
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.position = 0  # global samples consumed by the batches yielded so far
        self.set_positions = [0] * len(plan.sets)  # per set: samples consumed (across epochs)
        self.bad_shards: dict[
            tuple[int, str], str
        ] = {}  # (set, shard name) -> reason, as seen by this rank
        # remote sets: what this rank's processes fetched (latest totals per worker) and the
        # shards they downloaded, in order ([set, name]; per process, so a shard two workers
        # of a node share appears once)
        self._remote_by_worker: dict[tuple[int, int], dict] = {}
        self._passes = 0  # DataLoaders started (each starts its workers' totals afresh)
        self.downloaded: list[tuple[int, str]] = []
        self._generation = 0

    # ---- iteration ----

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        plan = self.plan
        if not plan.infinite and self.position >= plan.total:
            self._set_position(0, [0] * len(plan.sets))  # a finished finite pass: start a new one
        while True:
            gen = self._generation
            g0, q0 = self.position, list(self.set_positions)
            c0 = plan.set_counts(g0)
            step = self.world_size * self.micro_batch
            chunk = self._chunk()
            ds = _BatchStream(
                plan,
                g0=g0,
                q0=q0,
                rank=self.rank,
                world_size=self.world_size,
                micro_batch=self.micro_batch,
                chunk=chunk,
            )
            self._passes += 1
            dl = DataLoader(
                ds,
                batch_size=None,
                num_workers=self.num_workers,
                collate_fn=_as_is,
                worker_init_fn=functools.partial(_worker_init, os.getpid()),
            )
            expect = 0
            restarted = False
            for rec in dl:
                if "_error" in rec:  # a bad shard (policy raise) found by a worker
                    raise rec["_error"]
                if rec["_c"] != expect:  # never hand out batches out of order
                    raise RuntimeError(
                        f"loader: got chunk {rec['_c']} from the workers, expected {expect}"
                    )
                expect += 1
                self._note_bad(rec["_bad"])
                if "_remote" in rec:
                    self._note_remote(rec)
                for j, rows in enumerate(rec["rows"]):
                    g = g0 + (rec["_c"] * chunk + j + 1) * step
                    if plan.infinite:
                        q = (np.asarray(q0) + plan.set_counts(g) - c0).tolist()
                    else:
                        g = min(g, plan.total)
                        q = plan.finite_positions(g)
                    self._set_position(g, q)
                    if len(rows):
                        yield self._to_batch(rows)
                    if self._generation != gen:  # load_state_dict() while iterating: restart there
                        restarted = True
                        break
                if restarted:
                    break
            del dl
            if not restarted:
                return

    def _chunk(self) -> int:
        """Micro-steps per worker message: up to 16 (~256k tokens); 1 without workers."""
        if self.num_workers == 0:
            return 1
        return max(1, min(16, (1 << 18) // (self.micro_batch * (self.plan.seq_len + 1))))

    def _to_batch(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        x = torch.from_numpy(rows[:, :-1].astype(np.int64))  # (B, T)
        y = torch.from_numpy(rows[:, 1:].astype(np.int64))  # (B, T), shifted by one
        if self.pin_memory:
            x, y = x.pin_memory(), y.pin_memory()
        return {"input_ids": x, "labels": y}

    def _set_position(self, g: int, q: list[int]) -> None:
        self.position = int(g)
        self.set_positions = [int(x) for x in q]

    def _note_bad(self, bad: list) -> None:
        for si, name, reason in bad:
            if (si, name) not in self.bad_shards:
                self.bad_shards[(si, name)] = reason
                n_bad = sum(1 for (i, _) in self.bad_shards if i == si)
                log.warning(
                    "rank %d: skipping bad shard (%d of %d in %s so far): %s",
                    self.rank,
                    n_bad,
                    len(self.plan.sets[si].names),
                    self.plan.sets[si].path,
                    reason,
                )
                _check_bad_fraction(self.plan, si, {n for (i, n) in self.bad_shards if i == si})

    def _note_remote(self, rec: dict) -> None:
        key = (self._passes, rec["_w"])
        self._remote_by_worker[key] = rec["_remote"]
        self.downloaded += [(int(si), name) for si, name in rec["_downloaded"]]

    @property
    def remote_stats(self) -> dict:
        """Downloads of remote shards by this rank's processes so far: ``downloads``, ``bytes``,
        cache ``hits``, ``evicted`` and ``wait_s`` (seconds the readers waited for shards)."""
        out = {"downloads": 0, "bytes": 0, "hits": 0, "wait_s": 0.0, "evicted": 0}
        for st in self._remote_by_worker.values():
            for k in out:
                out[k] += st[k]
        return out

    def __len__(self) -> int:
        """Finite mode: batches this rank yields in a full pass from the start (fewer when bad shards
        are skipped)."""
        if self.plan.infinite:
            raise TypeError("an infinite (training) loader has no length")
        B, step, total = self.micro_batch, self.world_size * self.micro_batch, self.plan.total
        steps = -(-total // step)
        return max(0, steps - 1) + (
            1 if steps and (steps - 1) * step + self.rank * B < total else 0
        )

    @property
    def samples_per_epoch(self) -> list[int]:
        return [s.samples for s in self.plan.sets]

    # ---- state ----

    def state_dict(self) -> dict[str, Any]:
        sets: list[dict[str, Any]] = []
        for s, q in zip(self.plan.sets, self.set_positions):
            sets.append(
                {
                    "path": s.path,
                    "weight": s.weight,
                    "samples": s.samples,
                    "position": q,
                    "epoch": q // s.samples,
                }
            )
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "split": self.plan.split,
            "infinite": self.plan.infinite,
            "position": self.position,
            "epoch": min(x["epoch"] for x in sets),
            "order": self.plan.order.as_dict(),
            "sets": sets,
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Continue at the saved global position (see "Resume semantics" in the module docstring)."""
        try:
            self._load_state(sd)
        except (KeyError, TypeError) as exc:
            raise ValueError(
                f"loader state is incomplete or malformed ({type(exc).__name__}: {exc}); "
                f"expected what ShardLoader.state_dict() returns"
            ) from None

    def _load_state(self, sd: dict[str, Any]) -> None:
        if not isinstance(sd, dict) or sd.get("format") != STATE_FORMAT:
            raise ValueError(
                f"not a megapt loader state (format {sd.get('format') if isinstance(sd, dict) else sd!r})"
            )
        if sd.get("version") != STATE_VERSION:
            raise ValueError(
                f"loader state version {sd.get('version')!r}, this megapt reads {STATE_VERSION}"
            )
        if sd["split"] != self.plan.split or bool(sd["infinite"]) != self.plan.infinite:
            raise ValueError(
                f"loader state is for split {sd['split']!r} infinite={sd['infinite']}, this loader is "
                f"split {self.plan.split!r} infinite={self.plan.infinite}"
            )
        order = _Order(
            int(sd["order"]["seed"]),
            bool(sd["order"]["shuffle"]),
            int(sd["order"]["shuffle_buffer"]),
        )
        if order != self.plan.order:
            log.warning(
                "loader: the checkpoint's data order %s differs from the config's %s; keeping the "
                "checkpoint's so the epoch in progress stays exactly-once",
                order.as_dict(),
                self.plan.order.as_dict(),
            )
            self.plan.order = order
        old = sd["sets"]
        if len(old) > len(self.plan.sets):
            log.warning(
                "loader: the checkpoint had %d shard sets, the config has %d; dropping %s",
                len(old),
                len(self.plan.sets),
                [o["path"] for o in old[len(self.plan.sets) :]],
            )
        q = []
        for i, s in enumerate(self.plan.sets):
            if i >= len(old):
                log.warning("loader: new shard set %s starts at sample 0", s.path)
                q.append(0)
                continue
            o = old[i]
            if Path(o["path"]).name != Path(s.path).name or o["samples"] != s.samples:
                log.warning(
                    "loader: shard set %d was %s (%d samples), now %s (%d samples); continuing at its "
                    "saved position %d",
                    i,
                    o["path"],
                    o["samples"],
                    s.path,
                    s.samples,
                    o["position"],
                )
            if o.get("weight") != s.weight:
                log.info(
                    "loader: set %s weight %s -> %s from position %d",
                    s.path,
                    o.get("weight"),
                    s.weight,
                    sd["position"],
                )
            q.append(int(o["position"]))
        pos = int(sd["position"])
        if not self.plan.infinite:
            q = self.plan.finite_positions(pos)
        self._set_position(pos, q)
        self._generation += 1


# --------------------------------------------------------------------------------------------
# Building: start-up checks
# --------------------------------------------------------------------------------------------


def _open_set(
    path: str | os.PathLike, weight: float, split: str, data_cfg: Any, tokenizer_sha256: str | None
) -> tuple[_ShardSet, dict]:
    """One shard set: its manifest (a URL's is fetched first) checked against the config, and
    every shard it lists present (for a URL: one listing; http(s) cannot list, its shards are
    checked when fetched)."""
    loc: Path | str = path if isinstance(path, str) and is_url(path) else Path(path)
    remote = isinstance(loc, str)
    m = load_manifest(loc, data_cfg.remote)  # ShardError naming the file when missing / invalid
    where = getattr(m, "path", join(loc, "manifest.json"))
    if m["seq_len"] != data_cfg.seq_len:
        raise ConfigError(
            f"{where}: shards have seq_len {m['seq_len']} but data.seq_len is "
            f"{data_cfg.seq_len}; set --data.seq_len={m['seq_len']} or re-shard"
        )
    if tokenizer_sha256:
        check_tokenizer(m, tokenizer_sha256)
    entries = m["splits"].get(split, {}).get("shards", [])
    entries = [e for e in entries if e["samples"] > 0]
    if not entries:
        raise ShardError(f"{where}: no {split!r} samples listed; re-run `megapt data prepare`")
    if isinstance(loc, Path):
        missing = [e["name"] for e in entries if not (loc / e["name"]).is_file()]
    elif not loc.startswith(("http://", "https://")):
        listing = open_store(loc, data_cfg.remote).list()
        missing = [e["name"] for e in entries if e["name"] not in listing]
    else:
        missing = []
    if missing:
        more = f" (and {len(missing) - 1} more: {missing[1:6]})" if len(missing) > 1 else ""
        raise ShardError(
            f"{join(loc, missing[0])}: shard listed in {where} is missing{more}; "
            f"re-run the shard job that wrote it or restore the files"
        )
    s = _ShardSet(
        path=str(loc).rstrip("/"),
        weight=float(weight),
        names=[e["name"] for e in entries],
        counts=np.array([e["samples"] for e in entries], dtype=np.int64),
        entries=entries,
        remote=remote,
        member=MemberSpec.of(m),
    )
    return s, m


def build_loader(
    data_cfg: Any,
    shard_dir: str | os.PathLike,
    split: str,
    *,
    rank: int,
    world_size: int,
    micro_batch: int,
    seed: int,
    infinite: bool = True,
    tokenizer_sha256: str | None = None,
    pin_memory: bool | None = None,
    num_workers: int | None = None,
) -> ShardLoader:
    """The loader for one rank: checks manifests and shards, returns a resumable ``ShardLoader``.

    ``data_cfg`` is ``cfg.data``; ``shard_dir`` is used when ``data.mix`` is empty. ``pin_memory``
    defaults to CUDA availability; ``num_workers`` to ``data.loader_workers``.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if not data_cfg.mix and not shard_dir:
        raise ConfigError("loader: no shard directory (pass cfg.shard_dir, or set data.mix)")
    specs = [(mx["path"], float(mx.get("weight", 1.0))) for mx in data_cfg.mix] or [
        (shard_dir, 1.0)
    ]
    sets, manifests = [], []
    for p, w in specs:
        s, m = _open_set(p, w, split, data_cfg, tokenizer_sha256)
        sets.append(s)
        manifests.append(m)
    first = manifests[0]
    for s, m in zip(sets[1:], manifests[1:]):
        diff = [
            k for k in ("dtype", "vocab_size", "tokenizer_sha256", "eos_id") if m[k] != first[k]
        ]
        if diff:
            raise ShardError(
                f"{s.path}: mixed shard sets disagree with {sets[0].path} on {diff}; every set of "
                f"data.mix must be tokenized with the same tokenizer"
            )
    if infinite and len(sets) > 1:
        total_w = sum(s.weight for s in sets)
        tiny = [s.path for s in sets if s.weight / total_w * MIX_SLOTS < 0.5]
        if tiny:
            raise ConfigError(
                f"data.mix: weights of {tiny} are below 1/{2 * MIX_SLOTS} of the total; too small to mix"
            )
    workers = data_cfg.loader_workers if num_workers is None else num_workers
    plan = _Plan(
        split=split,
        sets=sets,
        order=_Order(int(seed), bool(data_cfg.shuffle), int(data_cfg.shuffle_buffer)),
        seq_len=int(first["seq_len"]),
        dtype=first["dtype"],
        vocab_size=int(first["vocab_size"]),
        infinite=infinite,
        verify_checksums=bool(data_cfg.verify_checksums),
        policy=data_cfg.bad_shard_policy,
        max_bad_fraction=float(data_cfg.max_bad_fraction),
        # no checksums to compute: read just the members this process needs. Decided by the
        # config alone, so every world size / worker count sees the same samples
        partial_reads=not data_cfg.verify_checksums,
        remote=data_cfg.remote,
        prefetch=_prefetch_depth(data_cfg, sets),
    )
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    loader = ShardLoader(
        plan,
        rank=rank,
        world_size=world_size,
        micro_batch=micro_batch,
        num_workers=workers,
        pin_memory=pin_memory,
    )
    if rank == 0:
        log.info(
            "loader %s: %s, %d samples x %d tokens in %d shards, %s, %d workers/rank, seed %d, %s",
            split,
            " + ".join(f"{s.path} (w={s.weight:g}, {s.samples} samples)" for s in sets),
            plan.total,
            plan.seq_len,
            sum(len(s.names) for s in sets),
            "infinite" if infinite else "one epoch",
            workers,
            seed,
            f"shuffle buffer {plan.order.shuffle_buffer}" if plan.order.shuffle else "no shuffle",
        )
        if any(s.remote for s in sets):
            r = data_cfg.remote
            log.info(
                "loader %s: remote shards cached in %s (cap %g GB), %d shards prefetched per "
                "set, %d retries",
                split,
                cache_root(r),
                r.cache_gb,
                plan.prefetch,
                r.retries,
            )
    return loader


def _prefetch_depth(data_cfg: Any, sets: list[_ShardSet]) -> int:
    """``data.remote.prefetch``, or (0) the shards one shuffle window spans + 2."""
    if data_cfg.remote.prefetch:
        return int(data_cfg.remote.prefetch)
    typical = max(1, int(np.median(np.concatenate([s.counts for s in sets]))))
    window = data_cfg.shuffle_buffer if data_cfg.shuffle else 1
    return math.ceil(max(window, 1) / typical) + 2
