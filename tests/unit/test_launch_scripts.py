"""launch/ scripts: the commands they build, the pre-flight refusals, the Slurm contract (signal,
requeue on megapt's pre-emption exit code, logs per job id). Multi-node runs: tests/integration/test_multinode.py."""
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
    return subprocess.run(["bash", str(LAUNCH / script), *args], cwd=ROOT, env=e, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (apt-get install shellcheck)")
def test_scripts_are_shellcheck_clean():
    files = sorted(str(p) for p in LAUNCH.iterdir() if p.suffix in (".sh", ".sbatch"))
    r = subprocess.run(["shellcheck", "-x", "-s", "bash", *files], cwd=LAUNCH, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_torchrun_command_per_node():
    r = run("torchrun_launch.sh", "--nnodes", "2", "--node-rank", "1", "--nproc-per-node", "8",
            "--rdzv-endpoint", "127.0.0.1:29400", "--rdzv-id", "job7", "--dry-run", "--",
            "-c", "configs/7b-4node-zero2.yaml", "--plan.nodes=2", "--plan.global_batch=256", MEGAPT_SKIP_PLAN="1")
    assert r.returncode == 0, r.stderr
    cmd = r.stderr.splitlines()[-1]
    for part in ("torchrun --nnodes 2 --node_rank 1 --nproc_per_node 8", "--rdzv_backend c10d",
                 "--rdzv_endpoint 127.0.0.1:29400", "--rdzv_id job7",
                 "-m megapt train -c configs/7b-4node-zero2.yaml --plan.nodes=2"):
        assert part in cmd, cmd


def test_deepspeed_one_host_runs_without_ssh(tmp_path):
    hf = tmp_path / "hostfile"
    hf.write_text("# comment\nlocalhost slots=8\n")
    r = run("deepspeed_launch.sh", "-H", str(hf), "--dry-run", "--", "-c", "configs/1b.yaml", "--resume",
            MEGAPT_SKIP_PLAN="1")
    assert r.returncode == 0, r.stderr
    cmd = r.stderr.splitlines()[-1]
    assert "--no_ssh --node_rank 0" in cmd and "--no_local_rank" in cmd
    assert cmd.endswith("--module megapt train -c configs/1b.yaml --resume")


def test_accelerate_command():
    r = run("accelerate_launch.sh", "--num-machines", "1", "--gpus-per-machine", "8", "--dry-run", "--",
            "-c", "configs/1b.yaml", MEGAPT_SKIP_PLAN="1")
    assert r.returncode == 0, r.stderr
    cmd = r.stderr.splitlines()[-1]
    assert "accelerate launch --multi_gpu --num_machines 1 --machine_rank 0 --num_processes 8" in cmd
    assert cmd.endswith("-m megapt train -c configs/1b.yaml")


def test_world_size_not_dividing_the_global_batch_stops_the_launch():
    r = run("torchrun_launch.sh", "--nnodes", "6", "--node-rank", "0", "--nproc-per-node", "8",
            "--rdzv-endpoint", "127.0.0.1:29400", "--dry-run", "--", "-c", "configs/70b.yaml")
    assert r.returncode == 3, r.stderr
    assert "plan.global_batch" in r.stderr and "megapt plan refused" in r.stderr
    assert "torchrun --nnodes" not in r.stderr


def test_config_that_does_not_fit_stops_the_launch(tmp_path):
    hf = tmp_path / "hostfile"
    hf.write_text("localhost slots=8\n")
    r = run("deepspeed_launch.sh", "-H", str(hf), "--dry-run", "--", "-c", "configs/70b.yaml",
            "--plan.global_batch=0")
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
    r = run("deepspeed_launch.sh", "-H", str(hf), "--dry-run", "--", "-c", "configs/1b.yaml", MEGAPT_SKIP_PLAN="1")
    assert r.returncode == 3 and "same GPU count" in r.stderr


def test_slurm_scripts_signal_requeue_and_log_per_job():
    from megapt.train.preempt import PREEMPT_EXIT_CODE

    common = (LAUNCH / "common.sh").read_text()
    assert re.search(rf"MEGAPT_PREEMPT_EXIT={PREEMPT_EXIT_CODE}\b", common)
    body = (LAUNCH / "slurm_body.sh").read_text()
    assert 'scontrol requeue "$SLURM_JOB_ID"' in body and "MEGAPT_PREEMPT_EXIT" in body
    for name in ("slurm_single_node.sbatch", "slurm_multi_node.sbatch", "slurm_multi_node_deepspeed.sbatch"):
        text = (LAUNCH / name).read_text()
        for line in ("#SBATCH --signal=USR1@120", "#SBATCH --requeue", "#SBATCH --output=logs/%x-%j.out",
                     "#SBATCH --open-mode=append"):
            assert line in text, (name, line)
    assert "--no_ssh" in (LAUNCH / "deepspeed_launch.sh").read_text()
