"""megapt.model.ops: every backend agrees with the reference math; selection fails loudly."""

import logging
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from megapt.config import ConfigError
from megapt.model import ops
from megapt.model.ops import Backends, select_backends


def _cfg(**kw):
    base = dict(attention="auto", norm="auto", rope="auto", loss="auto", doc_mask=False)
    return SimpleNamespace(**{**base, **kw})


# ---------------------------------------------------------------- attention


def _naive_attention(q, k, v, allowed):
    """Per-head loop with explicit kv head sharing; allowed (T, S) or (B, 1, T, S) bool."""
    B, nh, T, hs = q.shape
    group = nh // k.shape[1]
    out = torch.empty_like(q)
    for h in range(nh):
        kh, vh = k[:, h // group], v[:, h // group]  # (B, S, hs)
        s = q[:, h] @ kh.transpose(-1, -2) / hs**0.5  # (B, T, S)
        a = allowed if allowed.dim() == 2 else allowed[:, 0]
        s = s.masked_fill(~a, float("-inf"))
        out[:, h] = s.softmax(-1) @ vh
    return out


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_attention_matches_naive_gqa_causal(backend):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 7, 8, dtype=torch.float64)
    k, v = (
        torch.randn(2, 2, 7, 8, dtype=torch.float64),
        torch.randn(2, 2, 7, 8, dtype=torch.float64),
    )
    want = _naive_attention(q, k, v, torch.ones(7, 7, dtype=torch.bool).tril())
    torch.testing.assert_close(ops.attention(q, k, v, True, backend), want)


def test_attention_eager_equals_sdpa_forward_and_grads_with_mask():
    torch.manual_seed(0)
    B, nh, nkv, T, hs = 2, 6, 2, 9, 16
    base = [torch.randn(B, n, T, hs) for n in (nh, nkv, nkv)]
    mask = torch.rand(B, 1, T, T) > 0.3
    mask |= torch.eye(T, dtype=torch.bool)  # every query sees at least itself
    results = {}
    for backend in ("eager", "sdpa"):
        for causal, m in ((True, None), (True, mask), (False, mask)):
            q, k, v = (t.clone().requires_grad_() for t in base)
            out = ops.attention(q, k, v, causal, backend, mask=m)
            (out * torch.linspace(-1, 1, hs)).sum().backward()
            results[(backend, causal, m is None)] = (out, q.grad, k.grad, v.grad)
    for key in [(True, True), (True, False), (False, False)]:
        for a, b in zip(results[("eager",) + key], results[("sdpa",) + key]):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    # the mask really restricts: a masked run differs from the plain causal one
    assert not torch.allclose(results[("eager", True, True)][0], results[("eager", True, False)][0])


# ---------------------------------------------------------------- rms norm and rope


def test_rms_norm_eager_formula():
    x = torch.randn(3, 5, 32, dtype=torch.float64)
    w = torch.randn(32, dtype=torch.float64)
    want = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6) * w
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-6, "eager"), want)


