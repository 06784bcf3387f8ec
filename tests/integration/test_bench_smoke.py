"""`megapt bench sweep` end to end on CPU: a 2-point sweep of a micro model, each point in its own
subprocess (DeepSpeed engine + plain PyTorch + HF Llama), writes one valid JSON whose ratios are the
ratios of the absolutes it records, and `bench compare` of the run against itself finds nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MICRO = [
    "--model.n_layers=1",
    "--model.d_model=64",
    "--model.n_heads=2",
    "--model.n_kv_heads=1",
    "--tokenizer.vocab_size=256",
    "--data.seq_len=16",
    "--train.micro_batch=1",
    "--train.device=cpu",
]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_point_sweep_writes_valid_json(tmp_path):
    out = tmp_path / "run.json"
    env = dict(
        os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false"
    )
    cmd = [
        sys.executable,
        "-m",
        "megapt",
        "bench",
        "sweep",
        "-c",
        str(REPO / "configs" / "tiny.yaml"),
        *MICRO,
        "--axis",
        "zero=0,1",
        "--runners",
        "engine,plain,hf",
        "--warmup",
        "1",
        "--steps",
        "2",
        "--timeout",
        "240",
        "--out",
        str(out),
        "--logs",
        str(tmp_path / "logs"),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())

    assert doc["schema"] == "megapt-bench" and doc["version"] == 1 and doc["kind"] == "sweep"
    for key in ("config", "fingerprint", "peaks", "formulas", "baselines", "results", "ratios"):
        assert key in doc, key
    assert doc["peaks"]["used"]["source"] == "measured"  # CPU: no spec sheet
    assert doc["fingerprint"]["device"] == "cpu"
    assert [p["params"] for p in doc["results"]] == [
        {"deepspeed.zero_stage": 0},
        {"deepspeed.zero_stage": 1},
    ]
    for p in doc["results"]:
        assert p["status"] == "ok", (p["id"], p.get("failure"), p["results"], p["baselines"])
        eng = p["results"]["engine"]
        assert eng["zero_stage"] == p["params"]["deepspeed.zero_stage"]
        for name, r in [("engine", eng)] + list(p["baselines"].items()):
            assert r["status"] == "ok", name
            assert r["tokens_per_s_total"]["median"] > 0 and r["tokens_per_s_total"]["n"] == 2
            assert r["tokens_per_step_per_device"] == 16  # micro_batch 1 x seq 16, nothing padded
            assert r["memory"]["kind"] == "rss" and r["memory"]["peak_bytes"] > 0
            assert (
                0 < r["mfu"]["median"] and r["hfu"]["median"] == r["mfu"]["median"]
            )  # no recompute
            assert set(r["phases_s"]) == {"data_wait", "forward", "backward", "optimizer"}
        assert p["planner"]["available"] is True
    # the second point only re-ran the engine: plain and hf ignore the ZeRO stage
    assert doc["results"][1]["baselines"]["plain"]["reused_from"] == "p000"
    assert doc["results"][1]["baselines"]["hf"]["attn_implementation"] == "sdpa"

    # ratios: every one is the ratio of the recorded absolutes
    assert {(r["numerator"], r["denominator"]) for r in doc["ratios"]} == {
        ("engine", "plain"),
        ("engine", "hf"),
        ("plain", "hf"),
    }
    points = {p["id"]: p for p in doc["results"]}
    for r in doc["ratios"]:
        p = points[r["point"]]
        runs = {**p["baselines"], **p["results"]}
        path = {
            "tokens_per_s_total": ("tokens_per_s_total", "median"),
            "tokens_per_s_per_device": ("tokens_per_s_per_device", "median"),
            "step_time_s": ("step_time_s", "median"),
            "peak_memory_bytes": ("memory", "peak_bytes"),
        }[r["metric"]]
        num, den = (runs[r[side]][path[0]][path[1]] for side in ("numerator", "denominator"))
        assert r["ratio"] == pytest.approx(num / den, rel=1e-12)
        assert p["ratios"][f"{r['numerator']}/{r['denominator']}"][r["metric"]] == r["ratio"]
    assert "engine" in proc.stdout and "vs engine" in proc.stdout  # the terminal table

    same = subprocess.run(
        [sys.executable, "-m", "megapt", "bench", "compare", str(out), str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert same.returncode == 0, same.stdout


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_loader_bench_remote_reads_every_shard_cold_and_none_warm(tmp_path, monkeypatch):
    """`megapt bench loader --source remote`: disk vs a local S3 server (moto on 127.0.0.1); a
    cold cache fetches the whole set, a warm one fetches nothing, and the stall is measured."""
    from megapt.bench import loader

    for k in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_DEFAULT_REGION",
        "AWS_ENDPOINT_URL",
        "AWS_EC2_METADATA_DISABLED",
    ):
        monkeypatch.setenv(k, "")  # restored afterwards; the benchmark sets them for its server
    out = tmp_path / "loader.json"
    assert (
        loader.main(
            [
                "--source",
                "remote",
                "--samples",
                "1024",
                "--shard-samples",
                "256",
                "--seq-len",
                "64",
                "--world-sizes",
                "1",
                "2",
                "--workers",
                "0",
                "--batches",
                "20",
                "--step-ms",
                "2",
                "--seconds",
                "0.2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    doc = json.loads(out.read_text())
    rem = doc["remote"]
    assert rem["server"].startswith("moto") and rem["url"].startswith("s3://")
    runs = rem["runs"]
    assert {r["source"] for r in runs} == {"disk", "s3-cold", "s3-warm"} and len(runs) == 12
    for r in runs:
        assert r["tokens_per_s"] > 0 and 0 <= r["stall_fraction"] <= 1
        if r["source"] == "s3-cold":  # the shuffle window spans the set: all of it comes over
            assert r["downloaded_mb"] == pytest.approx(rem["set_mb"], abs=0.01)
        if r["source"] == "s3-warm":
            assert r["downloads"] == 0
    assert doc["runs"] == []  # --source remote skips the disk settings sweep
