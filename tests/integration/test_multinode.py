"""Multi-node launches on one machine: two "hosts" are two network namespaces joined by a veth
pair (10.77.0.1, 10.77.0.2), each node's processes run under `ip netns exec`, and ranks meet
only over that link (gloo bound to the veth with GLOO_SOCKET_IFNAME).

* torchrun, one agent per node, c10d rendezvous on node 0 (launch/torchrun_launch.sh), ZeRO-2
* the DeepSpeed launcher per node with --no_ssh --node_rank (launch/deepspeed_launch.sh), ZeRO-2 and -3
* Slurm: launch/slurm_multi_node.sbatch with srun/scontrol stand-ins that start one process per
  rank with SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID/SLURM_NODEID on its node; USR1 (the
  --signal=USR1@120 warning) -> megapt checkpoints and exits 75 -> the script requeues the job (ZeRO-2)
* a hostfile naming a host that does not resolve / does not answer: refused before any launch

Skipped (with the reason) when network namespaces cannot be created (not root, no iproute2).
"""
from __future__ import annotations

import json
import os
import random
import signal
import stat
import sys
import time
from pathlib import Path

import pytest

from scale_utils import (ADDRS, IFNAME, ROOT, base_env, free_port, kill_all, prepare_data, start, tail, two_hosts,
                         wait_all, write_micro_config)

LAUNCH_TIMEOUT = 200  # seconds per scenario (CPU start-up of torch + DeepSpeed dominates)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hosts():
    try:
        with two_hosts() as h:
            yield h
    except RuntimeError as exc:
        pytest.skip(f"cannot create network namespaces: {exc}")


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multinode")
    cfg = write_micro_config(tmp)
    prepare_data(cfg)
    return tmp, cfg


def _metrics(run_dir: Path) -> list[dict]:
    p = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []


