"""Trainer behaviour users rely on, on CPU with gloo (2 ranks via torchrun) and a micro model.

Exact resume, ZeRO 0-3 at 2 ranks vs 1 process on the same global batch, gradient accumulation,
NaN steps skipped on every rank, incompatible checkpoints, resharding through a universal
checkpoint. Scenarios run inside one driver process per world size (tests/integration/
train_driver.py) to pay start-up once; the exact-resume checks use fresh processes via the CLI.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("train_driver.py")
STEPS = 6
# micro model: 2 layers, d 64, vocab 512, seq 32; global batch 4 sequences per step
MICRO = [
    "--model.n_layers=2",
    "--model.d_model=64",
    "--model.n_heads=4",
    "--model.n_kv_heads=2",
    "--data.seq_len=32",
    f"--train.max_steps={STEPS}",
    "--train.warmup_steps=2",
    "--train.log_every=1",
    "--train.eval_every=0",
    "--train.eval_batches=2",
    "--checkpoint.every=3",
    "--train.sample_tokens=0",
    "--logging.tensorboard=false",
    "--logging.progress=false",
    "--train.collective_timeout_s=120",
]
# rel tolerance between different reduction orders / ZeRO partitionings in fp32 (measured ~1e-7)
LOSS_RTOL = 1e-5


def _env():
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("MEGAPT_FAULT_NAN_STEPS", None)
    return env


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args, nproc, cwd, timeout=240):
    if nproc == 1:
        cmd = [sys.executable] + args
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            f"--master_port={_port()}",
        ] + args
    p = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    return p


def _train_cli(common, extra, nproc, cwd):
    args = ["-m", "megapt.cli", "train"] if nproc == 1 else ["--no-python", "megapt", "train"]
    return _run(args + common + extra, nproc, cwd)


def _driver(common, scenarios, nproc, cwd, out):
    spec = cwd / f"spec_{out}.json"
    spec.write_text(json.dumps({"common": common, "scenarios": scenarios, "out": str(cwd / out)}))
    p = _run([str(DRIVER), str(spec)], nproc, cwd, timeout=420)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    return json.loads((cwd / out).read_text())


def rows(run_dir, kind="train"):
    return [
        r
        for r in map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines())
        if r["kind"] == kind
    ]


def curve(run_dir, key="loss"):
    return np.array([r[key] for r in rows(run_dir)])


# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    """A tokenizer (vocab 512) and shards (seq 32) made from a few stdlib files: ~650 samples."""
    from tests.integration.scale_utils import write_micro_shards

    d = tmp_path_factory.mktemp("train")
    write_micro_shards(d, 256)
    common = MICRO + [
        f"--tokenizer.path={d / 'spm.model'}",
        f"--data.shard_dir={d / 'shards'}",
        f"--run.out_dir={d / 'runs'}",
    ]
    return {"dir": d, "runs": d / "runs", "common": common}


@pytest.fixture(scope="module")
def two_ranks(mini):
    """2 ranks, micro batch 2 (global 4): stage 0 straight; stages 1-3 stopped at 3 and resumed; NaN run;
    then stage 0 stopped + resumed in fresh torchrun jobs."""
    common = mini["common"] + ["--train.micro_batch=2"]
    scenarios = [{"name": "z0", "phases": [["--run.name=z0"]]}]
    for s in (1, 2, 3):
        base = [f"--run.name=z{s}", f"--deepspeed.zero_stage={s}"]
        scenarios.append(
            {
                "name": f"z{s}",
                "phases": [base + ["--train.stop_after=3"], base + ["--checkpoint.resume=true"]],
            }
        )
    # ZeRO-2 + optimizer offload (DeepSpeedCPUAdam; DeepSpeed JIT-compiles it on first use, ~1 min once)
    off = ["--run.name=z2off", "--deepspeed.zero_stage=2", "--deepspeed.offload_optimizer=cpu"]
    scenarios.append(
        {
            "name": "z2off",
            "phases": [off + ["--train.stop_after=3"], off + ["--checkpoint.resume=true"]],
        }
    )
    scenarios.append(
        {
            "name": "nan",
            "env": {"MEGAPT_FAULT_NAN_STEPS": "2,5,6,7", "MEGAPT_FAULT_NAN_RANK": "1"},
            "phases": [
                [
                    "--run.name=nan",
                    "--train.max_steps=10",
                    "--checkpoint.every=2",
                    "--train.max_bad_steps=3",
                ]
            ],
        }
    )
    res = _driver(common, scenarios, 2, mini["dir"], "two_ranks.json")
    first = _train_cli(common, ["--run.name=d", "--train.stop_after=3"], 2, mini["dir"])
    assert first.returncode == 0, first.stderr[-4000:]
    second = _train_cli(common, ["--run.name=d", "--resume"], 2, mini["dir"])
    assert second.returncode == 0, second.stderr[-4000:]
    res["d_log"] = second.stderr
    return res


@pytest.fixture(scope="module")
def one_proc(mini, two_ranks):
    """1 process, micro batch 4 (the same global batch as 2 ranks x 2); grad accumulation; bad loads;
    the 2-rank ZeRO-2 checkpoint resharded to 1 process; and a stop + resume in fresh processes."""
    runs, common = mini["runs"], mini["common"]
    z2_ckpt = runs / "z2" / "checkpoints" / "step_0000003"
    conv = _run(["-m", "megapt.cli", "ckpt", "universal", str(z2_ckpt)], 1, mini["dir"])
    assert conv.returncode == 0, conv.stderr[-3000:]
    scenarios = [
        {"name": "a", "phases": [["--run.name=a", "--train.micro_batch=4"]]},
        {
            "name": "g",
            "phases": [["--run.name=g", "--train.micro_batch=2", "--train.grad_accum=2"]],
        },
        {
            "name": "bad_shape",
            "phases": [
                [
                    "--run.name=bad",
                    "--train.micro_batch=4",
                    "--model.d_model=128",
                    f"--checkpoint.load={runs / 'a' / 'checkpoints' / 'step_0000003'}",
                ]
            ],
        },
        {
            "name": "reshard",
            "phases": [
                [
                    "--run.name=rs0",
                    "--train.micro_batch=4",
                    "--deepspeed.zero_stage=2",
                    f"--checkpoint.load={z2_ckpt}",
                ],
                [
                    "--run.name=rs",
                    "--train.micro_batch=4",
                    "--deepspeed.zero_stage=2",
                    f"--checkpoint.load={z2_ckpt}",
                    "--checkpoint.universal=true",
                ],
            ],
        },
    ]
    res = _driver(common + ["--train.micro_batch=4"], scenarios, 1, mini["dir"], "one_proc.json")
    first = _train_cli(
        common, ["--run.name=b", "--train.micro_batch=4", "--train.stop_after=3"], 1, mini["dir"]
    )
    assert first.returncode == 0, first.stderr[-4000:]
    second = _train_cli(
        common, ["--run.name=b", "--train.micro_batch=4", "--resume"], 1, mini["dir"]
    )
    assert second.returncode == 0, second.stderr[-4000:]
    res["b_log"] = second.stderr
    return res


# --------------------------------------------------------------------------------------------


@pytest.mark.timeout(900)
def test_resume_is_bit_exact_single_process(mini, one_proc):
    """3 steps, exit, --resume, 3 steps == 6 steps straight: identical losses and grad norms."""
    a, b = mini["runs"] / "a", mini["runs"] / "b"
    assert "resumed from" in one_proc["b_log"] and "step 3" in one_proc["b_log"]
    assert [r["step"] for r in rows(b)] == list(range(1, STEPS + 1))
    assert np.array_equal(curve(a), curve(b))
    assert np.array_equal(curve(a, "grad_norm"), curve(b, "grad_norm"))


@pytest.mark.timeout(900)
def test_resume_is_bit_exact_two_ranks(mini, two_ranks):
    z0, d = mini["runs"] / "z0", mini["runs"] / "d"
    assert "resumed from" in two_ranks["d_log"]
    assert np.array_equal(curve(z0), curve(d))
    assert np.array_equal(curve(z0, "grad_norm"), curve(d, "grad_norm"))


@pytest.mark.timeout(900)
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage_at_two_ranks_matches_one_process(mini, two_ranks, one_proc, stage):
    """Same global batch (2 ranks x 2 vs 1 x 4): same losses, grad norms and final weights; stages
    1-3 were stopped after step 3 and resumed from their own checkpoint in between."""
    from megapt.weights.consolidate import full_state_dict

    runs = mini["runs"]
    if stage:
        assert two_ranks[f"z{stage}"] == [{"rc": 0}, {"rc": 0}]
    np.testing.assert_allclose(curve(runs / f"z{stage}"), curve(runs / "a"), rtol=LOSS_RTOL)
    np.testing.assert_allclose(
        curve(runs / f"z{stage}", "grad_norm"), curve(runs / "a", "grad_norm"), rtol=1e-4
    )
    ref = full_state_dict(runs / "a" / "checkpoints" / f"step_{STEPS:07d}")
    got = full_state_dict(runs / f"z{stage}" / "checkpoints" / f"step_{STEPS:07d}")
    assert sorted(ref) == sorted(got)
    for k in ref:  # Adam amplifies 1e-7 gradient differences a little; still far below one update
        rel = float((got[k] - ref[k]).norm() / ref[k].norm())
        assert rel < 1e-4, (k, rel)


@pytest.mark.timeout(900)
def test_grad_accumulation_matches_a_bigger_micro_batch(mini, one_proc):
    """micro 2 x accum 2 == micro 4: same samples per step, same loss and grad norm."""
    assert one_proc["g"] == [{"rc": 0}]
    np.testing.assert_allclose(curve(mini["runs"] / "g"), curve(mini["runs"] / "a"), rtol=LOSS_RTOL)
    np.testing.assert_allclose(
        curve(mini["runs"] / "g", "grad_norm"), curve(mini["runs"] / "a", "grad_norm"), rtol=1e-4
    )


@pytest.mark.timeout(900)
def test_nan_steps_are_skipped_on_all_ranks_then_training_stops(mini, two_ranks):
    """NaN loss on rank 1 only at attempts 2, 5, 6, 7 with max_bad_steps=3: attempt 2 is skipped by
    both ranks (rank 0 counts it), training goes on, then stops with exit code 3 after 3 bad in a
    row, leaving the step-2 checkpoint as the newest one."""
    from megapt.train.checkpoint import find_latest_valid, list_checkpoints
    from megapt.train.trainer import EXIT_NONFINITE

    run = mini["runs"] / "nan"
    assert two_ranks["nan"] == [{"rc": EXIT_NONFINITE}]
    events = rows(run, "event")
    assert [e["skipped_attempt"] for e in events] == [
        2,
        5,
        6,
        7,
    ]  # seen on rank 0, injected on rank 1
    train = rows(run)
    assert [r["step"] for r in train] == [1, 2, 3]
    assert all(
        np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in train
    )  # weights never got NaN
    # the skipped attempt consumed its batch and did not move the LR schedule: step 2 uses step 2's LR
    assert train[1]["lr"] == pytest.approx(rows(mini["runs"] / "z0")[1]["lr"])
    assert [p.name for _, p in list_checkpoints(run / "checkpoints")] == ["step_0000002"]
    assert find_latest_valid(run / "checkpoints").name == "step_0000002"


@pytest.mark.timeout(900)
def test_incompatible_checkpoints_fail_clearly(one_proc):
    (bad,) = one_proc["bad_shape"]
    assert (
        bad["error"] == "CheckpointError" and "model.d_model" in bad["msg"] and "64" in bad["msg"]
    )
    wrong_world = one_proc["reshard"][0]
    assert wrong_world["error"] == "CheckpointError"
    assert "world size 2" in wrong_world["msg"] and "megapt ckpt universal" in wrong_world["msg"]


@pytest.mark.timeout(900)
def test_two_rank_zero2_checkpoint_resumes_at_one_process_via_universal(mini, one_proc):
    """Saved at world size 2 (ZeRO-2, step 3), converted, resumed at world size 1: steps 4-6 match
    the run that trained at world size 1 throughout."""
    assert one_proc["reshard"][1] == {"rc": 0}
    rs = rows(mini["runs"] / "rs")
    assert [r["step"] for r in rs] == [4, 5, 6]
    np.testing.assert_allclose(
        [r["loss"] for r in rs], curve(mini["runs"] / "a")[3:], rtol=LOSS_RTOL
    )


@pytest.mark.timeout(900)
def test_cpu_optimizer_offload_matches_and_resumes(mini, two_ranks):
    """ZeRO-2 with the optimizer on the CPU (DeepSpeedCPUAdam), 2 ranks, stopped and resumed at step 3:
    the same losses as the 1-process run with torch AdamW."""
    assert two_ranks["z2off"] == [{"rc": 0}, {"rc": 0}]
    np.testing.assert_allclose(
        curve(mini["runs"] / "z2off"), curve(mini["runs"] / "a"), rtol=LOSS_RTOL
    )


@pytest.mark.timeout(300)
def test_doc_mask_run_trains_and_says_how_mfu_counts_attention(mini):
    # model.doc_mask end to end through the CLI (sdpa with the block mask on CPU): finite losses, and
    # the start-up log says MFU's attention term still counts the full window.
    p = _train_cli(
        mini["common"],
        [
            "--run.name=dm",
            "--train.micro_batch=2",
            "--train.max_steps=2",
            "--checkpoint.every=0",
            "--model.doc_mask=true",
        ],
        1,
        mini["dir"],
    )
    assert p.returncode == 0, p.stderr[-4000:]
    assert "PaLM's convention" in p.stderr and "model.doc_mask" in p.stderr
    losses = curve(mini["runs"] / "dm")
    assert len(losses) == 2 and np.isfinite(losses).all()
