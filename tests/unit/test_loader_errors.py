"""Loader start-up checks and bad shards: clear errors naming the file, or skip-and-count."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from megapt.config import ConfigError
from megapt.data.tarformat import ShardError
from tests.unit.loader_util import data_cfg, ids_of, loaders, make_set, run_global, sample

N = 100  # 7 shards: train-000-00000.tar (ids 0-15) ... train-000-00006.tar (ids 96-99)
SHARD = "train-000-00002.tar"  # ids 32..47
SHARD_IDS = set(range(32, 48))


@pytest.fixture
def shards(tmp_path):
    make_set(tmp_path, N)
    return tmp_path


def _entry(d: Path, name: str) -> dict:
    m = json.loads((d / "manifest.json").read_text())
    return next(e for e in m["splits"]["train"]["shards"] if e["name"] == name)


def _rewrite_entry(d: Path, name: str) -> None:
    """Make the manifest agree with the (tampered) file: size and sha256 match again."""
    m = json.loads((d / "manifest.json").read_text())
    for e in m["splits"]["train"]["shards"]:
        if e["name"] == name:
            data = (d / name).read_bytes()
            e["bytes"], e["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (d / "manifest.json").write_text(json.dumps(m))


def _corrupt_header(d: Path, name: str = SHARD) -> None:
    """Garbage over the 3rd member's tar header; same size (only the structure check sees it)."""
    p = d / name
    data = bytearray(p.read_bytes())
    data[2048 : 2048 + 200] = b"\xff" * 200  # member stride: 512 header + 512 padded payload
    p.write_bytes(bytes(data))


