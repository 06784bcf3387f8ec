"""Checkpoint bookkeeping without DeepSpeed: manifest, validity, rotation, compatibility, RNG."""

import json
import random

import numpy as np
import pytest
import torch

from megapt.train import checkpoint as ck


def fake_ckpt(root, step, valid=True):
    d = root / ck.step_dir_name(step)
    (d / "ds").mkdir(parents=True)
    (d / "ds" / "weights.pt").write_bytes(b"w" * (100 + step))
    (d / ck.META).write_text(json.dumps({"step": step}))
    if valid:
        ck.write_manifest(d)
    return d


def test_manifest_detects_changed_truncated_and_missing_files(tmp_path):
    d = fake_ckpt(tmp_path, 1)
    assert ck.verify_checkpoint(d) == []
    (d / "ds" / "weights.pt").write_bytes(b"x" * 101)  # same size, other bytes
    assert any("sha256" in p for p in ck.verify_checkpoint(d))
    (d / "ds" / "weights.pt").write_bytes(b"x")
    assert any("bytes" in p for p in ck.verify_checkpoint(d))
    (d / "ds" / "weights.pt").unlink()
    assert any("missing" in p for p in ck.verify_checkpoint(d))
    assert "missing" in ck.verify_checkpoint(fake_ckpt(tmp_path, 2, valid=False))[0]


def test_latest_valid_skips_unfinished_and_corrupt(tmp_path):
    fake_ckpt(tmp_path, 10)
    fake_ckpt(tmp_path, 20)
    fake_ckpt(tmp_path, 30, valid=False)  # crashed before its manifest
    (tmp_path / "step_0000040.tmp").mkdir()  # crashed before the rename
    assert ck.find_latest_valid(tmp_path).name == "step_0000020"
    (tmp_path / "step_0000020" / "ds" / "weights.pt").write_bytes(b"corrupt")
    assert ck.find_latest_valid(tmp_path).name == "step_0000010"
    assert ck.find_latest_valid(tmp_path / "nothing") is None


def test_rotation_keeps_last_k_and_never_the_only_valid(tmp_path):
    for s in (1, 2, 3, 4):
        fake_ckpt(tmp_path, s)
    ck.rotate(tmp_path, keep_last=2)
    assert [p.name for _, p in ck.list_checkpoints(tmp_path)] == ["step_0000003", "step_0000004"]
    fake_ckpt(tmp_path, 5, valid=False)  # newer but invalid: must not push out the valid ones
    ck.rotate(tmp_path, keep_last=1)
    names = [p.name for _, p in ck.list_checkpoints(tmp_path)]
    assert "step_0000004" in names and "step_0000005" in names and "step_0000003" not in names


ARGS = dict(
    n_layers=2,
    d_model=64,
    n_heads=4,
    n_kv_heads=2,
    ffn_hidden=192,
    vocab_size=512,
    max_seq_len=32,
    dropout=0.0,
)


def test_incompatible_model_names_every_differing_field(tmp_path):
    meta = {"model_args": ARGS, "world_size": 1, "zero_stage": 0}
    with pytest.raises(ck.CheckpointError) as exc:
        ck.check_compatible(
            meta,
            model_args=dict(ARGS, d_model=128, n_layers=4, dropout=0.1),
            world_size=1,
            zero_stage=0,
            universal=False,
            ckpt=tmp_path,
        )
    msg = str(exc.value)
    assert "model.d_model" in msg and "model.n_layers" in msg and "dropout" not in msg


def test_zero_partitions_at_another_world_size_suggest_universal(tmp_path):
    meta = {"model_args": ARGS, "world_size": 2, "zero_stage": 2}
    with pytest.raises(ck.CheckpointError, match="megapt ckpt universal") as exc:
        ck.check_compatible(
            meta, model_args=ARGS, world_size=1, zero_stage=2, universal=False, ckpt=tmp_path
        )
    assert "--checkpoint.universal=true" in str(exc.value)
    with pytest.raises(ck.CheckpointError, match="no ds_universal.*megapt ckpt universal"):
        ck.check_compatible(
            meta, model_args=ARGS, world_size=1, zero_stage=2, universal=True, ckpt=tmp_path
        )
    (tmp_path / ck.UNIVERSAL_TAG).mkdir()  # converted: any stage, any world size
    for stage in (0, 1, 2, 3):
        ck.check_compatible(
            meta, model_args=ARGS, world_size=3, zero_stage=stage, universal=True, ckpt=tmp_path
        )


def test_zero0_checkpoint_needs_no_conversion_and_the_messages_say_so(tmp_path):
    """ZeRO-0 holds the whole optimizer state in one file: another world size loads it plainly;
    another stage needs --checkpoint.universal=true, which takes it as it is (no ds_universal/)."""
    meta = {"model_args": ARGS, "world_size": 2, "zero_stage": 0}
    ck.check_compatible(
        meta, model_args=ARGS, world_size=4, zero_stage=0, universal=False, ckpt=tmp_path
    )
    with pytest.raises(ck.CheckpointError, match="--checkpoint.universal=true") as exc:
        ck.check_compatible(
            meta, model_args=ARGS, world_size=2, zero_stage=3, universal=False, ckpt=tmp_path
        )
    assert "megapt ckpt universal" not in str(exc.value) and "no conversion" in str(exc.value)
    for stage in (0, 1, 2, 3):
        ck.check_compatible(
            meta, model_args=ARGS, world_size=1, zero_stage=stage, universal=True, ckpt=tmp_path
        )


def test_rng_state_round_trips_through_json():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    state = json.loads(json.dumps(ck.rng_state()))
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    ck.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a
