"""Pre-emption: SIGTERM / SIGUSR1 (Slurm's warning signals) -> checkpoint at the next step boundary.

A signal only sets a flag (async-signal safe). At each step boundary the trainer calls
``handler.should_stop()``, which all-reduces the flag so every rank agrees on the same step even
when only one rank got the signal; the trainer then saves a checkpoint on all ranks, writes the
pre-emption marker and exits with ``PREEMPT_EXIT_CODE``.

The marker is what the Slurm scripts requeue on, not the exit code: srun reports whichever rank it
sees end first (with --kill-on-bad-exit it may SIGTERM the others and return 143), so the exit code
of the step says nothing reliable. ``mark_saved`` writes the file named by
``$MEGAPT_PREEMPT_MARKER`` (set by launch/slurm_body.sh, one name per job id and restart) on rank 0
only after every rank has finished the save, so its presence alone means "a complete checkpoint of
this run exists: requeue".
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger("megapt")

# EX_TEMPFAIL from sysexits.h: "try again later" (after a complete pre-emption save).
PREEMPT_EXIT_CODE = 75
# Environment variable naming the marker file written after a complete pre-emption save.
MARKER_ENV = "MEGAPT_PREEMPT_MARKER"


class PreemptionHandler:
    def __init__(self, signals: Iterable[int] = (signal.SIGTERM, signal.SIGUSR1)):
        self.signals = tuple(signals)
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> PreemptionHandler:
        for sig in self.signals:
            try:
                self._previous[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread (e.g. inside a notebook worker)
                log.warning(
                    "cannot install a handler for %s outside the main thread",
                    signal.Signals(sig).name,
                )
        return self

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)  # type: ignore[arg-type]
        self._previous.clear()

    def _on_signal(self, signum, frame) -> None:
        self.received = signum

    def should_stop(self) -> bool:
        """True on every rank when any rank was signalled (a collective: call it on all ranks)."""
        flag = 1.0 if self.received is not None else 0.0
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor([flag])
            if dist.get_backend() == "nccl":
                t = t.cuda()
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = float(t.item())
        return flag > 0

    @property
    def signal_name(self) -> str:
        return (
            signal.Signals(self.received).name
            if self.received is not None
            else "a peer rank's signal"
        )


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def mark_saved(
    step: int, checkpoint: Path | None, env: Mapping[str, str] | None = None
) -> Path | None:
    """Collective, after the pre-emption save returned on every rank: rank 0 writes the marker
    named by ``$MEGAPT_PREEMPT_MARKER`` (nothing when unset). A second barrier keeps every rank
    alive until the marker exists, so a launcher that kills the step when the first rank exits can
    never see the save without its marker. Returns the marker path on rank 0 when written."""
    env = os.environ if env is None else env
    target = env.get(MARKER_ENV, "")
    _barrier()  # every rank is past the save (or had nothing left to save)
    written = None
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if target and rank == 0:
        path = Path(target)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            line = f"step={step} checkpoint={checkpoint} time={time.time():.3f}\n"
            tmp.write_text(line, encoding="utf-8")
            os.replace(tmp, path)
            written = path
            log.info("pre-emption marker written: %s (checkpoint %s)", path, checkpoint)
        except OSError as exc:  # the checkpoint is safe; without the marker the job is not requeued
            log.error(
                "cannot write the pre-emption marker %s (%s): the job will not be requeued; "
                "resubmit with --resume to continue from %s",
                path,
                exc,
                checkpoint,
            )
    _barrier()
    return written
