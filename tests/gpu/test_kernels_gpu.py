"""megapt.kernels on a real GPU: full-size shapes, bf16 included, against fp32/fp64 references.

Tolerances as in tests/unit/kernels: error <= factor x (error of the same math done by PyTorch
at the kernel's dtype) + atol. Kernel modules are imported inside the tests: importing triton
while collecting this file on a CPU machine would stop the CPU interpreter tests from working.
"""

import functools
import logging
import math

import pytest
import torch

pytestmark = pytest.mark.gpu

ATOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
HALF = [torch.float16, torch.bfloat16]


def _close(name, out, ref, low, factor=2.0, atol=None):
    atol = ATOL[out.dtype] if atol is None else atol
    assert torch.isfinite(out.float()).all(), name
    err = (out.double() - ref.double()).abs().max().item()
    base = (low.double() - ref.double()).abs().max().item()
    scale = max(1.0, ref.abs().max().item())
    assert err <= factor * base + atol * scale, f"{name}: err {err:.3e} vs torch {base:.3e}"


def _grads(fn, inputs, dout, **kw):
    ins = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*ins, **kw)
    out.backward(dout)
    return [out.detach()] + [t.grad for t in ins]


# ----------------------------------------------------------------------------- flash attention
def _attn_lowp(q, k, v, causal=True, sm_scale=None, doc_start=None):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    att = (q @ k.transpose(-2, -1)) * (sm_scale or 1.0 / math.sqrt(q.shape[-1]))
    if doc_start is not None:
        from megapt.kernels.flash_attn import doc_mask_ref

        att = att.masked_fill(~doc_mask_ref(doc_start), float("-inf"))
    elif causal:
        T = q.shape[2]
        att = att.masked_fill(
            ~torch.ones(T, T, dtype=torch.bool, device=q.device).tril(), float("-inf")
        )
    return att.softmax(-1) @ v


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    "B,nh,nkv,T,hs",
    [
        (2, 8, 8, 1024, 64),
        (2, 8, 4, 1000, 128),
        (1, 16, 4, 2048, 128),
        (1, 16, 2, 777, 64),
        (1, 8, 1, 513, 128),
        (2, 32, 4, 256, 64),
        (1, 4, 2, 384, 256),
        (1, 8, 8, 97, 32),
    ],
)
def test_flash_attention_gpu(B, nh, nkv, T, hs, causal, dtype):
    from megapt.kernels.flash_attn import flash_attention, flash_attention_ref

    torch.manual_seed(0)
    q = torch.randn(B, nh, T, hs, device="cuda")
    k = torch.randn(B, nkv, T, hs, device="cuda")
    v = torch.randn(B, nkv, T, hs, device="cuda")
    do = torch.randn(B, nh, T, hs, device="cuda")
    ref = _grads(flash_attention_ref, [q, k, v], do, causal=causal)  # fp32 math
    low = _grads(_attn_lowp, [t.to(dtype) for t in (q, k, v)], do.to(dtype), causal=causal)
    out = _grads(flash_attention, [t.to(dtype) for t in (q, k, v)], do.to(dtype), causal=causal)
    for name, o, r, lo in zip(("o", "dq", "dk", "dv"), out, ref, low):
        assert o.dtype == dtype
        _close(f"{name} {B},{nh},{nkv},{T},{hs} causal={causal} {dtype}", o, r, lo)


def test_flash_attention_gpu_fp32_inputs():
    from megapt.kernels.flash_attn import flash_attention, flash_attention_ref

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, 300, 64, device="cuda", dtype=torch.float64) for _ in range(3))
    do = torch.randn_like(q)
    ref = _grads(flash_attention_ref, [q, k, v], do)
    out = _grads(flash_attention, [t.float() for t in (q, k, v)], do.float())
    for name, o, r in zip(("o", "dq", "dk", "dv"), out, ref):
        # fp32 inputs run 3xTF32 dots: close to fp32 accuracy (plain TF32 would miss this by ~100x)
        assert (o.double() - r).abs().max().item() < 1e-4 * max(1.0, r.abs().max().item()), name


