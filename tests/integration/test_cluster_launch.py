"""The launch scripts against a real Slurm cluster and real ssh hosts (marker ``infra``).

One private cluster serves every test (tests/integration/cluster_utils.py): two hosts (network +
UTS + mount namespaces joined by a veth pair), slurmctld + one slurmd per host, sshd on each,
munge with its own key. Every job trains the same micro model (2 ranks, seq 32) with the same LR
schedule (max_steps 100000, ended by train.stop_after), so every run of 2 ranks must produce the
same loss at every step: the uninterrupted single-host run from a fresh clone is the reference
the others are held to, >= 10 steps past every pre-emption.

* single host: `sbatch launch/slurm_single_node.sbatch` from a fresh clone runs to completion
* pre-emption: `scancel --signal=USR1` cycles, each saving, requeueing (the script's own decision;
  `scontrol update StartTime=now` skips Slurm's requeue delay), resuming from the saved step; and
  one time-limit cycle (the header's --signal=USR1@120 after the time limit is cut to ~110 s);
  a user's plain `scancel` still cancels; a rank killed with SIGKILL fails the job at once, with
  no requeue
* two hosts: slurm_multi_node.sbatch --nodes 2 (srun mode) and slurm_multi_node_deepspeed.sbatch
  --nodes 2 (deepspeed mode), each with a pre-emption cycle
* deepspeed_launch.sh -H hostfile across both hosts through real sshd + pdsh

Run alone: ``pytest -m infra``. Skipped (with the reason) without root / namespaces / apt-get;
with MEGAPT_REQUIRE_INFRA=1 (CI) a skip becomes a failure.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.cluster_utils import CRED_EXPIRE_S, InfraUnavailable, cluster, tool_versions
from tests.integration.scale_utils import (
    ROOT,
    base_env,
    free_port,
    prepare_data,
    tail,
    write_micro_config,
)

pytestmark = [pytest.mark.infra, pytest.mark.slow]

JOB_TIMEOUT = 300  # seconds for one run of a job to reach its next state (CPU start-up under load)
PREEMPT_STEPS = 400  # the USR1 job's length (stop_after)
TWO_HOST_STEPS = 100
SSH_STEPS = 60
AFTER = 12  # steps compared after the last event of a run (>= 10)
DONE = (
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "BOOT_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
)

# requeue cycles over the whole module: every pre-emption counted, every failed requeue counted
CYCLES = {"run": 0, "failed": 0}


# ------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    t0 = time.time()
    try:
        with cluster(tmp_path_factory.mktemp("infra")) as c:
            print(
                f"\ninfra: cluster up in {time.time() - t0:.1f}s; {tool_versions()}",
                file=sys.stderr,
            )
            yield c
            print(
                f"\ninfra: requeue cycles run {CYCLES['run']}, failed {CYCLES['failed']}",
                file=sys.stderr,
            )
    except InfraUnavailable as exc:
        if os.environ.get("MEGAPT_REQUIRE_INFRA") == "1":
            pytest.fail(
                f"MEGAPT_REQUIRE_INFRA=1 but the Slurm/ssh test cluster is unavailable: {exc}"
            )
        pytest.skip(f"no Slurm/ssh test cluster: {exc}")


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cluster_micro")
    cfg = write_micro_config(
        tmp,
        train={"max_steps": 100000, "warmup_steps": 1, "log_every": 1, "collective_timeout_s": 120},
        checkpoint={"every": 0, "keep_last": 2},
    )
    prepare_data(cfg)
    return tmp, cfg


def _env(slurm, pythonpath: Path, **extra: str) -> dict:
    env = base_env(PYTHONPATH=str(pythonpath), PYTHON=sys.executable, **extra)
    env.update(SLURM_CONF=slurm.env["SLURM_CONF"], PATH=slurm.env["PATH"])
    return env


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """`git clone` of this repository, plus the working tree's uncommitted changes to tracked files
    (in CI, a clean clone, there are none): what a user gets, with no untracked file of ours.
    Every job is submitted from it (its logs/ holds the Slurm logs), PYTHONPATH pointing at it."""
    if not (ROOT / ".git").exists():
        pytest.skip(f"{ROOT} is not a git checkout: cannot make a fresh clone")
    dest = tmp_path_factory.mktemp("clone") / "megapt"
    subprocess.run(
        ["git", "clone", "-q", "--no-hardlinks", str(ROOT), str(dest)], check=True, timeout=120
    )
    diff = subprocess.run(
        ["git", "diff", "HEAD", "--binary"], cwd=ROOT, capture_output=True, check=True, timeout=60
    ).stdout
    if diff:
        subprocess.run(
            ["git", "apply", "--whitespace=nowarn"], cwd=dest, input=diff, check=True, timeout=60
        )
    return dest


# ------------------------------------------------------------------------------------------------
# helpers


def _rows(run_dir: Path) -> list[dict]:
    p = run_dir / "metrics.jsonl"
    if not p.exists():
        return []
    return [
        r
        for r in (json.loads(line) for line in p.read_text().splitlines() if line.strip())
        if r.get("kind") == "train"
    ]


def _losses(run_dir: Path) -> dict[int, float]:
    """step -> loss over every run of the job; a step trained twice (resume from an older
    checkpoint than the one saved) or a gap is a failure."""
    rows = _rows(run_dir)
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), (
        f"steps trained twice: {sorted(s for s in steps if steps.count(s) > 1)}"
    )
    assert steps == list(range(1, len(steps) + 1)), (
        f"steps not 1..N in order: {steps[:5]}...{steps[-5:]}"
    )
    return {r["step"]: r["loss"] for r in rows}


def _last_step(run_dir: Path) -> int:
    rows = _rows(run_dir)
    return rows[-1]["step"] if rows else 0


def _wait_step(slurm, job, run_dir: Path, step: int, timeout: float = JOB_TIMEOUT) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        last = _last_step(run_dir)
        if last >= step:
            return last
        if slurm.job(job.id).get("JobState") in DONE:
            break
        time.sleep(0.1)
    raise AssertionError(
        f"job {job.id} did not reach step {step} (at {_last_step(run_dir)}; "
        f"{slurm.job(job.id).get('JobState')}):\n{tail(job.out, 4000)}"
    )


def _requeue_cycle(slurm, job, send, **pending_update: str) -> int:
    """``send()`` a pre-emption signal; the job must save, requeue itself (PENDING with one more
    restart) and start again (after ``scontrol update`` of ``pending_update`` while it waits).
    Returns the step the script says was saved."""
    before = int(slurm.job(job.id)["Restarts"])
    CYCLES["run"] += 1
    send()
    info = slurm.wait_job(
        job.id,
        lambda j: (
            (j["JobState"] == "PENDING" and int(j["Restarts"]) == before + 1)
            or j["JobState"] in DONE
        ),
        JOB_TIMEOUT,
        "requeued",
    )
    if info["JobState"] != "PENDING":
        CYCLES["failed"] += 1
        raise AssertionError(
            f"job {job.id} was not requeued: {info.get('JobState')} "
            f"ExitCode={info.get('ExitCode')}\n{tail(job.out, 4000)}"
        )
    saved = [int(s) for s in re.findall(r"pre-emption checkpoint \(step=(\d+) ", job.text())]
    assert len(saved) == before + 1, job.text()[-4000:]
    if pending_update:
        slurm.update(job.id, **pending_update)  # at once: the scheduler may start it any moment
    # The requeue delay is up to the scheduler (the backfill pass started one requeued job after
    # 11 s, others wait ~2 min); the test cuts it short, but only after the revoked credential of
    # the previous start has expired (see CRED_EXPIRE_S).
    time.sleep(CRED_EXPIRE_S + 2)
    try:
        slurm.update(job.id, StartTime="now")
    except RuntimeError as exc:  # the scheduler started it meanwhile: what the test waits for
        if "no longer pending" not in str(exc):
            raise
    slurm.wait_job(job.id, lambda j: j["JobState"] != "PENDING", JOB_TIMEOUT, "started again")
    return saved[-1]


def _usr1(slurm, job):
    return lambda: slurm.run(["scancel", "--signal=USR1", job.id])


def _assert_completed(slurm, job, restarts: int) -> None:
    info = slurm.wait_job(job.id, lambda j: j["JobState"] in DONE, JOB_TIMEOUT, "finished")
    assert (info["JobState"], info["ExitCode"], int(info["Restarts"])) == (
        "COMPLETED",
        "0:0",
        restarts,
    ), f"{info}\n{tail(job.out, 4000)}"


def _assert_resumed(job, run_dir: Path, saved: list[int]) -> None:
    text = job.text()
    for s in saved:
        assert f"resumed from {run_dir / 'checkpoints' / f'step_{s:07d}'}: step {s}," in text, text[
            -4000:
        ]
    assert text.count(f"requeueing job {job.id}") == len(saved), text[-4000:]


def _assert_same_losses(run: dict[int, float], ref: dict[int, float], upto: int) -> None:
    assert max(run) == upto and max(ref) >= upto
    # same world size, data order, seeds and schedule: equal to float32 round-off at every step
    diffs = {s: abs(run[s] - ref[s]) / abs(ref[s]) for s in range(1, upto + 1)}
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= 1e-6, f"step {worst}: {run[worst]} vs reference {ref[worst]}"


# ------------------------------------------------------------------------------------------------
# the time-limit cycle first: the reference run must cover the step it saved at (+ AFTER)


@pytest.fixture(scope="module")
def time_limit_run(slurm, micro, clone):
    tmp, cfg = micro
    run_dir = tmp / "runs" / "timelimit"
    job = slurm.sbatch(
        "launch/slurm_single_node.sbatch",
        [str(cfg), "--plan.gpus_per_node=2", "--run.name=timelimit"],
        clone,
        _env(slurm, clone),
    )
    _wait_step(slurm, job, run_dir, 5)

    def cut_time_limit():
        # the header's --signal=USR1@120: with ~110 s left Slurm sends USR1 at its next time check
        run_s = _seconds(slurm.job(job.id)["RunTime"])
        limit = run_s + 110
        slurm.update(job.id, TimeLimit=f"{limit // 60}:{limit % 60:02d}")

    # the resumed run gets an hour, set before it starts
    saved = _requeue_cycle(slurm, job, cut_time_limit, TimeLimit="60")
    # the only USR1 this job gets is Slurm's time-limit warning
    assert re.search(r"received SIGUSR1: saving a checkpoint", job.text()), tail(job.out, 4000)
    _wait_step(slurm, job, run_dir, saved + AFTER)
    # a user's plain scancel (SIGTERM): megapt saves, the script must not undo the cancel
    slurm.run(["scancel", job.id])
    slurm.wait_job(job.id, lambda j: j["JobState"] in DONE + ("PENDING",), JOB_TIMEOUT, "ended")
    time.sleep(3)  # a requeue by the script would show as PENDING with Restarts=2 by now
    info = slurm.job(job.id)
    print(f"\ninfra: time-limit cycle saved at step {saved}", file=sys.stderr)
    return {"job": job, "run_dir": run_dir, "saved": saved, "final": info}


def _seconds(runtime: str) -> int:
    days, _, hms = runtime.rpartition("-")
    parts = [int(x) for x in hms.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    return int(days or 0) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]


@pytest.fixture(scope="module")
def reference(slurm, micro, clone, time_limit_run):
    """The uninterrupted 2-rank run: `sbatch launch/slurm_single_node.sbatch` from a fresh clone."""
    tmp, cfg = micro
    steps = max(PREEMPT_STEPS, time_limit_run["saved"] + AFTER)
    run_dir = tmp / "runs" / "reference"
    job = slurm.sbatch(
        "launch/slurm_single_node.sbatch",
        [str(cfg), "--plan.gpus_per_node=2", "--run.name=reference", f"--train.stop_after={steps}"],
        clone,
        _env(slurm, clone),
    )
    _assert_completed(slurm, job, restarts=0)
    return {"job": job, "losses": _losses(run_dir), "steps": steps, "clone": clone}


# ------------------------------------------------------------------------------------------------
# tests


@pytest.mark.timeout(1200)
def test_single_host_sbatch_from_a_fresh_clone_runs_to_completion(reference):
    job, clone = reference["job"], reference["clone"]
    assert job.out.parent == clone / "logs" and job.out.is_file()  # where the README says logs land
    text = job.text()
    assert "x 2 rank(s) (no GPU on node mgi-node" in text and "plan.gpus_per_node" in text, text[
        -3000:
    ]
    assert f"stopping at step {reference['steps']} (train.stop_after)" in text
    assert sorted(reference["losses"]) == list(range(1, reference["steps"] + 1))
    assert "requeue" not in text.replace("--requeue", "")
    assert not list((clone / "logs").glob("*.preempted"))


@pytest.mark.timeout(1200)
def test_time_limit_warning_saves_requeues_and_resumes_then_scancel_cancels(
    time_limit_run, reference
):
    run, job, saved = time_limit_run, time_limit_run["job"], time_limit_run["saved"]
    _assert_resumed(job, run["run_dir"], [saved])
    losses = _losses(run["run_dir"])
    _assert_same_losses(
        {s: losses[s] for s in range(1, saved + AFTER + 1)}, reference["losses"], saved + AFTER
    )
    # the user's scancel: saved (SIGTERM) but not requeued, the job ends CANCELLED
    final = run["final"]
    assert (final["JobState"], int(final["Restarts"])) == ("CANCELLED", 1), (
        f"{final}\n{tail(job.out, 3000)}"
    )
    assert "received SIGTERM: saving a checkpoint" in job.text()
    assert "Slurm is ending job" in job.text() and "not requeueing" in job.text()


@pytest.mark.timeout(1800)
def test_repeated_usr1_preemptions_each_requeue_and_finish_with_the_uninterrupted_losses(
    slurm, micro, clone, reference
):
    tmp, cfg = micro
    run_dir = tmp / "runs" / "preempt"
    job = slurm.sbatch(
        "launch/slurm_single_node.sbatch",
        [
            str(cfg),
            "--plan.gpus_per_node=2",
            "--run.name=preempt",
            f"--train.stop_after={PREEMPT_STEPS}",
        ],
        clone,
        _env(slurm, clone),
    )
    saved: list[int] = []
    target = 10
    for _ in range(4):
        _wait_step(slurm, job, run_dir, target)
        saved.append(_requeue_cycle(slurm, job, _usr1(slurm, job)))
        target = saved[-1] + 30
    assert saved[-1] + AFTER <= PREEMPT_STEPS, saved
    _assert_completed(slurm, job, restarts=4)
    _assert_resumed(job, run_dir, saved)
    _assert_same_losses(_losses(run_dir), reference["losses"], PREEMPT_STEPS)
    assert CYCLES["failed"] == 0


@pytest.mark.timeout(600)
def test_a_crashed_rank_fails_the_job_at_once_and_is_not_requeued(slurm, micro, clone):
    tmp, cfg = micro
    run_dir = tmp / "runs" / "crash"
    job = slurm.sbatch(
        "launch/slurm_single_node.sbatch",
        [
            str(cfg),
            "--plan.gpus_per_node=2",
            "--run.name=crash",
            "--train.collective_timeout_s=600",
        ],
        clone,
        _env(slurm, clone),
    )
    _wait_step(slurm, job, run_dir, 5)
    pid = _rank_pid(job.id, rank=1)
    t0 = time.time()
    os.kill(pid, signal.SIGKILL)
    info = slurm.wait_job(
        job.id, lambda j: j["JobState"] in DONE + ("PENDING",), JOB_TIMEOUT, "ended"
    )
    waited = time.time() - t0
    print(f"\ninfra: rank 1 killed -> job {info['JobState']} after {waited:.1f}s", file=sys.stderr)
    assert (info["JobState"], int(info["Restarts"])) == ("FAILED", 0), (
        f"{info}\n{tail(job.out, 3000)}"
    )
    # srun --kill-on-bad-exit stops rank 0 at once: far sooner than the 600 s collective timeout
    assert waited < 90, waited
    assert "requeueing" not in job.text() and not list(
        (clone / "logs").glob(f"*-{job.id}.*.preempted")
    )


def _rank_pid(job_id: str, rank: int) -> int:
    """pid of the training process of Slurm task ``rank`` of job ``job_id`` (from /proc)."""
    want = {f"SLURM_JOB_ID={job_id}".encode(), f"SLURM_PROCID={rank}".encode()}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            env = set((p / "environ").read_bytes().split(b"\0"))
            cmd = (p / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if want <= env and b"megapt" in cmd and b"train" in cmd:
            return int(p.name)
    raise AssertionError(f"no rank {rank} process of job {job_id}")


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("script", ["slurm_multi_node.sbatch", "slurm_multi_node_deepspeed.sbatch"])
def test_two_hosts_train_preempt_requeue_and_match_the_single_host_losses(
    slurm, micro, clone, reference, script
):
    tmp, cfg = micro
    name = script.split(".")[0]
    run_dir = tmp / "runs" / name
    job = slurm.sbatch(
        f"launch/{script}",
        [
            str(cfg),
            "--plan.gpus_per_node=1",
            f"--run.name={name}",
            f"--train.stop_after={TWO_HOST_STEPS}",
        ],
        clone,
        _env(slurm, clone),
        opts=["--nodes", "2"],
    )
    _wait_step(slurm, job, run_dir, 20)
    saved = _requeue_cycle(slurm, job, _usr1(slurm, job))
    assert saved + AFTER <= TWO_HOST_STEPS
    _assert_completed(slurm, job, restarts=1)
    _assert_resumed(job, run_dir, [saved])
    text = job.text()
    assert text.count("on 2 node(s) [mgi-node1 mgi-node2] x 1 rank(s)") == 2, text[-3000:]
    _assert_same_losses(_losses(run_dir), reference["losses"], TWO_HOST_STEPS)
    assert CYCLES["failed"] == 0


@pytest.mark.timeout(600)
def test_deepspeed_launcher_over_ssh_and_pdsh_across_two_hosts(
    slurm, micro, clone, reference, tmp_path
):
    tmp, cfg = micro
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(f"{slurm.names[0]} slots=1\n{slurm.names[1]} slots=1\n")
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    env = _env(slurm, clone, TMPDIR=str(private_tmp))
    log = tmp_path / "launch.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            slurm.on(
                0,
                [
                    "bash",
                    "launch/deepspeed_launch.sh",
                    "-H",
                    str(hostfile),
                    "--master-port",
                    str(free_port()),
                    "--",
                    "-c",
                    str(cfg),
                    "--plan.gpus_per_node=1",
                    "--run.name=ssh",
                    f"--train.stop_after={SSH_STEPS}",
                ],
                cwd=clone,
            ),
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
        try:
            rc = proc.wait(timeout=JOB_TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text(errors="replace")
    assert rc == 0, text[-4000:]
    assert f"{slurm.names[1]}: " in text and f"{slurm.names[0]}: " in text, text[
        -3000:
    ]  # pdsh's host prefixes
    _assert_same_losses(_losses(tmp / "runs" / "ssh"), reference["losses"], SSH_STEPS)
    assert list(private_tmp.iterdir()) == []  # the forwarded-environment file is gone
