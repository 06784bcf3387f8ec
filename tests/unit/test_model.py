"""megapt.model.gpt: sizes, init, causality, caching, document masks, checkpointing, HF parity."""

import pytest
import torch
import torch.nn.functional as F

from megapt.config import ConfigError, ModelConfig
from megapt.model.gpt import GPT, PRESETS, ModelArgs, document_mask
from megapt.model.ops import Backends

EAGER = Backends(attention="eager", norm="eager", rope="eager", loss="eager")
SDPA = Backends(attention="sdpa", norm="eager", rope="eager", loss="chunked")


def small_args(**kw):
    base = dict(
        n_layers=2,
        d_model=64,
        n_heads=4,
        n_kv_heads=2,
        ffn_hidden=96,
        vocab_size=97,
        max_seq_len=48,
    )
    return ModelArgs(**{**base, **kw})


# ---------------------------------------------------------------- sizes


def _by_hand(L, C, nh, nkv, F_, V, tied):
    hs = C // nh
    per_layer = C * C + 2 * C * nkv * hs + C * C + 3 * C * F_ + 2 * C
    return L * per_layer + C + V * C * (1 if tied else 2)


# Published totals where they exist (HF model cards / config counts), else the formula by hand.
EXPECTED = {
    "tiny": (4096, _by_hand(4, 256, 4, 2, 704, 4096, False)),
    "124m": (
        50257,
        38_597_376 + 12 * (4 * 768 * 768 + 3 * 768 * 2048 + 2 * 768) + 768,
    ),  # ~123.6M, tied
    "350m": (50257, _by_hand(24, 1024, 16, 16, 2816, 50257, True)),
    "1b": (128256, 1_235_814_400),  # Llama-3.2-1B
    "3b": (128256, 3_212_749_824),  # Llama-3.2-3B
    "7b": (32000, 6_738_415_616),  # Llama-2-7B
    "13b": (32000, 13_015_864_320),  # Llama-2-13B
    "70b": (32000, 68_976_648_192),  # Llama-2-70B
}


def test_every_preset_has_an_expected_size():
    assert set(PRESETS) == set(EXPECTED)


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_builds_on_meta_with_expected_param_count(name):
    vocab, expected = EXPECTED[name]
    args = ModelArgs.from_preset(name, vocab_size=vocab, max_seq_len=128)
    with torch.device("meta"):
        model = GPT(args)
    assert sum(p.numel() for p in model.parameters()) == expected == args.num_params()
    if args.tie_embeddings:
        assert model.output.weight is model.tok_embeddings.weight


def test_124m_is_gpt2_small_sized_and_70b_uses_gqa():
    a = ModelArgs.from_preset("124m", 50257, 1024)
    assert (a.n_layers, a.d_model, a.n_heads) == (12, 768, 12)
    assert 123e6 < a.num_params() < 125e6
    b = ModelArgs.from_preset("70b", 32000, 4096)
    assert (b.n_layers, b.d_model, b.n_heads, b.n_kv_heads, b.ffn_hidden) == (
        80,
        8192,
        64,
        8,
        28672,
    )


def test_flops_per_token_by_hand_for_7b():
    a = ModelArgs.from_preset("7b", 32000, 4096)
    n_no_embed = 6_738_415_616 - 32000 * 4096  # the untied output head stays, input lookup goes
    assert a.num_params(exclude_embeddings=True) == n_no_embed
    attn = 12 * 32 * 32 * 128 * 4096  # 12 * L * H * Q * T
    assert a.flops_per_token(4096) == 6 * 6_607_343_616 + attn == 46_086_512_640
    assert a.flops_per_token() == a.flops_per_token(a.max_seq_len)


