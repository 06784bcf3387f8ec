"""megapt bench: the numbers a user reads off a benchmark JSON are the right numbers.

MFU/HFU against a hand calculation, the peak a run is measured against (spec sheet, or the measured
matmul peak for an unknown GPU / a CPU), medians and spread, real-token accounting under grad
accumulation, ratios that are the ratio of the recorded absolutes, compare flagging a regression,
and a sweep that records an OOM and carries on.
"""

from __future__ import annotations

import copy
import json
import re
import signal
from pathlib import Path

import pytest
import torch

from megapt.bench import cli as bench_cli
from megapt.bench import report, runners, sweep
from megapt.bench.fingerprint import fingerprint, measure_matmul_tflops
from megapt.config import ConfigError, load_config
from megapt.hardware import GPUS, match_gpu, select_peak
from megapt.model.gpt import ModelArgs

REPO = Path(__file__).resolve().parents[2]

# --------------------------------------------------------------------------------------------
# MFU / HFU
# --------------------------------------------------------------------------------------------


def test_palm_flops_hand_calculation():
    # 2 layers of d 32, 4 heads (Q = 8, kv 4), ffn 64, vocab 10, untied, T = 16; N counted by hand
    a = ModelArgs(
        n_layers=2,
        d_model=32,
        n_heads=4,
        n_kv_heads=4,
        ffn_hidden=64,
        vocab_size=10,
        max_seq_len=16,
    )
    per_layer = 4 * 32 * 32 + 3 * 32 * 64 + 2 * 32  # wq wk wv wo, w1 w2 w3, two norms = 10,304
    n = 2 * per_layer + 32 + 10 * 32  # + final norm + output head (the input table is a lookup)
    assert a.num_params(exclude_embeddings=True) == n == 20_960
    # 6N + 12*L*H*Q*T = 125,760 + 12*2*4*8*16 = 125,760 + 12,288
    assert a.flops_per_token(16) == 138_048
    # activation checkpointing recomputes the forward: 8N + 16*L*H*Q*T = 167,680 + 16,384
    assert a.hardware_flops_per_token(16, recompute=True) == 184_064
    assert a.hardware_flops_per_token(16, recompute=False) == 138_048
    # 1000 tokens/s x 138,048 FLOP/token on a 1 GFLOP/s device
    assert a.mfu(1000.0, 1e9, 16) == pytest.approx(0.138048)
    assert a.hfu(1000.0, 1e9, 16, recompute=True) == pytest.approx(0.184064)
    assert a.mfu(1000.0, None, 16) is None and a.hfu(1000.0, 0.0) is None


def test_tiny_preset_flops_match_hand_count():
    # tiny: d=256, L=4, H=4, kv=2 (head 64), ffn=704, vocab 4096, untied.
    # per block: wq 256*256 + wk 256*128 + wv 256*128 + wo 256*256 = 196608; ffn 3*256*704 = 540672;
    # 2 norms 512 -> 737792; x4 = 2951168; + final norm 256 + output head 4096*256 = 1048576
    # -> N = 4,000,000 (the 4096*256 input embedding is a lookup: not counted)
    args = ModelArgs.from_preset("tiny", vocab_size=4096, max_seq_len=128)
    info = runners.flops_record(args, seq_len=128, recompute=True)
    assert info["N"] == 4_000_000
    # 6*4e6 + 12*4*4*64*128 = 24,000,000 + 1,572,864
    assert info["model_flops_per_token"] == 25_572_864
    # 8*4e6 + 16*4*4*64*128 = 32,000,000 + 2,097,152
    assert info["hardware_flops_per_token"] == 34_097_152


def _hf_matmul_params(model) -> int:
    """Parameters of a Hugging Face causal LM that take part in matmuls: all but an untied input
    embedding (counted here from the model, independently of ModelArgs)."""
    n = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    emb, out = model.get_input_embeddings(), model.get_output_embeddings()
    return n if emb.weight is out.weight else n - emb.weight.numel()


