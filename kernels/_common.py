"""Helpers shared by the Triton kernels: device checks, block sizes, the interpreter switch.

Triton reads ``TRITON_INTERPRET`` when a ``@triton.jit`` function is *decorated*, so the
interpreter (CPU, numpy) is used only if the variable was ``1`` before the kernel module was
imported. ``kernel_runs_on_cpu`` asks the decorated kernel itself, so a CPU tensor is accepted
exactly when the launch would really run.
"""

from __future__ import annotations

import torch

try:  # triton ships with the [gpu] and [dev] extras; the pure-torch paths work without it
    import triton

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on installs without triton
    triton = None
    HAS_TRITON = False

# Largest row a single program holds in registers (same bound as Liger's MAX_FUSED_SIZE).
MAX_FUSED_SIZE = 65536


def require_triton(op: str) -> None:
    if not HAS_TRITON:
        raise ImportError(
            f"megapt.kernels.{op} needs triton; install it with `pip install -e .[gpu]` "
            "or pick the `eager`/`sdpa`/`chunked` backend"
        )


def _version_tuple(text: str) -> tuple[int, ...]:
    import re

    return tuple(int(x) for x in re.findall(r"\d+", text.split("+")[0])[:3])


def interpreter_problem() -> str | None:
    """Why Triton's CPU interpreter cannot run our kernels in this environment, or None.

    Triton < 3.7's interpreter turns 1-element arrays into Python ints with ``int()``, which numpy
    >= 2.3 refuses ("only 0-dimensional arrays can be converted to Python scalars"): every kernel
    fails inside triton. Seen with triton 3.6.0 + numpy 2.4.6; 3.7.0 and later work. Only the
    interpreter is affected: compiled GPU kernels do not go through numpy. Reads package metadata
    only (importing triton here would fix the interpreter switch too early)."""
    import importlib.metadata

    try:
        tv = importlib.metadata.version("triton")
        nv = importlib.metadata.version("numpy")
    except importlib.metadata.PackageNotFoundError:
        return None
    if _version_tuple(tv) < (3, 7) and _version_tuple(nv) >= (2, 3):
        return (
            f"Triton {tv}'s CPU interpreter (TRITON_INTERPRET=1) does not work with numpy {nv} (>= 2.3): "
            "install triton>=3.7 or numpy<2.3 to run the kernels on CPU"
        )
    return None


def kernel_runs_on_cpu(kernel) -> bool:
    """True when ``kernel`` was decorated under TRITON_INTERPRET=1 (runs on CPU tensors)."""
    fn = getattr(kernel, "fn", kernel)  # an Autotuner wraps the jit function in .fn
    return (
        type(kernel).__name__ == "InterpretedFunction" or type(fn).__name__ == "InterpretedFunction"
    )


def check_device(op: str, kernel, *tensors: torch.Tensor) -> None:
    """Raise a ValueError before launch when the tensors cannot run through ``kernel``."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(
            f"megapt.kernels.{op}: all inputs must be on one device, got {sorted(map(str, devices))}"
        )
    (device,) = devices
    if device.type == "cuda":
        if kernel_runs_on_cpu(kernel):
            raise ValueError(
                f"megapt.kernels.{op}: kernels were built for the Triton interpreter (TRITON_INTERPRET=1 "
                "at import) and cannot take CUDA tensors; unset TRITON_INTERPRET and restart"
            )
        return
    if device.type == "cpu" and kernel_runs_on_cpu(kernel):
        problem = interpreter_problem()
        if problem:
            raise RuntimeError(f"megapt.kernels.{op}: {problem}")
        return
    raise ValueError(
        f"megapt.kernels.{op}: got {device.type} tensors; the Triton kernels need CUDA tensors "
        "(or, for CPU tests, TRITON_INTERPRET=1 set before megapt.kernels is imported). "
        "On CPU use the `eager`/`chunked` backend."
    )


def check_dtype(op: str, allowed: tuple[torch.dtype, ...], **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.dtype not in allowed:
            names = ", ".join(str(d).replace("torch.", "") for d in allowed)
            raise ValueError(f"megapt.kernels.{op}: {name} has dtype {t.dtype}; supported: {names}")


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def row_block_settings(n_cols: int, op: str) -> tuple[int, int]:
    """(BLOCK_SIZE, num_warps) for a kernel that keeps one row of ``n_cols`` in registers."""
    block = next_power_of_2(n_cols)
    if block > MAX_FUSED_SIZE:
        raise ValueError(
            f"megapt.kernels.{op}: rows of {n_cols} elements exceed the fused limit {MAX_FUSED_SIZE}"
        )
    num_warps = 4
    if block >= 32768:
        num_warps = 32
    elif block >= 8192:
        num_warps = 16
    elif block >= 2048:
        num_warps = 8
    return block, num_warps


def num_programs_for_reduction(device: torch.device, n_rows: int) -> int:
    """How many programs share the rows of a cross-row reduction (one partial sum each)."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(n_rows, sms * 2))
    return max(1, min(n_rows, 4))  # interpreter: few programs, still > 1 so the reduction is tested