@pytest.mark.parametrize("tie,n_kv_heads", [(False, 2), (True, 4)])
def test_flops_per_token_equals_the_matmul_flops_torch_counts(tie, n_kv_heads):
    """6N + 12·L·H·Q·T against an independent count: torch's FlopCounterMode over a real forward
    + backward (eager kernels: plain matmuls). It counts matmuls only, so the norm weights that N
    includes (2L + 1 vectors of d_model, 6 FLOPs each per token in the formula) are the difference."""
    from torch.utils.flop_counter import FlopCounterMode

    args = small_args(tie_embeddings=tie, n_kv_heads=n_kv_heads, max_seq_len=32)
    model = GPT(args, EAGER)
    B, T = 3, 32
    x = torch.randint(0, args.vocab_size, (B, T))
    with FlopCounterMode(display=False) as counter:
        model(x, labels=x).loss.backward()
    norms = (2 * args.n_layers + 1) * args.d_model
    assert counter.get_total_flops() == B * T * (args.flops_per_token(T) - 6 * norms)


def test_from_config_overrides_and_errors():
    cfg = ModelConfig(preset="tiny", n_layers=2, d_model=128, dropout=0.1)
    a = ModelArgs.from_config(cfg, vocab_size=1000, seq_len=64)
    assert (
        a.n_layers,
        a.d_model,
        a.n_heads,
        a.n_kv_heads,
        a.vocab_size,
        a.max_seq_len,
        a.dropout,
    ) == (2, 128, 4, 2, 1000, 64, 0.1)
    assert a.ffn_hidden % 64 == 0 and 2 * 128 <= a.ffn_hidden <= 3 * 128  # follows the new d_model
    assert (
        ModelArgs.from_config(ModelConfig(vocab_size=1024, max_seq_len=512), 1000, 64).vocab_size
        == 1024
    )
    with pytest.raises(ConfigError, match="model.vocab_size"):
        ModelArgs.from_config(ModelConfig(vocab_size=512), 1000, 64)
    with pytest.raises(ConfigError, match="model.preset: unknown 'huge'"):
        ModelArgs.from_config(ModelConfig(preset="huge"), 1000, 64)
    with pytest.raises(ConfigError) as e:
        ModelArgs.from_config(ModelConfig(n_heads=6, n_kv_heads=4), 1000, 64)
    assert "n_heads: 6 must divide d_model 256" in str(
        e.value
    ) and "n_kv_heads: 4 must divide" in str(e.value)


# ---------------------------------------------------------------- init


@pytest.mark.parametrize("tied", [False, True])
def test_meta_build_then_init_equals_direct_build(tied):
    args = small_args(tie_embeddings=tied)
    direct = GPT(args, seed=7)
    with torch.device("meta"):
        lazy = GPT(args)
    lazy.to_empty(device="cpu")
    lazy.init_weights(seed=7)
    assert (lazy.output.weight is lazy.tok_embeddings.weight) == tied
    sd_direct, sd_lazy = direct.state_dict(), lazy.state_dict()
    assert sd_direct.keys() == sd_lazy.keys()
    for k in sd_direct:
        assert torch.equal(sd_direct[k], sd_lazy[k]), k
    assert torch.equal(direct.rope_cos, lazy.rope_cos) and torch.equal(
        direct.rope_sin, lazy.rope_sin
    )
    other = GPT(args, seed=8)
    assert not torch.equal(
        other.layers[0].attention.wq.weight, direct.layers[0].attention.wq.weight
    )


def test_meta_build_then_load_state_dict_without_init_is_complete():
    args = small_args(tie_embeddings=True)
    direct = GPT(args, SDPA, seed=5)
    with torch.device("meta"):
        lazy = GPT(args, SDPA)
    lazy.to_empty(device="cpu")
    lazy.load_state_dict(direct.state_dict())  # RoPE tables are not in it: to_empty rebuilt them
    assert lazy.output.weight is lazy.tok_embeddings.weight
    x = torch.randint(0, 97, (2, 12))
    torch.testing.assert_close(lazy(x).logits, direct(x).logits)


def test_init_scales_residual_projections():
    args = small_args(n_layers=8, d_model=128, ffn_hidden=512, init_std=0.05)
    m = GPT(args, seed=0)
    resid = 0.05 / (2 * 8) ** 0.5
    for w, std in (
        (m.layers[3].feed_forward.w2.weight, resid),
        (m.layers[3].attention.wo.weight, resid),
        (m.layers[3].feed_forward.w1.weight, 0.05),
        (m.tok_embeddings.weight, 0.05),
    ):
        assert abs(w.std().item() / std - 1) < 0.1
    assert torch.all(m.layers[0].attention_norm.weight == 1)