def test_hf_baseline_has_the_same_shapes_as_megapt_gpt():
    # the HF runner's MFU uses megapt's ModelArgs count: it must be HF's own count too
    from megapt.model.gpt import GPT

    for tie in (False, True):
        args = ModelArgs.from_preset("tiny", vocab_size=512, max_seq_len=32, tie_embeddings=tie)
        hf = runners.build_hf_llama(args, "cpu")
        assert hf.config._attn_implementation == "sdpa"
        assert _hf_matmul_params(hf) == args.num_params(exclude_embeddings=True)
        ours = GPT(args)
        assert sum(p.numel() for p in hf.parameters()) == sum(p.numel() for p in ours.parameters())


def test_plain_baseline_optimizer_groups_match_the_engine():
    # engine vs plain compares DeepSpeed with no DeepSpeed, not two optimisers: the baseline once
    # decayed the embedding table (grouped by ndim only) while the engine did not
    from megapt.config import Config
    from megapt.model.gpt import GPT
    from megapt.train.engine import build_optimizer

    cfg = Config()
    cfg.train.weight_decay = 0.1
    for tie in (False, True):
        model = GPT(
            ModelArgs.from_preset("tiny", vocab_size=512, max_seq_len=32, tie_embeddings=tie)
        )
        plain, engine = runners._adamw(model, cfg.train, cuda=False), build_optimizer(cfg, model)
        keys = ("lr", "betas", "eps", "weight_decay", "fused", "foreach")
        assert [{k: g.get(k) for k in keys} for g in plain.param_groups] == [
            {k: g.get(k) for k in keys} for g in engine.param_groups
        ]
        assert [[id(p) for p in g["params"]] for g in plain.param_groups] == [
            [id(p) for p in g["params"]] for g in engine.param_groups
        ]
        emb = model.tok_embeddings.weight
        assert [
            g["weight_decay"] for g in plain.param_groups if any(p is emb for p in g["params"])
        ] == [0.0]


# --------------------------------------------------------------------------------------------
# Peaks and fingerprint
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,key",
    [
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H100 PCIe", "h100-pcie"),
        ("NVIDIA H100 NVL", "h100-nvl"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA H200 NVL", "h200-nvl"),
        ("NVIDIA A100-SXM4-80GB", "a100"),
        ("NVIDIA A100-PCIE-40GB", "a100-40"),
        ("NVIDIA A100 80GB PCIe", "a100"),
        ("NVIDIA A10G", "a10g"),
        ("NVIDIA A10", "a10"),
        ("NVIDIA L40S", "l40s"),
        ("NVIDIA L4", "l4"),
        ("NVIDIA GeForce RTX 4090", "rtx4090"),
        ("NVIDIA GeForce RTX 3090", "rtx3090"),
        ("Tesla V100-SXM2-32GB", "v100"),
        ("Tesla V100-PCIE-32GB", "v100-pcie"),
        ("Tesla V100S-PCIE-32GB", "v100s"),
        ("Tesla T4", "t4"),
        ("NVIDIA GeForce GTX 1080", None),
    ],
)
def test_gpu_names_map_to_the_right_spec_row(name, key):
    assert match_gpu(name) == key


def test_spec_peak_is_dense_and_follows_precision():
    h100 = select_peak("NVIDIA H100 80GB HBM3", "bf16", False, {"bf16": 700.0})
    assert (h100["tflops"], h100["source"]) == (989.4, "spec")  # 1979 with sparsity, halved
    assert h100["measured_tflops"] == 700.0  # reported beside the spec peak
    a100_tf32 = select_peak("NVIDIA A100-SXM4-40GB", "fp32", True, {})
    assert (a100_tf32["precision_key"], a100_tf32["tflops"]) == ("tf32", 156.0)
    a100_fp32 = select_peak("NVIDIA A100-SXM4-40GB", "fp32", False, {})
    assert a100_fp32["tflops"] == 19.5


