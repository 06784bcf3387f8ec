"""Who am I in the job? Rank/world detection for every launcher we support, and process-group set-up.

Launchers and the variables they set (first match wins, in this order):

    deepspeed / torchrun   RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
    Slurm srun             SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_NODELIST (first host = master)
    Open MPI / mpirun      OMPI_COMM_WORLD_RANK, OMPI_COMM_WORLD_SIZE, OMPI_COMM_WORLD_LOCAL_RANK
    MPICH / Intel MPI      PMI_RANK, PMI_SIZE, MPI_LOCALRANKID
    plain `python`         single process: rank 0 of 1

``init_distributed`` exports the detected values as RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* (so DeepSpeed
and torch see one consistent picture) and creates the default process group: gloo on CPU, nccl on
CUDA, with ``timeout`` so a stalled rank fails with an error naming the collective instead of hanging.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NoReturn

log = logging.getLogger("megapt.train")

DEFAULT_PORT = 29500
_GROUP_MADE = False  # init_distributed created a process group in this process


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    launcher: str  # "torchrun/deepspeed" | "slurm" | "openmpi" | "mpich" | "single"
    master_addr: str
    master_port: int

    def describe(self) -> str:
        return (
            f"launcher={self.launcher} rank={self.rank}/{self.world_size} local_rank={self.local_rank} "
            f"master={self.master_addr}:{self.master_port}"
        )


def _int(env: Mapping[str, str], *names: str, default: int) -> int:
    for n in names:
        if env.get(n, "") != "":
            return int(env[n])
    return default


def first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm node list. Uses ``scontrol show hostnames`` when present, else parses
    the compressed syntax: ``node[003-005,007],gpu01`` -> ``node003``; ``a-[1-2]`` -> ``a-1``."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout.split()
            if out:
                return out[0]
        except (subprocess.SubprocessError, OSError):
            pass
    # first comma-separated entry at bracket depth 0
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            end = i
            break
    first = nodelist[:end].strip()
    m = re.match(r"^(.*?)\[([^\]]+)\](.*)$", first)
    if not m:
        return first
    prefix, ranges, suffix = m.groups()
    lo = ranges.split(",")[0].split("-")[0]
    return f"{prefix}{lo}{suffix}"


def detect_launcher_env(env: Mapping[str, str] | None = None) -> DistInfo:
    """Read rank/world/local rank/master from the environment (see module docstring)."""
    env = os.environ if env is None else env
    port = _int(env, "MASTER_PORT", default=DEFAULT_PORT)
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistInfo(
            int(env["RANK"]),
            int(env["WORLD_SIZE"]),
            _int(env, "LOCAL_RANK", default=0),
            "torchrun/deepspeed",
            env.get("MASTER_ADDR", "127.0.0.1"),
            port,
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = (
            env.get("SLURM_STEP_NODELIST")
            or env.get("SLURM_JOB_NODELIST")
            or env.get("SLURM_NODELIST", "")
        )
        master = env.get("MASTER_ADDR") or (first_slurm_host(nodelist) if nodelist else "127.0.0.1")
        if "MASTER_PORT" not in env and env.get("SLURM_JOB_ID"):
            port = (
                20000 + int(env["SLURM_JOB_ID"]) % 20000
            )  # same on every task, differs between jobs
        return DistInfo(
            int(env["SLURM_PROCID"]),
            int(env["SLURM_NTASKS"]),
            _int(env, "SLURM_LOCALID", default=0),
            "slurm",
            master,
            port,
        )
    if "OMPI_COMM_WORLD_RANK" in env:
        return DistInfo(
            int(env["OMPI_COMM_WORLD_RANK"]),
            int(env["OMPI_COMM_WORLD_SIZE"]),
            _int(env, "OMPI_COMM_WORLD_LOCAL_RANK", default=0),
            "openmpi",
            env.get("MASTER_ADDR", "127.0.0.1"),
            port,
        )
    if "PMI_RANK" in env:
        return DistInfo(
            int(env["PMI_RANK"]),
            int(env["PMI_SIZE"]),
            _int(env, "MPI_LOCALRANKID", "PMI_LOCAL_RANK", default=0),
            "mpich",
            env.get("MASTER_ADDR", "127.0.0.1"),
            port,
        )
    return DistInfo(0, 1, 0, "single", "127.0.0.1", port)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_EXPORTED: dict[str, str] = {}  # what init_distributed put into os.environ


def init_distributed(info: DistInfo, device: str, timeout_s: int) -> None:
    """Export the env DeepSpeed/torch read and create the default process group (idempotent)."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        # the group exists (an earlier call in this process): put back the variables DeepSpeed
        # reads at every initialize, in case the caller's environment was reset since
        for k, v in _EXPORTED.items():
            os.environ.setdefault(k, v)
        return
    if info.launcher == "single" and "MASTER_PORT" not in os.environ:
        # A lone process still needs a (one-member) group for DeepSpeed; pick a free port so two
        # single-process runs on one machine don't collide.
        info = DistInfo(0, 1, 0, "single", "127.0.0.1", free_port())
    _EXPORTED.clear()
    _EXPORTED.update(
        RANK=str(info.rank),
        WORLD_SIZE=str(info.world_size),
        LOCAL_RANK=str(info.local_rank),
        LOCAL_SIZE=os.environ.get("LOCAL_SIZE", str(info.world_size)),
        MASTER_ADDR=info.master_addr,
        MASTER_PORT=str(info.master_port),
    )
    os.environ.update(_EXPORTED)
    if device == "cuda":
        torch.cuda.set_device(info.local_rank)
    backend = "nccl" if device == "cuda" else "gloo"
    # The timeout must reach every group, not only the default one: DeepSpeed reduces gradients on
    # groups it makes later with new_group() and no timeout, which take torch's module defaults.
    from torch.distributed import distributed_c10d

    timeout = datetime.timedelta(seconds=timeout_s)
    distributed_c10d.default_pg_timeout = timeout
    distributed_c10d.default_pg_nccl_timeout = timeout
    dist.init_process_group(
        backend=backend, rank=info.rank, world_size=info.world_size, timeout=timeout
    )
    global _GROUP_MADE
    _GROUP_MADE = True
    log.info(
        "process group: backend=%s %s collective_timeout=%ss", backend, info.describe(), timeout_s
    )


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_gather_object(obj):
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def broadcast_object(obj, src: int = 0):
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


def destroy() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End a process with ``code``; the last thing a command-line entry point does.

    A process that made a process group destroys it, flushes its logs and output, and leaves with
    ``os._exit``, skipping the interpreter's tear-down. Objects that outlive
    ``destroy_process_group`` (DeepSpeed and the engines keep references to groups) are otherwise
    freed during that tear-down, and gloo's worker threads, still holding finished work with
    tensors in it, then take the GIL of a half-destroyed interpreter: the process aborts
    ("terminate called without an active exception", SIGABRT) after the run succeeded, and the
    launcher reports the job failed. Everything megapt writes is closed before this point
    (checkpoints, metrics, TensorBoard); loader workers die with their parent
    (megapt.data.workers). Processes without a group exit normally."""
    dist = sys.modules.get("torch.distributed")  # not imported: no group (and no torch import)
    made = _GROUP_MADE or (dist is not None and dist.is_available() and dist.is_initialized())
    if not made:
        sys.exit(code)
    destroy()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or a broken pipe: nothing left to save
            pass
    os._exit(code)
