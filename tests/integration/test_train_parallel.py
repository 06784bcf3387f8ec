"""Sequence parallelism (Ulysses) and tensor parallelism (AutoTP) on DeepSpeed, composed with ZeRO,
against one process: CPU, gloo, fp32, the micro model (2 layers, d 64, 4 heads on 2 KV heads,
seq 32), the same global batch of 4 rows and seed everywhere, 10 optimizer steps.

Jobs (each one torchrun job running several Trainer scenarios through train_driver.py, so
start-up is paid once per job; a job holds one layout, as DeepSpeed's process groups are global):
  * 2 ranks, sequence_parallel 2: ZeRO-2 stopped at step 5 and resumed, the same run straight,
    ZeRO-3 straight.
  * 2 ranks, tensor_parallel 2: ZeRO-1 stopped at 5 and resumed, straight, ZeRO-3 straight, and
    the universal SP checkpoint of step 5 (whole weights) resumed at TP 2, ZeRO-1 and ZeRO-3.
  * 4 ranks: ZeRO-3 + hpZ 2 (plain data parallel), SP 2 x DP 2 at ZeRO-1, and the 2-rank SP
    checkpoint of step 5 resumed at SP 2 x DP 2 through a universal checkpoint.
  * 1 process: the reference run, and the TP 2 checkpoint of step 5 resumed at TP 1 (universal).
Plus the bare model under Ulysses (ulysses_check.py), and consolidate + HF export of a TP
checkpoint.

Tolerances (measured on this machine, fp32): losses agree to rel <= 1.7e-7 (LOSS_RTOL 1e-5, as
the ZeRO tests); grad norms to rel <= 4e-5 (different reduction orders inside the norm and the
all-reduces; GN_RTOL 1e-4, as the ZeRO tests); final weights to rel <= 7e-6 (1e-4).
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.integration.scale_utils import base_env, free_port, write_micro_shards

ROOT = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("train_driver.py")
ULYSSES_CHECK = Path(__file__).with_name("ulysses_check.py")
STEPS = 10
LOSS_RTOL, GN_RTOL, WEIGHT_RTOL = 1e-5, 1e-4, 1e-4
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
    "--checkpoint.every=5",
    "--train.sample_tokens=0",
    "--logging.tensorboard=false",
    "--logging.progress=false",
    "--train.collective_timeout_s=120",
]
SP2 = ["--train.sequence_parallel=2"]
TP2 = ["--train.tensor_parallel=2"]


def _env():
    env = base_env()
    env.pop("MEGAPT_FAULT_NAN_STEPS", None)
    return env


def _run(args, nproc, cwd, timeout):
    cmd = (
        [sys.executable] + args
        if nproc == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}",
        ]
        + args
    )
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


def _driver(common, scenarios, nproc, cwd, out, timeout=600):
    spec = cwd / f"spec_{out}.json"
    spec.write_text(json.dumps({"common": common, "scenarios": scenarios, "out": str(cwd / out)}))
    p = _run([str(DRIVER), str(spec)], nproc, cwd, timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    res = json.loads((cwd / out).read_text())
    res["log"] = p.stderr
    return res


def _universal(ckpt, cwd):
    p = _run(["-m", "megapt.cli", "ckpt", "universal", str(ckpt)], 1, cwd, 300)
    assert p.returncode == 0, p.stderr[-3000:]


def rows(run_dir, kind="train"):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def curve(run_dir, key="loss"):
    return np.array([r[key] for r in rows(run_dir)])


def _close_to_reference(par, name, first_step=1):
    """Losses and grad norms of run ``name`` equal the 1-process run's from ``first_step`` on."""
    got, ref = rows(par["runs"] / name), rows(par["runs"] / "a")[first_step - 1 :]
    assert [r["step"] for r in got] == [r["step"] for r in ref], name
    np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in ref], rtol=LOSS_RTOL)
    np.testing.assert_allclose(
        [r["grad_norm"] for r in got], [r["grad_norm"] for r in ref], rtol=GN_RTOL
    )
    assert got[-1]["tokens_seen"] == ref[-1]["tokens_seen"]