def test_unknown_gpu_falls_back_to_measured_peak_and_says_so():
    p = select_peak("NVIDIA Z9000 Prototype", "bf16", False, {"bf16": 123.0})
    assert (p["tflops"], p["source"], p["gpu_model"]) == (123.0, "measured", None)
    assert "unknown GPU model 'NVIDIA Z9000 Prototype'" in p["note"]
    # a known GPU without the precision (V100 has no bf16) also falls back, with its own reason
    v = select_peak("Tesla V100-SXM2-16GB", "bf16", False, {"bf16": 30.0})
    assert (v["tflops"], v["source"]) == (30.0, "measured") and "no bf16" in v["note"]
    # nothing measured either: no MFU rather than a made-up one
    assert select_peak("NVIDIA Z9000", "bf16", False, {})["tflops"] is None


def test_cpu_uses_measured_peak():
    p = select_peak(None, "fp32", False, {"fp32": 0.05}, is_cuda=False)
    assert (p["tflops"], p["source"]) == (0.05, "measured") and p["note"].startswith("CPU")


def test_every_table_row_has_all_precisions():
    for name, gpu in GPUS.items():
        row = gpu.peak_tflops
        assert set(row) == {"bf16", "fp16", "tf32", "fp32"}, name
        assert row["fp16"] and row["fp32"], name
        assert row["fp16"] >= row["fp32"], name
        assert gpu.bf16 == (row["bf16"] is not None), name
        assert match_gpu(f"NVIDIA {gpu.name}") == name, name  # its own spec-sheet name finds it


def test_trainer_mfu_peak_is_the_shared_table_row():
    # the trainer asks megapt.hardware for the peak of its device; bf16 on an H100 is the dense
    # 989.4 TFLOP/s of the datasheet's 1,979 with sparsity
    from megapt.hardware import peak_flops

    assert peak_flops("bf16", "NVIDIA H100 80GB HBM3") == pytest.approx(989.4e12)
    assert peak_flops("bf16", "Tesla V100-SXM2-32GB") is None  # Volta has no bf16: no MFU
    assert peak_flops("fp32", "NVIDIA GeForce GTX 1080") is None


def test_measured_matmul_peak_on_cpu_is_positive():
    m = measure_matmul_tflops("cpu", "fp32", n=64, repeats=3, warmup=1, min_time_s=0.05)
    assert m["tflops"] > 0 and m["n"] == 64 and m["repeats"] >= 3
    # 2 n^3 flops per call over the median time; on a (shared) CPU the peak is the best repeat
    assert m["median_tflops"] == pytest.approx(2 * 64**3 / m["median_s"] / 1e12)
    assert m["tflops"] == m["max_tflops"] >= m["median_tflops"]


def test_fingerprint_identifies_the_machine():
    fp = fingerprint(measure=False)
    for key in ("device", "gpu", "cpu", "software", "git", "hostname_sha256", "os"):
        assert key in fp
    assert fp["software"]["torch"] == torch.__version__
    assert {"deepspeed", "triton", "transformers"} <= set(fp["software"])
    assert len(fp["hostname_sha256"]) == 12 and fp["cpu"]["logical_cores"] >= 1
    assert set(fp["git"]) == {"commit", "dirty"}
    json.dumps(fp)  # JSON-ready


# --------------------------------------------------------------------------------------------
# Statistics and the timed loop
# --------------------------------------------------------------------------------------------


def test_summary_median_and_spread():
    s = runners.summarize([5, 1, 4, 2, 3])
    assert (s["median"], s["q1"], s["q3"], s["iqr"], s["min"], s["max"], s["n"]) == (
        3,
        2,
        4,
        2,
        1,
        5,
        5,
    )
    assert runners.summarize([])["median"] is None


