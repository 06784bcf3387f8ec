"""Triton flash attention (GQA, causal or not, any T) matches plain attention: output and grads."""
import math
import os
import subprocess
import sys

import pytest
import torch

from kernel_testing import DEVICE, assert_close_rel_torch
from megapt.kernels.flash_attn import flash_attention, flash_attention_ref


def _attn_lowp(q, k, v, causal, sm_scale=None):
    """Naive attention with every op at the input dtype: the error PyTorch itself makes."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    att = (q @ k.transpose(-2, -1)) * (sm_scale or 1.0 / math.sqrt(q.shape[-1]))
    if causal:
        T = q.shape[2]
        att = att.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    return att.softmax(-1) @ v


def _grads(fn, q, k, v, do, **kw):
    ins = [t.clone().requires_grad_(True) for t in (q, k, v)]
    o = fn(*ins, **kw)
    o.backward(do)
    return [o.detach()] + [t.grad for t in ins]


def _check(B, nh, nkv, T, hs, causal, dtype, sm_scale=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, nh, T, hs, generator=g, dtype=torch.float64).to(DEVICE)
    k = torch.randn(B, nkv, T, hs, generator=g, dtype=torch.float64).to(DEVICE)
    v = torch.randn(B, nkv, T, hs, generator=g, dtype=torch.float64).to(DEVICE)
    do = torch.randn(B, nh, T, hs, generator=g, dtype=torch.float64).to(DEVICE)
    kw = dict(causal=causal, sm_scale=sm_scale)
    ref = _grads(flash_attention_ref, q, k, v, do, **kw)  # fp64 math
    low = _grads(_attn_lowp, q.to(dtype), k.to(dtype), v.to(dtype), do.to(dtype), **kw)
    out = _grads(flash_attention, q.to(dtype), k.to(dtype), v.to(dtype), do.to(dtype), **kw)
    for name, o, r, l in zip(("o", "dq", "dk", "dv"), out, ref, low):
        assert o.dtype == dtype
        assert_close_rel_torch(f"{name} nh={nh} nkv={nkv} T={T} causal={causal} {dtype}", o, r, l)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("nkv", [4, 2, 1])  # GQA ratios 1, 2, 4
def test_flash_attention_fp32_gqa_odd_length(nkv, causal):
    _check(B=1, nh=4, nkv=nkv, T=37, hs=16, causal=causal, dtype=torch.float32)


@pytest.mark.parametrize("causal", [True, False])
def test_flash_attention_fp16(causal):
    _check(B=2, nh=4, nkv=2, T=64, hs=32, causal=causal, dtype=torch.float16)


def test_flash_attention_fp16_short_odd_sequence_custom_scale():
    # T smaller than one block, GQA 4, explicit sm_scale
    _check(B=1, nh=4, nkv=1, T=13, hs=32, causal=True, dtype=torch.float16, sm_scale=0.3)


def test_flash_attention_takes_transposed_views_without_copy_semantics_change():
    # The model holds q as (B, T, nh, hs) and passes q.transpose(1, 2): a strided (B, nh, T, hs) view.
    torch.manual_seed(0)
    B, T, nh, nkv, hs = 1, 20, 4, 2, 16
    q = torch.randn(B, T, nh, hs, device=DEVICE).transpose(1, 2)
    k = torch.randn(B, T, nkv, hs, device=DEVICE).transpose(1, 2)
    v = torch.randn(B, T, nkv, hs, device=DEVICE).transpose(1, 2)
    o = flash_attention(q, k, v, causal=True)
    torch.testing.assert_close(o, flash_attention_ref(q, k, v, causal=True), rtol=1e-4, atol=1e-5)
    assert o.stride() == q.stride()  # output keeps the (B, T, nh, hs) memory layout


def test_flash_attention_bad_inputs_are_value_errors():
    q = torch.randn(1, 4, 8, 16, device=DEVICE)
    k = torch.randn(1, 2, 8, 16, device=DEVICE)
    cases = [
        ((torch.randn(1, 4, 8, 48), torch.randn(1, 2, 8, 48), torch.randn(1, 2, 8, 48)), "head_dim 48"),
        ((q, torch.randn(1, 3, 8, 16), torch.randn(1, 3, 8, 16)), "do not divide"),
        ((q, torch.randn(1, 2, 8, 32), torch.randn(1, 2, 8, 32)), "head size"),
        ((q, k[:, :, :4], k[:, :, :4]), "equal lengths"),
        ((q.double(), k.double(), k.double()), "dtypes"),
        ((q, k.half(), k), "dtypes"),
        ((q[0], k[0], k[0]), "4-D"),
    ]
    for (a, b, c), msg in cases:
        with pytest.raises(ValueError, match=msg):
            flash_attention(a.to(DEVICE), b.to(DEVICE), c.to(DEVICE))


@pytest.mark.skipif(DEVICE != "cpu", reason="checks the CPU-without-interpreter error")
def test_cpu_tensors_without_interpreter_are_rejected_before_launch():
    code = (
        "import torch\n"
        "from megapt.kernels import flash_attention, rms_norm, apply_rope, fused_linear_cross_entropy as ce\n"
        "q = torch.randn(1, 2, 8, 16)\n"
        "calls = [lambda: flash_attention(q, q, q), lambda: rms_norm(torch.randn(2, 8), torch.ones(8)),\n"
        "         lambda: apply_rope(q, q, torch.ones(2, 8), torch.ones(2, 8)),\n"
        "         lambda: ce(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long))]\n"
        "for f in calls:\n"
        "    try:\n"
        "        f()\n"
        "    except ValueError as e:\n"
        "        assert 'CUDA' in str(e), e\n"
        "    else:\n"
        "        raise SystemExit('no error')\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout + res.stderr


def test_autotuned_launch_prunes_by_head_dim_and_logs_the_chosen_config(monkeypatch, caplog):
    # The GPU launch path (autotuner, config pruning, grid from the chosen blocks, config log)
    # run through the interpreter: each fake family has one config per head dim, so pruning
    # leaves one and nothing needs timing on a GPU.
    import logging

    import megapt.kernels.flash_attn as fa

    fake = {"fwd": [(16, 16, 4, 1, (16,)), (32, 16, 4, 1, (64,))],
            "dkdv": [(16, 32, 4, 1, (16,)), (16, 16, 4, 1, (64,))],
            "dq": [(32, 16, 4, 1, (16,)), (16, 16, 4, 1, (64,))]}
    for name, configs in fake.items():
        monkeypatch.setitem(fa._CONFIGS[name], "fake", configs)
    monkeypatch.setattr(fa, "_tuned", {})
    monkeypatch.setattr(fa, "_logged", set())
    monkeypatch.setattr(fa, "_launch", lambda name, jit_fn, *rest: fa._launch_autotuned(name, "fake", *rest))
    torch.manual_seed(0)
    q = torch.randn(1, 4, 21, 16, device=DEVICE, requires_grad=True)
    k = torch.randn(1, 2, 21, 16, device=DEVICE, requires_grad=True)
    v = torch.randn(1, 2, 21, 16, device=DEVICE, requires_grad=True)
    with caplog.at_level(logging.INFO, logger="megapt.kernels.flash_attn"):
        o = flash_attention(q, k, v, causal=True)
        o.sum().backward()
    torch.testing.assert_close(o, flash_attention_ref(q, k, v, causal=True), rtol=1e-4, atol=1e-5)
    text = caplog.text
    assert "flash_attention fwd fake T<=32 hs=16 causal=True group=2" in text and "BLOCK_M=16 BLOCK_N=16" in text
    assert "flash_attention dkdv fake" in text and "BLOCK_M=16 BLOCK_N=32" in text
    assert "flash_attention dq fake" in text and "BLOCK_M=32 BLOCK_N=16" in text
    ins = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    flash_attention_ref(*ins, causal=True).sum().backward()
    for a, b in zip((q, k, v), ins):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)
