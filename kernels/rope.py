"""Fused rotary position embedding (RoPE) for q and k in one launch, forward and backward.

Convention: HF Llama ``rotate_half`` (non-interleaved). With ``h = hs // 2``,
``x1 = x[..., :h]``, ``x2 = x[..., h:]`` and cos/sin of shape (T, h), or (B, T, h) for
per-sample positions (packed documents whose positions restart at 0, position_ids):

    out[..., :h] = x1 * cos - x2 * sin
    out[..., h:] = x2 * cos + x1 * sin

The backward is the inverse rotation (same kernel with sin -> -sin). One program handles one
token (b, t): all q heads and all k heads. Math in fp32, stored in the input dtype.
"""

from __future__ import annotations

import torch

from ._common import HAS_TRITON, check_device, check_dtype, next_power_of_2, require_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _rotate_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h].float(), x[..., h:].float()
    c = (
        cos.float()[None, :, None, :] if cos.dim() == 2 else cos.float()[:, :, None, :]
    )  # (1 or B, T, 1, h)
    s = sin.float()[None, :, None, :] if sin.dim() == 2 else sin.float()[:, :, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


def apply_rope_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Plain PyTorch RoPE. q (B, T, nh, hs), k (B, T, nkv, hs), cos/sin (T, hs // 2) or (B, T, hs // 2)."""
    return _rotate_ref(q, cos, sin), _rotate_ref(k, cos, sin)


# ----------------------------------------------------------------------------- jit kernel
if HAS_TRITON:

    @triton.jit
    def _rope_kernel(
        Q,
        K,
        QO,
        KO,
        COS,
        SIN,
        sq_b,
        sq_t,
        sq_h,
        sk_b,
        sk_t,
        sk_h,
        sqo_b,
        sqo_t,
        sqo_h,
        sko_b,
        sko_t,
        sko_h,
        scs_b,
        scs_t,
        T,
        NH,
        NKV,
        HALF: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_KV: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BACKWARD: tl.constexpr,
    ):
        pid = tl.program_id(0)
        b = tl.cast(pid // T, tl.int64)
        t = tl.cast(pid % T, tl.int64)
        d = tl.arange(0, BLOCK_D)
        d_mask = d < HALF
        cs = b * scs_b + t * scs_t  # scs_b = 0: one (T, h) table for the batch
        cos = tl.load(COS + cs + d, mask=d_mask, other=0.0).to(tl.float32)
        sin = tl.load(SIN + cs + d, mask=d_mask, other=0.0).to(tl.float32)
        if BACKWARD:
            sin = -sin
        cos2 = cos[None, :]
        sin2 = sin[None, :]

        # q heads: (BLOCK_H, BLOCK_D) tiles of the two halves
        h = tl.arange(0, BLOCK_H)
        m = (h[:, None] < NH) & d_mask[None, :]
        q_in = Q + b * sq_b + t * sq_t + h[:, None] * sq_h + d[None, :]
        q_out = QO + b * sqo_b + t * sqo_t + h[:, None] * sqo_h + d[None, :]
        q1 = tl.load(q_in, mask=m, other=0.0).to(tl.float32)
        q2 = tl.load(q_in + HALF, mask=m, other=0.0).to(tl.float32)
        tl.store(q_out, (q1 * cos2 - q2 * sin2).to(QO.dtype.element_ty), mask=m)
        tl.store(q_out + HALF, (q2 * cos2 + q1 * sin2).to(QO.dtype.element_ty), mask=m)

        hk = tl.arange(0, BLOCK_KV)
        mk = (hk[:, None] < NKV) & d_mask[None, :]
        k_in = K + b * sk_b + t * sk_t + hk[:, None] * sk_h + d[None, :]
        k_out = KO + b * sko_b + t * sko_t + hk[:, None] * sko_h + d[None, :]
        k1 = tl.load(k_in, mask=mk, other=0.0).to(tl.float32)
        k2 = tl.load(k_in + HALF, mask=mk, other=0.0).to(tl.float32)
        tl.store(k_out, (k1 * cos2 - k2 * sin2).to(KO.dtype.element_ty), mask=mk)
        tl.store(k_out + HALF, (k2 * cos2 + k1 * sin2).to(KO.dtype.element_ty), mask=mk)


# ----------------------------------------------------------------------------- launcher
def _check(q, k, cos, sin) -> None:
    require_triton("apply_rope")
    check_dtype("apply_rope", _DTYPES, q=q, k=k, cos=cos, sin=sin)
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(
            f"megapt.kernels.apply_rope: q and k must be (B, T, heads, hs), got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    B, T, _, hs = q.shape
    if k.shape[0] != B or k.shape[1] != T or k.shape[3] != hs:
        raise ValueError(
            f"megapt.kernels.apply_rope: k {tuple(k.shape)} must share B, T and hs with q {tuple(q.shape)}"
        )
    if hs % 2:
        raise ValueError(f"megapt.kernels.apply_rope: head size {hs} must be even")
    if cos.shape != sin.shape or tuple(cos.shape) not in ((T, hs // 2), (B, T, hs // 2)):
        raise ValueError(
            f"megapt.kernels.apply_rope: cos/sin must be (T, hs // 2) = {(T, hs // 2)} or per sample "
            f"(B, T, hs // 2) = {(B, T, hs // 2)}, got {tuple(cos.shape)} and {tuple(sin.shape)}"
        )
    check_device("apply_rope", _rope_kernel, q, k, cos, sin)


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def rope_launch(q, k, cos, sin, q_out, k_out, backward: bool = False) -> None:
    """Rotate q (B,T,nh,hs) into q_out and k (B,T,nkv,hs) into k_out (may alias the inputs).

    cos/sin (T, hs/2) or (B, T, hs/2), unit stride on the last dim."""
    B, T, nh, hs = q.shape
    nkv = k.shape[2]
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    if B * T == 0:
        return
    block_d = next_power_of_2(hs // 2)
    _rope_kernel[(B * T,)](
        q,
        k,
        q_out,
        k_out,
        cos,
        sin,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        q_out.stride(0),
        q_out.stride(1),
        q_out.stride(2),
        k_out.stride(0),
        k_out.stride(1),
        k_out.stride(2),
        cos.stride(0) if cos.dim() == 3 else 0,
        cos.stride(-2),
        T,
        nh,
        nkv,
        HALF=hs // 2,
        BLOCK_H=next_power_of_2(nh),
        BLOCK_KV=next_power_of_2(nkv),
        BLOCK_D=block_d,
        BACKWARD=backward,
        num_warps=4 if nh * hs <= 4096 else 8,
    )


# ----------------------------------------------------------------------------- autograd
class RoPEFunction(torch.autograd.Function):
    """Out of place. q (B, T, nh, hs), k (B, T, nkv, hs), cos/sin (T or B, T, hs // 2) -> (q_rot, k_rot).

    Saves cos/sin only; backward rotates dq_rot/dk_rot back (sin -> -sin).
    """

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        q, k, cos, sin = map(_unit_last, (q, k, cos, sin))
        q_out, k_out = torch.empty_like(q), torch.empty_like(k)
        rope_launch(q, k, cos, sin, q_out, k_out)
        ctx.save_for_backward(cos, sin)
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq, dk = _unit_last(dq), _unit_last(dk)
        dq_in, dk_in = torch.empty_like(dq), torch.empty_like(dk)
        rope_launch(dq, dk, cos, sin, dq_in, dk_in, backward=True)
        return dq_in, dk_in, None, None


class RoPEInplaceFunction(torch.autograd.Function):
    """In place: rotates q and k in their own storage (no new activation memory).

    Same shapes as RoPEFunction; q and k must have unit stride on the last dim.
    """

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        cos, sin = _unit_last(cos), _unit_last(sin)
        rope_launch(q, k, cos, sin, q, k)
        ctx.mark_dirty(q, k)
        ctx.save_for_backward(cos, sin)
        return q, k

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq, dk = _unit_last(dq), _unit_last(dk)
        dq_in, dk_in = torch.empty_like(dq), torch.empty_like(dk)
        rope_launch(dq, dk, cos, sin, dq_in, dk_in, backward=True)
        return dq_in, dk_in, None, None


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Fused RoPE on q (B, T, nh, hs) and k (B, T, nkv, hs); returns new (q_rot, k_rot).

    cos/sin: (T, hs // 2) shared by the batch, or (B, T, hs // 2) per sample (e.g. positions that
    restart at 0 in every packed document: ``cos_table[positions]``)."""
    _check(q, k, cos, sin)
    return RoPEFunction.apply(q, k, cos, sin)


def apply_rope_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """In-place fused RoPE; q and k are overwritten and returned. Same shapes as apply_rope."""
    _check(q, k, cos, sin)
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError(
            "megapt.kernels.apply_rope_: q and k need unit stride on the last dim for in-place use"
        )
    return RoPEInplaceFunction.apply(q, k, cos, sin)