def test_timed_loop_counts_real_tokens_over_grad_accum_and_skips_warmup():
    B, T, ga = 2, 8, 3
    labels = torch.ones(B, T, dtype=torch.long)
    labels[0, :3] = -100  # 3 padded positions per micro-batch
    batch = {"input_ids": torch.zeros(B, T, dtype=torch.long), "labels": labels}
    calls = {"fwd": 0, "step": []}

    def forward(b):
        calls["fwd"] += 1
        return torch.tensor(float(calls["fwd"]))

    out = runners.timed_loop(
        iter([batch] * 100),
        forward,
        lambda loss: None,
        lambda boundary: calls["step"].append(boundary),
        grad_accum=ga,
        warmup=2,
        steps=4,
        cuda=False,
    )
    recs = out["records"]
    assert len(recs) == 4  # warm-up steps are not recorded
    assert calls["fwd"] == (2 + 4) * ga
    assert calls["step"].count(True) == 6  # one optimizer boundary per step
    assert all(r["tokens"] == ga * (B * T - 3) for r in recs)  # real tokens only
    assert all(r["all_tokens"] == ga * B * T for r in recs)
    assert set(recs[0]["phases"]) == {"data_wait", "forward", "backward", "optimizer"}
    assert len(out["losses"]) == 6
    peak = {"tflops": 1e-3}
    args = ModelArgs.from_preset("tiny", vocab_size=512, max_seq_len=T)
    res = runners.summarize_records(
        out, world_size=2, args=args, seq_len=T, recompute=True, peak=peak
    )
    step = recs[0]
    assert res["tokens_per_s_total"]["n"] == 4
    assert res["real_token_fraction"] == pytest.approx((B * T - 3) / (B * T))
    tps = sorted(r["tokens"] / r["step_time_s"] for r in recs)
    assert res["tokens_per_s_per_device"]["median"] == pytest.approx((tps[1] + tps[2]) / 2)
    assert res["tokens_per_s_total"]["median"] == pytest.approx(
        2 * res["tokens_per_s_per_device"]["median"]
    )
    # MFU = tokens/s per device x (6N + 12LHQT) / peak; with recomputation HFU counts 8N + 16LHQT: 4/3 of it
    assert res["mfu"]["median"] == pytest.approx(
        res["tokens_per_s_per_device"]["median"] * args.flops_per_token(T) / 1e9
    )
    assert res["hfu"]["median"] == pytest.approx(4 / 3 * res["mfu"]["median"])
    assert step["step_time_s"] >= sum(step["phases"].values()) * 0.999


