"""Sequence / tensor parallelism: the rules a user meets before anything runs (config errors that
name the combination, the rank layout, which weights tensor parallelism shards, the resume check)
and the ds_config DeepSpeed receives. The distributed behaviour is tested against one process in
tests/integration/test_train_parallel.py."""

from __future__ import annotations

import re

import pytest
import torch

from megapt.config import ConfigError, load_config
from megapt.model.gpt import GPT, ModelArgs, param_table
from megapt.train import parallel
from megapt.train.checkpoint import CheckpointError
from megapt.train.engine import build_ds_config


def _args(**kw):
    d = dict(
        n_layers=2,
        d_model=64,
        n_heads=4,
        n_kv_heads=2,
        ffn_hidden=96,
        vocab_size=128,
        max_seq_len=32,
    )
    d.update(kw)
    return ModelArgs(**d)


def test_unsupported_combinations_are_one_config_error_naming_each():
    with pytest.raises(ConfigError) as e:
        load_config(
            [],
            [
                "--train.sequence_parallel=2",
                "--train.tensor_parallel=2",
                "--data.seq_len=33",
                "--deepspeed.zero_stage=0",
                "--deepspeed.zero_hpz_partition_size=2",
            ],
        )
    text = str(e.value)
    assert "train.sequence_parallel=2 with train.tensor_parallel=2: not supported" in text
    assert "train.sequence_parallel: 2 must divide data.seq_len 33" in text
    assert "train.tensor_parallel=2 with deepspeed.zero_stage=0" in text
    assert "deepspeed.zero_hpz_partition_size=2: hpZ partitions ZeRO-3 parameters" in text
    assert "hpz_partition_size=2 with sequence/tensor parallelism" in text
    with pytest.raises(ConfigError, match="train.tensor_parallel with deepspeed.offload"):
        load_config(
            [],
            [
                "--train.tensor_parallel=2",
                "--deepspeed.zero_stage=2",
                "--deepspeed.offload_optimizer=cpu",
            ],
        )
    with pytest.raises(ConfigError, match="train.sequence_parallel: must be >= 1, got 0"):
        load_config([], ["--train.sequence_parallel=0"])
    ok = load_config([], ["--train.sequence_parallel=4", "--deepspeed.zero_stage=3"])
    assert ok.train.sequence_parallel == 4


def test_world_and_head_counts_that_do_not_fit_the_layout_are_named():
    cfg = load_config([], ["--train.sequence_parallel=4"])
    with pytest.raises(
        ConfigError, match="train.sequence_parallel: 4 does not divide the world size 6"
    ):
        parallel.Layout.from_config(cfg, 6)
    # 4 query heads cannot be spread over 8 sequence ranks
    problems = parallel.head_problems(_args(), 8, 1)
    assert any("8 must divide the 4 query heads" in p for p in problems)
    # AutoTP needs whole KV heads per rank: 2 KV heads over 4 ranks is refused, over 2 is fine
    assert any(
        "train.tensor_parallel: 4 must divide the 2 KV heads" in p
        for p in parallel.head_problems(_args(n_heads=8), 1, 4)
    )
    assert parallel.head_problems(_args(), 1, 2) == []
    with pytest.raises(ConfigError, match="parallel layout: 1 problem"):
        parallel.Layout.from_config(
            load_config([], ["--train.tensor_parallel=4", "--deepspeed.zero_stage=1"]),
            4,
            _args(n_heads=8),
        )


def test_gqa_with_fewer_kv_heads_than_sequence_ranks_is_allowed_when_they_divide():
    """Ulysses repeats each KV head to the ranks that need it: 2 KV heads over 4 ranks is fine,
    3 over 4 is not (neither divides the other)."""
    assert parallel.head_problems(_args(n_heads=8, n_kv_heads=2, d_model=128), 4, 1) == []
    bad = parallel.head_problems(_args(n_heads=12, n_kv_heads=3, d_model=96), 4, 1)
    assert any("the 3 KV heads must divide one another" in p for p in bad)