def _final_weights_close(par, name):
    from megapt.weights.consolidate import full_state_dict

    last = f"step_{STEPS:07d}"
    ref = full_state_dict(par["runs"] / "a" / "checkpoints" / last)
    got = full_state_dict(par["runs"] / name / "checkpoints" / last)
    assert sorted(ref) == sorted(got)
    for k in ref:
        assert got[k].shape == ref[k].shape, k
        rel = float((got[k] - ref[k]).norm() / ref[k].norm())
        assert rel < WEIGHT_RTOL, (k, rel)


# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def par(tmp_path_factory):
    d = tmp_path_factory.mktemp("parallel")
    write_micro_shards(d, 256)
    common = MICRO + [
        f"--tokenizer.path={d / 'spm.model'}",
        f"--data.shard_dir={d / 'shards'}",
        f"--run.out_dir={d / 'runs'}",
    ]
    return {"dir": d, "runs": d / "runs", "common": common}


def _stop_resume(name, extra):
    base = [f"--run.name={name}"] + extra
    return {
        "name": name,
        "phases": [base + ["--train.stop_after=5"], base + ["--checkpoint.resume=true"]],
    }


@pytest.fixture(scope="module")
def sp_job(par):
    common = par["common"] + ["--train.micro_batch=4"] + SP2
    z2 = ["--deepspeed.zero_stage=2"]
    scenarios = [
        _stop_resume("sp_z2", z2),
        {"name": "sp_z2s", "phases": [["--run.name=sp_z2s"] + z2]},
        {"name": "sp_z3", "phases": [["--run.name=sp_z3", "--deepspeed.zero_stage=3"]]},
    ]
    return _driver(common, scenarios, 2, par["dir"], "sp_job.json")


@pytest.fixture(scope="module")
def sp_universal(par, sp_job):
    """The SP 2 ZeRO-2 checkpoint of step 5 (whole weights on every rank), converted once."""
    sp_ckpt = par["runs"] / "sp_z2" / "checkpoints" / "step_0000005"
    _universal(sp_ckpt, par["dir"])
    return sp_ckpt


@pytest.fixture(scope="module")
def tp_job(par, sp_universal):
    common = par["common"] + ["--train.micro_batch=4"] + TP2
    z1 = ["--deepspeed.zero_stage=1"]
    load = [f"--checkpoint.load={sp_universal}", "--checkpoint.universal=true"]
    scenarios = [
        _stop_resume("tp_z1", z1),
        {"name": "tp_z1s", "phases": [["--run.name=tp_z1s"] + z1]},
        {"name": "tp_z3", "phases": [["--run.name=tp_z3", "--deepspeed.zero_stage=3"]]},
        # whole tensors into TP shards (megapt.train.reshard cuts this rank's part)
        {"name": "to_tp_z1", "phases": [["--run.name=to_tp_z1"] + z1 + load]},
        {
            "name": "to_tp_z3",
            "phases": [["--run.name=to_tp_z3", "--deepspeed.zero_stage=3"] + load],
        },
    ]
    return _driver(common, scenarios, 2, par["dir"], "tp_job.json")


@pytest.fixture(scope="module")
def four_ranks(par, sp_universal):
    """hpZ first: DeepSpeed keeps the sequence-parallel mpu once an engine set it."""
    sp_ckpt = sp_universal
    scenarios = [
        {
            "name": "hpz",
            "phases": [
                [
                    "--run.name=hpz",
                    "--train.micro_batch=1",
                    "--deepspeed.zero_stage=3",
                    "--deepspeed.zero_hpz_partition_size=2",
                ]
            ],
        },
        {
            "name": "sp2dp2",
            "phases": [
                ["--run.name=sp2dp2", "--train.micro_batch=2", "--deepspeed.zero_stage=1"] + SP2
            ],
        },
        {
            "name": "elastic",
            "phases": [
                [
                    "--run.name=elastic",
                    "--train.micro_batch=2",
                    "--deepspeed.zero_stage=2",
                    f"--checkpoint.load={sp_ckpt}",
                    "--checkpoint.universal=true",
                ]
                + SP2
            ],
        },
    ]
    return _driver(par["common"], scenarios, 4, par["dir"], "four_ranks.json", timeout=900)