def test_rope_rotate_half_convention_and_relative_positions():
    hs = 8
    cos, sin = ops.rope_cache(16, hs, theta=10000.0)
    assert cos.shape == (16, hs // 2)
    # HF Llama: pairs (i, i + hs/2) rotate by angle pos * theta^(-2i/hs)
    x = torch.randn(1, 16, 1, hs, dtype=torch.float64)
    y, _ = ops.apply_rope(x, x, cos.double(), sin.double(), "eager")
    p, i = 5, 1
    ang = p * 10000.0 ** (-2 * i / hs)
    a, b = x[0, p, 0, i], x[0, p, 0, i + hs // 2]
    torch.testing.assert_close(
        y[0, p, 0, i],
        a * torch.cos(torch.tensor(ang, dtype=torch.float64))
        - b * torch.sin(torch.tensor(ang, dtype=torch.float64)),
    )
    # relative: <rope(q, m), rope(k, n)> depends only on m - n
    q, k = torch.randn(hs, dtype=torch.float64), torch.randn(hs, dtype=torch.float64)
    qs = q.expand(1, 16, 1, hs).contiguous()
    ks = k.expand(1, 16, 1, hs).contiguous()
    rq, rk = ops.apply_rope(qs, ks, cos.double(), sin.double(), "eager")
    torch.testing.assert_close(
        (rq[0, 7, 0] * rk[0, 4, 0]).sum(), (rq[0, 12, 0] * rk[0, 9, 0]).sum()
    )
    # per-sample positions (B, T, hs/2) give the same rotation as the shared table
    pos = torch.tensor([[3, 4, 5], [0, 1, 2]])
    x3 = torch.randn(2, 3, 2, hs)
    per_sample, _ = ops.apply_rope(x3, x3, cos[pos], sin[pos], "eager")
    shared, _ = ops.apply_rope(x3[1:], x3[1:], cos[:3], sin[:3], "eager")
    torch.testing.assert_close(per_sample[1:], shared)


def test_rope_tables_survive_zero_init_style_bf16_constructors(monkeypatch):
    """deepspeed.zero.Init(dtype=bf16) wraps torch.arange so floating results become bf16;
    positions above 256 would round and every later token would get a wrong rotation."""
    want = ops.rope_cache(1024, 64, 10000.0)
    orig = torch.arange

    def arange_like_zero_init(*args, **kwargs):
        t = orig(*args, **kwargs)
        return t.to(torch.bfloat16) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "arange", arange_like_zero_init)
    got = ops.rope_cache(1024, 64, 10000.0)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


# ---------------------------------------------------------------- linear + cross-entropy


@pytest.mark.parametrize(
    "backend,chunk", [("chunked", 1), ("chunked", 8), ("chunked", None), ("eager", None)]
)
def test_linear_cross_entropy_matches_full_logits(backend, chunk):
    torch.manual_seed(0)
    N, C, V = 37, 16, 50
    h0, w0 = torch.randn(N, C), torch.randn(V, C) * 0.5
    labels = torch.randint(0, V, (N,))
    labels[::5] = -100
    h1, w1 = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    want = F.cross_entropy((h1.double() @ w1.double().t()), labels, ignore_index=-100)
    (3.0 * want).backward()
    h2, w2 = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    got = ops.linear_cross_entropy(h2, w2, labels, backend, chunk_size=chunk)
    (3.0 * got).backward()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h2.grad, h1.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(w2.grad, w1.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["chunked", "eager"])
def test_linear_cross_entropy_all_ignored_is_zero_not_nan(backend):
    h = torch.randn(6, 4, requires_grad=True)
    w = torch.randn(10, 4, requires_grad=True)
    loss = ops.linear_cross_entropy(h, w, torch.full((6,), -100), backend)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.all(h.grad == 0) and torch.all(w.grad == 0)


# ---------------------------------------------------------------- selection


def test_select_backends_auto_on_cpu_and_logs_once(caplog):
    ops._LOGGED.clear()
    with caplog.at_level(logging.INFO, logger="megapt"):
        b = select_backends(_cfg(), "cpu")
        select_backends(_cfg(), torch.device("cpu"))
    assert b == Backends(attention="sdpa", norm="eager", rope="eager", loss="chunked")
    lines = [r.getMessage() for r in caplog.records if "model backends" in r.getMessage()]
    assert lines == ["model backends on cpu: attention=sdpa norm=eager rope=eager loss=chunked"]
    assert select_backends(_cfg(attention="eager", loss="eager"), "cpu").attention == "eager"


def test_select_backends_rejects_gpu_backends_on_cpu_naming_each():
    with pytest.raises(ConfigError) as e:
        select_backends(_cfg(attention="triton", norm="cuda"), "cpu")
    assert "model.attention=triton" in str(e.value) and "model.norm=cuda" in str(e.value)
    assert "CUDA" in str(e.value)
    with pytest.raises(ValueError, match="attention='flash'"):
        Backends(attention="flash")


def test_unknown_kernel_error_names_module_and_cause():
    with pytest.raises(
        RuntimeError, match=r"megapt.kernels.no_such_kernel is not available \(.*Error"
    ):
        ops._kernel("triton", "no_such_kernel")


TRITON_MODEL_CHECK = textwrap.dedent("""
    import torch
    from megapt.model.gpt import GPT, ModelArgs
    from megapt.model.ops import Backends
    args = ModelArgs(n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, ffn_hidden=64, vocab_size=64, max_seq_len=16)
    x = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(0))
    res = {}
    for name in ("eager", "triton"):
        m = GPT(args, Backends(name, name, name, name), seed=0)
        loss = m(x, x).loss
        loss.backward()
        res[name] = (loss.detach(), [p.grad for p in m.parameters()])
    torch.testing.assert_close(res["eager"][0], res["triton"][0], atol=1e-4, rtol=1e-4)
    for a, b in zip(res["eager"][1], res["triton"][1]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)
    print("OK")
""")


@pytest.mark.timeout(180)
def test_model_on_triton_kernels_matches_eager_under_interpreter():
    """The dispatch into megapt.kernels (flash attention with GQA, RMSNorm, RoPE, fused CE)
    gives the eager model's loss and gradients; run through TRITON_INTERPRET=1 on CPU."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-c", TRITON_MODEL_CHECK],
        env=env,
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]


TRITON_DOC_MASK_CHECK = textwrap.dedent("""
    import torch
    import megapt.model.gpt as gpt
    from megapt.model.gpt import GPT, ModelArgs
    from megapt.model.ops import Backends
    EOS = 1
    args = ModelArgs(n_layers=1, d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden=64, vocab_size=64, max_seq_len=48)
    x = torch.randint(2, 64, (2, 24), generator=torch.Generator().manual_seed(0))
    x[0, [4, 5, 17]] = EOS  # documents [0..4] [5] [6..17] [18..23]
    x[1, [11]] = EOS  # [0..11] [12..23]

    def run(backends, doc_mask=True, checkpointing=False):
        m = GPT(args, backends, seed=0, doc_mask=True, eos_id=EOS)
        m.gradient_checkpointing = checkpointing
        loss = m(x, x, doc_mask=doc_mask).loss
        loss.backward()
        return loss.detach(), [p.grad for p in m.parameters()]

    ref = run(Backends("sdpa", "eager", "eager", "eager"))
    built = []
    real = gpt.document_mask_from_starts
    gpt.document_mask_from_starts = lambda starts: built.append(starts.shape) or real(starts)
    tri = run(Backends("triton", "eager", "triton", "eager"), checkpointing=True)
    assert not built, f"(B, 1, T, T) mask built on the triton path: {built}"
    plain = run(Backends("sdpa", "eager", "eager", "eager"), doc_mask=False)
    torch.testing.assert_close(tri[0], ref[0], atol=1e-5, rtol=1e-5)
    for a, b in zip(tri[1], ref[1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-3)
    assert (plain[0] - ref[0]).abs() > 1e-3, "the document mask changed nothing: the check would be vacuous"
    print("OK", len(built))
""")


@pytest.mark.timeout(180)
def test_model_doc_mask_on_triton_kernels_matches_sdpa_under_interpreter():
    """doc_mask on the triton attention (document starts, no (B, 1, T, T) mask) and triton RoPE
    (per-sample positions), with gradient checkpointing, gives the loss and gradients of doc_mask
    on sdpa/eager with the explicit mask; run through TRITON_INTERPRET=1 on CPU."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-c", TRITON_DOC_MASK_CHECK],
        env=env,
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert r.returncode == 0 and "OK 0" in r.stdout, r.stderr[-3000:]


def test_select_backends_doc_mask_keeps_triton_and_refuses_cuda_attention(monkeypatch):
    # CUDA selection without a GPU: the kernel lookups are stubbed, the rules are real
    monkeypatch.setattr(ops, "_triton_importable", lambda: True)
    monkeypatch.setattr(ops, "_find_kernel", lambda backend, name: lambda *a, **k: None)
    monkeypatch.setattr(ops, "_cuda_extension_problem", lambda: "")
    auto = select_backends(_cfg(doc_mask=True), "cuda")
    assert auto.attention == "triton" and auto.rope == "triton"
    explicit = select_backends(_cfg(attention="triton", rope="triton", doc_mask=True), "cuda")
    assert explicit.attention == "triton" and explicit.rope == "triton"
    with pytest.raises(ConfigError, match="model.attention=cuda: model.doc_mask is not supported"):
        select_backends(_cfg(attention="cuda", doc_mask=True), "cuda")
    assert select_backends(_cfg(attention="cuda", doc_mask=False), "cuda").attention == "cuda"


def test_attention_doc_start_only_on_triton():
    q = torch.randn(1, 2, 4, 16)
    with pytest.raises(ValueError, match="takes no doc_start"):
        ops.attention(q, q, q, True, "sdpa", doc_start=torch.zeros(1, 4, dtype=torch.int32))
