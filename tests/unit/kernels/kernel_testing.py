"""Tolerance helper for the kernel tests.

A kernel's error against the fp32 reference must stay within ``factor`` times the error of
the same math done by PyTorch at the kernel's dtype, plus a small ``atol``: low-precision
inputs are compared with what PyTorch itself would get, not with an arbitrary constant.
"""

import os

import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETED else "cuda"
# The interpreter emulates fp32/fp16 only (bf16 loads are wrong there): bf16 runs on GPU only.
DTYPES = (
    [torch.float32, torch.float16]
    if INTERPRETED
    else [torch.float32, torch.float16, torch.bfloat16]
)
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def assert_close_rel_torch(name, out, ref32, torch_lowp, factor=2.0, atol=None):
    """|out - ref32| <= factor * |torch_lowp - ref32| + atol (max norms)."""
    assert out.shape == ref32.shape, (name, out.shape, ref32.shape)
    assert torch.isfinite(out.float()).all(), f"{name}: non-finite values"
    atol = ATOL[out.dtype] if atol is None else atol
    err = max_err(out, ref32)
    base = max_err(torch_lowp, ref32)
    scale = ref32.float().abs().max().item()
    bound = factor * base + atol * max(1.0, scale)
    assert err <= bound, (
        f"{name}: kernel err {err:.3e} > {factor} x torch {out.dtype} err {base:.3e} + atol ({bound:.3e})"
    )
