"""Fused RoPE matches the HF Llama rotate_half convention, forward and backward."""

import pytest
import torch

from megapt.kernels.rope import apply_rope, apply_rope_, apply_rope_ref
from tests.unit.kernels.kernel_testing import DEVICE, DTYPES, assert_close_rel_torch


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def _hf_rope(q, k, cos, sin):
    """transformers' apply_rotary_pos_emb with cos/sin duplicated to the full head dim;
    cos/sin (T, hs/2) shared or (B, T, hs/2) per sample (HF's position_ids path)."""
    c = torch.cat([cos, cos], -1)
    s = torch.cat([sin, sin], -1)
    c = c[None, :, None, :] if c.dim() == 2 else c[:, :, None, :]
    s = s[None, :, None, :] if s.dim() == 2 else s[:, :, None, :]
    return q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s


def _cos_sin(T, hs, theta=10000.0):
    inv = 1.0 / theta ** (torch.arange(0, hs, 2, dtype=torch.float64) / hs)
    freqs = torch.outer(torch.arange(T, dtype=torch.float64), inv)  # (T, hs // 2)
    return freqs.cos(), freqs.sin()


def _run(fn, q, k, cos, sin, dq, dk):
    q = q.clone().requires_grad_(True)
    k = k.clone().requires_grad_(True)
    qo, ko = fn(q, k, cos, sin)
    torch.autograd.backward((qo, ko), (dq, dk))
    return qo.detach(), ko.detach(), q.grad, k.grad


def _compare(q, k, cos, sin, dq, dk, dtype, label):
    """Triton RoPE at ``dtype`` vs the fp64 reference, within 2x PyTorch's own error at ``dtype``."""
    ref = _run(_hf_rope, q.double(), k.double(), cos, sin, dq.double(), dk.double())
    low_args = [t.to(dtype) for t in (q, k, cos, sin, dq, dk)]
    low = _run(_hf_rope, *low_args)
    out = _run(apply_rope, *low_args)
    for name, o, r, lo in zip(("q", "k", "dq", "dk"), out, ref, low):
        assert o.dtype == dtype
        assert_close_rel_torch(f"{label}{name} {dtype}", o, r, lo)
    return low_args, out, ref, low


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,nh,nkv,hs", [(2, 37, 4, 2, 32), (1, 16, 3, 1, 16)])
def test_rope_forward_and_grads(B, T, nh, nkv, hs, dtype):
    torch.manual_seed(0)
    q = torch.randn(B, T, nh, hs, device=DEVICE)
    k = torch.randn(B, T, nkv, hs, device=DEVICE)
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    cos, sin = (t.to(DEVICE) for t in _cos_sin(T, hs))
    low_args, out, ref, low = _compare(q, k, cos, sin, dq, dk, dtype, "")
    ref_fn = _run(apply_rope_ref, *low_args)
    for name, o, r, lo in zip(("q", "k", "dq", "dk"), ref_fn, ref, low):
        assert_close_rel_torch(f"ref {name} {dtype}", o, r, lo)