def test_groups_are_consecutive_ranks_and_the_loader_runs_on_the_data_parallel_world():
    layout = parallel.Layout(world=8, sp=2)
    assert (layout.dp, layout.group) == (4, 2)
    assert [layout.dp_rank(r) for r in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [layout.group_rank(r) for r in range(8)] == [0, 1] * 4
    # every sequence rank holds a share of one loss: 4 groups of shares 1 + 2 -> mean 3
    assert parallel.Layout(world=8, sp=2).mean_loss(4 * 3.0) == pytest.approx(3.0)
    # every tensor rank holds the whole loss: 8 copies of 3 -> mean 3
    assert parallel.Layout(world=8, tp=2).mean_loss(8 * 3.0) == pytest.approx(3.0)


def test_tensor_parallelism_shards_every_attention_and_mlp_matrix_and_nothing_else():
    names = [p.name for p in param_table(_args(tie_embeddings=False))]
    sharded = {n for n in names if parallel.tp_sharded(n)}
    matrix = re.compile(r"\.(attention\.w[qkvo]|feed_forward\.w[123])\.weight$")
    matrices = {n for n in names if matrix.search(n)}
    assert sharded == matrices and len(matrices) == 2 * 7
    assert "tok_embeddings.weight" not in sharded and "output.weight" not in sharded


def test_ds_config_carries_autotp_rules_and_the_data_parallel_batch():
    cfg = load_config(
        [],
        [
            "--train.tensor_parallel=2",
            "--deepspeed.zero_stage=1",
            "--train.micro_batch=3",
            "--train.grad_accum=2",
        ],
    )
    ds = build_ds_config(cfg, world_size=parallel.Layout(world=8, tp=2).dp)
    assert ds["train_batch_size"] == 3 * 2 * 4
    tp = ds["tensor_parallel"]
    assert tp["autotp_size"] == 2
    assert [s["partition_type"] for s in tp["partition_config"]["layer_specs"]] == ["column", "row"]
    assert "tensor_parallel" not in build_ds_config(load_config([], []))


def test_zero3_under_sequence_parallelism_keeps_gradients_off_the_reduce_scatter_path():
    """DeepSpeed's ZeRO-3 reduce-scatter path averages over the sequence ranks too (measured:
    grad norms 1/sp); the engine gets reduce_scatter off and a bucket that holds every param."""
    model = GPT(_args(vocab_size=4096))
    largest = max(p.numel() for p in model.parameters())
    cfg = {"zero_optimization": {"stage": 3, "reduce_bucket_size": 1000}}
    out = parallel.finalize_ds_config(cfg, model, parallel.Layout(world=2, sp=2))
    assert out["zero_optimization"]["reduce_scatter"] is False
    assert out["zero_optimization"]["reduce_bucket_size"] >= largest
    z2 = {"zero_optimization": {"stage": 2, "reduce_bucket_size": 1000}}
    assert parallel.finalize_ds_config(z2, model, parallel.Layout(world=2, sp=2)) == z2
    z3 = {"zero_optimization": {"stage": 3, "reduce_bucket_size": 1000}}
    assert parallel.finalize_ds_config(z3, model, parallel.Layout(world=2, tp=2)) == z3


def test_a_checkpoint_resumes_directly_only_at_its_own_layout(tmp_path):
    saved = {"sequence_parallel": 1, "tensor_parallel": 2}
    with pytest.raises(CheckpointError) as e:
        parallel.check_resume(saved, parallel.Layout(world=2, sp=2), False, tmp_path)
    assert "sequence_parallel 1 x tensor_parallel 2" in str(e.value)
    assert f"megapt ckpt universal {tmp_path}" in str(e.value)
    parallel.check_resume(saved, parallel.Layout(world=2, tp=2), False, tmp_path)
    parallel.check_resume(saved, parallel.Layout(world=1), True, tmp_path)  # universal: any
    parallel.check_resume({}, parallel.Layout(world=4), False, tmp_path)  # older checkpoints


def test_sequence_shard_is_a_slice_and_its_loss_a_share():
    """With seq_shard the model runs only its slice of the row and returns the slice's share of
    the row's mean loss (sum over the slice / valid labels of the whole row). Without the
    all-to-all, slice 0 of a causal model computes exactly what the whole model computes on those
    positions, so its share is checkable here; the other slices need the all-to-all (tested in
    tests/integration/test_train_parallel.py)."""
    args = _args(n_layers=1)
    x = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    y = x.roll(-1, 1)
    y[0, :5] = -100  # ignored labels count in neither numerator nor denominator
    full = GPT(args, seed=0)
    with torch.no_grad():
        logits = full(x).logits  # (B, T, V)
    ce = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), y.flatten(), reduction="none", ignore_index=-100
    ).view(2, 16)
    m = GPT(args, seed=0)
    m.seq_shard = (0, 2)
    out = m(x, y, return_hidden=True)
    assert out.hidden.shape == (2, 8, args.d_model)
    want = ce[:, :8].sum() / (y != -100).sum()
    assert out.loss.item() == pytest.approx(float(want), rel=1e-5)
    m.seq_shard = (0, 3)
    with pytest.raises(ValueError, match="not divisible by the 3 sequence-parallel ranks"):
        m(x, y)


