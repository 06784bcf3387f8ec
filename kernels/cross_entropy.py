"""Fused linear + cross-entropy: the (N, V) logits never exist at once.

``fused_linear_cross_entropy(hidden (N, C), weight (V, C), labels (N,))`` walks the rows in
chunks. For each chunk it computes ``logits = hidden_chunk @ weight.T`` (chunk, V), and a Triton
kernel turns those logits, in place, into d(loss)/d(logits) while producing the per-row loss
(online logsumexp in fp32). The chunk's gradients wrt hidden and weight are then two GEMMs, all
during the forward (Liger's approach), so the backward only scales the stored gradients by
grad_output. Loss = mean over rows whose label != ignore_index (0 when every row is ignored,
instead of PyTorch's NaN, so an all-padding micro-batch cannot poison a run).

``chunked_linear_cross_entropy`` is the same algorithm with the per-chunk softmax done by
PyTorch: no triton needed, runs on CPU (the model's ``chunked`` loss backend).
``fused_linear_cross_entropy_ref`` materialises the full logits (the reference).

Memory: grad_hidden (N, C) in hidden.dtype and an fp32 (V, C) weight-gradient accumulator live
from forward to backward (fp32 so that summing many chunks does not round at bf16 each time;
Liger accumulates in the weight dtype and needs half of that); per chunk one (chunk, V)
logits buffer and a bounded GEMM temporary (WGRAD_SLICE_ELEMENTS).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ._common import HAS_TRITON, check_device, check_dtype, next_power_of_2, require_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Half-precision weight-gradient GEMMs are split over vocab rows so their temporary stays below
# this many elements (128 MiB in bf16) before being added into the fp32 accumulator.
WGRAD_SLICE_ELEMENTS = 1 << 26


def fused_linear_cross_entropy_ref(
    hidden, weight, labels, ignore_index: int = -100, chunk_size=None
):
    """Full-logits PyTorch reference (fp32 softmax). hidden (N, C), weight (V, C), labels (N,)."""
    logits = (hidden @ weight.t()).float()  # (N, V)
    n_valid = (labels != ignore_index).sum().clamp(min=1)
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum") / n_valid


def default_chunk_size(n_rows: int, hidden_size: int, vocab_size: int) -> int:
    """Liger's heuristic: a chunk's logits take about as much memory as the hidden states."""
    inc_factor = -(-vocab_size // hidden_size)
    return max(1, next_power_of_2(-(-n_rows // inc_factor)))


# ----------------------------------------------------------------------------- jit kernel
if HAS_TRITON:

    @triton.jit
    def _ce_loss_grad_kernel(
        LOGITS,
        stride_l,
        LABELS,
        LOSS,
        SCALE,
        n_cols,
        ignore_index,
        BLOCK_SIZE: tl.constexpr,
        COMPUTE_GRAD: tl.constexpr,
    ):
        # One row of logits: loss = logsumexp(x) - x[y]; grad = (softmax(x) - onehot(y)) * scale.
        row = tl.cast(tl.program_id(0), tl.int64)
        ptr = LOGITS + row * stride_l
        label = tl.load(LABELS + row)
        valid = label != ignore_index
        cols = tl.arange(0, BLOCK_SIZE)

        m = tl.full((), float("-inf"), tl.float32)
        d = tl.full((), 0.0, tl.float32)
        for off in range(0, n_cols, BLOCK_SIZE):
            x = tl.load(ptr + off + cols, mask=off + cols < n_cols, other=float("-inf")).to(
                tl.float32
            )
            m_new = tl.maximum(m, tl.max(x, axis=0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        lse = m + tl.log(d)
        x_y = tl.load(ptr + label, mask=valid, other=0.0).to(tl.float32)
        tl.store(LOSS + row, tl.where(valid, lse - x_y, 0.0))

        if COMPUTE_GRAD:
            scale = tl.load(SCALE) * valid.to(tl.float32)
            for off in range(0, n_cols, BLOCK_SIZE):
                c = off + cols
                cmask = c < n_cols
                x = tl.load(ptr + c, mask=cmask, other=float("-inf")).to(tl.float32)
                g = tl.exp(x - lse)
                g = tl.where(c == label, g - 1.0, g) * scale
                tl.store(ptr + c, g.to(LOGITS.dtype.element_ty), mask=cmask)


def _ce_chunk_triton(logits, labels, scale, ignore_index, compute_grad):
    """logits (n, V) -> loss (n,) fp32; with compute_grad, logits become d(loss)/d(logits) in place."""
    n, V = logits.shape
    on_gpu = logits.device.type == "cuda"
    block = min(
        next_power_of_2(V), 32768 if on_gpu else 64
    )  # small blocks exercise the loop on CPU
    num_warps = 32 if block >= 32768 else (16 if block >= 8192 else 8)
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    _ce_loss_grad_kernel[(n,)](
        logits,
        logits.stride(0),
        labels,
        loss,
        scale,
        V,
        ignore_index,
        BLOCK_SIZE=block,
        COMPUTE_GRAD=compute_grad,
        num_warps=num_warps,
    )
    return loss, logits


def _ce_chunk_torch(logits, labels, scale, ignore_index, compute_grad):
    """PyTorch version of _ce_chunk_triton (fp32 softmax). Same contract, returns a new grad."""
    lf = logits.to(torch.promote_types(logits.dtype, torch.float32))
    lse = torch.logsumexp(lf, dim=-1)  # (n,)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    rows = torch.arange(lf.shape[0], device=lf.device)
    loss = torch.where(valid, lse - lf[rows, safe], torch.zeros_like(lse))
    if not compute_grad:
        return loss, None
    grad = torch.exp(lf.sub_(lse[:, None]))  # softmax, reusing the fp32 buffer
    grad[rows, safe] -= valid.to(grad.dtype)
    grad.mul_((scale * valid.to(grad.dtype))[:, None])
    return loss, grad.to(logits.dtype)


# ----------------------------------------------------------------------------- chunk driver
ChunkFn = Callable[..., tuple]


def _linear_ce_forward(
    hidden,
    weight,
    labels,
    ignore_index,
    chunk_size,
    chunk_fn: ChunkFn,
    grad_hidden_needed: bool,
    grad_weight_needed: bool,
):
    """Returns loss (scalar fp32), grad_hidden (N, C) | None, grad_weight (V, C) | None."""
    N, C = hidden.shape
    V = weight.shape[0]
    chunk = chunk_size or default_chunk_size(N, C, V)
    compute_grad = grad_hidden_needed or grad_weight_needed
    acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32 (fp64 for fp64 inputs)
    n_valid = (labels != ignore_index).sum()
    scale = (1.0 / n_valid.clamp(min=1).to(acc)).reshape(1)  # stays on device: no host sync
    loss_rows = torch.empty(N, dtype=acc, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if grad_hidden_needed else None
    grad_weight = torch.zeros(V, C, dtype=acc, device=weight.device) if grad_weight_needed else None
    for s in range(0, N, chunk):
        e = min(s + chunk, N)
        h = hidden[s:e]  # (n, C)
        logits = h @ weight.t()  # (n, V), hidden.dtype
        loss_c, grad_logits = chunk_fn(logits, labels[s:e], scale, ignore_index, compute_grad)
        loss_rows[s:e] = loss_c
        if grad_hidden is not None:  # grad_hidden_needed
            torch.mm(grad_logits, weight, out=grad_hidden[s:e])  # (n, C)
        if grad_weight is not None:  # grad_weight_needed
            if grad_logits.dtype == acc:
                grad_weight.addmm_(grad_logits.t(), h)  # (V, C)
            else:  # half-precision GEMMs over vocab slices, summed in fp32 (no (V, C) temporary)
                rows = max(1, WGRAD_SLICE_ELEMENTS // C)
                for vs in range(0, V, rows):
                    grad_weight[vs : vs + rows] += grad_logits[:, vs : vs + rows].t() @ h
    loss = loss_rows.sum() * scale[0]
    if grad_weight is not None:
        grad_weight = grad_weight.to(weight.dtype)
    return loss, grad_hidden, grad_weight


class LinearCrossEntropyFunction(torch.autograd.Function):
    """hidden (N, C), weight (V, C), labels (N,) -> mean CE loss (scalar, fp32; fp64 if inputs are).

    The forward stores grad_hidden (N, C) and grad_weight (V, C) computed chunk by chunk; the
    backward multiplies them by grad_output.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, chunk_size, chunk_fn):
        loss, gh, gw = _linear_ce_forward(
            hidden,
            weight,
            labels,
            ignore_index,
            chunk_size,
            chunk_fn,
            grad_hidden_needed=ctx.needs_input_grad[0],
            grad_weight_needed=ctx.needs_input_grad[1],
        )
        ctx.save_for_backward(gh, gw)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        gh, gw = ctx.saved_tensors
        g = grad_output
        gh = None if gh is None else (gh * g).to(gh.dtype)
        gw = None if gw is None else (gw * g).to(gw.dtype)
        return gh, gw, None, None, None, None


