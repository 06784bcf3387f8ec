"""Pre-emption: SIGTERM / SIGUSR1 (Slurm's warning signals) -> checkpoint at the next step boundary.

A signal only sets a flag (async-signal safe). At each step boundary the trainer calls
``handler.should_stop()``, which all-reduces the flag so every rank agrees on the same step even
when only one rank got the signal; the trainer then saves a checkpoint on all ranks and exits with
``PREEMPT_EXIT_CODE``, which launch/slurm scripts turn into ``scontrol requeue``.
"""
from __future__ import annotations

import logging
import signal
from typing import Iterable

import torch
import torch.distributed as dist

log = logging.getLogger("megapt")

# EX_TEMPFAIL from sysexits.h: "try again later". The Slurm scripts requeue on it.
PREEMPT_EXIT_CODE = 75


class PreemptionHandler:
    def __init__(self, signals: Iterable[int] = (signal.SIGTERM, signal.SIGUSR1)):
        self.signals = tuple(signals)
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> "PreemptionHandler":
        for sig in self.signals:
            try:
                self._previous[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread (e.g. inside a notebook worker)
                log.warning("cannot install a handler for %s outside the main thread", signal.Signals(sig).name)
        return self

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)  # type: ignore[arg-type]
        self._previous.clear()

    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002
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
        return signal.Signals(self.received).name if self.received is not None else "a peer rank's signal"