def test_runner_oom_is_recorded_not_raised(monkeypatch):
    def boom(cfg, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setitem(runners.RUNNER_FNS, "plain", boom)
    cfg = load_config([str(REPO / "configs" / "tiny.yaml")], ["--train.device=cpu"])
    res = runners.run_one("plain", cfg, warmup=0, steps=1, data="synthetic", measured={})
    assert res["status"] == "oom" and "out of memory" in res["error"]
    assert res["memory"]["kind"] == "rss" and res["memory"]["peak_bytes"] > 0


# --------------------------------------------------------------------------------------------
# Sweeps, ratios, compare
# --------------------------------------------------------------------------------------------


def _ok(tps: float, mem: float) -> dict:
    s = runners.summarize([tps])
    return {
        "status": "ok",
        "tokens_per_s_total": s,
        "tokens_per_s_per_device": s,
        "step_time_s": runners.summarize([1000.0 / tps]),
        "mfu": runners.summarize([tps / 1e4]),
        "memory": {"kind": "rss", "peak_bytes": mem},
    }


def test_sweep_axes_expand_in_order_and_bad_specs_list_every_problem(tmp_path):
    assert sweep.parse_axis_arg("size=tiny,124m") == ("model.preset", ["tiny", "124m"])
    assert sweep.parse_axis_arg("zero=0,3") == ("deepspeed.zero_stage", [0, 3])
    pts = sweep.expand({"size": ["tiny", "124m"], "seq": [64, 128]})
    assert pts == [
        {"model.preset": "tiny", "data.seq_len": 64},
        {"model.preset": "tiny", "data.seq_len": 128},
        {"model.preset": "124m", "data.seq_len": 64},
        {"model.preset": "124m", "data.seq_len": 128},
    ]
    assert sweep.expand({}) == [{}]
    spec = tmp_path / "s.yaml"
    spec.write_text("axes: {size: tiny}\nrunners: [engine, fsdp]\nbogus: 1\n")
    with pytest.raises(ConfigError) as e:
        sweep.load_spec(str(spec))
    for word in ("bogus", "axes.size", "fsdp"):
        assert word in str(e.value)
    with pytest.raises(ConfigError):
        sweep.parse_axis_arg("nodot=1,2")


def test_sweep_explicit_points_combine_with_axes_and_are_validated(tmp_path):
    pts = sweep.expand(
        {"attention": ["sdpa", "triton"]},
        [{"size": "124m", "seq": 1024}, {"size": "1b", "seq": 2048, "zero": 3}],
    )
    assert pts == [
        {"model.preset": "124m", "data.seq_len": 1024, "model.attention": "sdpa"},
        {"model.preset": "124m", "data.seq_len": 1024, "model.attention": "triton"},
        {
            "model.preset": "1b",
            "data.seq_len": 2048,
            "deepspeed.zero_stage": 3,
            "model.attention": "sdpa",
        },
        {
            "model.preset": "1b",
            "data.seq_len": 2048,
            "deepspeed.zero_stage": 3,
            "model.attention": "triton",
        },
    ]
    assert sweep.expand({}, [{"seq": 64}, {"seq": 64}]) == [
        {"data.seq_len": 64}
    ]  # duplicates dropped
    spec = tmp_path / "p.yaml"
    spec.write_text("points:\n  - {size: tiny, seq: [64, 128]}\n  - {nodot: 1}\n  - 7\n")
    with pytest.raises(ConfigError) as e:
        sweep.load_spec(str(spec))
    for word in ("points[0].seq", "points[1]", "nodot", "points[2]"):
        assert word in str(e.value)
    ok = tmp_path / "ok.yaml"
    ok.write_text("points:\n  - {size: tiny, seq: 64}\n")
    assert sweep.load_spec(str(ok))["points"] == [{"size": "tiny", "seq": 64}]


def test_every_committed_spec_loads_and_expands():
    root = Path(__file__).resolve().parents[2] / "benchmarks" / "specs"
    specs = sorted(root.glob("*.yaml"))
    assert specs
    for path in specs:
        spec = sweep.load_spec(str(path))
        assert sweep.expand(spec.get("axes") or {}, spec.get("points")), path


def test_sweep_records_oom_with_planner_and_continues(monkeypatch):
    calls = []

    def fake_point(config_files, overrides, todo, **kw):
        calls.append((tuple(overrides), tuple(todo)))
        if "--train.micro_batch=64" in overrides:  # the big point dies in the engine
            return {
                "returncode": -signal.SIGKILL,
                "wall_s": 1.0,
                "planner": {"available": True, "peak_bytes": 9e10},
                "runners": {
                    "engine": {"status": "oom", "error": "killed by SIGKILL"},
                    "plain": {"status": "not_run"},
                },
                "failure": {"status": "oom"},
            }
        mb = int([o for o in overrides if "micro_batch" in o][0].split("=")[1])
        z = int([o for o in overrides if "zero_stage" in o][0].split("=")[1])
        res = {"engine": _ok(100.0 * mb + z, 2e9)}
        if "plain" in todo:
            res["plain"] = _ok(80.0 * mb, 1e9)
        return {
            "returncode": 0,
            "wall_s": 1.0,
            "planner": {"available": True, "peak_bytes": 3e9},
            "runners": res,
        }

    monkeypatch.setattr(sweep, "run_point_subprocess", fake_point)
    recs = sweep.run_sweep(
        [],
        [],
        {"micro_batch": [64, 2], "zero": [0, 1]},
        ["engine", "plain"],
        warmup=0,
        steps=1,
        data="synthetic",
        measured={},
        timeout_s=10,
        progress=lambda *_: None,
    )
    assert [r["status"] for r in recs] == ["oom", "oom", "ok", "ok"]
    assert recs[0]["planner"]["peak_bytes"] == 9e10  # the OOM carries the planner's prediction
    # plain ignores the ZeRO stage: measured once for mb=2 and reused by the zero=1 point
    assert calls[3][1] == ("engine",)
    assert recs[3]["baselines"]["plain"]["reused_from"] == recs[2]["id"]
    # ratios are the ratios of the recorded absolutes
    r = recs[3]
    assert r["ratios"]["engine/plain"]["tokens_per_s_total"] == pytest.approx(
        r["results"]["engine"]["tokens_per_s_total"]["median"]
        / r["baselines"]["plain"]["tokens_per_s_total"]["median"]
    )
    assert r["ratios"]["engine/plain"]["peak_memory_bytes"] == pytest.approx(2.0)


def test_failure_classification():
    assert sweep._classify_failure(-signal.SIGKILL, "", False)[0] == "oom"
    assert (
        sweep._classify_failure(1, "torch.OutOfMemoryError: CUDA out of memory", False)[0] == "oom"
    )
    assert sweep._classify_failure(1, "ValueError: x", False)[0] == "error"
    assert sweep._classify_failure(None, "", True)[0] == "timeout"


def _doc(engine_tps: float, engine_status: str = "ok") -> dict:
    point = {
        "id": "p000",
        "params": {"model.preset": "tiny"},
        "status": engine_status,
        "results": {
            "engine": _ok(engine_tps, 2e9) if engine_status == "ok" else {"status": engine_status}
        },
        "baselines": {"plain": _ok(80.0, 1e9)},
    }
    point["ratios"] = report.point_ratios(point)
    fp = {"gpu": {"name": None}, "cpu": {"model": "x"}, "software": {"torch": "2"}}
    return report.build_document(
        "sweep", argv=[], config={}, fingerprint=fp, peaks={}, points=[point]
    )


def test_compare_flags_an_injected_regression(tmp_path):
    base = _doc(100.0)
    rows, _ = report.compare(base, copy.deepcopy(base), threshold=0.05)
    assert rows and not any(r["regression"] for r in rows)
    slower = _doc(90.0)  # engine 10% slower, plain unchanged
    rows, _ = report.compare(base, slower, threshold=0.05)
    flagged = {(r["runner"], r["metric"]) for r in rows if r["regression"]}
    assert ("engine", "tokens_per_s_total") in flagged and ("engine", "step_time_s") in flagged
    assert not any(r["runner"] == "plain" and r["regression"] for r in rows)
    assert not any(r["regression"] for r in report.compare(base, slower, threshold=0.2)[0])
    # a point that ran in A and OOMs in B is a regression too
    rows, _ = report.compare(base, _doc(0, "oom"))
    assert any(r["metric"] == "status" and r["regression"] for r in rows)

    # through the CLI: exit code 1 on a regression, 0 without
    from megapt.cli import main

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    report.write_json(a, base)
    report.write_json(b, slower)
    assert main(["bench", "compare", str(a), str(b)]) == 1
    assert main(["bench", "compare", str(a), str(a)]) == 0
    assert main(["bench", "compare", str(a), str(b), "--threshold", "0.5"]) == 0


def test_document_ratios_equal_recorded_absolutes():
    doc = _doc(120.0)
    assert {"config", "fingerprint", "results", "baselines", "ratios", "formulas", "peaks"} <= set(
        doc
    )
    (row,) = [r for r in doc["ratios"] if r["metric"] == "tokens_per_s_total"]
    assert row["ratio"] == pytest.approx(120.0 / 80.0)
    assert row["ratio"] == pytest.approx(row["numerator_value"] / row["denominator_value"])
    assert (
        "6*N + 12*L*H*Q*T" in doc["formulas"]["mfu"]
        and "8*N + 16*L*H*Q*T" in doc["formulas"]["hfu"]
    )
    plain_row = [line for line in report.table(doc["results"]).splitlines() if " plain " in line][0]
    assert "1.50x" in plain_row  # the terminal table prints the ratio beside the absolutes


def _points(axis: str, values: list) -> list[dict]:
    return [
        {
            "id": f"p{i:03d}",
            "params": {axis: v},
            "results": {"engine": _ok(100.0 + i, 2e9)},
            "baselines": {"plain": _ok(80.0 + i, 1e9)},
        }
        for i, v in enumerate(values)
    ]


@pytest.mark.parametrize(
    "axis,values,style",
    [
        ("model.preset", ["tiny", "124m", "1b"], "bars"),  # categories: grouped bars
        ("deepspeed.zero_stage", [0, 1, 2, 3], "bars"),  # numbers, but a choice, not a quantity
        ("model.attention", ["sdpa", "triton"], "bars"),
        ("data.seq_len", [128, 512, 2048], "lines"),  # quantities: lines
        ("train.micro_batch", [1, 2, 4], "lines"),
    ],
)
def test_categorical_sweeps_draw_grouped_bars_quantities_lines(axis, values, style, tmp_path):
    pytest.importorskip(
        "matplotlib", reason="the bench extra (pip install -e '.[bench]'); CI installs it"
    )
    import matplotlib.pyplot as plt

    points = _points(axis, values)
    assert report.plot_style(axis, values) == style
    fig, (tps, mem) = report.figure(points, axis)
    try:
        for ax in (tps, mem):
            if style == "bars":  # one bar per (runner, value), side by side in each value's group
                assert len(ax.patches) == 2 * len(values) and not ax.lines
                xs = sorted(round(b.get_x() + b.get_width() / 2, 6) for b in ax.patches)
                assert len(set(xs)) == 2 * len(values)  # no two bars on top of each other
            else:  # one line per runner through every value
                assert len(ax.lines) == 2 and not ax.patches
                assert all(len(line.get_xdata()) == len(values) for line in ax.lines)
        assert [t.get_text() for t in tps.get_xticklabels()] == [str(v) for v in values]
        heights = sorted(b.get_height() for b in tps.patches) if style == "bars" else None
        if heights:  # the bars are the recorded tokens/s, nothing else
            assert heights == sorted(
                [100.0 + i for i in range(len(values))] + [80.0 + i for i in range(len(values))]
            )
    finally:
        plt.close(fig)
    paths, note = report.plot(points, tmp_path / "run")
    assert note is None and [Path(x).name for x in paths] == [f"run-{axis.replace('.', '_')}.png"]
    assert Path(paths[0]).stat().st_size > 1000


def test_comm_time_is_the_time_inside_allreduce_gradients():
    import time

    class Engine:
        def __init__(self):
            self.calls = 0

        def allreduce_gradients(self, bucket_size=10):
            self.calls += 1
            time.sleep(0.05)

        def backward(
            self, loss
        ):  # DeepSpeed's backward calls self.allreduce_gradients() at its end
            time.sleep(0.02)
            self.allreduce_gradients()

    eng = Engine()
    read = runners._engine_comm_timer(eng, cuda=False)
    eng.backward(None)
    eng.backward(None)
    assert eng.calls == 2  # the original still runs
    assert 0.1 <= read() < 0.14  # both reductions, not the rest of backward
    assert read() == 0.0  # reset after each read: one step's worth at a time


def test_loader_path_feeds_the_timed_loop(tmp_path):
    """--data loader: real shards through megapt.data.loader; their tokens are counted, their wait timed."""
    import numpy as np

    from megapt.data.shard import write_token_dataset

    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 256, 17, dtype=np.uint16) for _ in range(64)]
    write_token_dataset(
        tmp_path, {"train": rows, "val": rows[:4]}, seq_len=16, vocab_size=256, shard_samples=16
    )
    cfg = load_config(
        [str(REPO / "configs" / "tiny.yaml")],
        [
            "--model.n_layers=1",
            "--model.d_model=64",
            "--model.n_heads=2",
            "--model.n_kv_heads=1",
            "--tokenizer.vocab_size=256",
            "--data.seq_len=16",
            "--train.micro_batch=2",
            "--train.grad_accum=2",
            "--train.device=cpu",
            f"--data.shard_dir={tmp_path}",
            "--data.loader_workers=0",
        ],
    )
    res = runners.run_one("plain", cfg, warmup=1, steps=3, data="loader", measured={"fp32": 1e-3})
    assert res["status"] == "ok", res.get("traceback")
    assert res["tokens_per_step_per_device"] == 2 * 2 * 16  # micro_batch x grad_accum x seq_len
    assert res["phases_s"]["data_wait"]["median"] > 0
    assert res["steps"] == 3


