"""megapt.bench.kernels: the plan covers what we report, and every code path runs (tiny CPU cases).

Real numbers need a GPU; here the benchmark modules run on CPU through the Triton interpreter
at toy sizes so a broken provider, row or speedup computation is caught before a GPU run.
"""

import json

import pytest
import torch

from megapt.bench.kernels import attention as bench_attention
from megapt.bench.kernels import common as bench_common
from megapt.bench.kernels import cross_entropy as bench_cross_entropy
from megapt.bench.kernels import rms_norm as bench_rms_norm
from megapt.bench.kernels import rope as bench_rope
from megapt.bench.kernels import run as run_all


def test_full_attention_plan_covers_1k_to_16k_both_head_dims_causal_and_not():
    plan = bench_attention.cases(quick=False)
    assert {c["seq"] for c in plan} == {1024, 2048, 4096, 8192, 16384}
    assert {c["head_dim"] for c in plan} == {64, 128}
    assert {c["causal"] for c in plan} == {True, False}
    assert {c["mode"] for c in plan} == {"fwd", "fwd+bwd"}
    assert {"sdpa-flash", "sdpa-cudnn"} <= set(bench_attention.PROVIDERS)
    doc = [c for c in plan if c.get("doc_len")]
    assert {c["seq"] for c in doc} == {4096, 8192} and {c["doc_len"] for c in doc} == {512}
    assert {c["mode"] for c in doc} == {"fwd", "fwd+bwd"} and all(c["causal"] for c in doc)


def test_dry_run_writes_fingerprint_and_plan(tmp_path):
    out = tmp_path / "k.json"
    assert run_all.main(["--dry-run", "--quick", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["kind"] == "kernels" and doc["dry_run"] is True
    assert doc["fingerprint"]["software"]["torch"] == torch.__version__
    assert set(doc["planned_cases"]) == {"attention", "rms_norm", "rope", "cross_entropy"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_run_without_gpu_exits_2_with_a_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_all.main(["--only", "rope", "--out", str(tmp_path / "x.json")])
    assert e.value.code == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.fixture
def cpu_bench(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("CPU smoke test")
    monkeypatch.setattr(bench_common, "DEVICE", "cpu")


def _by_provider(rows):
    return {r["provider"]: r for r in rows}


def test_benchmarks_run_end_to_end_on_toy_cases(cpu_bench):
    att = bench_attention.run(
        [
            dict(
                op="attention",
                mode=m,
                causal=True,
                head_dim=16,
                seq=32,
                batch=1,
                heads=2,
                kv_heads=1,
                dtype="fp16",
            )
            for m in ("fwd", "fwd+bwd")
        ],
        quick=True,
    )
    for mode in ("fwd", "fwd+bwd"):
        rows = _by_provider([r for r in att if r["mode"] == mode])
        assert set(rows) == set(bench_attention.PROVIDERS)
        assert rows["megapt"]["status"] == "ok" and rows["megapt"]["tflops"] > 0
        assert rows["sdpa-cudnn"]["status"] != "ok"  # no cuDNN on CPU: recorded, not raised
        ok_baselines = {p for p, r in rows.items() if p != "megapt" and r["status"] == "ok"}
        assert set(rows["megapt"]["speedup_vs"]) == ok_baselines

    # document-masked case: ours with doc_start vs SDPA with the explicit mask; the others are n/a
    doc = bench_attention.run(
        [
            dict(
                op="attention",
                mode=m,
                causal=True,
                head_dim=16,
                seq=40,
                batch=2,
                heads=2,
                kv_heads=1,
                dtype="fp16",
                doc_len=8,
            )
            for m in ("fwd", "fwd+bwd")
        ],
        quick=True,
    )
    for mode in ("fwd", "fwd+bwd"):
        rows = _by_provider([r for r in doc if r["mode"] == mode])
        assert set(rows) == set(bench_attention.PROVIDERS)
        assert rows["megapt"]["status"] == "ok" and rows["sdpa-mask"]["status"] == "ok"
        assert rows["sdpa-mask"]["mask_mb"] > 0
        assert all(rows[p]["status"].startswith("n/a") for p in bench_attention.NO_DOC)
        assert set(rows["megapt"]["speedup_vs"]) == {
            "sdpa-mask"
        }  # not compared with the plain cases
    ds = bench_attention.doc_start_for(2, 40, 8)
    assert ds.shape == (2, 40) and (ds[:, 1:] >= ds[:, :-1]).all() and ds[0].unique().numel() > 2

    rms = _by_provider(
        bench_rms_norm.run([dict(op="rms_norm", mode="fwd+bwd", rows=8, hidden=24, dtype="fp16")])
    )
    assert rms["megapt"]["status"] == "ok" and rms["torch-eager"]["status"] == "ok"
    assert rms["megapt-cuda"]["status"].startswith("unavailable")
    assert "torch-eager" in rms["megapt"]["speedup_vs"]

    rope = bench_rope.run(
        [
            dict(op="rope", mode=m, batch=1, seq=8, heads=2, kv_heads=1, head_dim=16, dtype="fp16")
            for m in ("fwd", "fwd+bwd")
        ]
    )
    assert all(r["status"] == "ok" for r in rope if r["provider"] in ("megapt", "torch-eager"))
    assert any(r["provider"] == "megapt-inplace" and r["status"] == "ok" for r in rope)

    ce = _by_provider(
        bench_cross_entropy.run(
            [
                dict(
                    op="linear_cross_entropy",
                    mode="fwd+bwd",
                    tokens=16,
                    hidden=16,
                    vocab=50,
                    dtype="fp16",
                )
            ]
        )
    )
    for p in ("megapt", "megapt-chunked", "torch-full-logits"):
        assert ce[p]["status"] == "ok", ce[p]