@pytest.fixture(scope="module")
def one_proc(par, tp_job):
    tp_ckpt = par["runs"] / "tp_z1" / "checkpoints" / "step_0000005"
    _universal(tp_ckpt, par["dir"])
    scenarios = [
        {"name": "a", "phases": [["--run.name=a"]]},
        {
            "name": "tp_to_1",
            "phases": [
                [
                    "--run.name=tp_to_1",
                    "--deepspeed.zero_stage=1",
                    f"--checkpoint.load={tp_ckpt}",
                    "--checkpoint.universal=true",
                ]
            ],
        },
    ]
    return _driver(
        par["common"] + ["--train.micro_batch=4"], scenarios, 1, par["dir"], "one_proc.json"
    )


# --------------------------------------------------------------------------------------------


@pytest.mark.timeout(1200)
def test_sequence_parallel_two_ranks_matches_one_process(par, sp_job, one_proc):
    """SP 2 (each rank half of every row, all-to-all around attention), ZeRO-2 stopped at step 5
    and resumed, and ZeRO-3: the 1-process losses, grad norms and final weights."""
    assert sp_job["sp_z2"] == [{"rc": 0}, {"rc": 0}] and sp_job["sp_z3"] == [{"rc": 0}]
    assert "sequence 2" in sp_job["log"]
    for name in ("sp_z2", "sp_z3"):
        _close_to_reference(par, name)
    _final_weights_close(par, "sp_z2")


@pytest.mark.timeout(1200)
def test_tensor_parallel_two_ranks_matches_one_process(par, tp_job, one_proc):
    """TP 2 (AutoTP column/row shards of every attention and MLP matrix), ZeRO-1 stopped at step
    5 and resumed, and ZeRO-3: the 1-process losses, grad norms and (merged) final weights."""
    assert tp_job["tp_z1"] == [{"rc": 0}, {"rc": 0}] and tp_job["tp_z3"] == [{"rc": 0}]
    assert "tensor 2" in tp_job["log"]
    for name in ("tp_z1", "tp_z3"):
        _close_to_reference(par, name)
    _final_weights_close(par, "tp_z1")
    _final_weights_close(par, "tp_z3")


@pytest.mark.timeout(1200)
def test_a_checkpoint_of_whole_weights_resumes_at_tensor_parallel_2_via_universal(
    par, tp_job, one_proc
):
    """TP 1 -> TP 2: the universal checkpoint of SP 2's step 5 (whole weights) loaded into TP 2
    at ZeRO-1 and ZeRO-3, each rank keeping its shard: steps 6-10 continue the 1-process run."""
    assert tp_job["to_tp_z1"] == [{"rc": 0}] and tp_job["to_tp_z3"] == [{"rc": 0}]
    for name in ("to_tp_z1", "to_tp_z3"):
        _close_to_reference(par, name, first_step=6)


@pytest.mark.timeout(1200)
def test_sp_and_tp_checkpoints_resume_bit_exactly(par, sp_job, tp_job):
    """Stopped after step 5, resumed from the checkpoint: steps 6-10 are bit-identical to the
    same run made straight (losses and grad norms)."""
    for resumed, straight in (("sp_z2", "sp_z2s"), ("tp_z1", "tp_z1s")):
        assert [r["step"] for r in rows(par["runs"] / resumed)] == list(range(1, STEPS + 1))
        for key in ("loss", "grad_norm"):
            assert np.array_equal(
                curve(par["runs"] / resumed, key), curve(par["runs"] / straight, key)
            ), (resumed, key)
    assert sp_job["log"].count("resumed from") >= 1 and tp_job["log"].count("resumed from") >= 1


@pytest.mark.timeout(1800)
def test_four_ranks_sequence_parallel_times_data_parallel_matches_one_process(
    par, four_ranks, one_proc
):
    """SP 2 x DP 2 (two groups reading different rows, the loader on the 2 data-parallel ranks):
    the 1-process losses and grad norms at ZeRO-1."""
    assert four_ranks["sp2dp2"] == [{"rc": 0}]
    assert "data 2 x sequence 2 x tensor 1 = 4 ranks" in four_ranks["log"]
    _close_to_reference(par, "sp2dp2")


@pytest.mark.timeout(1800)
def test_sp_checkpoint_resumes_at_more_data_parallel_ranks_via_universal(par, four_ranks, one_proc):
    """The step-5 checkpoint of SP 2 on 2 ranks, converted to universal and resumed at SP 2 x
    DP 2 (4 ranks, ZeRO-2): steps 6-10 continue the 1-process run (same data position)."""
    assert four_ranks["elastic"] == [{"rc": 0}]
    _close_to_reference(par, "elastic", first_step=6)