def test_gpu_parallel_benchmark_points_are_valid_and_fit_one_8_gpu_node():
    """The throughput points the GPU session would run (benchmarks/specs/gpu_parallel.yaml, 8
    GPUs): each passes the launch checks and fits an H100 per the planner, so a rare multi-GPU
    session is not spent on a typo or an OOM the plan predicts."""
    from pathlib import Path

    from megapt import planner as P
    from megapt.bench import sweep

    root = Path(__file__).resolve().parents[2]
    spec = sweep.load_spec(str(root / "benchmarks/specs/gpu_parallel.yaml"))
    points = sweep.expand(spec.get("axes") or {}, spec.get("points"))
    assert len(points) == 8
    for point in points:
        cfg = load_config(
            [str(root / c) for c in spec["configs"]],
            list(spec["overrides"]) + sweep.point_overrides(point),
        )
        hw = P.Hardware(1, 8, "h100")
        args = P.model_args(cfg)
        assert P.check_launch(cfg, hw, args) == [], point
        plan = P.plan_memory(cfg, hw, args=args)
        assert plan.fits, (point, P.format_plan(cfg, plan))


def test_local_shard_cuts_a_whole_tensor_as_autotp_shards_the_layer():
    """A whole weight (as a universal checkpoint holds it) cut to one rank's part: rows of a
    column-parallel layer, columns of a row-parallel one, untouched elsewhere. The layers are
    DeepSpeed's own, told they are rank 1 of 2."""
    from deepspeed.module_inject.layers import LinearAllreduce, LinearLayer

    model = GPT(_args(n_layers=1))
    attn = model.layers[0].attention
    wq, wo = attn.wq.weight.detach().clone(), attn.wo.weight.detach().clone()
    attn.wq, attn.wo = LinearLayer(attn.wq, None), LinearAllreduce(attn.wo, None)
    for layer in (attn.wq, attn.wo):
        layer.tp_world_size, layer.tp_index = 2, 1
        layer._partition_sizes = [layer._orig_weight_shape[0 if layer is attn.wq else 1] // 2] * 2
    got_q = parallel.local_shard(model, "layers.0.attention.wq.weight", wq.flatten())
    got_o = parallel.local_shard(model, "layers.0.attention.wo.weight", wo.flatten())
    assert torch.equal(got_q, wq[32:])  # rows 32..63: heads 2 and 3
    assert torch.equal(got_o, wo[:, 32:])
    norm = model.layers[0].attention_norm.weight
    assert parallel.local_shard(model, "layers.0.attention_norm.weight", norm) is norm
