"""Worker processes die with the process that started them.

A DataLoader worker (or a tokenizer pool worker) whose parent is killed (SIGKILL, OOM killer, a
node agent) would otherwise live on as an orphan: torch's own check runs only between batches,
and a worker whose result pipe is full blocks at exit forever (~300 MB each, files still open).
``die_with_parent(parent_pid)``, called first thing in the worker, arranges two things:

* Linux ``prctl(PR_SET_PDEATHSIG, SIGKILL)``: the kernel kills the worker the moment its parent
  exits (strictly: the parent *thread* that forked it; megapt starts workers from the thread that
  iterates, which lives as long as the loader is used);
* a daemon thread that checks every ``interval`` seconds that the parent is still ``parent_pid``
  (it is not once the worker has been re-parented) and ends the worker if not: the fallback on
  systems without prctl.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import threading

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _set_pdeathsig(sig: int) -> bool:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):  # not Linux / no libc prctl: the watchdog thread remains
        return False


def _watch(parent_pid: int, interval: float) -> None:
    ev = threading.Event()
    while not ev.wait(interval):
        if os.getppid() != parent_pid:
            os._exit(1)  # no cleanup: a queue's feeder thread may block on a pipe nobody reads


def die_with_parent(parent_pid: int, interval: float = 1.0) -> None:
    """Make this (worker) process end when ``parent_pid`` is no longer its parent."""
    _set_pdeathsig(signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)
    threading.Thread(
        target=_watch, args=(parent_pid, interval), daemon=True, name="megapt-parent-watch"
    ).start()