def _first_epoch(cfg, d, *, workers=0, ranks=1):
    order, state = run_global(loaders(cfg, d, ranks, 4, workers=workers), -(-N // (4 * ranks)))
    return order, state


# ---- start-up ----


def test_missing_manifest_names_the_file(tmp_path):
    with pytest.raises(ShardError, match=r"manifest\.json.*not found"):
        loaders(data_cfg(), tmp_path, 1, 4)


def test_missing_shard_is_an_error_at_startup_naming_it(shards):
    (shards / SHARD).unlink()
    with pytest.raises(ShardError, match=SHARD + ".*missing"):
        loaders(data_cfg(), shards, 1, 4)


def test_seq_len_and_tokenizer_mismatch(shards):
    with pytest.raises(ConfigError, match="seq_len 8 but data.seq_len is 16"):
        loaders(data_cfg(seq_len=16), shards, 1, 4)
    from megapt.data.loader import build_loader

    build_loader(
        data_cfg(),
        shards,
        "train",
        rank=0,
        world_size=1,
        micro_batch=2,
        seed=0,
        tokenizer_sha256="ab" * 32,
    )  # the right tokenizer passes
    with pytest.raises(ShardError, match="different tokenizer"):
        build_loader(
            data_cfg(),
            shards,
            "train",
            rank=0,
            world_size=1,
            micro_batch=2,
            seed=0,
            tokenizer_sha256="cd" * 32,
        )


def test_mixed_sets_must_share_the_tokenizer(tmp_path):
    make_set(tmp_path / "a", 20)
    make_set(tmp_path / "b", 20, tokenizer_sha256="ef" * 32)
    cfg = data_cfg(
        mix=[
            {"path": str(tmp_path / "a"), "weight": 1.0},
            {"path": str(tmp_path / "b"), "weight": 1.0},
        ]
    )
    with pytest.raises(ShardError, match="tokenizer"):
        loaders(cfg, None, 1, 4)


# ---- bad shards when read, policy raise ----


def test_checksum_mismatch_raises_naming_the_shard(shards):
    p = shards / SHARD
    data = bytearray(p.read_bytes())
    data[512 + 4] ^= 1  # one token of the first sample: same size, valid tar
    p.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=SHARD + ".*sha256 mismatch"):
        _first_epoch(data_cfg(), shards)


def test_truncated_shard_raises_even_without_checksums(shards):
    p = shards / SHARD
    p.write_bytes(p.read_bytes()[:5000])
    with pytest.raises(ShardError, match=SHARD + ".*size mismatch"):
        _first_epoch(data_cfg(verify_checksums=False), shards)
    with pytest.raises(ShardError, match=SHARD + ".*size mismatch"):
        _first_epoch(data_cfg(verify_checksums=False), shards, ranks=4)
    _rewrite_entry(
        shards, SHARD
    )  # a manifest that agrees with the cut file: the tar structure catches it
    with pytest.raises(ShardError, match=SHARD + ".*(truncated|corrupt)"):
        _first_epoch(data_cfg(verify_checksums=False), shards)


@pytest.mark.parametrize("verify,ranks", [(True, 1), (False, 4)])  # whole shards / single members
def test_corrupt_tar_header_is_never_silently_misread(shards, verify, ranks):
    _corrupt_header(shards)
    _rewrite_entry(shards, SHARD)  # even when size and sha256 agree
    with pytest.raises(ShardError, match=SHARD):
        _first_epoch(data_cfg(verify_checksums=verify), shards, ranks=ranks)


def test_corrupt_shard_error_crosses_worker_processes(shards):
    """Raised in a worker, the error reaches the trainer as the same one-line ShardError (not
    torch's re-raise with the worker's traceback in its message), so the CLI prints one line."""
    _corrupt_header(shards)
    with pytest.raises(ShardError, match=SHARD) as ei:
        _first_epoch(data_cfg(), shards, workers=2)
    assert "Traceback" not in str(ei.value) and "\n" not in str(ei.value), str(ei.value)


def _write_members(p: Path, names: list[str]) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, i in zip(names, sorted(SHARD_IDS)):
            payload = sample(i, 1).tobytes()
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    p.write_bytes(buf.getvalue())


@pytest.mark.parametrize(
    "bad,match",
    [
        ("../../etc/evil.tokens", "unsafe"),
        ("/abs/x.tokens", "unsafe"),
        ("train-000-000000034.txt", "unexpected member"),
        ("train-000-000000032.tokens", "duplicate"),
    ],
)
def test_unsafe_or_unexpected_member_names_raise(shards, bad, match):
    names = [f"train-000-{i:09d}.tokens" for i in sorted(SHARD_IDS)]
    names[3] = bad
    _write_members(shards / SHARD, names)
    _rewrite_entry(shards, SHARD)
    with pytest.raises(ShardError, match=SHARD + f".*{match}"):
        _first_epoch(data_cfg(), shards)
    if match == "unsafe":  # single-member reads check every name they read too
        with pytest.raises(ShardError, match=SHARD + f".*{match}"):
            _first_epoch(data_cfg(verify_checksums=False), shards, ranks=4)


def test_token_id_beyond_vocab_raises(shards, tmp_path):
    d = tmp_path / "big"
    from megapt.data.shard import write_token_dataset

    rows = [sample(i, 1) for i in range(20)]
    rows[5][3] = 61000  # >= vocab_size 60000
    write_token_dataset(d, {"train": rows}, seq_len=8, vocab_size=60000, shard_samples=16)
    for verify, ranks in [
        (True, 1),
        (False, 1),
        (False, 4),
    ]:  # whole shard, member checks (preload, pread)
        with pytest.raises(ShardError, match="train-000-00000.tar.*vocab_size"):
            run_global(loaders(data_cfg(verify_checksums=verify), d, ranks, 4), 5)


# ---- policy skip ----


def test_skip_policy_finite_drops_the_bad_shard_and_counts_it(shards):
    _corrupt_header(shards)
    cfg = data_cfg(bad_shard_policy="skip", max_bad_fraction=0.2)  # 1 of 7 shards bad: 0.14
    lds = loaders(cfg, shards, 2, 4, workers=2, infinite=False)
    got = [i for ld in lds for b in ld for _, i in ids_of(b)]
    assert Counter(got) == Counter(i for i in range(N) if i not in SHARD_IDS)
    assert {name for ld in lds for _, name in ld.bad_shards} == {SHARD}


def test_skip_policy_training_keeps_full_batches_without_bad_samples(shards):
    _corrupt_header(shards)
    cfg = data_cfg(bad_shard_policy="skip", max_bad_fraction=0.2)
    lds = loaders(cfg, shards, 2, 5)
    order, state = run_global(lds, 2 * N // 10)
    ids = [i for _, i in order]
    assert len(ids) == 2 * N and not SHARD_IDS & set(ids)
    assert set(ids[:N]) == set(range(N)) - SHARD_IDS  # the good samples are all there
    assert list(lds[0].bad_shards) == [(0, SHARD)] and SHARD in lds[0].bad_shards[(0, SHARD)]
    # the fill is deterministic: any world size sees the same global stream
    order1, _ = run_global(loaders(cfg, shards, 1, 4, workers=2), 2 * N // 4)
    assert order1 == order


def test_skip_policy_with_member_reads_skips_only_the_bad_member(shards):
    """verify_checksums=false reads single members: only the member with the broken header (id 34)
    is replaced, the same way on any number of ranks and workers."""
    _corrupt_header(shards)
    cfg = data_cfg(bad_shard_policy="skip", max_bad_fraction=0.2, verify_checksums=False)
    order, _ = run_global(loaders(cfg, shards, 4, 5), N // 20)
    ids = [i for _, i in order]
    assert len(ids) == N and 34 not in ids and set(ids) == set(range(N)) - {34}
    order1, _ = run_global(loaders(cfg, shards, 1, 4, workers=2), N // 4)
    assert order1 == order


def test_skip_policy_stops_above_max_bad_fraction(shards):
    _corrupt_header(shards)
    _corrupt_header(shards, "train-000-00004.tar")  # 2 of 7 = 0.29 > 0.2
    cfg = data_cfg(bad_shard_policy="skip", max_bad_fraction=0.2)
    with pytest.raises(ShardError, match="2 of 7 train shards are bad"):
        run_global(loaders(cfg, shards, 1, 4), N // 4)
    with pytest.raises(ShardError, match="2 of 7 train shards are bad"):
        run_global(loaders(cfg, shards, 1, 4, workers=2), N // 4)


def test_valid_tar_in_another_layout_still_reads_exactly(shards):
    """A pax tar (global header first) is not the fixed-stride layout: tarfile walks it instead."""
    p = shards / SHARD
    buf = io.BytesIO()
    with tarfile.open(
        fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "x"}
    ) as tf:
        for i in sorted(SHARD_IDS):
            payload = sample(i, 1).tobytes()
            info = tarfile.TarInfo(f"train-000-{i:09d}.tokens")
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    p.write_bytes(buf.getvalue())
    _rewrite_entry(shards, SHARD)
    order, _ = _first_epoch(data_cfg(), shards)
    assert sorted(i for _, i in order) == list(range(N))
