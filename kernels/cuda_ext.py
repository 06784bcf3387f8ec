"""Fused RMSNorm as a CUDA C++ extension, built on first use with torch.utils.cpp_extension.load.

Sources (package data): csrc/rms_norm_cuda.cu (kernels, header-light), csrc/rms_norm.h
(plain C++ launcher interface), csrc/rms_norm_binding.cpp (torch binding). The build lands in
torch's extension cache (``TORCH_EXTENSIONS_DIR``) and is reused by later processes.

    rms_norm(x (..., C), weight (C,), eps) -> y (..., C)     same contract as the Triton kernel
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from pathlib import Path

import torch

from .rms_norm import rms_norm_ref  # noqa: F401  (the reference the tests hold this to)

log = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = (CSRC / "rms_norm_binding.cpp", CSRC / "rms_norm_cuda.cu")
EXT_NAME = "megapt_rms_norm_cuda"
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_ext = None
_lock = threading.Lock()


def extension_available() -> tuple[bool, str]:
    """(True, "") when the extension can be built here, else (False, why)."""
    if not torch.cuda.is_available():
        return False, "no CUDA device is visible to torch"
    if torch.version.cuda is None:
        return False, "this torch build has no CUDA support"
    from torch.utils.cpp_extension import CUDA_HOME, is_ninja_available

    if CUDA_HOME is None and shutil.which("nvcc") is None:
        return False, "nvcc was not found (set CUDA_HOME or put nvcc on PATH)"
    if not is_ninja_available():
        return False, "ninja is not installed (torch builds extensions with it): pip install ninja"
    return True, ""


def load_extension(verbose: bool = False):
    """Build (first call, ~1 min) or load the cached extension module."""
    global _ext
    if _ext is not None:
        return _ext
    ok, why = extension_available()
    if not ok:
        raise RuntimeError(
            f"megapt.kernels.cuda_ext: cannot build the CUDA RMSNorm extension: {why}; "
            "use the `triton` or `eager` norm backend"
        )
    with _lock:
        if _ext is None:
            from torch.utils.cpp_extension import load

            major, minor = torch.cuda.get_device_capability()
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")
            log.info(
                "building %s for sm_%d%d (cached after the first build)", EXT_NAME, major, minor
            )
            _ext = load(
                name=EXT_NAME,
                sources=[str(s) for s in SOURCES],
                extra_include_paths=[str(CSRC)],
                extra_cflags=["-O3"],
                extra_cuda_cflags=["-O3"],
                verbose=verbose,
            )
    return _ext


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dtype not in _DTYPES or weight.dtype not in _DTYPES:
        raise ValueError(
            f"megapt.kernels.cuda.rms_norm: dtypes {x.dtype}/{weight.dtype}; supported: fp32, fp16, bf16"
        )
    if weight.dtype != x.dtype and weight.dtype != torch.float32:
        raise ValueError(
            f"megapt.kernels.cuda.rms_norm: weight dtype {weight.dtype} must equal x dtype {x.dtype} or be fp32"
        )
    if weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(
            f"megapt.kernels.cuda.rms_norm: weight shape {tuple(weight.shape)} does not match the "
            f"last dim of x {tuple(x.shape)}"
        )
    if x.device.type != "cuda" or weight.device != x.device:
        raise ValueError(
            f"megapt.kernels.cuda.rms_norm: needs x and weight on one CUDA device, got {x.device} "
            f"and {weight.device}"
        )


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


class CudaRMSNormFunction(torch.autograd.Function):
    """x (..., C), weight (C,), eps -> y (..., C); saves x, weight, rstd (N,) fp32."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        ext = load_extension()
        with torch.cuda.device(x.device):
            y, rstd = ext.forward(x, weight, float(eps), _stream(x.device))
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        with torch.cuda.device(x.device):
            dx, dw = load_extension().backward(dy.contiguous(), x, weight, rstd, _stream(x.device))
        return dx, dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Fused RMSNorm through the CUDA extension (built on first call)."""
    _check(x, weight)
    return CudaRMSNormFunction.apply(x, weight, eps)