def test_flash_attention_logs_chosen_config(caplog):
    from megapt.kernels.flash_attn import flash_attention

    q = torch.randn(1, 4, 4096, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with caplog.at_level(logging.INFO, logger="megapt.kernels.flash_attn"):
        flash_attention(q, q, q, causal=True).sum().backward()
    text = caplog.text
    for name in ("fwd", "dkdv", "dq"):
        assert f"flash_attention {name}" in text and "BLOCK_M=" in text


def test_flash_attention_matches_sdpa_bf16():
    from megapt.kernels.flash_attn import flash_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 16, 2048, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    o = flash_attention(q, k, v, causal=True)
    s = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert (o.float() - s.float()).abs().max().item() < 2e-2


def _random_doc_start(B, T, mean_len, seed):
    """doc_start (B, T) of packed rows with documents of random length (mean ``mean_len``, some of
    length 1), different boundaries per row."""
    from megapt.kernels.flash_attn import doc_start_from_ids

    g = torch.Generator().manual_seed(seed)
    ids = torch.ones(B, T, dtype=torch.long)
    for b in range(B):
        ends = torch.randperm(T - 1, generator=g)[: max(1, T // mean_len)]
        ids[b, ends] = 0
        ids[b, ends[:2].clamp(max=T - 3) + 1] = 0  # a few documents of length 1
    return doc_start_from_ids(ids, 0).cuda()


@pytest.mark.parametrize(
    "B,nh,nkv,T,hs,mean_len",
    [
        (2, 8, 1, 1024, 64, 100),
        (1, 16, 2, 2048, 128, 512),
        (1, 8, 1, 4096, 128, 512),
        (2, 8, 8, 1000, 64, 37),
        (1, 4, 2, 3000, 256, 700),
    ],
)
def test_flash_attention_doc_mask_gpu(B, nh, nkv, T, hs, mean_len):
    from megapt.kernels.flash_attn import flash_attention, flash_attention_ref

    torch.manual_seed(0)
    ds = _random_doc_start(B, T, mean_len, seed=T)
    q = torch.randn(B, nh, T, hs, device="cuda")
    k = torch.randn(B, nkv, T, hs, device="cuda")
    v = torch.randn(B, nkv, T, hs, device="cuda")
    do = torch.randn(B, nh, T, hs, device="cuda")
    dtype = torch.bfloat16
    ref = _grads(flash_attention_ref, [q, k, v], do, doc_start=ds)  # fp32 math, explicit mask
    low = _grads(_attn_lowp, [t.to(dtype) for t in (q, k, v)], do.to(dtype), doc_start=ds)
    out = _grads(flash_attention, [t.to(dtype) for t in (q, k, v)], do.to(dtype), doc_start=ds)
    for name, o, r, lo in zip(("o", "dq", "dk", "dv"), out, ref, low):
        _close(f"doc {name} {B},{nh},{nkv},{T},{hs} mean_len={mean_len}", o, r, lo)


def test_flash_attention_doc_mask_one_document_equals_causal_gpu():
    from megapt.kernels.flash_attn import flash_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 8, 2048, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ds = torch.zeros(2, 2048, dtype=torch.int32, device="cuda")
    torch.testing.assert_close(
        flash_attention(q, k, v, doc_start=ds), flash_attention(q, k, v), rtol=0, atol=0
    )


# ----------------------------------------------------------------------------- rms norm
@pytest.mark.parametrize("dtype", [torch.float32] + HALF)
@pytest.mark.parametrize("shape", [(4, 2048, 4096), (3, 1000, 5120), (7, 123, 123), (2, 64, 16384)])
@pytest.mark.parametrize("impl", ["triton", "cuda"])
def test_rms_norm_gpu(impl, shape, dtype):
    from megapt.kernels.rms_norm import rms_norm_ref

    if impl == "triton":
        from megapt.kernels.rms_norm import rms_norm
    else:
        from megapt.kernels.cuda_ext import rms_norm

    torch.manual_seed(0)
    x = torch.randn(shape, device="cuda")
    w = 1 + 0.1 * torch.randn(shape[-1], device="cuda")
    dy = torch.randn(shape, device="cuda")

    def lowp(x, w, eps):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    ref = _grads(rms_norm_ref, [x.double(), w.double()], dy.double(), eps=1e-5)
    low = _grads(lowp, [x.to(dtype), w.to(dtype)], dy.to(dtype), eps=1e-5)
    out = _grads(rms_norm, [x.to(dtype), w.to(dtype)], dy.to(dtype), eps=1e-5)
    for name, o, r, lo in zip(("y", "dx", "dw"), out, ref, low):
        # dw sums over up to 8k rows: allow the fp32-accumulation difference to scale with them
        _close(
            f"{impl} {name} {shape} {dtype}",
            o,
            r,
            lo,
            atol=ATOL[dtype] * (4 if name == "dw" else 1),
        )


# ----------------------------------------------------------------------------- rope
def _rope_grads(fn, q, k, cos, sin, *, dq, dk):
    """RoPE outputs and input gradients for upstream gradients dq, dk (cast to q's dtype)."""
    q, k = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
    qo, ko = fn(q, k, cos, sin)
    torch.autograd.backward((qo, ko), (dq.to(q.dtype), dk.to(k.dtype)))
    return qo.detach(), ko.detach(), q.grad, k.grad


@pytest.mark.parametrize("dtype", [torch.float32] + HALF)
def test_rope_gpu(dtype):
    from megapt.kernels.rope import apply_rope, apply_rope_ref

    torch.manual_seed(0)
    B, T, nh, nkv, hs = 2, 2048, 32, 8, 128
    q = torch.randn(B, T, nh, hs, device="cuda")
    k = torch.randn(B, T, nkv, hs, device="cuda")
    inv = 1.0 / 10000 ** (torch.arange(0, hs, 2, device="cuda", dtype=torch.float64) / hs)
    f = torch.outer(torch.arange(T, device="cuda", dtype=torch.float64), inv)
    cos, sin = f.cos(), f.sin()
    dq, dk = torch.randn_like(q), torch.randn_like(k)

    run = functools.partial(_rope_grads, dq=dq, dk=dk)

    ref = run(apply_rope_ref, q.double(), k.double(), cos, sin)
    args = [t.to(dtype) for t in (q, k, cos, sin)]
    low = run(
        lambda q, k, c, s: tuple(
            torch.cat(
                [
                    x[..., : hs // 2] * c[None, :, None] - x[..., hs // 2 :] * s[None, :, None],
                    x[..., hs // 2 :] * c[None, :, None] + x[..., : hs // 2] * s[None, :, None],
                ],
                -1,
            )
            for x in (q, k)
        ),
        *args,
    )
    out = run(apply_rope, *args)
    for name, o, r, lo in zip(("q", "k", "dq", "dk"), out, ref, low):
        _close(f"rope {name} {dtype}", o, r, lo)


@pytest.mark.parametrize("dtype", HALF)
def test_rope_per_sample_positions_gpu(dtype):
    # packed documents: positions restart per document; (B, T, hs/2) tables gathered by position
    from megapt.kernels.rope import apply_rope, apply_rope_ref

    torch.manual_seed(0)
    B, T, nh, nkv, hs = 2, 2048, 32, 8, 128
    pos = torch.stack([torch.arange(T) % 700, torch.arange(T) % 333]).cuda()  # (B, T)
    inv = 1.0 / 10000 ** (torch.arange(0, hs, 2, device="cuda", dtype=torch.float64) / hs)
    f = torch.outer(torch.arange(T, device="cuda", dtype=torch.float64), inv)
    cos, sin = f.cos()[pos], f.sin()[pos]  # (B, T, hs/2)
    q = torch.randn(B, T, nh, hs, device="cuda")
    k = torch.randn(B, T, nkv, hs, device="cuda")
    dq, dk = torch.randn_like(q), torch.randn_like(k)

    run = functools.partial(_rope_grads, dq=dq, dk=dk)

    ref = run(apply_rope_ref, q.double(), k.double(), cos, sin)
    args = [t.to(dtype) for t in (q, k, cos, sin)]
    low = run(
        apply_rope_ref, q.to(dtype), k.to(dtype), cos.to(dtype).float(), sin.to(dtype).float()
    )
    out = run(apply_rope, *args)
    for name, o, r, lo in zip(("q", "k", "dq", "dk"), out, ref, low):
        _close(f"rope per-sample {name} {dtype}", o, r, lo)


# ----------------------------------------------------------------------------- linear + CE
@pytest.mark.parametrize("dtype", [torch.float32] + HALF)
def test_fused_linear_cross_entropy_gpu(dtype):
    from megapt.kernels.cross_entropy import (
        fused_linear_cross_entropy,
        fused_linear_cross_entropy_ref,
    )

    torch.manual_seed(0)
    N, C, V = 4096, 2048, 32003  # V not a multiple of any block
    h = torch.randn(N, C, device="cuda") / 4
    w = torch.randn(V, C, device="cuda") / math.sqrt(C)
    y = torch.randint(0, V, (N,), device="cuda")
    y[::7] = -100

    def run(fn, h, w):
        h, w = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss = fn(h, w, y)
        loss.backward()
        return loss.detach().reshape(1), h.grad, w.grad

    def peak_of(fn):
        hl, wl = h.to(dtype), w.to(dtype)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        res = run(fn, hl, wl)
        return res, torch.cuda.max_memory_allocated() - base

    ref = run(fused_linear_cross_entropy_ref, h.double(), w.double())
    low, peak_full = peak_of(fused_linear_cross_entropy_ref)
    out, peak_fused = peak_of(fused_linear_cross_entropy)
    for name, o, r, lo in zip(("loss", "dh", "dw"), out, ref, low):
        _close(f"ce {name} {dtype}", o, r, lo)
    # the full-logits path holds (N, V) logits, their fp32 copy and gradient; fused never does
    assert peak_fused < 0.5 * peak_full, (
        f"fused peak {peak_fused / 2**20:.0f} MiB vs full {peak_full / 2**20:.0f} MiB"
    )
