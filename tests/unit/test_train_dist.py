"""Rank/world detection: every launcher a user may start megapt under gives the right picture."""

import pytest

from megapt.train.dist import detect_launcher_env, first_slurm_host


def test_plain_python_is_single_process():
    info = detect_launcher_env({})
    assert (info.rank, info.world_size, info.local_rank, info.launcher) == (0, 1, 0, "single")


def test_torchrun_and_deepspeed_launcher_env():
    env = {
        "RANK": "3",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "node7",
        "MASTER_PORT": "1234",
    }
    info = detect_launcher_env(env)
    assert (info.rank, info.world_size, info.local_rank, info.master_addr, info.master_port) == (
        3,
        8,
        1,
        "node7",
        1234,
    )


def test_slurm_srun_env_uses_first_host_of_nodelist(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)  # no scontrol: parse the list ourselves
    env = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "16",
        "SLURM_LOCALID": "1",
        "SLURM_NODELIST": "gpu[017-020,031],cpu01",
        "SLURM_JOB_ID": "4242",
    }
    info = detect_launcher_env(env)
    assert (info.rank, info.world_size, info.local_rank, info.launcher) == (5, 16, 1, "slurm")
    assert info.master_addr == "gpu017"
    # every task of the job derives the same port; another job gets another one
    assert info.master_port == detect_launcher_env(dict(env, SLURM_PROCID="0")).master_port
    assert info.master_port != detect_launcher_env(dict(env, SLURM_JOB_ID="4243")).master_port


@pytest.mark.parametrize(
    "nodelist,first",
    [
        ("node1", "node1"),
        ("a-[1-2]", "a-1"),
        ("x[003,007]", "x003"),
        ("h1,h2", "h1"),
        ("r[1-2]n[3-4]", "r1n[3-4]"),
    ],
)
def test_first_slurm_host_parsing(monkeypatch, nodelist, first):
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert first_slurm_host(nodelist) == first


def test_openmpi_and_mpich_env():
    ompi = detect_launcher_env(
        {
            "OMPI_COMM_WORLD_RANK": "2",
            "OMPI_COMM_WORLD_SIZE": "4",
            "OMPI_COMM_WORLD_LOCAL_RANK": "0",
            "MASTER_ADDR": "h0",
        }
    )
    assert (ompi.rank, ompi.world_size, ompi.local_rank, ompi.launcher, ompi.master_addr) == (
        2,
        4,
        0,
        "openmpi",
        "h0",
    )
    pmi = detect_launcher_env({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1"})
    assert (pmi.rank, pmi.world_size, pmi.local_rank, pmi.launcher) == (1, 2, 1, "mpich")


def test_torchrun_env_wins_over_slurm_when_both_are_set():
    # torchrun inside an sbatch allocation: the per-process RANK is the truth
    info = detect_launcher_env(
        {"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    )
    assert (info.rank, info.world_size, info.launcher) == (1, 2, "torchrun/deepspeed")


def test_start_process_seeds_each_rank_and_checks_the_device(monkeypatch):
    # rank 1 of 2 under torchrun (the process group itself is left out: one process here)
    import random

    import numpy as np
    import torch

    from megapt.config import ConfigError, load_config
    from megapt.train import dist, process

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "init_distributed", lambda info, device, timeout_s: None)
    monkeypatch.setattr(dist, "rank", lambda: 1)
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    cfg = load_config([], ["--train.device=cpu", "--run.seed=7"])

    def draws():
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    proc = process.start_process(cfg)
    assert (proc.rank, proc.world_size, proc.device, proc.info.launcher) == (
        1,
        2,
        "cpu",
        "torchrun/deepspeed",
    )
    per_rank = draws()
    process.start_process(cfg, same_seed=True)  # fine-tuning: the same seed on every rank
    same = draws()
    random.seed(8), np.random.seed(8), torch.manual_seed(8)
    assert per_rank == draws()  # run.seed + rank
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    assert same == draws()
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="train.device"):
            process.start_process(load_config([], ["--train.device=cuda"]))
