"""Kernel tests run on CPU through the Triton interpreter when no CUDA device is present.

Triton picks interpreter-or-compiler when a ``@triton.jit`` function is decorated, including
its own ``tl.sum``/``tl.max`` helpers at ``import triton``. So TRITON_INTERPRET=1 must be set
before triton is first imported. This conftest sets it; megapt kernel modules imported earlier
are reloaded. If triton itself was imported earlier in this process (by a test collected
before this directory), the interpreter cannot be switched on any more: every kernel test then
fails with an explanation instead of crashing inside triton.
"""

import importlib
import os
import sys

import pytest
import torch

_TOO_LATE = None

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        _TOO_LATE = (
            "triton was imported before tests/unit/kernels/conftest.py could set TRITON_INTERPRET=1, "
            "so the CPU interpreter is unavailable in this process. Run `TRITON_INTERPRET=1 pytest ...` "
            "or run tests/unit/kernels in its own pytest invocation."
        )
    os.environ["TRITON_INTERPRET"] = "1"
    for _name in sorted(n for n in list(sys.modules) if n.startswith("megapt.kernels.")):
        _mod = sys.modules[_name]
        if _mod is not None and not _name.endswith("._common"):
            importlib.reload(_mod)


@pytest.fixture(autouse=True)
def _interpreter_available():
    if _TOO_LATE:
        pytest.fail(_TOO_LATE)


def pytest_collection_modifyitems(config, items):
    # Triton versions whose interpreter cannot run here: say why instead of failing inside triton.
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    from megapt.kernels._common import _version_tuple, interpreter_problem

    problem = interpreter_problem()
    try:
        import importlib.metadata

        old_autotuner = _version_tuple(importlib.metadata.version("triton")) < (3, 8)
    except importlib.metadata.PackageNotFoundError:
        old_autotuner = False
    for item in items:
        if "tests/unit/kernels/" not in item.nodeid.replace("\\", "/"):
            continue
        if problem and not any(
            k in item.nodeid for k in ("aot_compile", "cuda_ext")
        ):  # no interpreter there
            item.add_marker(pytest.mark.skip(reason=problem))
        elif old_autotuner and item.get_closest_marker("interpreter_autotune"):
            item.add_marker(
                pytest.mark.skip(
                    reason="triton < 3.8's autotuner asks for a GPU driver even under "
                    "TRITON_INTERPRET=1 (3.6, 3.7 seen); runs with triton >= 3.8"
                )
            )
