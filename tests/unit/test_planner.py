"""`megapt plan`: memory predictions a user sizes a cluster job with, and the pre-launch checks.

Expected values come from the ZeRO paper (Rajbhandari et al. 2020, Figure 1: 7.5B parameters,
64 GPUs, K=12) and from first principles, not from the planner's code.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from megapt import planner as P
from megapt.config import ConfigError, load_config
from megapt.model.gpt import GPT, AttentionMask, ModelArgs

GB = 1e9


def args_7b(**kw):
    d = dict(
        n_layers=32,
        d_model=4096,
        n_heads=32,
        n_kv_heads=32,
        ffn_hidden=11008,
        vocab_size=32000,
        max_seq_len=4096,
        tie_embeddings=False,
    )
    d.update(kw)
    return ModelArgs(**d)


def cfg_for(*overrides: str):
    return load_config(
        [], ["--train.precision=bf16", "--data.seq_len=4096", "--model.preset=7b", *overrides]
    )


# ---- model states -----------------------------------------------------------------------------


@pytest.mark.parametrize("stage,expected_gb", [(0, 120.0), (1, 31.4), (2, 16.6), (3, 1.9)])
def test_model_states_match_zero_paper_figure_1(stage, expected_gb):
    s = P.model_states(7_500_000_000, precision="bf16", zero_stage=stage, world=64)
    assert s.total / GB == pytest.approx(expected_gb, abs=0.06)


def test_sixteen_bytes_per_param_in_both_precisions_but_split_differently():
    n = 1_000_000
    mixed = P.model_states(n, precision="bf16", zero_stage=0, world=1)
    full = P.model_states(n, precision="fp32", zero_stage=0, world=1)
    assert mixed.total == full.total == 16 * n
    assert (mixed.params, mixed.grads, mixed.optimizer) == (2 * n, 2 * n, 12 * n)
    assert (full.params, full.grads, full.optimizer) == (4 * n, 4 * n, 8 * n)


def test_each_zero_stage_shards_one_more_component():
    n, w = 8_000_000, 8
    s = [P.model_states(n, precision="bf16", zero_stage=k, world=w) for k in range(4)]
    assert s[1].optimizer == s[0].optimizer / w and s[1].grads == s[0].grads
    assert s[2].grads == s[0].grads / w and s[2].params == s[0].params
    assert s[3].params == s[0].params / w


def test_offload_moves_optimizer_and_params_to_host_ram():
    n, w = 8_000_000, 8
    on_gpu = P.model_states(n, precision="bf16", zero_stage=3, world=w)
    off = P.model_states(
        n, precision="bf16", zero_stage=3, world=w, offload_optimizer=True, offload_params=True
    )
    assert off.optimizer == 0 and off.params == 0
    # host holds fp32 master + Adam moments + fp32 grad partition + the bf16 param partition
    assert off.host == pytest.approx((12 + 4 + 2) * n / w)
    assert on_gpu.host == 0


def test_offload_reports_host_ram_per_node_and_fails_when_it_does_not_fit():
    cfg = cfg_for(
        "--deepspeed.zero_stage=3",
        "--deepspeed.offload_optimizer=cpu",
        "--deepspeed.offload_params=cpu",
        "--train.activation_checkpointing=true",
        "--train.micro_batch=1",
    )
    a = args_7b()
    n = sum(p.numel for p in P.param_list(a))
    plan = P.plan_memory(cfg, P.Hardware(1, 8, "h100"), args=a)
    # 8 ranks on the node, each holding 18 bytes/param / 8 of the offloaded states -> 18 bytes/param per node
    assert plan.host_per_node >= 18 * n
    small = P.plan_memory(cfg, P.Hardware(1, 8, "h100", cpu_mem_gib=64), args=a)
    assert not small.fits and small.fits_gpu


def test_parameter_list_is_the_models_own():
    """The planner sizes model states from the parameters GPT really has: a tied head is one
    tensor, an untied one a second (V, C) matrix; 2L + 1 norm vectors; one embedding table."""
    for tie in (False, True):
        a = ModelArgs.from_preset("tiny", vocab_size=1000, max_seq_len=64, tie_embeddings=tie)
        params = P.param_list(a)
        by_kind = {k: [p for p in params if p.kind == k] for k in ("embedding", "norm", "linear")}
        assert [(p.name, p.shape) for p in by_kind["embedding"]] == [
            ("tok_embeddings.weight", (1000, 256))
        ]
        assert len(by_kind["norm"]) == 2 * a.n_layers + 1 and {
            p.shape for p in by_kind["norm"]
        } == {(256,)}
        # per block wq wk wv wo w1 w2 w3, plus the output head when it is not the embedding
        assert len(by_kind["linear"]) == 7 * a.n_layers + (0 if tie else 1)
        assert ("output.weight" in {p.name for p in params}) == (not tie)
        assert sum(p.numel for p in params) == sum(p.numel() for p in GPT(a).parameters())
        assert len(params) == len(list(GPT(a).parameters()))


# ---- activations ----------------------------------------------------------------------------


def test_activations_linear_in_micro_batch_and_no_seq_squared_with_flash_attention():
    a = args_7b()
    one = P.activation_bytes(a, 2048, 1, "bf16", False)
    assert P.activation_bytes(a, 2048, 4, "bf16", False) == pytest.approx(4 * one)
    assert P.activation_bytes(a, 4096, 1, "bf16", False) == pytest.approx(2 * one)
    eager = P.activation_bytes(a, 4096, 1, "bf16", False, attention="eager")
    assert (
        eager - P.activation_bytes(a, 4096, 1, "bf16", False) >= 33 * 2 * 2 * 32 * 4096**2
    )  # the s^2 scores


def test_activation_checkpointing_keeps_block_inputs_only():
    a = args_7b()
    full = P.activation_bytes(a, 4096, 1, "bf16", False)
    ckpt = P.activation_bytes(a, 4096, 1, "bf16", True)
    inputs = a.n_layers * 4096 * a.d_model * 2  # one bf16 (s, h) tensor per block
    assert inputs < ckpt < inputs + 4 * full / a.n_layers
    assert ckpt < full / 5


def test_block_activations_per_token_are_those_of_a_llama_block():
    # 7B bf16: the block saves ~ 7h + 2k + 4f half-precision values per token (norm in/out, q k v,
    # attention out twice, SwiGLU's four (s, f) tensors). Korthikanti's GPT block (MLP 4h, no GQA,
    # flash attention) would be 34 bytes * h per token; SwiGLU at f = 2.7h costs more: between 34h and 50h.
    a = args_7b()
    per_token = P.block_activation_bytes(a, 1, 1, "bf16")
    assert 34 * a.d_model < per_token < 50 * a.d_model


def test_full_logits_cost_more_than_chunked_loss():
    a = args_7b()
    full = P.loss_bytes(a, 4096, 8, "bf16", "eager")
    chunked = P.loss_bytes(a, 4096, 8, "bf16", "chunked")
    assert full >= 4096 * 8 * 32000 * (2 + 8)
    assert chunked < full / 5


# ---- the plan -----------------------------------------------------------------------------


def test_7b_zero0_does_not_fit_one_h100_but_zero3_on_8_does():
    a = args_7b()
    p0 = P.plan_memory(cfg_for("--train.micro_batch=1"), P.Hardware(1, 1), args=a)
    assert not p0.fits and p0.peak > 16 * 6.7e9
    p3 = P.plan_memory(
        cfg_for(
            "--deepspeed.zero_stage=3",
            "--train.micro_batch=1",
            "--train.activation_checkpointing=true",
        ),
        P.Hardware(1, 8),
        args=a,
    )
    assert p3.fits and p3.peak < 40 * P.GIB


def test_largest_micro_batch_is_the_boundary():
    a = args_7b()
    cfg = cfg_for("--deepspeed.zero_stage=3", "--train.activation_checkpointing=true")
    hw = P.Hardware(1, 8)
    base = P.Setting.from_config(cfg)
    m = P.max_micro_batch(cfg, hw, args=a)
    assert m >= 2
    assert P.plan_memory(cfg, hw, dataclasses.replace(base, micro_batch=m), a).fits
    assert not P.plan_memory(cfg, hw, dataclasses.replace(base, micro_batch=m + 1), a).fits


def test_suggestion_is_the_cheapest_that_fits_and_avoids_offload_when_not_needed():
    a = args_7b()
    cfg = cfg_for("--train.micro_batch=4", "--train.grad_accum=8")  # ZeRO-0: ~200 GiB
    hw = P.Hardware(1, 8)
    found = P.suggest(cfg, hw, a)
    assert found
    cost, plan = found[0]
    assert plan.fits
    assert not plan.setting.offload_optimizer and not plan.setting.offload_params
    # global batch (4 x 8 x 8 = 256 sequences) is kept
    dp = P.data_parallel(cfg, hw, plan.setting)
    assert plan.setting.micro_batch * plan.setting.grad_accum * dp == 256
    costs = [c for c, _ in found]
    assert costs == sorted(costs)


def test_70b_on_one_node_needs_offload():
    a = args_7b(n_layers=80, d_model=8192, n_heads=64, n_kv_heads=8, ffn_hidden=28672)
    cfg = cfg_for("--train.micro_batch=1", "--train.grad_accum=16")
    found = P.suggest(cfg, P.Hardware(1, 8), a)
    assert found and found[0][1].setting.offload_optimizer


# ---- sequence and tensor parallelism ---------------------------------------------------------


def test_sequence_parallelism_divides_every_activation_by_the_ranks():
    a = args_7b()
    one = P.activation_bytes(a, 32768, 1, "bf16", False)
    # flash attention saves only per-token tensors: each of 4 ranks holds a quarter of the tokens
    assert P.activation_bytes(a, 32768, 1, "bf16", False, sp=4) == pytest.approx(one / 4)
    # eager attention adds the scores and probabilities of the whole sequence for 32 / 4 heads,
    # in 32 blocks + 1 block of gradients
    flash = P.activation_bytes(a, 4096, 1, "bf16", False, sp=4)
    eager = P.activation_bytes(a, 4096, 1, "bf16", False, attention="eager", sp=4)
    assert eager - flash == pytest.approx(33 * 2 * 2 * (32 / 4) * 4096**2)


def test_sequence_parallelism_keeps_weights_whole_and_zero_shards_over_all_ranks():
    a = args_7b()
    plain = P.plan_memory(
        cfg_for("--deepspeed.zero_stage=2", "--train.micro_batch=1"), P.Hardware(1, 8), args=a
    )
    sp = P.plan_memory(
        cfg_for("--deepspeed.zero_stage=2", "--train.micro_batch=1", "--train.sequence_parallel=4"),
        P.Hardware(1, 8),
        args=a,
    )
    for row in ("parameters", "gradients", "optimizer states"):
        assert sp.row(row) == plain.row(row)  # ZeRO partitions over data x sequence ranks = 8
    assert sp.row("activations") < plain.row("activations") / 3.9


def test_tensor_parallelism_keeps_a_tp_th_of_attention_and_mlp_weights_per_rank():
    a = args_7b()
    cfg = cfg_for("--train.tensor_parallel=8", "--deepspeed.zero_stage=1", "--train.micro_batch=1")
    plan = P.plan_memory(cfg, P.Hardware(1, 8), args=a)
    h, f, n_layers, vocab = 4096, 11008, 32, 32000
    whole = 2 * vocab * h + (2 * n_layers + 1) * h  # embedding, head, norms
    sharded = n_layers * (4 * h * h + 3 * h * f)  # wq wk wv wo, w1 w2 w3
    assert plan.rank_params == whole + sharded // 8
    assert plan.row("parameters") == 2 * plan.rank_params  # bf16, whole within ZeRO-1
    # ZeRO-1 partitions the optimizer over the data-parallel ranks only: 8 GPUs / tp 8 = 1
    assert plan.row("optimizer states") == 12 * plan.rank_params


def test_7b_at_128k_on_one_node_fits_only_with_sequence_parallelism_and_the_planner_says_so():
    a = args_7b(max_seq_len=131072)
    cfg = cfg_for(
        "--data.seq_len=131072",
        "--train.micro_batch=1",
        "--train.grad_accum=1",
        "--deepspeed.zero_stage=3",
        "--train.activation_checkpointing=true",
        "--plan.global_batch=8",
    )
    hw = P.Hardware(1, 8)
    assert not P.plan_memory(cfg, hw, args=a).fits
    found = P.suggest(cfg, hw, a, top=5)
    assert found and all(p.setting.sequence_parallel > 1 for _, p in found)
    # ZeRO alone does not fit: no stage, checkpointing, offload or micro-batch without sequence
    # (or tensor) parallelism
    without = [s for s in P.candidates(cfg, hw, a) if s.group == 1]
    assert without and not any(P.plan_memory(cfg, hw, s, a).fits for s in without)


def test_batch_checks_count_data_parallel_replicas_not_gpus():
    cfg = cfg_for(
        "--train.tensor_parallel=8",
        "--deepspeed.zero_stage=1",
        "--train.micro_batch=1",
        "--train.grad_accum=16",
        "--plan.global_batch=1024",
    )
    problems = P.check_launch(cfg, P.Hardware(8, 8), args_7b())
    # 64 GPUs in groups of 8: 8 data-parallel replicas, so 1 x 128 x 8 = 1024
    assert any("--train.grad_accum=128" in p and "data-parallel size" in p for p in problems)
    ok = cfg_for(
        "--train.tensor_parallel=8",
        "--deepspeed.zero_stage=1",
        "--train.micro_batch=1",
        "--train.grad_accum=128",
        "--plan.global_batch=1024",
    )
    assert P.check_launch(ok, P.Hardware(8, 8), args_7b()) == []


def test_layouts_the_model_or_world_cannot_take_are_launch_errors():
    cfg = cfg_for("--train.tensor_parallel=8", "--deepspeed.zero_stage=1")
    problems = P.check_launch(cfg, P.Hardware(1, 8), args_7b(n_kv_heads=4))
    assert any("train.tensor_parallel: 8 must divide the 4 KV heads" in p for p in problems)
    problems = P.check_launch(cfg, P.Hardware(1, 6), args_7b())
    assert any("train.tensor_parallel: 8 does not divide the world size 6" in p for p in problems)


def test_overrides_carry_sequence_and_tensor_parallelism():
    cfg = cfg_for("--train.micro_batch=4")
    base = P.Setting.from_config(cfg)
    s = dataclasses.replace(base, sequence_parallel=4, zero_stage=2)
    again = load_config(
        [],
        [
            "--train.precision=bf16",
            "--data.seq_len=4096",
            "--model.preset=7b",
            "--train.micro_batch=4",
            *s.overrides(base),
        ],
    )
    assert P.Setting.from_config(again) == s


# ---- checks before launch ------------------------------------------------------------------


def test_world_size_not_dividing_the_global_batch_is_named():
    cfg = cfg_for("--plan.global_batch=512", "--train.micro_batch=4", "--train.grad_accum=16")
    problems = P.check_launch(cfg, P.Hardware(1, 6), args_7b())
    assert any("plan.global_batch" in p and "6" in p for p in problems)
    assert P.check_launch(cfg, P.Hardware(1, 8), args_7b()) == []
    wrong_accum = P.check_launch(cfg, P.Hardware(2, 8), args_7b())
    assert any("--train.grad_accum=8" in p for p in wrong_accum)


def test_bad_combinations_are_all_reported():
    cfg = cfg_for("--plan.global_batch=100", "--train.micro_batch=4")
    a = SimpleNamespace(
        **{**dataclasses.asdict(args_7b()), "n_kv_heads": 5}
    )  # ModelArgs refuses it
    problems = P.check_launch(cfg, P.Hardware(1, 8, "v100"), a)
    text = "\n".join(problems)
    assert "bf16" in text and "v100" in text
    assert "n_kv_heads" in text
    assert "plan.global_batch" in text


def test_unknown_gpu_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown GPU"):
        P.Hardware(1, 8, "h9000")


def test_overrides_turn_the_config_into_the_suggested_setting():
    cfg = cfg_for("--train.micro_batch=4")
    base = P.Setting.from_config(cfg)
    s = dataclasses.replace(
        base, zero_stage=3, activation_checkpointing=True, offload_optimizer=True
    )
    again = load_config(
        [],
        [
            "--train.precision=bf16",
            "--data.seq_len=4096",
            "--model.preset=7b",
            "--train.micro_batch=4",
            *s.overrides(base),
        ],
    )
    assert P.Setting.from_config(again) == s


def test_bf16_at_zero0_runs_as_stage_1_in_the_engine_and_the_planner():
    # one rule (engine.engine_stage), asked by the ds_config, the trainer, fine-tuning, the
    # benchmark and the planner: bf16 at ZeRO-0 runs as stage 1 with fp32 gradient accumulation
    from megapt.train.engine import build_ds_config, engine_stage

    for precision in ("fp32", "bf16", "fp16"):
        for stage in range(4):
            raised = precision == "bf16" and stage == 0
            cfg = load_config(
                [], [f"--train.precision={precision}", f"--deepspeed.zero_stage={stage}"]
            )
            ds = build_ds_config(cfg)
            assert ds["zero_optimization"]["stage"] == (1 if raised else stage)
            assert ds.get("data_types") == ({"grad_accum_dtype": "fp32"} if raised else None)
            assert engine_stage(precision, stage) == (1 if raised else stage, raised)
    hw = P.Hardware(
        1, 2, "h100"
    )  # 2 ranks: stage 1 partitions the optimizer states, stage 0 does not
    states = {}
    for precision in ("fp32", "bf16"):
        cfg = load_config([], [f"--train.precision={precision}", "--model.preset=124m"])
        for stage in (0, 1):
            plan = P.plan_memory(
                cfg, hw, dataclasses.replace(P.Setting.from_config(cfg), zero_stage=stage)
            )
            states[precision, stage] = plan.row("optimizer states")
    assert states["fp32", 0] > states["fp32", 1]
    assert states["bf16", 0] == states["bf16", 1]  # planned as the stage 1 the engine runs


# ---- the command line ------------------------------------------------------------------------


def _plan_cli(capsys, *argv):
    from megapt.cli import main

    rc = main(["plan", *argv])
    out = capsys.readouterr()
    return rc, out.out + out.err


def test_cli_prints_the_table_and_exits_0_when_it_fits(capsys):
    rc, text = _plan_cli(capsys, "-c", "configs/7b.yaml")
    assert rc == 0, text
    for row in (
        "parameters",
        "gradients",
        "optimizer states",
        "activations",
        "logits / loss",
        "ZeRO buffers",
        "CUDA context",
        "peak per GPU",
        "host RAM per node",
        "largest micro_batch",
    ):
        assert row in text


def test_cli_exits_1_with_a_fitting_suggestion_when_it_does_not_fit(capsys):
    rc, text = _plan_cli(
        capsys,
        "-c",
        "configs/7b.yaml",
        "--nodes",
        "1",
        "--gpus-per-node",
        "8",
        "--deepspeed.zero_stage=0",
        "--train.activation_checkpointing=false",
    )
    assert rc == 1 and "DOES NOT FIT" in text
    line = next(
        x for x in text.splitlines() if x.strip().startswith("x1") or x.strip().startswith("x2")
    )
    overrides = [w for w in line.split() if w.startswith("--")]
    assert overrides
    rc2, text2 = _plan_cli(
        capsys,
        "-c",
        "configs/7b.yaml",
        "--deepspeed.zero_stage=0",
        "--train.activation_checkpointing=false",
        *overrides,
    )
    assert rc2 == 0, text2


def test_cli_exits_2_naming_the_key_when_the_world_size_does_not_divide_the_batch(capsys):
    rc, text = _plan_cli(capsys, "-c", "configs/70b.yaml", "--nodes", "6")
    assert rc == 2
    assert "plan.global_batch" in text and "48" in text


def test_cli_says_nothing_fits_when_nothing_does(capsys):
    rc, text = _plan_cli(
        capsys,
        "-c",
        "configs/70b.yaml",
        "--nodes",
        "1",
        "--gpus-per-node",
        "1",
        "--plan.global_batch=0",
        "--gpu",
        "a10g",
        "--cpu-mem-gb",
        "64",
    )
    assert rc == 1 and "nothing fits" in text


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_block_activation_formula_matches_the_tensors_a_real_block_saves(precision):
    """Sum the tensors megapt's Block saves for backward (CPU: sdpa flash attention, eager RMSNorm and
    RoPE), leaving out parameters and the RoPE tables, and hold the planner's formula to it."""
    import torch

    from megapt.model.ops import select_backends

    cfg = load_config(
        [],
        [
            "--model.preset=tiny",
            "--model.n_layers=1",
            "--model.d_model=256",
            "--model.n_heads=4",
            "--model.n_kv_heads=2",
            "--model.ffn_hidden=704",
            "--tokenizer.vocab_size=512",
            "--data.seq_len=128",
            "--model.norm=eager",
            "--model.attention=sdpa",
        ],
    )
    a = P.model_args(cfg)
    model = GPT(a, select_backends(cfg.model, "cpu")).to(
        torch.bfloat16 if precision == "bf16" else torch.float32
    )
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            saved[st.data_ptr()] = st.nbytes()
        return t

    b, s = 2, 128
    h = model.tok_embeddings(torch.randint(0, 512, (b, s))).detach().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.layers[0](h, model.rope_cos[:s], model.rope_sin[:s], AttentionMask())
    predicted = P.block_activation_bytes(a, s, b, precision, attention="sdpa", norm="eager")
    assert sum(saved.values()) == pytest.approx(predicted, rel=0.10)
