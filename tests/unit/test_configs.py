"""Every shipped run config parses, builds its model, has the size its name promises and fits
the hardware it was written for (per `megapt plan`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megapt import planner as P
from megapt.config import load_config, save_config
from megapt.model.gpt import GPT, ModelArgs

CONFIGS = sorted(
    p for p in (Path(__file__).parents[2] / "configs").glob("*.yaml") if p.name != "tiny.yaml"
)

# Published parameter counts of the Llama-2 checkpoints (32000 vocab, untied) these presets copy.
PUBLISHED = {"7b": 6_738_415_616, "13b": 13_015_864_320, "70b": 68_976_648_192}
NOMINAL = {"124m": 124e6, "350m": 350e6, "1b": 1e9, "3b": 3e9, "7b": 7e9, "13b": 13e9, "70b": 70e9}


def expected_params(a: ModelArgs) -> int:
    """Llama block: q/o (h x h), k/v (h x kv*hd), SwiGLU 3 x (h x f), two norms; embeddings, final norm, head."""
    h, hd = a.d_model, a.d_model // a.n_heads
    block = 2 * h * h + 2 * h * a.n_kv_heads * hd + 3 * h * a.ffn_hidden + 2 * h
    return a.n_layers * block + a.vocab_size * h * (1 if a.tie_embeddings else 2) + h


def test_every_size_has_a_config():
    presets = {load_config([str(p)]).model.preset for p in CONFIGS}
    assert presets == set(NOMINAL)
    assert len(CONFIGS) >= 10  # the sizes plus multi-node / offload variants


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_builds_the_promised_model_and_fits_its_hardware(path, tmp_path):
    cfg = load_config([str(path)])
    save_config(cfg, tmp_path / "resolved.yaml")  # the resolved tree round-trips
    assert load_config([str(tmp_path / "resolved.yaml")]) == cfg
    assert cfg.train.precision == "bf16" and cfg.run.name == path.stem

    args = P.model_args(cfg)
    with torch.device("meta"):
        model = GPT(args)
    built = sum(p.numel() for p in model.parameters())
    assert built == expected_params(args) == args.num_params()
    assert sum(p.numel for p in P.param_list(args)) == built
    preset = cfg.model.preset
    if preset in PUBLISHED:
        assert built == PUBLISHED[preset]
    assert abs(built / NOMINAL[preset] - 1) < 0.05, f"{preset}: {built / 1e9:.3f} B parameters"

    hw = P.Hardware.from_config(cfg)
    assert P.check_launch(cfg, hw, args) == []
    dp = P.data_parallel(cfg, hw)  # the world over the sequence x tensor-parallel group
    assert cfg.train.micro_batch * cfg.train.grad_accum * dp == cfg.plan.global_batch
    plan = P.plan_memory(cfg, hw, args=args)
    assert plan.fits, P.format_plan(cfg, plan)
    # headroom for what the model leaves out: at most 85% of the GPU
    assert plan.peak < 0.85 * hw.gpu_mem_gib * P.GIB, P.format_plan(cfg, plan)


def test_multi_node_configs_say_so_in_their_name():
    for p in CONFIGS:
        cfg = load_config([str(p)])
        if "node" in p.stem:
            assert f"{cfg.plan.nodes}node" in p.stem


def test_a_launch_on_the_wrong_world_size_is_refused():
    cfg = load_config([str(Path(__file__).parents[2] / "configs" / "70b.yaml")])
    problems = P.check_launch(cfg, P.Hardware(nodes=6, gpus_per_node=8), P.model_args(cfg))
    assert any("plan.global_batch" in p for p in problems)
