"""Worker processes die with their parent (megapt.data.workers): by the kernel's parent-death
signal, and by the watchdog thread alone where prctl is not available."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

CHILD = """
import os, sys, time
sys.path.insert(0, {root!r})
import megapt.data.workers as w
if {no_prctl}:
    w._set_pdeathsig = lambda sig: False  # the watchdog thread alone
parent = os.getpid()
pid = os.fork()
if pid == 0:
    w.die_with_parent(parent, interval={interval})
    time.sleep(120)
    os._exit(0)
print(pid, flush=True)
time.sleep(0.5)
os._exit(0)  # the parent dies, without waiting for its child
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize(
    "no_prctl,interval", [(False, 3600.0), (True, 0.2)], ids=["pdeathsig", "watchdog"]
)
def test_a_worker_ends_when_its_parent_dies(no_prctl, interval):
    code = CHILD.format(root=str(ROOT), no_prctl=no_prctl, interval=interval)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    child = int(r.stdout.split()[0])
    t0 = time.time()
    while _alive(child) and time.time() - t0 < 5:
        time.sleep(0.05)
    alive = _alive(child)
    if alive:
        import os
        import signal

        os.kill(child, signal.SIGKILL)
    assert not alive, "the child outlived its parent by 5 s"