def _assert_two_rank_run(run_dir: Path, steps: int, logs: list[Path]) -> None:
    rows = [r for r in _metrics(run_dir) if r.get("kind") == "train"]
    info = "\n".join(tail(p) for p in logs)
    assert [r["step"] for r in rows] == list(range(1, steps + 1)), info
    # 2 ranks x micro_batch 2 x seq 32 tokens per step: both nodes trained
    assert rows[0]["tokens_seen"] == 2 * 2 * 32, info
    ckpt = run_dir / "checkpoints" / f"step_{steps:07d}" / "ds"
    assert (ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt").exists(), info
    assert (ckpt / "zero_pp_rank_1_mp_rank_00_optim_states.pt").exists(), info


@pytest.mark.timeout(LAUNCH_TIMEOUT + 60)
def test_torchrun_two_nodes_c10d_rendezvous(hosts, micro, tmp_path):
    tmp, cfg = micro
    port = free_port()
    env = base_env(GLOO_SOCKET_IFNAME=IFNAME)
    procs, logs = [], []
    for node in (0, 1):
        log = tmp_path / f"node{node}.log"
        cmd = ["bash", str(ROOT / "launch/torchrun_launch.sh"), "--nnodes", "2", "--node-rank", str(node),
               "--nproc-per-node", "1", "--rdzv-endpoint", f"{ADDRS[0]}:{port}", "--rdzv-id", f"t{port}",
               "--local-addr", ADDRS[node], "--", "-c", str(cfg), "--run.name=torchrun",
               "--deepspeed.zero_stage=2"]
        procs.append(start(cmd, env, log, hosts.netns[node]))
        logs.append(log)
    try:
        codes = wait_all(procs, LAUNCH_TIMEOUT)
    finally:
        kill_all(procs)
    assert codes == [0, 0], "\n".join(tail(p) for p in logs)
    _assert_two_rank_run(tmp / "runs" / "torchrun", 3, logs)
    assert f"rendezvous {ADDRS[0]}:{port}" in logs[1].read_text()


@pytest.mark.timeout(LAUNCH_TIMEOUT + 60)
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_launcher_per_node_no_ssh(hosts, micro, tmp_path, stage):
    tmp, cfg = micro
    port = free_port()
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(f"# two namespaces\n{ADDRS[0]} slots=1\n{ADDRS[1]} slots=1\n")
    env = base_env(GLOO_SOCKET_IFNAME=IFNAME)
    procs, logs = [], []
    for node in (0, 1):
        log = tmp_path / f"node{node}.log"
        cmd = ["bash", str(ROOT / "launch/deepspeed_launch.sh"), "-H", str(hostfile), "--node-rank", str(node),
               "--master-addr", ADDRS[0], "--master-port", str(port), "--", "-c", str(cfg),
               f"--run.name=dslaunch{stage}", f"--deepspeed.zero_stage={stage}"]
        procs.append(start(cmd, env, log, hosts.netns[node]))
        logs.append(log)
    try:
        codes = wait_all(procs, LAUNCH_TIMEOUT)
    finally:
        kill_all(procs)
    assert codes == [0, 0], "\n".join(tail(p) for p in logs)
    _assert_two_rank_run(tmp / "runs" / f"dslaunch{stage}", 3, logs)


FAKE_SRUN = r'''#!{python}
"""srun stand-in: one process per task, SLURM_* per rank, node i's tasks inside FAKE_SRUN_NETNS[i]."""
import os, signal, subprocess, sys
args, i = sys.argv[1:], 0
while i < len(args) and args[i].startswith("-"):
    i += 1 if "=" in args[i] else 2
cmd = args[i:]
ntasks, nodes = int(os.environ["SLURM_NTASKS"]), int(os.environ["SLURM_JOB_NUM_NODES"])
per, netns = ntasks // nodes, os.environ["FAKE_SRUN_NETNS"].split()
procs = []
for r in range(ntasks):
    env = dict(os.environ, SLURM_PROCID=str(r), SLURM_LOCALID=str(r % per), SLURM_NODEID=str(r // per),
               SLURM_STEP_NUM_TASKS=str(ntasks))
    procs.append(subprocess.Popen(["ip", "netns", "exec", netns[r // per], *cmd], env=env))
def forward(sig, frame):
    for p in procs:
        if p.poll() is None:
            p.send_signal(sig)
for s in (signal.SIGUSR1, signal.SIGTERM):
    signal.signal(s, forward)
open(os.environ["FAKE_SRUN_PIDFILE"], "w").write(str(os.getpid()))
sys.exit(max(p.wait() for p in procs))
'''

FAKE_SCONTROL = r'''#!/usr/bin/env bash
# scontrol stand-in: `show hostnames LIST` and `requeue JOBID` (recorded)
case "$1 $2" in
    "show hostnames") tr ',' '\n' <<<"$3" ;;
    requeue*) echo "requeue $2" >> "$FAKE_SCONTROL_LOG" ;;
    *) echo "fake scontrol: unsupported $*" >&2; exit 1 ;;
esac
'''


def _install(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


@pytest.mark.timeout(LAUNCH_TIMEOUT + 60)
def test_slurm_srun_per_rank_preempted_and_requeued(hosts, micro, tmp_path):
    tmp, cfg = micro
    bindir = tmp_path / "bin"
    bindir.mkdir()
    _install(bindir / "srun", FAKE_SRUN.replace("{python}", sys.executable))
    _install(bindir / "scontrol", FAKE_SCONTROL)
    job_id = str(random.randint(1000, 19000))
    env = base_env(
        PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}", GLOO_SOCKET_IFNAME=IFNAME, MEGAPT_ROOT=str(ROOT),
        SLURM_JOB_ID=job_id, SLURM_JOB_NAME="megapt", SLURM_JOB_NUM_NODES="2", SLURM_NNODES="2", SLURM_NTASKS="2",
        SLURM_JOB_NODELIST="nodea,nodeb", SLURM_SUBMIT_DIR=str(ROOT), MASTER_ADDR=ADDRS[0],
        FAKE_SRUN_NETNS=" ".join(hosts.netns), FAKE_SRUN_PIDFILE=str(tmp_path / "srun.pid"),
        FAKE_SCONTROL_LOG=str(tmp_path / "scontrol.log"))
    log = tmp_path / "job.log"
    run_dir = tmp / "runs" / "slurm"
    # many steps: the USR1 below must arrive while it trains
    proc = start(["bash", str(ROOT / "launch/slurm_multi_node.sbatch"), str(cfg), "--run.name=slurm",
                  "--deepspeed.zero_stage=2", "--train.max_steps=100000"], env, log)
    try:
        deadline = time.time() + LAUNCH_TIMEOUT
        while time.time() < deadline and proc.poll() is None:
            if len([r for r in _metrics(run_dir) if r.get("kind") == "train"]) >= 2:
                break
            time.sleep(0.5)
        assert proc.poll() is None, tail(log)
        assert time.time() < deadline, "no training step within the time limit:\n" + tail(log)
        os.kill(int((tmp_path / "srun.pid").read_text()), signal.SIGUSR1)  # Slurm's time-limit warning
        rc = proc.wait(timeout=LAUNCH_TIMEOUT)
    finally:
        kill_all([proc])
    text = log.read_text()
    assert rc == 0, tail(log)
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", job_id], tail(log)
    assert "requeueing job" in text
    steps = [r["step"] for r in _metrics(run_dir) if r.get("kind") == "train"]
    assert steps[0] == 1 and steps[-1] < 100000
    assert steps[0] and (run_dir / "checkpoints" / f"step_{steps[-1]:07d}").is_dir(), text[-3000:]
    assert [r for r in _metrics(run_dir) if r.get("kind") == "train"][0]["tokens_seen"] == 2 * 2 * 32


@pytest.mark.timeout(120)
def test_hostfile_with_an_unreachable_host_is_refused_before_launch(hosts, micro, tmp_path):
    tmp, cfg = micro
    hostfile = tmp_path / "hostfile"
    # resolves but nobody answers ssh (no sshd in the namespace) / does not resolve at all
    hostfile.write_text(f"{ADDRS[1]} slots=1\nno-such-node-megapt-test slots=1\n")
    log = tmp_path / "launch.log"
    p = start(["bash", str(ROOT / "launch/deepspeed_launch.sh"), "-H", str(hostfile), "--",
               "-c", str(cfg), "--run.name=never"], base_env(), log, hosts.netns[0])
    rc = wait_all([p], 100)[0]
    text = log.read_text()
    assert rc == 3, text
    assert "no-such-node-megapt-test" in text and "does not resolve" in text
    assert ADDRS[1] in text and "ssh" in text
    assert "nothing was launched" in text
    assert "deepspeed --" not in text and not (tmp / "runs" / "never").exists()