@pytest.mark.timeout(1800)
def test_zero3_hpz_partitions_within_pairs_and_matches_one_process(par, four_ranks, one_proc):
    """ZeRO-3 with hpZ 2 at 4 ranks: DeepSpeed builds secondary partitions of 2 ranks (logged
    from its own group) and training matches the 1-process run."""
    assert four_ranks["hpz"] == [{"rc": 0}]
    assert "hpZ: parameters are all-gathered within groups of 2 ranks" in four_ranks["log"]
    _close_to_reference(par, "hpz")


@pytest.mark.timeout(1200)
def test_tp2_checkpoint_converts_to_universal_and_resumes_at_tp1(par, one_proc):
    """TP 2 -> TP 1: the universal checkpoint holds whole weights; steps 6-10 at one process
    equal the reference run's."""
    assert one_proc["tp_to_1"] == [{"rc": 0}]
    _close_to_reference(par, "tp_to_1", first_step=6)


@pytest.mark.timeout(1200)
def test_consolidate_and_hf_export_work_from_a_tensor_parallel_checkpoint(par, tp_job, one_proc):
    """`megapt ckpt consolidate` and `megapt export` on a TP 2 checkpoint (no universal folder
    in it): whole weights equal to the 1-process run's, and transformers loads the export and
    gives the logits of megapt's model on those weights."""
    import torch
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    from megapt.model.gpt import GPT, ModelArgs
    from megapt.weights.consolidate import full_state_dict

    ckpt = par["runs"] / "tp_z1s" / "checkpoints" / f"step_{STEPS:07d}"
    out = par["dir"] / "tp_consolidated"
    p = _run(
        ["-m", "megapt.cli", "ckpt", "consolidate", str(ckpt), f"--out={out}"], 1, par["dir"], 300
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert not (ckpt / "ds_universal").exists() and not list(ckpt.parent.glob(".megapt-merge-*"))
    got = load_file(str(out / "model.safetensors"))
    ref = full_state_dict(par["runs"] / "a" / "checkpoints" / f"step_{STEPS:07d}")
    assert sorted(got) == sorted(ref)
    for k in ref:
        assert float((got[k] - ref[k]).norm() / ref[k].norm()) < WEIGHT_RTOL, k

    hf = par["dir"] / "tp_hf"
    p = _run(
        ["-m", "megapt.cli", "export", *par["common"], f"--from={ckpt}", f"--out={hf}"],
        1,
        par["dir"],
        300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    args = ModelArgs(**json.loads((out / "model_config.json").read_text()))
    ours = GPT(args)
    ours.load_state_dict(got)
    theirs = LlamaForCausalLM.from_pretrained(str(hf), torch_dtype=torch.float32)
    x = torch.randint(0, args.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, ours(x).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.timeout(600)
def test_ulysses_attention_on_the_bare_model_matches_one_process(tmp_path):
    """The model alone, 2 gloo ranks: rows cut into documents (doc_mask), 4 query heads on one
    KV head (repeated to the 2 ranks), activation checkpointing; the triton flash kernel
    (document starts, through the Triton interpreter) and sdpa (explicit mask). The ranks' loss
    shares sum to the 1-process loss and their summed gradients equal its gradients."""
    names = "sdpa,eager"
    env = _env()
    try:
        import triton  # noqa: F401

        names, env["TRITON_INTERPRET"] = "triton,sdpa", "1"
    except ImportError:
        pass
    out = tmp_path / "ulysses.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        str(ULYSSES_CHECK),
        str(out),
        names,
    ]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=500)
    assert p.returncode == 0, p.stderr[-4000:]
    res = json.loads(out.read_text())
    for name, r in res.items():
        assert r["sp"] == pytest.approx(r["ref"], rel=1e-6), name
        assert r["grad_rel"] < 1e-5, name
        assert abs(r["no_doc_mask"] - r["ref"]) > 1e-3, "the document mask changed nothing"
    first, second = res.values()
    assert first["ref"] == pytest.approx(second["ref"], rel=1e-5)  # the backends agree