def test_other_benchmarks_run_from_the_same_entry_point(tmp_path, monkeypatch, capsys):
    import megapt.bench.loader
    from megapt.cli import main

    calls = []

    def fake_main(argv):
        calls.append(argv)
        return 0

    out = tmp_path / "fake.json"
    monkeypatch.setattr(megapt.bench.loader, "main", fake_main)
    assert (
        main(["bench", "loader", "--script-args=--seconds 1 --workers 0", "--out", str(out)]) == 0
    )
    assert calls == [["--seconds", "1", "--workers", "0", "--out", str(out)]]
    # a benchmark's own bad argument: its usage error and exit code 2, no traceback
    assert main(["bench", "data", "--script-args=--no-such-flag"]) == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
    # a GPU-only benchmark on a machine without one says so and exits 2
    if not torch.cuda.is_available():
        assert (
            main(
                ["bench", "kernels", "--script-args=--only rope", "--out", str(tmp_path / "k.json")]
            )
            == 2
        )
        assert "needs a CUDA GPU" in capsys.readouterr().err


def test_gpu_session_script_dry_run_lists_every_phase(tmp_path):
    # the GPU runbook: bash-parses, refuses an unknown phase, and its dry run names each step's
    # command with the committed specs (a GPU session can't afford to find a typo there)
    import os
    import subprocess

    root = Path(__file__).resolve().parents[2]
    script = root / "benchmarks" / "gpu_session.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    bad = subprocess.run(["bash", str(script), "bogus"], capture_output=True, text=True)
    assert bad.returncode == 2 and "usage" in bad.stderr
    env = dict(os.environ, MEGAPT_GPU_SESSION_DRY="1")
    out = subprocess.run(
        ["bash", str(script), "all", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    for step in ("[gpu-tests]", "[kernel-bench]", "[goals]", "[zero]", "[planner-peak]"):
        assert step in out.stdout
    for path in ("benchmarks/specs/gpu_goals.yaml", "benchmarks/specs/gpu_zero.yaml", "tests/gpu"):
        assert path in out.stdout and (root / path).exists()
    # every `megapt bench ACTION` it runs is an action the installed package has
    actions = re.findall(r"-m megapt bench (\S+)", out.stdout)
    assert {"kernels", "sweep", "planner"} <= set(actions) and set(actions) <= set(
        bench_cli.ACTIONS
    )
    assert (tmp_path / "o" / "all.log").is_file()
    core = subprocess.run(
        ["bash", str(script), "core", str(tmp_path / "c")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert core.returncode == 0, core.stderr
    for step in (
        "[gpu-tests]",
        "[kernel-bench]",
        "[goal-124m]",
        "benchmarks/specs/gpu_124m.yaml",
        "--quick",
        "-m megapt bench kernels",
    ):
        assert step in core.stdout
    assert (root / "benchmarks/specs/gpu_124m.yaml").exists()
