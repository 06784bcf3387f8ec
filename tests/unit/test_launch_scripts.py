"""launch/ scripts: the commands they build, the pre-flight refusals, the Slurm contract (signal,
requeue on megapt's pre-emption marker, logs per job id, ranks per node from the cluster or the
config). Multi-node runs: tests/integration/test_multinode.py; real Slurm and ssh hosts:
tests/integration/test_cluster_launch.py."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
LAUNCH = ROOT / "launch"


def run(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    e = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(ROOT), **env)
    return subprocess.run(
        ["bash", str(LAUNCH / script), *args],
        cwd=ROOT,
        env=e,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.skipif(
    shutil.which("shellcheck") is None,
    reason="shellcheck not installed (apt-get install shellcheck)",
)
def test_scripts_are_shellcheck_clean():
    files = sorted(str(p) for p in LAUNCH.iterdir() if p.suffix in (".sh", ".sbatch"))
    r = subprocess.run(
        ["shellcheck", "-x", "-s", "bash", *files], cwd=LAUNCH, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_torchrun_command_per_node():
    r = run(
        "torchrun_launch.sh",
        "--nnodes",
        "2",
        "--node-rank",
        "1",
        "--nproc-per-node",
        "8",
        "--rdzv-endpoint",
        "127.0.0.1:29400",
        "--rdzv-id",
        "job7",
        "--dry-run",
        "--",
        "-c",
        "configs/7b-4node-zero2.yaml",
        "--plan.nodes=2",
        "--plan.global_batch=256",
        MEGAPT_SKIP_PLAN="1",
    )
    assert r.returncode == 0, r.stderr
    cmd = r.stderr.splitlines()[-1]
    for part in (
        "torchrun --nnodes 2 --node_rank 1 --nproc_per_node 8",
        "--rdzv_backend c10d",
        "--rdzv_endpoint 127.0.0.1:29400",
        "--rdzv_id job7",
        "-m megapt train -c configs/7b-4node-zero2.yaml --plan.nodes=2",
    ):
        assert part in cmd, cmd


def test_deepspeed_one_host_runs_without_ssh(tmp_path):
    hf = tmp_path / "hostfile"
    hf.write_text("# comment\nlocalhost slots=8\n")
    r = run(
        "deepspeed_launch.sh",
        "-H",
        str(hf),
        "--dry-run",
        "--",
        "-c",
        "configs/1b.yaml",
        "--resume",
        MEGAPT_SKIP_PLAN="1",
    )
    assert r.returncode == 0, r.stderr
    cmd = r.stderr.splitlines()[-1]
    assert "--no_ssh --node_rank 0" in cmd and "--no_local_rank" in cmd
    assert cmd.endswith("--module megapt train -c configs/1b.yaml --resume")


def test_accelerate_command():
    r = run(
        "accelerate_launch.sh",
        "--num-machines",
        "1",
        "--gpus-per-machine",
        "8",
        "--dry-run",
        "--",
        "-c",
        "configs/1b.yaml",
        MEGAPT_SKIP_PLAN="1",
    )
    assert r.returncode == 0, r.stderr
    cmd = r.stderr.splitlines()[-1]
    assert (
        "accelerate launch --multi_gpu --num_machines 1 --machine_rank 0 --num_processes 8" in cmd
    )
    assert cmd.endswith("-m megapt train -c configs/1b.yaml")


def test_world_size_not_dividing_the_global_batch_stops_the_launch():
    r = run(
        "torchrun_launch.sh",
        "--nnodes",
        "6",
        "--node-rank",
        "0",
        "--nproc-per-node",
        "8",
        "--rdzv-endpoint",
        "127.0.0.1:29400",
        "--dry-run",
        "--",
        "-c",
        "configs/70b.yaml",
    )
    assert r.returncode == 3, r.stderr
    assert "plan.global_batch" in r.stderr and "megapt plan refused" in r.stderr
    assert "torchrun --nnodes" not in r.stderr


def test_config_that_does_not_fit_stops_the_launch(tmp_path):
    hf = tmp_path / "hostfile"
    hf.write_text("localhost slots=8\n")
    r = run(
        "deepspeed_launch.sh",
        "-H",
        str(hf),
        "--dry-run",
        "--",
        "-c",
        "configs/70b.yaml",
        "--plan.global_batch=0",
    )
    assert r.returncode == 3, r.stderr
    assert "DOES NOT FIT" in r.stderr and "cheapest settings" in r.stderr


def test_unresolvable_host_is_named_before_launch(tmp_path):
    hf = tmp_path / "hostfile"
    hf.write_text("localhost slots=2\nno-such-node-xyz-megapt slots=2\n")
    r = run("deepspeed_launch.sh", "-H", str(hf), "--", "-c", "configs/1b.yaml")
    assert r.returncode == 3
    assert "no-such-node-xyz-megapt" in r.stderr and "does not resolve" in r.stderr
    assert "nothing was launched" in r.stderr


def test_uneven_slots_are_refused(tmp_path):
    hf = tmp_path / "hostfile"
    hf.write_text("localhost slots=8\n127.0.0.1 slots=4\n")
    r = run(
        "deepspeed_launch.sh",
        "-H",
        str(hf),
        "--dry-run",
        "--",
        "-c",
        "configs/1b.yaml",
        MEGAPT_SKIP_PLAN="1",
    )
    assert r.returncode == 3 and "same GPU count" in r.stderr


def test_slurm_scripts_signal_requeue_on_the_marker_and_log_per_job():
    from megapt.train.preempt import MARKER_ENV, PREEMPT_EXIT_CODE

    common = (LAUNCH / "common.sh").read_text()
    assert re.search(rf"MEGAPT_PREEMPT_EXIT={PREEMPT_EXIT_CODE}\b", common)
    body = (LAUNCH / "slurm_body.sh").read_text()
    # requeue on the marker megapt writes after a complete save, not on srun's exit code
    assert f"export {MARKER_ENV}=" in body and f"[[ -f ${MARKER_ENV} ]]" in body
    assert 'scontrol requeue "$SLURM_JOB_ID"' in body
    for name in (
        "slurm_single_node.sbatch",
        "slurm_multi_node.sbatch",
        "slurm_multi_node_deepspeed.sbatch",
    ):
        text = (LAUNCH / name).read_text()
        for line in (
            "#SBATCH --signal=USR1@120",
            "#SBATCH --requeue",
            "#SBATCH --output=logs/%x-%j.out",
            "#SBATCH --open-mode=append",
            "#SBATCH --exclusive",
        ):
            assert line in text, (name, line)
        # GPU count from the cluster (or the config on CPU nodes), never a constant: a partition
        # without GRES rejects any --gpus-per-node, and CPU counts differ between clusters
        for opt in (
            "--gpus-per-node",
            "--gres",
            "--gpus",
            "--cpus-per-task",
            "--ntasks-per-node=8",
        ):
            assert f"#SBATCH {opt}" not in text, (name, opt)
    assert "--no_ssh" in (LAUNCH / "deepspeed_launch.sh").read_text()


def test_the_slurm_log_folder_ships_with_the_checkout():
    # Slurm opens #SBATCH --output=logs/... before the script runs: a missing folder fails the job
    # (ExitCode 0:53) with nothing written where the user looks
    assert (ROOT / "logs").is_dir()
    if (ROOT / ".git").exists() and shutil.which("git"):
        tracked = subprocess.run(
            ["git", "ls-files", "logs"], cwd=ROOT, capture_output=True, text=True
        ).stdout
        assert tracked.split(), "logs/ must be tracked (a fresh clone needs the folder)"


def _common(snippet: str, **env: str) -> subprocess.CompletedProcess:
    e = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(ROOT), **env)
    for k in ("MEGAPT_GPUS_PER_NODE", "SLURM_GPUS_PER_NODE", "SLURM_CPUS_ON_NODE", "SLURM_JOB_ID"):
        if k not in env:
            e.pop(k, None)
    return subprocess.run(
        ["bash", "-c", f'source "{LAUNCH}/common.sh"; {snippet}'],
        cwd=ROOT,
        env=e,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "gres, gpus",
    [
        ("gpu:8", "8"),
        ("gpu:h100:4(S:0-1),nic:1", "4"),
        ("(null)", "0"),
        ("", "0"),
        ("gpu:a100:2,gpu:v100:2", "4"),
        ("gpu:4(S:0,1)", "4"),
        ("nic:2", "0"),
        ("gpu", "1"),
    ],
)
def test_gpus_per_node_are_read_from_the_nodes_gres(gres, gpus):
    r = subprocess.run(
        ["bash", "-c", f'source "{LAUNCH}/common.sh"; gres_gpu_count "$1"', "_", gres],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0 and r.stdout.strip() == gpus, (gres, r.stdout, r.stderr)


def test_ranks_per_node_come_from_the_job_or_the_config_never_a_constant():
    show = (
        'ranks_per_node -c configs/tiny.yaml "$@"; echo "$PER_NODE|$PER_NODE_FROM|${GPU_ARGS[*]}"'
    )
    r = _common(show, MEGAPT_GPUS_PER_NODE="3")
    assert r.stdout.strip().split("|")[:2] == ["3", "MEGAPT_GPUS_PER_NODE"], r.stderr
    r = _common(show, SLURM_GPUS_PER_NODE="h100:4")
    assert r.stdout.strip().split("|") == ["4", "sbatch --gpus-per-node", "--gpus-per-node=4"], (
        r.stderr
    )
    # a node without GPUs (no Gres): CPU ranks from the config, no GPU request for the step
    r = _common(show.replace('"$@"', "--plan.gpus_per_node=2"), SLURM_CPUS_ON_NODE="2")
    n, src, gpu_args = r.stdout.strip().split("|")
    assert (n, gpu_args) == ("2", "") and "plan.gpus_per_node" in src, r.stderr
    # more CPU ranks than the node has CPUs: refused before anything starts, naming the fix
    r = _common(show.replace('"$@"', "--plan.gpus_per_node=8"), SLURM_CPUS_ON_NODE="2")
    assert (
        r.returncode == 3
        and "8 CPU ranks per node" in r.stderr
        and "--plan.gpus_per_node" in r.stderr
    )


def test_deepspeed_ssh_launch_leaves_no_environment_file_behind(tmp_path):
    hf = tmp_path / "hostfile"
    hf.write_text("node-a slots=1\nnode-b slots=1\n")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    user_env = tmp_path / "my_env"
    user_env.write_text("MY_SETTING=1\nOTHER_SETTING=2\n")
    counts = []
    for extra in ({}, {"DS_ENV_FILE": str(user_env)}):
        r = run(
            "deepspeed_launch.sh",
            "-H",
            str(hf),
            "--dry-run",
            "--",
            "-c",
            "configs/tiny.yaml",
            MEGAPT_SKIP_PLAN="1",
            MEGAPT_SKIP_HOSTCHECK="1",
            TMPDIR=str(scratch),
            **extra,
        )
        assert r.returncode == 0, r.stderr
        counts.append(int(re.search(r"forwarding (\d+) variables", r.stderr).group(1)))
        assert list(scratch.iterdir()) == [], "the forwarded-environment file was left behind"
    assert counts[1] == counts[0] + 2  # the user's own DeepSpeed env file still reaches the nodes