def _check(op, hidden, weight, labels, ignore_index, chunk_size, dtypes=_DTYPES):
    check_dtype(op, dtypes, hidden=hidden, weight=weight)
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"megapt.kernels.{op}: expected hidden (N, C) and weight (V, C), got "
            f"{tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if hidden.dtype != weight.dtype:
        raise ValueError(
            f"megapt.kernels.{op}: hidden is {hidden.dtype} but weight is {weight.dtype}"
        )
    if labels.shape != (hidden.shape[0],) or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"megapt.kernels.{op}: labels must be int64/int32 of shape ({hidden.shape[0]},), got "
            f"{labels.dtype} {tuple(labels.shape)}"
        )
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"megapt.kernels.{op}: chunk_size must be >= 1, got {chunk_size}")
    V = weight.shape[0]
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
    if bool(bad.any()):  # one host sync; an out-of-range label would read foreign memory
        first = int(labels[bad][0])
        raise ValueError(
            f"megapt.kernels.{op}: label {first} is outside [0, {V}) and is not ignore_index={ignore_index}"
        )


def _apply(hidden, weight, labels, ignore_index, chunk_size, chunk_fn):
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return LinearCrossEntropyFunction.apply(
            hidden, weight, labels, ignore_index, chunk_size, chunk_fn
        )
    loss, _, _ = _linear_ce_forward(
        hidden, weight, labels, ignore_index, chunk_size, chunk_fn, False, False
    )
    return loss


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Mean CE of ``hidden @ weight.T`` vs labels, with a Triton softmax/CE kernel per chunk.

    hidden (N, C), weight (V, C) same dtype (fp32/fp16/bf16), labels (N,) int. chunk_size rows
    per chunk (default: logits chunk about the size of hidden). Returns a scalar fp32 loss.
    """
    require_triton("fused_linear_cross_entropy")
    _check("fused_linear_cross_entropy", hidden, weight, labels, ignore_index, chunk_size)
    check_device("fused_linear_cross_entropy", _ce_loss_grad_kernel, hidden, weight, labels)
    return _apply(hidden, weight, labels, ignore_index, chunk_size, _ce_chunk_triton)


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Same API and algorithm as fused_linear_cross_entropy in plain PyTorch (any device).

    Also takes fp64 (loss in fp64) for gradient checks.
    """
    _check(
        "chunked_linear_cross_entropy",
        hidden,
        weight,
        labels,
        ignore_index,
        chunk_size,
        dtypes=_DTYPES + (torch.float64,),
    )
    return _apply(hidden, weight, labels, ignore_index, chunk_size, _ce_chunk_torch)
