"""Fused RMSNorm forward and backward in Triton (Liger layout: jit kernels, launcher, Function).

    y = (x / sqrt(mean(x**2, -1) + eps)).to(x.dtype) * w          (HF Llama / Liger "llama" casting)

The statistics are computed in fp32; the normalised row is rounded to ``x.dtype`` before the
weight multiplies it, exactly like HF ``LlamaRMSNorm`` and the model's eager path, so the
backends agree bit-for-bit up to the last multiply. The output is ``x.dtype``.
``rms_norm_ref`` is the same formula in plain PyTorch. The backward reduces the weight gradient
across rows with one fp32 partial sum per program (deterministic, no atomics) and a final
``sum(0)``.
"""

from __future__ import annotations

import torch

from ._common import (
    HAS_TRITON,
    check_device,
    check_dtype,
    num_programs_for_reduction,
    require_triton,
    row_block_settings,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Plain PyTorch RMSNorm (fp32 statistics, Llama casting), output in ``x.dtype``.

    x (..., C), weight (C,). fp64 inputs stay fp64 (gradient checks).
    """
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return ((xf * rstd).to(x.dtype) * weight).to(x.dtype)


# ----------------------------------------------------------------------------- jit kernels
if HAS_TRITON:

    @triton.jit
    def _rms_norm_fwd_kernel(
        X,
        W,
        Y,
        RSTD,
        stride_x,
        stride_y,
        n_cols,
        eps,
        BLOCK_SIZE: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_SIZE)
        mask = cols < n_cols
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        tl.store(RSTD + row, rstd)
        x_hat = (x * rstd).to(Y.dtype.element_ty).to(tl.float32)  # rounded like HF Llama
        y = x_hat * w
        tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _rms_norm_bwd_kernel(
        DY,
        X,
        W,
        RSTD,
        DX,
        DW_PARTIAL,
        stride_dy,
        stride_x,
        stride_dx,
        n_rows,
        n_cols,
        rows_per_program,
        BLOCK_SIZE: tl.constexpr,
    ):
        # Each program walks a contiguous range of rows and keeps its share of dW in fp32.
        pid = tl.program_id(0)
        row_start = pid * rows_per_program
        row_end = tl.minimum(row_start + rows_per_program, n_rows)
        cols = tl.arange(0, BLOCK_SIZE)
        mask = cols < n_cols
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw_acc = tl.zeros((BLOCK_SIZE,), dtype=tl.float32)
        for row in range(row_start, row_end):
            row64 = tl.cast(row, tl.int64)
            x = tl.load(X + row64 * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + row64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row64)
            x_hat = x * rstd
            dyw = dy * w
            # dx = rstd * (dy*w - x_hat * mean(dy*w*x_hat))
            dx = rstd * (dyw - x_hat * (tl.sum(dyw * x_hat, axis=0) / n_cols))
            tl.store(DX + row64 * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
            dw_acc += dy * x_hat.to(DX.dtype.element_ty).to(
                tl.float32
            )  # the rounded x_hat the forward used
        tl.store(DW_PARTIAL + tl.cast(pid, tl.int64) * n_cols + cols, dw_acc, mask=mask)


# ----------------------------------------------------------------------------- launchers
def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    require_triton("rms_norm")
    check_dtype("rms_norm", _DTYPES, x=x, weight=weight)
    if weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(
            f"megapt.kernels.rms_norm: weight shape {tuple(weight.shape)} does not match the last "
            f"dim of x {tuple(x.shape)}"
        )
    check_device("rms_norm", _rms_norm_fwd_kernel, x, weight)


def rms_norm_forward(x2d: torch.Tensor, weight: torch.Tensor, eps: float):
    """x2d (N, C) with unit column stride -> y (N, C) in x.dtype, rstd (N,) fp32."""
    n_rows, n_cols = x2d.shape
    block, num_warps = row_block_settings(n_cols, "rms_norm")
    y = torch.empty_like(x2d)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x2d.device)
    if n_rows:
        _rms_norm_fwd_kernel[(n_rows,)](
            x2d,
            weight,
            y,
            rstd,
            x2d.stride(0),
            y.stride(0),
            n_cols,
            eps,
            BLOCK_SIZE=block,
            num_warps=num_warps,
        )
    return y, rstd


def rms_norm_backward(
    dy2d: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
):
    """dy2d, x2d (N, C), weight (C,), rstd (N,) -> dx (N, C) in x.dtype, dw (C,) in weight.dtype."""
    n_rows, n_cols = x2d.shape
    block, num_warps = row_block_settings(n_cols, "rms_norm")
    n_prog = num_programs_for_reduction(x2d.device, n_rows)
    rows_per_program = -(-n_rows // n_prog) if n_rows else 0
    dx = torch.empty_like(x2d)
    dw_partial = torch.zeros((n_prog, n_cols), dtype=torch.float32, device=x2d.device)
    if n_rows:
        _rms_norm_bwd_kernel[(n_prog,)](
            dy2d,
            x2d,
            weight,
            rstd,
            dx,
            dw_partial,
            dy2d.stride(0),
            x2d.stride(0),
            dx.stride(0),
            n_rows,
            n_cols,
            rows_per_program,
            BLOCK_SIZE=block,
            num_warps=num_warps,
        )
    return dx, dw_partial.sum(0).to(weight.dtype)


# ----------------------------------------------------------------------------- autograd
class RMSNormFunction(torch.autograd.Function):
    """x (..., C), weight (C,), eps -> y (..., C) in x.dtype.

    Saves x, weight and rstd (N,) fp32; backward returns dx (..., C) and dweight (C,).
    """

    @staticmethod
    def forward(ctx, x, weight, eps):
        shape = x.shape
        x2d = x.reshape(-1, shape[-1])
        if x2d.stride(-1) != 1:
            x2d = x2d.contiguous()
        y, rstd = rms_norm_forward(x2d, weight, eps)
        ctx.save_for_backward(x2d, weight, rstd)
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, rstd = ctx.saved_tensors
        dy2d = dy.reshape(-1, x2d.shape[-1])
        if dy2d.stride(-1) != 1:
            dy2d = dy2d.contiguous()
        dx, dw = rms_norm_backward(dy2d, x2d, weight, rstd)
        return dx.view(dy.shape), dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Fused RMSNorm. x (..., C) fp32/fp16/bf16 on CUDA (or CPU under TRITON_INTERPRET=1)."""
    _check(x, weight)
    return RMSNormFunction.apply(x, weight, eps)
