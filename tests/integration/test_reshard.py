"""Resharding through universal checkpoints, and one gradient-norm computation for every ZeRO stage
(CPU, gloo, the micro model: 2 layers, d 64, vocab 512, seq 32, global batch 4 sequences).

Settings under which a wrong optimizer shows: lr 1e-2, weight_decay 0.1 on matrices (none on norms
and embeddings), grad_clip 1.0, which clips some steps and not others (checked).

1. Uninterrupted runs of 20 steps at ZeRO 0, 1, 2, 3: at 2 ranks (micro batch 2; these save the
   step-4 checkpoints used below and are the reference of every resume) and at 1 process (micro
   batch 4: the same global batch).
2. `megapt ckpt universal` on each step-4 checkpoint (in parallel), listing the run folders before
   and after; `megapt ckpt consolidate` on the ZeRO-2 one.
3. Every pair: each of the four checkpoints resumed with --checkpoint.universal=true at each ZeRO
   stage 0-3, at 1 process and at 2 ranks (32 resumes of 16 steps, in one driver per world size);
   at 1 process also ZeRO-3 -> ZeRO-2 with CPU optimizer offload, and a copy of the ZeRO-3
   checkpoint without the optimizer metadata older megapt versions did not write.
   Losses and grad norms of steps 5-20 are compared with the uninterrupted run, and at step 20 the
   optimizer itself (read through DeepSpeed's public API, not megapt's): group hyperparameters and
   Adam's step exactly, weights and moments within RESUME_STATE_RTOL, and the data position.

Tolerances are the fp32 noise measured here (2-core CPU VM): see each constant.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from megapt.train import checkpoint as ck
from tests.integration.scale_utils import (
    base_env,
    free_port,
    kill_all,
    start,
    tail,
    wait_all,
    write_micro_shards,
)

pytestmark = pytest.mark.slow
TIMEOUT = 600
DRIVER = Path(__file__).with_name("train_driver.py")
STEPS, LOAD, CLIP = 20, 4, 1.0
STAGES = (0, 1, 2, 3)
MICRO = [
    "--model.n_layers=2",
    "--model.d_model=64",
    "--model.n_heads=4",
    "--model.n_kv_heads=2",
    "--data.seq_len=32",
    f"--train.max_steps={STEPS}",
    "--train.warmup_steps=2",
    "--train.lr=1e-2",
    "--train.weight_decay=0.1",
    f"--train.grad_clip={CLIP}",
    "--train.log_every=1",
    "--train.eval_every=0",
    "--train.eval_batches=1",
    "--train.sample_tokens=0",
    "--logging.tensorboard=false",
    "--logging.progress=false",
    "--train.collective_timeout_s=120",
]

# ZeRO-0, 1 and 2 at one process compute the same gradients and, since ZeRO-0's GuardedAdamW uses
# DeepSpeed's norm and clip formula, the same grad norms and updates: measured identical (0.0) over
# 20 steps. Before, ZeRO-0 took fp32 per-tensor norms, which read low: its grad norms differed by
# 3.9e-7 here (1.5e-6 on a 3-layer d-192 model).
SAME_PROCESS_RTOL = 1e-7
# ZeRO-3 (its gradients differ from ZeRO-1/2's in the last bits, 1-3e-7 per tensor at step 1) and
# 2 ranks vs 1 process (reduction order): measured up to 2.1e-6 (losses) and 1.8e-5 (grad norms)
# over 20 steps, both from ZeRO-3; ZeRO 0-2 at 2 ranks: 3.7e-7 and 5.2e-6.
STAGE_LOSS_RTOL, STAGE_NORM_RTOL = 1e-5, 1e-4
# A universal resume vs the uninterrupted run, 16 steps after the load: measured up to 2.2e-7
# (losses), 1.4e-7 (grad norms) and 7.7e-5 (weights and Adam moments: the norm of the difference
# relative to the tensor's, worst tensor; Adam turns last-bit differences of tiny gradients into
# full-size updates, so a stage change that involves ZeRO-3 shows most). A wrong optimizer shows far
# above: weight decay on norms moves them by lr x 0.1 per step (1e-3), a doubled Adam step changes
# the bias correction (update size x1.5 at step 5).
RESUME_LOSS_RTOL, RESUME_NORM_RTOL, RESUME_STATE_RTOL = 1e-6, 1e-6, 5e-4


SOURCES = ("0", "1", "2", "3", "legacy3")  # the step-4 checkpoints of the 2-rank runs s0..s3
TARGETS = {f"z{t}": [f"--deepspeed.zero_stage={t}"] for t in STAGES}
TARGETS["z2off"] = ["--deepspeed.zero_stage=2", "--deepspeed.offload_optimizer=cpu"]


def _cases(world: int) -> list[tuple[str, str]]:
    """(source, target) pairs resumed at ``world`` ranks: every stage pair, plus at 1 process a
    CPU-offloaded target and the legacy checkpoint."""
    cases = [(str(s), f"z{t}") for s in STAGES for t in STAGES]
    return cases + ([("3", "z2off"), ("legacy3", "z0"), ("legacy3", "z3")] if world == 1 else [])


def _ckpt(runs: Path, name: str, step: int) -> Path:
    return runs / name / "checkpoints" / f"step_{step:07d}"


def _driver(d: Path, tag: str, nproc: int, common: list[str], scenarios: list[dict]) -> dict:
    spec = d / f"spec_{tag}.json"
    spec.write_text(
        json.dumps({"common": common, "scenarios": scenarios, "out": str(d / f"{tag}.json")})
    )
    if nproc == 1:
        cmd = [sys.executable, str(DRIVER), str(spec)]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            str(free_port()),
            str(DRIVER),
            str(spec),
        ]
    log = d / f"{tag}.log"
    p = start(cmd, base_env(), log)
    try:
        rc = wait_all([p], TIMEOUT)[0]
    finally:
        kill_all([p])
    assert rc == 0, tail(log, 6000)
    return json.loads((d / f"{tag}.json").read_text())


def _megapt_all(d: Path, commands: list[list[str]]) -> list[tuple[int, str]]:
    """Several `megapt ...` commands in parallel (mostly interpreter and DeepSpeed start-up)."""
    logs = [d / f"cmd{i}.log" for i in range(len(commands))]
    procs = [
        start([sys.executable, "-m", "megapt", *c], base_env(), log)
        for c, log in zip(commands, logs)
    ]
    try:
        codes = wait_all(procs, TIMEOUT)
    finally:
        kill_all(procs)
    return [(rc, log.read_text(errors="replace")) for rc, log in zip(codes, logs)]


def _files(root: Path) -> dict[str, tuple[int, int]]:
    return {
        p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("reshard")
    write_micro_shards(d, 256)
    runs = d / "runs"
    common = MICRO + [
        f"--tokenizer.path={d / 'spm.model'}",
        f"--data.shard_dir={d / 'shards'}",
        f"--run.out_dir={runs}",
    ]
    out: dict = {"dir": d, "runs": runs}

    # 1. uninterrupted runs
    two = [
        {
            "name": f"s{s}",
            "dump": str(d / f"s{s}.pt"),
            "phases": [[f"--run.name=s{s}", f"--deepspeed.zero_stage={s}"]],
        }
        for s in STAGES
    ]
    out["two"] = _driver(
        d,
        "two",
        2,
        common
        + ["--train.micro_batch=2", f"--checkpoint.every={LOAD}", "--checkpoint.keep_last=10"],
        two,
    )
    one = [
        {"name": f"a{s}", "phases": [[f"--run.name=a{s}", f"--deepspeed.zero_stage={s}"]]}
        for s in STAGES
    ]
    # plain (not universal) loads across stages / world sizes, and a universal one before conversion
    one += [
        {
            "name": "plain_z0_to_z2",
            "phases": [
                [
                    "--run.name=p0",
                    "--deepspeed.zero_stage=2",
                    f"--checkpoint.load={_ckpt(runs, 's0', LOAD)}",
                ]
            ],
        },
        {
            "name": "plain_z2_to_1proc",
            "phases": [
                [
                    "--run.name=p2",
                    "--deepspeed.zero_stage=2",
                    f"--checkpoint.load={_ckpt(runs, 's2', LOAD)}",
                ]
            ],
        },
        {
            "name": "universal_unconverted",
            "phases": [
                [
                    "--run.name=p3",
                    "--deepspeed.zero_stage=2",
                    "--checkpoint.universal=true",
                    f"--checkpoint.load={_ckpt(runs, 's2', 2 * LOAD)}",
                ]
            ],
        },
    ]
    out["one"] = _driver(
        d, "one", 1, common + ["--train.micro_batch=4", "--checkpoint.every=0"], one
    )

    # 2. conversions (and a consolidation), the run folders listed before and after
    before = _files(runs)
    cmds = [["ckpt", "universal", str(_ckpt(runs, f"s{s}", LOAD))] for s in STAGES]  # in parallel
    cmds.append(["ckpt", "consolidate", str(_ckpt(runs, "s2", LOAD)), "--out", str(d / "cons_s2")])
    out["convert"] = _megapt_all(d, cmds)
    out["listing"] = (before, _files(runs))

    # A checkpoint saved before megapt.json recorded the optimizer groups (older megapt): a copy of
    # the ZeRO-3 one without them. Its universal load falls back on this run's config and steps.
    legacy = _ckpt(runs, "legacy3", LOAD)
    shutil.copytree(_ckpt(runs, "s3", LOAD), legacy)
    meta = json.loads((legacy / ck.META).read_text())
    del meta["optimizer"]
    (legacy / ck.META).write_text(json.dumps(meta))
    ck.write_manifest(legacy)

    # 3. every stage pair at 1 process and at 2 ranks, 16 steps after the load; at 1 process also
    # into ZeRO-2 with the optimizer offloaded (DeepSpeedCPUAdam), and the legacy checkpoint
    sources = {s: _ckpt(runs, f"s{s}", LOAD) for s in SOURCES if s != "legacy3"}
    for world in (1, 2):
        scenarios = [
            {
                "name": f"s{s}{t}",
                "dump": str(d / f"w{world}s{s}{t}.pt"),
                "phases": [
                    [
                        f"--run.name=w{world}s{s}{t}",
                        *TARGETS[t],
                        "--checkpoint.universal=true",
                        f"--checkpoint.load={sources.get(s, legacy)}",
                    ]
                ],
            }
            for s, t in _cases(world)
        ]
        out[f"resume{world}"] = _driver(
            d,
            f"resume{world}",
            world,
            common + [f"--train.micro_batch={4 // world}", "--checkpoint.every=0"],
            scenarios,
        )
    return out


def _rows(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if r["kind"] == "train"}


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def _worst(run: Path, ref: Path, key: str) -> float:
    got, want = _rows(run), _rows(ref)
    return max(_rel(got[s][key], want[s][key]) for s in got)


# --------------------------------------------------------------------------------------------


@pytest.mark.timeout(4 * TIMEOUT)
def test_zero_stages_0_to_3_give_the_same_losses_and_grad_norms(runs):
    """20 steps with clipping active on some of them: ZeRO-0 (GuardedAdamW) equals ZeRO-1 and 2 at
    one process; ZeRO-3 and 2 ranks stay within the measured fp32 noise of ZeRO-0 at one process."""
    r = runs["runs"]
    assert all(runs["one"][f"a{s}"] == [{"rc": 0}] for s in STAGES), runs["one"]
    assert all(runs["two"][f"s{s}"] == [{"rc": 0}] for s in STAGES), runs["two"]
    ref = _rows(r / "a0")
    assert sorted(ref) == list(range(1, STEPS + 1))
    clipped = [s for s, row in ref.items() if row["grad_norm"] > CLIP]
    assert 3 <= len(clipped) < STEPS and any(s > LOAD for s in clipped), clipped
    measured = {}
    for run in ("a1", "a2", "a3", "s0", "s1", "s2", "s3"):
        measured[run] = (_worst(r / run, r / "a0", "loss"), _worst(r / run, r / "a0", "grad_norm"))
    print("rel. difference to ZeRO-0 at 1 process (loss, grad norm):", measured)
    for run in ("a1", "a2"):
        assert max(measured[run]) <= SAME_PROCESS_RTOL, (run, measured)
    for run in ("a3", "s0", "s1", "s2", "s3"):
        assert measured[run][0] <= STAGE_LOSS_RTOL and measured[run][1] <= STAGE_NORM_RTOL, (
            run,
            measured,
        )


@pytest.mark.timeout(4 * TIMEOUT)
@pytest.mark.parametrize(
    "source,world", [(s, w) for w in (1, 2) for s in dict.fromkeys(c[0] for c in _cases(w))]
)
def test_universal_resume_matches_the_uninterrupted_run_for_every_stage(runs, source, world):
    """The 2-rank ZeRO-`source` checkpoint of step 4 resumed at every ZeRO stage 0-3 at `world`
    ranks: steps 5-20 have the losses and grad norms of the uninterrupted run, and at step 20 the
    optimizer holds what the uninterrupted run's does: every group's name, lr, weight_decay, betas,
    eps; Adam's step 20 everywhere; the same weights, exp_avg and exp_avg_sq; the same data
    position."""
    r, d = runs["runs"], runs["dir"]
    ref_name = "s3" if source == "legacy3" else f"s{source}"
    ref_run = r / ref_name
    ref = torch.load(d / f"{ref_name}.pt", weights_only=True)
    ref_meta = json.loads((_ckpt(r, ref_name, STEPS) / "megapt.json").read_text())
    problems, measured = [], {}
    for _src, target in [c for c in _cases(world) if c[0] == source]:
        name = f"w{world}s{source}{target}"
        result = runs[f"resume{world}"][f"s{source}{target}"]
        if result != [{"rc": 0}]:
            problems.append(f"{name}: {result}")
            continue
        got_rows = _rows(r / name)
        if sorted(got_rows) != list(range(LOAD + 1, STEPS + 1)):
            problems.append(f"{name}: steps {sorted(got_rows)}")
            continue
        loss, norm = _worst(r / name, ref_run, "loss"), _worst(r / name, ref_run, "grad_norm")
        got = torch.load(d / f"{name}.pt", weights_only=True)
        state = max(
            float((got["tensors"][k] - t).norm() / t.norm().clamp_min(1e-30))
            for k, t in ref["tensors"].items()
        )
        measured[name] = (loss, norm, state)
        if loss > RESUME_LOSS_RTOL or norm > RESUME_NORM_RTOL or state > RESUME_STATE_RTOL:
            problems.append(
                f"{name}: rel. difference loss {loss:.2e}, grad norm {norm:.2e}, state {state:.2e}"
            )
        if got["groups"] != ref["groups"]:
            problems.append(
                f"{name}: optimizer groups {got['groups']} != uninterrupted {ref['groups']}"
            )
        if got["steps"] != [STEPS] or ref["steps"] != [STEPS]:
            problems.append(f"{name}: Adam steps {got['steps']} (uninterrupted: {ref['steps']})")
        meta = json.loads((_ckpt(r, name, STEPS) / "megapt.json").read_text())
        if (meta["loader"], meta["tokens_seen"]) != (ref_meta["loader"], ref_meta["tokens_seen"]):
            problems.append(f"{name}: data position {meta['loader']} != {ref_meta['loader']}")
    print("rel. difference to the uninterrupted run (loss, grad norm, state):", measured)
    assert not problems, "\n".join(problems)


@pytest.mark.timeout(4 * TIMEOUT)
def test_ckpt_universal_writes_only_into_the_checkpoints_ds_universal(runs):
    """`megapt ckpt universal` (ZeRO 1-3) adds <ckpt>/ds_universal/ and re-writes
    <ckpt>/MANIFEST.json; nothing else in the run folders appears or changes (no
    latest_universal, no scripts)."""
    assert [rc for rc, _ in runs["convert"][1:]] == [0] * len(runs["convert"][1:]), runs["convert"]
    before, after = runs["listing"]
    converted = [f"s{s}/checkpoints/step_{LOAD:07d}" for s in STAGES if s]
    allowed = {f"{c}/MANIFEST.json" for c in converted}
    added = sorted(set(after) - set(before))
    outside = [p for p in added if not any(p.startswith(f"{c}/ds_universal/") for c in converted)]
    assert outside == [], outside
    assert all(any(p.startswith(f"{c}/ds_universal/zero/") for p in added) for c in converted)
    changed = sorted(p for p in before if after.get(p) != before[p] and p not in allowed)
    assert changed == [], changed


@pytest.mark.timeout(4 * TIMEOUT)
def test_zero0_checkpoint_has_one_path_to_another_stage_or_world_size(runs):
    """The README's path (`megapt ckpt universal DIR`, then --checkpoint.universal=true) works for a
    ZeRO-0 checkpoint too: the command has nothing to convert, exits 0 and names the flag; a plain
    load at another stage names the same flag (no conversion). ZeRO 1-3 checkpoints are sent to the
    conversion, before and after --checkpoint.universal=true. (The universal loads themselves are
    in the resume matrix above.)"""
    rc, text = runs["convert"][0]
    assert rc == 0 and "nothing to convert" in text and "--checkpoint.universal=true" in text, text
    plain0 = runs["one"]["plain_z0_to_z2"][0]
    assert plain0["error"] == "CheckpointError", plain0
    assert (
        "--checkpoint.universal=true" in plain0["msg"]
        and "megapt ckpt universal" not in plain0["msg"]
    )
    for case in ("plain_z2_to_1proc", "universal_unconverted"):
        res = runs["one"][case][0]
        assert res["error"] == "CheckpointError" and "megapt ckpt universal" in res["msg"], (
            case,
            res,
        )
    assert "world size 2" in runs["one"]["plain_z2_to_1proc"][0]["msg"]


@pytest.mark.timeout(4 * TIMEOUT)
def test_consolidate_writes_the_checkpoints_weights(runs):
    """`megapt ckpt consolidate` on the ZeRO-2 checkpoint: one model.safetensors equal to its
    weights (compared with the universal checkpoint's per-parameter fp32 tensors, a separate code
    path)."""
    from safetensors.torch import load_file

    out = runs["dir"] / "cons_s2"
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    weights = load_file(str(out / "model.safetensors"))
    zero = _ckpt(runs["runs"], "s2", LOAD) / "ds_universal" / "zero"
    params = sorted(p.name for p in zero.iterdir() if p.is_dir())
    assert params and set(params) <= set(weights), sorted(set(params) - set(weights))
    for name in params:
        fp32 = torch.load(zero / name / "fp32.pt", weights_only=True)["param"]
        assert torch.equal(weights[name].float(), fp32.float().reshape(weights[name].shape)), name