def test_rope_on_strided_views_and_in_place():
    # q/k as views of a fused qkv projection (B, T, nh + 2 * nkv, hs): no copy needed.
    torch.manual_seed(0)
    B, T, nh, nkv, hs = 1, 9, 4, 2, 16
    qkv = torch.randn(B, T, nh + 2 * nkv, hs, device=DEVICE)
    q, k = qkv[:, :, :nh], qkv[:, :, nh : nh + nkv]
    cos, sin = (t.float().to(DEVICE) for t in _cos_sin(T, hs))
    eq, ek = _hf_rope(q, k, cos, sin)
    qo, ko = apply_rope(q, k, cos, sin)
    torch.testing.assert_close(qo, eq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ko, ek, rtol=1e-5, atol=1e-5)
    v_before = qkv[:, :, nh + nkv :].clone()
    apply_rope_(q, k, cos, sin)
    torch.testing.assert_close(qkv[:, :, :nh], eq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(qkv[:, :, nh : nh + nkv], ek, rtol=1e-5, atol=1e-5)
    assert torch.equal(qkv[:, :, nh + nkv :], v_before)  # v untouched


def test_rope_in_place_gradients_match_out_of_place():
    torch.manual_seed(0)
    q = torch.randn(1, 8, 2, 16, device=DEVICE)
    k = torch.randn(1, 8, 1, 16, device=DEVICE)
    cos, sin = (t.float().to(DEVICE) for t in _cos_sin(8, 16))
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    ref = _run(apply_rope, q, k, cos, sin, dq, dk)
    qa, ka = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
    qo, ko = apply_rope_(qa * 1.0, ka * 1.0, cos, sin)  # non-leaf inputs may be rotated in place
    torch.autograd.backward((qo, ko), (dq, dk))
    torch.testing.assert_close(qa.grad, ref[2])
    torch.testing.assert_close(ka.grad, ref[3])


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_per_sample_positions_forward_and_grads(dtype):
    # packed documents: positions restart at 0 in each document, differently in each row
    torch.manual_seed(0)
    B, T, nh, nkv, hs = 2, 23, 4, 2, 16
    pos = torch.stack(
        [
            torch.cat([torch.arange(9), torch.arange(1), torch.arange(13)]),
            torch.cat([torch.arange(4), torch.arange(19)]),
        ]
    )  # (B, T)
    cos_t, sin_t = _cos_sin(T, hs)
    cos, sin = cos_t[pos].to(DEVICE), sin_t[pos].to(DEVICE)  # (B, T, hs // 2)
    q = torch.randn(B, T, nh, hs, device=DEVICE)
    k = torch.randn(B, T, nkv, hs, device=DEVICE)
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    low_args, out, _, _ = _compare(q, k, cos, sin, dq, dk, dtype, "per-sample ")
    # row 1 token 4 starts a document: rotated like position 0 (identity)
    torch.testing.assert_close(out[0][1, 4], low_args[0][1, 4])
    inplace = _run(lambda a, b, c, s: apply_rope_(a * 1, b * 1, c, s), *low_args)
    for o, i in zip(out, inplace):
        torch.testing.assert_close(o, i, rtol=0, atol=0)


def test_rope_bad_shapes_are_clear_errors():
    q = torch.randn(1, 8, 2, 16, device=DEVICE)
    k = torch.randn(1, 8, 1, 16, device=DEVICE)
    cos, sin = (t.float().to(DEVICE) for t in _cos_sin(8, 16))
    with pytest.raises(ValueError, match="cos/sin"):
        apply_rope(q, k, cos[:4], sin[:4])
    with pytest.raises(ValueError, match="share B, T and hs"):
        apply_rope(q, k[:, :4], cos, sin)
    with pytest.raises(ValueError, match=r"per sample \(B, T, hs // 2\) = \(1, 8, 8\)"):
        apply_rope(q, k, cos.expand(2, 8, 8), sin.expand(2, 8, 8))
    with pytest.raises(ValueError, match="cos/sin"):
        apply_rope(q, k, cos[None], sin)


def test_rope_half_inputs_with_fp32_tables_match_the_model_eager_math():
    # The model keeps cos/sin in fp32 and rotates fp16/bf16 q, k in fp32, rounding once.
    torch.manual_seed(0)
    q = torch.randn(2, 11, 4, 32, device=DEVICE).half()
    k = torch.randn(2, 11, 2, 32, device=DEVICE).half()
    cos, sin = (t.float().to(DEVICE) for t in _cos_sin(11, 32))
    qo, ko = apply_rope(q, k, cos, sin)
    eq, ek = (t.half() for t in _hf_rope(q.float(), k.float(), cos, sin))
    assert qo.dtype == torch.float16 and ko.dtype == torch.float16
    torch.testing.assert_close(qo, eq, rtol=2**-10, atol=1e-3)
    torch.testing.assert_close(ko, ek, rtol=2**-10, atol=1e-3)
