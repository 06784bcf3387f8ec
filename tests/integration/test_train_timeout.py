"""A stalled rank makes its peers fail with an error after train.collective_timeout_s, not hang."""

import multiprocessing as mp
import os
import socket
import time

import pytest

TIMEOUT, STALL = 20, 150


def _worker(rank, port, q):
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    from megapt.train import dist

    try:  # the timeout also bounds the rendezvous: generous enough for a loaded CI machine
        dist.init_distributed(dist.detect_launcher_env(), "cpu", timeout_s=TIMEOUT)
    except Exception as exc:  # noqa: BLE001 - reported to the test through the queue
        q.put(("init failed: " + str(exc)[:200], -1.0))
        return
    if rank == 1:
        time.sleep(STALL)  # stalled: never joins the collective
        return
    t0 = time.time()
    try:
        dist.barrier()
        q.put(("no error", time.time() - t0))
    except Exception as exc:  # noqa: BLE001 - gloo raises on timeout (type varies by version)
        q.put((type(exc).__name__ + ": " + str(exc)[:200], time.time() - t0))


@pytest.mark.timeout(240)
def test_stalled_rank_times_out_with_an_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, port, q), daemon=True) for r in (0, 1)]
    for p in procs:
        p.start()
    msg, waited = q.get(timeout=200)
    for p in procs:
        p.kill()
        p.join(10)
    assert waited >= 0, msg
    assert msg != "no error"
    assert waited < STALL - 30, (
        msg,
        waited,
    )  # failed after the collective timeout, long before the stall ended