# ---------------------------------------------------------------- forward behaviour


def test_gqa_equals_mha_with_repeated_kv_weights():
    torch.manual_seed(0)
    gqa_args, mha_args = small_args(n_kv_heads=2), small_args(n_kv_heads=4)
    gqa, mha = GPT(gqa_args, SDPA, seed=1), GPT(mha_args, SDPA, seed=2)
    hs, group = gqa_args.head_dim, 2
    sd = gqa.state_dict()
    for k, v in list(sd.items()):
        if k.endswith(
            ("wk.weight", "wv.weight")
        ):  # (n_kv*hs, C) -> (nh*hs, C), head j uses kv head j//g
            sd[k] = v.view(2, hs, -1).repeat_interleave(group, dim=0).reshape(4 * hs, -1)
    mha.load_state_dict(sd)
    x = torch.randint(0, 97, (2, 20))
    torch.testing.assert_close(gqa(x).logits, mha(x).logits)


@pytest.mark.parametrize("backends", [EAGER, SDPA], ids=["eager", "sdpa"])
def test_future_tokens_do_not_change_earlier_logits(backends):
    torch.manual_seed(0)
    m = GPT(small_args(), backends, seed=0)
    x = torch.randint(0, 97, (2, 24))
    y = x.clone()
    y[:, 10:] = torch.randint(0, 97, (2, 14))
    a, b = m(x).logits, m(y).logits
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_loss_equals_cross_entropy_of_logits_for_every_loss_backend():
    torch.manual_seed(0)
    m = GPT(small_args(), EAGER, seed=0)
    x = torch.randint(0, 97, (3, 16))
    labels = torch.randint(0, 97, (3, 16))
    labels[0, :5] = -100
    want = F.cross_entropy(m(x).logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    grads = {}
    for loss_backend in ("eager", "chunked"):
        m.set_backends(Backends(attention="eager", norm="eager", rope="eager", loss=loss_backend))
        m.zero_grad()
        out = m(x, labels)
        assert out.logits is None
        torch.testing.assert_close(out.loss, want)
        out.loss.backward()
        grads[loss_backend] = [p.grad.clone() for p in m.parameters()]
    for a, b in zip(grads["eager"], grads["chunked"]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_eager_and_sdpa_models_agree():
    torch.manual_seed(0)
    m = GPT(small_args(), EAGER, seed=3)
    x = torch.randint(0, 97, (2, 20))
    ref = m(x, x).loss
    ref.backward()
    g_ref = m.layers[0].attention.wq.weight.grad.clone()
    m.zero_grad()
    m.set_backends(SDPA)
    out = m(x, x).loss
    out.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(m.layers[0].attention.wq.weight.grad, g_ref, atol=1e-6, rtol=1e-4)


def test_kv_cache_prefill_in_pieces_equals_full_forward_and_cached_greedy_matches():
    torch.manual_seed(0)
    m = GPT(small_args(init_std=0.2), SDPA, seed=0).eval()  # larger init: well-separated argmaxes
    x = torch.randint(0, 97, (2, 20))
    full = m(x).logits
    cache = m.new_kv_cache(2)
    pieces = [
        m(x[:, a:b], kv_cache=cache, start_pos=a).logits for a, b in ((0, 7), (7, 8), (8, 20))
    ]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-4)
    # greedy decoding: one token per step through the cache vs the whole sequence every step
    cached, uncached = x[:, :6], x[:, :6]
    cache, pos = m.new_kv_cache(2, 26), 0
    for _ in range(20):
        nxt = m(cached[:, pos:], kv_cache=cache, start_pos=pos).logits[:, -1].argmax(-1)
        pos = cached.shape[1]
        cached = torch.cat([cached, nxt[:, None]], dim=1)
        uncached = torch.cat([uncached, m(uncached).logits[:, -1].argmax(-1)[:, None]], dim=1)
    assert torch.equal(cached, uncached)
    with pytest.raises(ValueError, match="KV cache holds 26"):
        m(x[:, :1], kv_cache=cache, start_pos=26)


def test_document_mask_positions_and_mask():
    eos = 0
    ids = torch.tensor([[5, 6, 0, 7, 8, 9, 0, 4]])
    pos, mask = document_mask(ids, eos)
    assert pos.tolist() == [[0, 1, 2, 0, 1, 2, 3, 0]]
    assert mask.shape == (1, 1, 8, 8)
    assert mask[0, 0, 4].tolist() == [False, False, False, True, True, False, False, False]
    assert mask[0, 0, 2].tolist() == [True, True, True, False, False, False, False, False]


@pytest.mark.parametrize("backends", [EAGER, SDPA], ids=["eager", "sdpa"])
def test_doc_mask_blocks_cross_document_attention(backends):
    eos = 1
    torch.manual_seed(0)
    m = GPT(small_args(), backends, seed=0, doc_mask=True, eos_id=eos)
    doc_a, doc_b = torch.tensor([5, 9, 12, 40, eos]), torch.tensor([7, 3, 88, 21, 60, 2])
    row = torch.cat([doc_a, doc_b])[None]
    packed = m(row).logits
    # doc B sees neither doc A nor its positions: same as running B alone from position 0
    alone = m(doc_b[None], doc_mask=False).logits
    torch.testing.assert_close(packed[:, 5:], alone, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        packed[:, :5], m(doc_a[None], doc_mask=False).logits, atol=1e-5, rtol=1e-4
    )
    # without the mask, doc A leaks into doc B
    assert not torch.allclose(m(row, doc_mask=False).logits[:, 5:], alone, atol=1e-3)
    m.eos_id = None
    with pytest.raises(ValueError, match="eos_id"):
        m(row)


def test_activation_checkpointing_gives_same_grads_with_dropout():
    args = small_args(dropout=0.1)
    m = GPT(args, SDPA, seed=0).train()
    x = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    grads = []
    for ckpt in (False, True):
        m.gradient_checkpointing = ckpt
        m.zero_grad()
        torch.manual_seed(123)
        loss = m(x, x).loss
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in m.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b)


