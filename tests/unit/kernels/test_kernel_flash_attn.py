"""Triton flash attention (GQA, causal or not, any T, packed documents) matches plain attention:
output and grads."""

import math
import os
import subprocess
import sys

import pytest
import torch

from megapt.kernels.flash_attn import (
    doc_mask_ref,
    doc_start_from_ids,
    flash_attention,
    flash_attention_ref,
)
from tests.unit.kernels.kernel_testing import DEVICE, assert_close_rel_torch


def _attn_lowp(q, k, v, causal, sm_scale=None, doc_start=None):
    """Naive attention with every op at the input dtype: the error PyTorch itself makes."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    att = (q @ k.transpose(-2, -1)) * (sm_scale or 1.0 / math.sqrt(q.shape[-1]))
    if doc_start is not None:
        att = att.masked_fill(~doc_mask_ref(doc_start), float("-inf"))
    elif causal:
        T = q.shape[2]
        att = att.masked_fill(
            ~torch.ones(T, T, dtype=torch.bool, device=q.device).tril(), float("-inf")
        )
    return att.softmax(-1) @ v


def _grads(fn, q, k, v, do, **kw):
    ins = [t.clone().requires_grad_(True) for t in (q, k, v)]
    o = fn(*ins, **kw)
    o.backward(do)
    return [o.detach()] + [t.grad for t in ins]


def _check(B, nh, nkv, T, hs, causal, dtype, sm_scale=None, seed=0, doc_start=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, nh, T, hs, generator=g, dtype=torch.float64).to(DEVICE)
    k = torch.randn(B, nkv, T, hs, generator=g, dtype=torch.float64).to(DEVICE)
    v = torch.randn(B, nkv, T, hs, generator=g, dtype=torch.float64).to(DEVICE)
    do = torch.randn(B, nh, T, hs, generator=g, dtype=torch.float64).to(DEVICE)
    kw = dict(causal=causal, sm_scale=sm_scale)
    if doc_start is not None:
        kw["doc_start"] = doc_start
    ref = _grads(flash_attention_ref, q, k, v, do, **kw)  # fp64 math
    low = _grads(_attn_lowp, q.to(dtype), k.to(dtype), v.to(dtype), do.to(dtype), **kw)
    out = _grads(flash_attention, q.to(dtype), k.to(dtype), v.to(dtype), do.to(dtype), **kw)
    for name, o, r, lo in zip(("o", "dq", "dk", "dv"), out, ref, low):
        assert o.dtype == dtype
        assert_close_rel_torch(
            f"{name} nh={nh} nkv={nkv} T={T} causal={causal} doc={doc_start is not None} {dtype}",
            o,
            r,
            lo,
        )


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("nkv", [4, 2, 1])  # GQA ratios 1, 2, 4
def test_flash_attention_fp32_gqa_odd_length(nkv, causal):
    _check(B=1, nh=4, nkv=nkv, T=37, hs=16, causal=causal, dtype=torch.float32)


@pytest.mark.parametrize("causal", [True, False])
def test_flash_attention_fp32_gqa8_odd_length(causal):
    # 8 query heads read one K/V head (GQA ratio 8)
    _check(B=1, nh=8, nkv=1, T=29, hs=16, causal=causal, dtype=torch.float32)


@pytest.mark.parametrize("causal", [True, False])
def test_flash_attention_fp16(causal):
    _check(B=2, nh=4, nkv=2, T=64, hs=32, causal=causal, dtype=torch.float16)


@pytest.mark.parametrize("hs", [64, 128, 256])
def test_flash_attention_fp16_model_head_dims(hs):
    # the head sizes models use (the kernel's blocks and autotune families differ per head size)
    _check(B=1, nh=2, nkv=1, T=41, hs=hs, causal=True, dtype=torch.float16)


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
        (
            (torch.randn(1, 4, 8, 48), torch.randn(1, 2, 8, 48), torch.randn(1, 2, 8, 48)),
            "head_dim 48",
        ),
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
    res = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout + res.stderr


@pytest.mark.interpreter_autotune
def test_autotuned_launch_prunes_by_head_dim_and_logs_the_chosen_config(monkeypatch, caplog):
    # The GPU launch path (autotuner, config pruning, grid from the chosen blocks, config log)
    # run through the interpreter: each fake family has one config per head dim, so pruning
    # leaves one and nothing needs timing on a GPU.
    import logging

    import megapt.kernels.flash_attn as fa

    fake = {
        "fwd": [(16, 16, 4, 1, (16,)), (32, 16, 4, 1, (64,))],
        "dkdv": [(16, 32, 4, 1, (16,)), (16, 16, 4, 1, (64,))],
        "dq": [(32, 16, 4, 1, (16,)), (16, 16, 4, 1, (64,))],
    }
    for name, configs in fake.items():
        monkeypatch.setitem(fa._CONFIGS[name], "fake", configs)
    monkeypatch.setattr(fa, "_tuned", {})
    monkeypatch.setattr(fa, "_logged", set())
    monkeypatch.setattr(
        fa, "_launch", lambda name, jit_fn, *rest: fa._launch_autotuned(name, "fake", *rest)
    )
    torch.manual_seed(0)
    q = torch.randn(1, 4, 21, 16, device=DEVICE, requires_grad=True)
    k = torch.randn(1, 2, 21, 16, device=DEVICE, requires_grad=True)
    v = torch.randn(1, 2, 21, 16, device=DEVICE, requires_grad=True)
    with caplog.at_level(logging.INFO, logger="megapt.kernels.flash_attn"):
        o = flash_attention(q, k, v, causal=True)
        o.sum().backward()
    torch.testing.assert_close(o, flash_attention_ref(q, k, v, causal=True), rtol=1e-4, atol=1e-5)
    text = caplog.text
    assert (
        "flash_attention fwd fake T<=32 hs=16 causal=True group=2" in text
        and "BLOCK_M=16 BLOCK_N=16" in text
    )
    assert "flash_attention dkdv fake" in text and "BLOCK_M=16 BLOCK_N=32" in text
    assert "flash_attention dq fake" in text and "BLOCK_M=32 BLOCK_N=16" in text
    ins = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    flash_attention_ref(*ins, causal=True).sum().backward()
    for a, b in zip((q, k, v), ins):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)
    # the document-masked variant is tuned and logged under its own key
    ds = torch.tensor([[0] * 7 + [7] * 14], dtype=torch.int32, device=DEVICE)
    with caplog.at_level(logging.INFO, logger="megapt.kernels.flash_attn"):
        o = flash_attention(q, k, v, causal=True, doc_start=ds)
    assert "flash_attention fwd fake T<=32 hs=16 causal=True group=2 doc_mask=True" in caplog.text
    torch.testing.assert_close(
        o, flash_attention_ref(q, k, v, causal=True, doc_start=ds), rtol=1e-4, atol=1e-5
    )


# ----------------------------------------------------------------------------- document mask
# Interpreter blocks: fwd 16x16, dkdv 16x32, dq 32x16 (_INTERPRETER_BLOCKS), so boundaries at 5,
# 10, 11, 20, 21, 26, 33 fall inside blocks and the documents of length 1 (token 10, token 20)
# sit next to other boundaries.
EOS = 0


def _packed_ids(T, eos_positions_per_row):
    ids = torch.arange(1, T + 1).repeat(len(eos_positions_per_row), 1)
    for row, positions in enumerate(eos_positions_per_row):
        ids[row, list(positions)] = EOS
    return ids


def test_doc_start_from_ids_marks_first_token_of_each_document():
    ids = torch.tensor([[5, 6, EOS, 7, EOS, EOS, 8, 9], [EOS, 1, 2, 3, 4, 5, 6, 7]])
    assert doc_start_from_ids(ids, EOS).tolist() == [
        [0, 0, 0, 3, 3, 5, 6, 6],
        [0, 1, 1, 1, 1, 1, 1, 1],
    ]
    assert doc_start_from_ids(ids, EOS).dtype == torch.int32


@pytest.mark.parametrize("nkv", [4, 2, 1])  # GQA ratios 1, 2, 4
def test_flash_attention_doc_mask_fp32_gqa(nkv):
    # row 0: documents [0..9] [10] [11..25] [26..36]; row 1: [0..4] [5..19] [20] [21..32] [33..36]
    ids = _packed_ids(37, [(9, 10, 25), (4, 19, 20, 32)])
    ds = doc_start_from_ids(ids, EOS).to(DEVICE)
    _check(B=2, nh=4, nkv=nkv, T=37, hs=16, causal=True, dtype=torch.float32, doc_start=ds)


def test_flash_attention_doc_mask_fp16_long_documents_int64_doc_start():
    # documents spanning several blocks: the unmasked middle loops run too. Row 1: one EOS at the
    # very end (one document = plain causal). int64 doc_start is accepted (converted).
    ids = _packed_ids(70, [(3, 47, 48), (69,)])
    ds = doc_start_from_ids(ids, EOS).long().to(DEVICE)
    _check(B=2, nh=4, nkv=2, T=70, hs=16, causal=True, dtype=torch.float16, doc_start=ds, seed=1)


def test_flash_attention_one_document_equals_plain_causal():
    g = torch.Generator().manual_seed(2)
    q, k, v, do = (torch.randn(1, n, 45, 16, generator=g).to(DEVICE) for n in (4, 2, 2, 4))
    ds = torch.zeros(1, 45, dtype=torch.int32, device=DEVICE)
    a = _grads(flash_attention, q, k, v, do, causal=True, doc_start=ds)
    b = _grads(flash_attention, q, k, v, do, causal=True)
    for name, x, y in zip(("o", "dq", "dk", "dv"), a, b):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6, msg=name)


def test_flash_attention_documents_of_length_one_attend_to_themselves():
    # every token is an EOS: o = v of its own kv head; scores do not matter, so dq = dk = 0 and
    # dv sums do over the query heads of the group
    B, nh, nkv, T, hs = 1, 4, 2, 21, 16
    g = torch.Generator().manual_seed(3)
    q, k, v, do = (torch.randn(B, n, T, hs, generator=g).to(DEVICE) for n in (nh, nkv, nkv, nh))
    ds = torch.arange(T, dtype=torch.int32, device=DEVICE)[None]
    o, dq, dk, dv = _grads(flash_attention, q, k, v, do, causal=True, doc_start=ds)
    torch.testing.assert_close(o, v.repeat_interleave(2, 1), rtol=1e-6, atol=1e-6)
    assert dq.abs().max() < 1e-6 and dk.abs().max() < 1e-6
    torch.testing.assert_close(dv, do.view(B, nkv, 2, T, hs).sum(2), rtol=1e-6, atol=1e-6)


@pytest.mark.filterwarnings(
    "ignore::RuntimeWarning"
)  # the interpreter computes on the nan rows too
def test_flash_attention_doc_mask_skips_earlier_documents_key_blocks():
    # Documents [0, 32) and [32, 64): block-aligned. Non-finite K/V in the first document must
    # not reach the second one's output or dq (its key blocks are never loaded, not just masked:
    # 0 * nan would be nan), and non-finite q/dO in the second must not reach the first's dk/dv.
    T = 64
    g = torch.Generator().manual_seed(4)
    q, k, v, do = (torch.randn(1, 2, T, 16, generator=g).to(DEVICE) for _ in range(4))
    ds = torch.tensor([[0] * 32 + [32] * 32], dtype=torch.int32, device=DEVICE)
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[:, :, :32], v_bad[:, :, :32] = float("inf"), float("nan")
    o, dq, _, _ = _grads(flash_attention, q, k_bad, v_bad, do, causal=True, doc_start=ds)
    ref = _grads(flash_attention_ref, q.double(), k.double(), v.double(), do.double(), doc_start=ds)
    torch.testing.assert_close(o[:, :, 32:], ref[0][:, :, 32:].float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dq[:, :, 32:], ref[1][:, :, 32:].float(), rtol=1e-4, atol=1e-5)
    q_bad, do_bad = q.clone(), do.clone()
    q_bad[:, :, 32:], do_bad[:, :, 32:] = float("nan"), float("nan")
    _, _, dk, dv = _grads(flash_attention, q_bad, k, v, do_bad, causal=True, doc_start=ds)
    torch.testing.assert_close(dk[:, :, :32], ref[2][:, :, :32].float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dv[:, :, :32], ref[3][:, :, :32].float(), rtol=1e-4, atol=1e-5)


def test_flash_attention_bad_doc_start_raises_before_any_launch(monkeypatch):
    import megapt.kernels.flash_attn as fa

    def no_launch(*a, **kw):
        raise AssertionError("kernel launched")

    monkeypatch.setattr(fa, "_launch", no_launch)
    q = torch.randn(2, 4, 8, 16, device=DEVICE)
    k = torch.randn(2, 2, 8, 16, device=DEVICE)
    good = torch.zeros(2, 8, dtype=torch.int32, device=DEVICE)
    cases = [
        (dict(doc_start=good, causal=False), "needs causal=True"),
        (dict(doc_start=good.float()), "dtype torch.float32"),
        (dict(doc_start=good.bool()), "dtype torch.bool"),
        (dict(doc_start=good[:1]), r"shape \(B, T\) = \(2, 8\)"),
        (dict(doc_start=good[:, None]), r"shape \(B, T\)"),
        (dict(doc_start=good.tolist()), "integer tensor"),
        (dict(doc_start=torch.zeros(2, 8, dtype=torch.int32, device="meta")), "meta"),
        (
            dict(doc_start=torch.tensor([[0, 0, 0, 3, 2, 2, 2, 2]] * 2, dtype=torch.int32)),
            r"doc_start\[0, 4\] = 2",
        ),
        (
            dict(doc_start=torch.tensor([[0, 0, 3, 3, 3, 3, 3, 3]] * 2, dtype=torch.int32)),
            r"doc_start\[0, 2\] = 3",
        ),
        (dict(doc_start=torch.full((2, 8), -1, dtype=torch.int32)), "0 <= doc_start"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            flash_attention(q, k, k, **kw)
