"""Shared test fixtures. Every test runs on CPU unless marked `gpu`."""

import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Without a GPU, Triton kernels run through its interpreter. This must be set before anything
# imports triton (collection order is not ours to choose), so it is decided here from the
# device files rather than from torch.cuda.
if not os.path.exists("/dev/nvidiactl") and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - no usable torch: no CUDA  # pragma: no cover
        has_cuda = False
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip)


_DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _restore_launcher_env():
    # megapt.train.dist.init_distributed exports RANK/MASTER_PORT/... into os.environ (DeepSpeed reads
    # them). A test that sets up a process group in the pytest process would otherwise hand its
    # MASTER_PORT, still bound by that group, to every later subprocess: EADDRINUSE at their start.
    saved = {k: os.environ.get(k) for k in _DIST_ENV}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(autouse=True)
def _restore_megapt_logger():
    # megapt.train.process.setup_logging (train / finetune / bench run in the pytest process) gives
    # the "megapt" logger its own stderr handler and stops propagation; a later test's caplog
    # listens at the root logger, so each test gets the logger back as it found it.
    import logging

    log = logging.getLogger("megapt")
    handlers, level, propagate = list(log.handlers), log.level, log.propagate
    yield
    log.handlers[:] = handlers
    log.setLevel(level)
    log.propagate = propagate