def test_too_long_input_names_max_seq_len():
    m = GPT(small_args(max_seq_len=8), seed=0)
    with pytest.raises(ValueError, match="max_seq_len 8"):
        m(torch.zeros(1, 9, dtype=torch.long))


# ---------------------------------------------------------------- Hugging Face parity


def test_matches_hf_llama_without_weight_permutation():
    transformers = pytest.importorskip("transformers")
    args = small_args(n_layers=2, rope_theta=500000.0, norm_eps=1e-6)
    m = GPT(args, EAGER, seed=0)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.d_model,
        intermediate_size=args.ffn_hidden,
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_kv_heads,
        max_position_embeddings=args.max_seq_len,
        rope_theta=args.rope_theta,
        rms_norm_eps=args.norm_eps,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    names = {
        "tok_embeddings": "model.embed_tokens",
        "norm": "model.norm",
        "output": "lm_head",
        "attention.wq": "self_attn.q_proj",
        "attention.wk": "self_attn.k_proj",
        "attention.wv": "self_attn.v_proj",
        "attention.wo": "self_attn.o_proj",
        "feed_forward.w1": "mlp.gate_proj",
        "feed_forward.w3": "mlp.up_proj",
        "feed_forward.w2": "mlp.down_proj",
        "attention_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
    }
    sd = {}
    for k, v in m.state_dict().items():
        if k.startswith("layers."):
            _, i, rest = k.split(".", 2)
            mod = rest.rsplit(".", 1)[0]
            sd[f"model.layers.{i}.{names[mod]}.weight"] = v
        else:
            sd[f"{names[k.rsplit('.', 1)[0]]}.weight"] = v
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    x = torch.randint(0, args.vocab_size, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(m(x).logits, hf(x).logits, atol=1e-5, rtol=1e-4)
