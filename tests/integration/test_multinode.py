"""Multi-node launches on one machine: two "hosts" are two network namespaces joined by a veth
pair (10.77.0.1, 10.77.0.2), each node's processes run under `ip netns exec`, and ranks meet
only over that link (gloo bound to the veth with GLOO_SOCKET_IFNAME). The Slurm scripts and the
ssh (pdsh) launch run against a real Slurm cluster and real sshd: tests/integration/test_cluster_launch.py.

* torchrun, one agent per node, c10d rendezvous on node 0 (launch/torchrun_launch.sh), ZeRO-2
* the DeepSpeed launcher per node with --no_ssh --node_rank (launch/deepspeed_launch.sh), ZeRO-2 and -3
* a hostfile naming a host that does not resolve / does not answer: refused before any launch

Skipped (with the reason) when network namespaces cannot be created (not root, no iproute2).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.scale_utils import (
    ADDRS,
    IFNAME,
    ROOT,
    base_env,
    free_port,
    kill_all,
    prepare_data,
    start,
    tail,
    two_hosts,
    wait_all,
    write_micro_config,
)

LAUNCH_TIMEOUT = 200  # seconds per scenario (CPU start-up of torch + DeepSpeed dominates)
pytestmark = [pytest.mark.infra, pytest.mark.slow]  # network namespaces (root)


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
        cmd = [
            "bash",
            str(ROOT / "launch/torchrun_launch.sh"),
            "--nnodes",
            "2",
            "--node-rank",
            str(node),
            "--nproc-per-node",
            "1",
            "--rdzv-endpoint",
            f"{ADDRS[0]}:{port}",
            "--rdzv-id",
            f"t{port}",
            "--local-addr",
            ADDRS[node],
            "--",
            "-c",
            str(cfg),
            "--run.name=torchrun",
            "--deepspeed.zero_stage=2",
        ]
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
        cmd = [
            "bash",
            str(ROOT / "launch/deepspeed_launch.sh"),
            "-H",
            str(hostfile),
            "--node-rank",
            str(node),
            "--master-addr",
            ADDRS[0],
            "--master-port",
            str(port),
            "--",
            "-c",
            str(cfg),
            f"--run.name=dslaunch{stage}",
            f"--deepspeed.zero_stage={stage}",
        ]
        procs.append(start(cmd, env, log, hosts.netns[node]))
        logs.append(log)
    try:
        codes = wait_all(procs, LAUNCH_TIMEOUT)
    finally:
        kill_all(procs)
    assert codes == [0, 0], "\n".join(tail(p) for p in logs)
    _assert_two_rank_run(tmp / "runs" / f"dslaunch{stage}", 3, logs)


@pytest.mark.timeout(120)
def test_hostfile_with_an_unreachable_host_is_refused_before_launch(hosts, micro, tmp_path):
    tmp, cfg = micro
    hostfile = tmp_path / "hostfile"
    # resolves but nobody answers ssh (no sshd in the namespace) / does not resolve at all
    hostfile.write_text(f"{ADDRS[1]} slots=1\nno-such-node-megapt-test slots=1\n")
    log = tmp_path / "launch.log"
    p = start(
        [
            "bash",
            str(ROOT / "launch/deepspeed_launch.sh"),
            "-H",
            str(hostfile),
            "--",
            "-c",
            str(cfg),
            "--run.name=never",
        ],
        base_env(),
        log,
        hosts.netns[0],
    )
    rc = wait_all([p], 100)[0]
    text = log.read_text()
    assert rc == 3, text
    assert "no-such-node-megapt-test" in text and "does not resolve" in text
    assert ADDRS[1] in text and "ssh" in text
    assert "nothing was launched" in text
    assert "deepspeed --" not in text and not (tmp / "runs" / "never").exists()
