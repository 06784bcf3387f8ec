"""Process set-up shared by `megapt train`, `megapt finetune` and the benchmark's engine runner:
launcher environment -> logging -> device -> process group -> seeds.

    proc = start_process(cfg)                   # every rank seeded with run.seed + rank
    proc = start_process(cfg, same_seed=True, log_level=logging.WARNING)  # fine-tuning: every
                                        # rank seeded with run.seed (heads / LoRA start identical)
    proc.device, proc.rank, proc.world_size
"""

from __future__ import annotations

import logging
import os
import random
import sys
from dataclasses import dataclass

import numpy as np
import torch

from megapt.config import Config, ConfigError
from megapt.train import dist

log = logging.getLogger("megapt.train")


@dataclass(frozen=True)
class Process:
    info: dist.DistInfo  # what the launcher's environment says
    device: str  # "cpu" or "cuda"
    rank: int
    world_size: int


def setup_logging(rank: int, all_ranks: bool, level: int = logging.INFO) -> None:
    """``level`` (INFO) on rank 0 (every rank with logging.all_ranks), WARNING elsewhere;
    DeepSpeed's chatter stays at WARNING. Messages go through tqdm.write so a progress bar is
    not broken."""

    class _Handler(logging.StreamHandler):
        def emit(self, record):
            try:
                from tqdm import tqdm

                tqdm.write(self.format(record), file=sys.stderr)
            except Exception:  # noqa: BLE001 - a log line must never raise  # pragma: no cover
                super().emit(record)

    root = logging.getLogger("megapt")
    for h in list(root.handlers):
        if getattr(h, "_megapt", False):
            root.removeHandler(h)
    h = _Handler()
    h._megapt = True  # type: ignore[attr-defined]
    h.setFormatter(logging.Formatter(f"[%(asctime)s rank{rank}] %(message)s", "%H:%M:%S"))
    root.addHandler(h)
    root.setLevel(level if (rank == 0 or all_ranks) else max(level, logging.WARNING))
    root.propagate = False
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    try:
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
    except Exception:  # noqa: BLE001 - deepspeed's import fails in many ways; its log level is cosmetic
        pass


def resolve_device(choice: str) -> str:
    """``train.device``: auto -> cuda when torch sees a GPU, else cpu; cuda without one is an error."""
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "train.device: 'cuda' requested but torch sees no CUDA device (set train.device=cpu)"
        )
    return choice


def seed_everything(seed: int) -> None:
    """Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def start_process(
    cfg: Config, *, same_seed: bool = False, log_level: int = logging.INFO
) -> Process:
    """Read the launcher's environment, set up logging (``log_level`` on rank 0: fine-tuning
    reports its own progress lines and logs warnings only), choose the device, create the default
    process group (gloo on CPU, nccl on CUDA, ``train.collective_timeout_s``) and seed the global
    generators with ``run.seed + rank`` (``run.seed`` on every rank with ``same_seed``)."""
    info = dist.detect_launcher_env()
    setup_logging(info.rank, cfg.logging.all_ranks, log_level)
    device = resolve_device(cfg.train.device)
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported
        if info.world_size > 1 and "OMP_NUM_THREADS" not in os.environ:
            # the deepspeed launcher does not set it; N ranks x all cores thrash
            torch.set_num_threads(1)
    log.info("distributed: %s (device %s)", info.describe(), device)
    dist.init_distributed(info, device, cfg.train.collective_timeout_s)
    rank, world = dist.rank(), dist.world_size()
    seed_everything(cfg.run.seed if same_seed else cfg.run.seed + rank)
    return Process(info, device, rank, world)
