"""Streaming loader: coverage, global order, resume and mixing (tiny shards, CPU).

Ranks are simulated in one process: one loader per rank (rank=r, world_size=W), stepped in
lock-step; the global order is rank 0's batch, then rank 1's, ... for each micro-step.
"""

from __future__ import annotations

from collections import Counter

import pytest

from megapt.data.loader import build_loader
from tests.unit.loader_util import data_cfg, ids_of, loaders, make_set, run_global

N = 100  # samples in the main set: 6 shards of 16 + one of 4


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("set_a")
    make_set(d, N, tag=1, val=37)
    return d


@pytest.fixture(scope="module")
def reference(shards):
    """The global order of 3 epochs on one rank, no workers."""
    order, _ = run_global(loaders(data_cfg(), shards, 1, 4), 3 * N // 4)
    return order


@pytest.mark.parametrize("W", [1, 2, 3])
@pytest.mark.parametrize("workers", [0, 2])
def test_every_sample_once_per_epoch_and_order_independent_of_ranks_and_workers(
    shards, reference, W, workers
):
    B = 4
    steps = -(-2 * N // (W * B))  # two full epochs
    order, state = run_global(loaders(data_cfg(), shards, W, B, workers=workers), steps)
    ids = [i for _, i in order]
    assert sorted(ids[:N]) == list(range(N))  # epoch 0: every sample exactly once
    assert sorted(ids[N : 2 * N]) == list(range(N))  # epoch 1 too...
    assert ids[N : 2 * N] != ids[:N]  # ...reshuffled
    assert order == reference[: len(order)]  # same global stream for any world size / workers
    assert state["position"] == steps * W * B and state["epoch"] == steps * W * B // N


def test_member_reads_without_checksums_give_the_same_stream(shards, reference):
    """verify_checksums=false reads single members (pread) instead of whole shards."""
    for W, workers in [(4, 0), (1, 2)]:
        lds = loaders(data_cfg(verify_checksums=False), shards, W, 3, workers=workers)
        assert lds[0].plan.partial_reads
        order, _ = run_global(lds, 80 // W)  # 240 samples: two epochs and a bit
        assert order == reference[: len(order)]


def test_shards_from_the_data_writer_take_the_fast_paths(shards):
    """Shards written by megapt's shard writer are read without a per-member tarfile walk (whole
    and member reads)."""
    import json

    import numpy as np

    from megapt.data.tarformat import PartialShard, fixed_stride_rows, iter_shard

    entry = json.loads((shards / "manifest.json").read_text())["splits"]["train"]["shards"][-1]
    path = shards / entry["name"]
    ref = np.stack([t for _, t in iter_shard(path, sample_len=9, dtype="uint16")])
    rows = fixed_stride_rows(path.read_bytes(), path, entry["samples"], 9, "uint16")
    assert rows is not None and (rows == ref).all()
    for preload in (False, True):
        data, ok = PartialShard(path, entry, 9, "uint16", 60000, preload=preload).read(
            np.array([3, 0, 3])
        )
        assert ok.all() and (data == ref[[3, 0, 3]]).all()


@pytest.mark.parametrize("W,workers", [(1, 0), (2, 2), (3, 0), (3, 2)])
def test_finite_mode_sees_every_sample_exactly_once(shards, reference, W, workers):
    B = 8
    lds = loaders(data_cfg(), shards, W, B, workers=workers, infinite=False)
    per_rank = [[ids_of(b) for b in ld] for ld in lds]
    for ld, batches in zip(lds, per_rank):
        assert len(batches) == len(ld)  # documented per-rank batch count (ranks may differ)
        assert all(len(b) == B for b in batches[:-1])
    flat = [x for batches in per_rank for b in batches for x in b]
    assert Counter(flat) == Counter((1, i) for i in range(N))
    # the finite pass is epoch 0 of the training order, re-assembled step by step
    steps = max(len(b) for b in per_rank)
    glob = [x for k in range(steps) for batches in per_rank if k < len(batches) for x in batches[k]]
    assert glob == reference[:N]
    # a second pass over a finished finite loader starts again from the beginning
    assert [x for b in lds[0] for x in ids_of(b)] == [x for b in per_rank[0] for x in b]


def test_val_split_finite(shards):
    (ld,) = loaders(data_cfg(), shards, 1, 5, split="val", infinite=False)
    got = [x for b in ld for x in ids_of(b)]
    assert sorted(got) == [(101, i) for i in range(37)]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_gives_identical_remaining_stream(shards, workers):
    cfg, W, B = data_cfg(), 2, 4
    full, _ = run_global(loaders(cfg, shards, W, B, workers=workers), 20)
    # stop after 7 micro-steps (workers have prefetched beyond that), restart from the state
    first, state = run_global(loaders(cfg, shards, W, B, workers=workers), 7)
    assert state["position"] == 7 * W * B
    rest, _ = run_global(loaders(cfg, shards, W, B, workers=workers, state=state), 13)
    assert first + rest == full


def test_resume_same_loader_object_while_iterating(shards):
    (ld,) = loaders(data_cfg(), shards, 1, 4, workers=2)
    it = iter(ld)
    seen = [ids_of(next(it)) for _ in range(5)]
    state = ld.state_dict()
    more = [ids_of(next(it)) for _ in range(4)]
    ld.load_state_dict(state)  # rewind while the iterator is live: it restarts at the state
    assert [ids_of(next(it)) for _ in range(4)] == more
    it.close()
    (fresh,) = loaders(data_cfg(), shards, 1, 4)
    fresh_it = iter(fresh)
    assert [ids_of(next(fresh_it)) for _ in range(9)] == seen + more
    fresh_it.close()


@pytest.mark.parametrize("w_from,w_to,workers", [(2, 3, 0), (3, 1, 2)])
def test_resume_with_other_rank_count_loses_and_repeats_nothing(
    shards, reference, w_from, w_to, workers
):
    B = 4
    first, state = run_global(loaders(data_cfg(), shards, w_from, B), 5)  # mid-epoch
    assert 0 < state["position"] < N
    rest, _ = run_global(loaders(data_cfg(), shards, w_to, B, workers=workers, state=state), 12)
    order = first + rest
    assert order == reference[: len(order)]  # the global stream simply continues
    ids = [i for _, i in order]
    assert sorted(ids[:N]) == list(range(N))


def test_resume_with_other_micro_batch(shards, reference):
    first, state = run_global(loaders(data_cfg(), shards, 2, 4), 3)
    rest, _ = run_global(loaders(data_cfg(), shards, 2, 3, state=state), 10)
    assert first + rest == reference[: len(first) + len(rest)]


def test_shuffle_is_seeded(shards):
    cfg = data_cfg()
    a, _ = run_global(loaders(cfg, shards, 1, 10, seed=1), 10)
    b, _ = run_global(loaders(cfg, shards, 1, 10, seed=1), 10)
    c, _ = run_global(loaders(cfg, shards, 1, 10, seed=2), 10)
    assert a == b
    assert a != c and sorted(a) == sorted(c)
    plain, _ = run_global(loaders(data_cfg(shuffle=False), shards, 1, 10), 10)
    assert [i for _, i in plain] == list(range(N))  # shuffle off: manifest order


def test_state_is_small_json_and_adopts_the_saved_order(shards):
    import json

    cfg = data_cfg()
    first, state = run_global(loaders(cfg, shards, 1, 4, seed=5), 6)
    text = json.dumps(state)
    assert len(text) < 1000
    full, _ = run_global(loaders(cfg, shards, 1, 4, seed=5), 12)
    # resumed with another seed in the config: the checkpoint's seed wins, the epoch stays exactly-once
    rest, _ = run_global(loaders(cfg, shards, 1, 4, seed=99, state=json.loads(text)), 6)
    assert first + rest == full
    with pytest.raises(ValueError, match="split"):
        loaders(cfg, shards, 1, 4, split="val", state=state)
    with pytest.raises(ValueError, match="malformed"):
        loaders(cfg, shards, 1, 4, state={k: v for k, v in state.items() if k != "sets"})


# --------------------------------------------------------------------------------------------
# Mixing
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory):
    a, b = tmp_path_factory.mktemp("mix_a"), tmp_path_factory.mktemp("mix_b")
    make_set(a, N, tag=1)
    make_set(b, 60, tag=2, shard_samples=8)
    return a, b


def _mix_cfg(two_sets, wa=3.0, wb=1.0):
    a, b = two_sets
    return data_cfg(mix=[{"path": str(a), "weight": wa}, {"path": str(b), "weight": wb}])


def test_mix_proportions_and_per_set_coverage(two_sets):
    order, state = run_global(loaders(_mix_cfg(two_sets), None, 2, 5), 40)  # 400 samples
    tags = [t for t, _ in order]
    assert tags.count(1) == 300 and tags.count(2) == 100
    for k in range(0, 400, 40):  # every stretch carries the proportions, not just the total
        assert abs(tags[k : k + 40].count(2) - 10) <= 1
    a_ids = [i for t, i in order if t == 1]
    b_ids = [i for t, i in order if t == 2]
    assert sorted(a_ids[:N]) == list(range(N)) and sorted(b_ids[:60]) == list(range(60))
    assert [s["position"] for s in state["sets"]] == [300, 100]
    assert [s["epoch"] for s in state["sets"]] == [3, 1]


@pytest.mark.parametrize("workers", [0, 2])
def test_mix_resume_identical_and_weight_change_continues_each_set(two_sets, workers):
    cfg = _mix_cfg(two_sets)
    full, _ = run_global(loaders(cfg, None, 2, 4), 40)
    first, state = run_global(loaders(cfg, None, 2, 4), 11)
    rest, _ = run_global(loaders(cfg, None, 3, 4, workers=workers, state=state), 14)
    assert first + rest == full[: len(first) + len(rest)]
    # new weights from the saved position on: each set continues its own stream
    rest2, _ = run_global(loaders(_mix_cfg(two_sets, 1.0, 1.0), None, 2, 4, state=state), 10)
    tags = [t for t, _ in rest2]
    assert abs(tags.count(1) - tags.count(2)) <= 2
    long, _ = run_global(loaders(cfg, None, 1, 8), 60)
    for tag in (1, 2):
        mine = [x for x in first + rest2 if x[0] == tag]
        assert mine == [x for x in long if x[0] == tag][: len(mine)]


def test_mix_finite_is_each_set_once(two_sets):
    lds = loaders(_mix_cfg(two_sets), None, 2, 7, infinite=False)
    got = [x for ld in lds for b in ld for x in ids_of(b)]
    assert Counter(got) == Counter([(1, i) for i in range(N)] + [(2, i) for i in range(60)])


def test_build_loader_defaults_to_config_workers(shards):
    ld = build_loader(
        data_cfg(loader_workers=2), shards, "train", rank=0, world_size=1, micro_batch=2, seed=0
    )
    assert ld.num_workers == 2 and not ld.pin_memory
