"""A Llama-style decoder-only transformer: one file, read top to bottom.

ModelArgs (+ PRESETS) -> RMSNorm -> AttentionMask, AttentionCore, Attention (GQA, RoPE) ->
FeedForward (SwiGLU) -> Block -> GPT -> KVCache. Pre-norm blocks, no biases, rotary positions in
the HF Llama "rotate_half" layout (so HF export needs no permutation), optional tied embeddings.
The four hot operations go through ``megapt.model.ops`` and the backend chosen once from config.

    args = ModelArgs.from_config(cfg.model, vocab_size=tok.vocab_size, seq_len=cfg.data.seq_len)
    with torch.device("meta"):
        model = GPT(args, select_backends(cfg.model, "cuda"))
    model.to_empty(device="cuda"); model.init_weights(seed=cfg.run.seed)
    out = model(input_ids, labels)          # out.loss; logits are not materialised

Shapes: B batch, T sequence, C d_model, nh query heads, n_kv key/value heads, hs head_dim,
V vocab. Model code does no I/O, never imports DeepSpeed and never looks at ranks.

Hooks for model parallelism (the wiring lives in ``megapt.train.parallel``): every attention
layer calls its ``AttentionCore`` through one seam that sequence parallelism wraps, ``seq_shard``
selects the slice of the sequence this rank computes, and attention reads its head counts off the
projection widths, so tensor-parallel shards of the linear layers run the same code.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, fields
from typing import Any, overload

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from megapt.config import ConfigError
from megapt.model import ops
from megapt.model.ops import Backends

# --------------------------------------------------------------------------------------------
# Arguments and presets
# --------------------------------------------------------------------------------------------


def swiglu_hidden(d_model: int, multiple_of: int = 256, multiplier: float = 1.0) -> int:
    """Llama's SwiGLU width: 2/3 of 4*d_model (same params as a 4x GELU MLP), times
    ``multiplier``, rounded up to ``multiple_of``. 4096 -> 11008; 8192, 4096, 1.3 -> 28672."""
    hidden = int(multiplier * int(2 * 4 * d_model / 3))
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclass
class ModelArgs:
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int  # GQA: each kv head serves n_heads // n_kv_heads query heads
    ffn_hidden: int  # SwiGLU inner width
    vocab_size: int
    max_seq_len: int  # length of the RoPE table and the KV cache
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False  # output head shares tok_embeddings.weight
    init_std: float = 0.02  # normal init; wo/w2 use init_std / sqrt(2 * n_layers)
    dropout: float = 0.0  # on the attention and MLP outputs (before the residual add)

    def __post_init__(self) -> None:
        problems = [
            f"{f.name}: must be >= 1, got {getattr(self, f.name)}"
            for f in fields(self)
            if f.name
            in (
                "n_layers",
                "d_model",
                "n_heads",
                "n_kv_heads",
                "ffn_hidden",
                "vocab_size",
                "max_seq_len",
            )
            and getattr(self, f.name) < 1
        ]
        if not problems:
            if self.d_model % self.n_heads:
                problems.append(f"n_heads: {self.n_heads} must divide d_model {self.d_model}")
            elif self.head_dim % 2:
                problems.append(f"head_dim d_model/n_heads = {self.head_dim} must be even for RoPE")
            if self.n_heads % self.n_kv_heads:
                problems.append(f"n_kv_heads: {self.n_kv_heads} must divide n_heads {self.n_heads}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout: must be in [0, 1), got {self.dropout}")
        if self.init_std <= 0 or self.rope_theta <= 0 or self.norm_eps <= 0:
            problems.append(
                "init_std, rope_theta and norm_eps must be > 0, got "
                f"{self.init_std}, {self.rope_theta}, {self.norm_eps}"
            )
        if problems:
            raise ConfigError(
                f"model args: {len(problems)} problem(s):\n  " + "\n  ".join(problems)
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    # ---- construction ----

    @classmethod
    def from_preset(
        cls, name: str, vocab_size: int, max_seq_len: int, **overrides: Any
    ) -> ModelArgs:
        if name not in PRESETS:
            raise ConfigError(f"model.preset: unknown {name!r}; choose from {', '.join(PRESETS)}")
        return cls(
            **{**PRESETS[name], "vocab_size": vocab_size, "max_seq_len": max_seq_len, **overrides}
        )

    @classmethod
    def from_config(cls, model_cfg: Any, vocab_size: int, seq_len: int) -> ModelArgs:
        """Preset named by ``model_cfg.preset`` + every non-None override in ``model_cfg``.

        ``vocab_size`` is the tokenizer's (``model.vocab_size`` may only enlarge it, e.g. to pad
        to a multiple of 64); ``max_seq_len`` defaults to the data ``seq_len``. When ``d_model``
        is overridden but ``ffn_hidden`` is not, the SwiGLU width follows the new d_model
        (``swiglu_hidden(d_model, 64)``).
        """
        if model_cfg.preset not in PRESETS:
            raise ConfigError(
                f"model.preset: unknown {model_cfg.preset!r}; choose from {', '.join(PRESETS)}"
            )
        kw = dict(PRESETS[model_cfg.preset])
        for name in (
            "n_layers",
            "d_model",
            "n_heads",
            "n_kv_heads",
            "ffn_hidden",
            "rope_theta",
            "norm_eps",
            "tie_embeddings",
            "init_std",
        ):
            value = getattr(model_cfg, name, None)
            if value is not None:
                kw[name] = value
        if (
            getattr(model_cfg, "d_model", None) is not None
            and getattr(model_cfg, "ffn_hidden", None) is None
        ):
            kw["ffn_hidden"] = swiglu_hidden(kw["d_model"], 64)
        if getattr(model_cfg, "vocab_size", None) is not None:
            if model_cfg.vocab_size < vocab_size:
                raise ConfigError(
                    f"model.vocab_size: {model_cfg.vocab_size} is smaller than the tokenizer's "
                    f"vocabulary ({vocab_size}); token ids would fall outside the embedding"
                )
            vocab_size = model_cfg.vocab_size
        max_seq_len = getattr(model_cfg, "max_seq_len", None) or seq_len
        if max_seq_len < seq_len:
            raise ConfigError(
                f"model.max_seq_len: {max_seq_len} is shorter than data.seq_len {seq_len}"
            )
        return cls(
            **kw,
            vocab_size=vocab_size,
            max_seq_len=max_seq_len,
            dropout=float(getattr(model_cfg, "dropout", 0.0) or 0.0),
        )

    # ---- accounting ----

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count from the shapes (equals ``sum(p.numel())`` of the built GPT).

        ``exclude_embeddings=True`` drops the input embedding table, a lookup with no FLOPs.
        The output head (V x C) is a real matmul and stays counted; with tied embeddings the
        shared matrix is that head, so nothing is dropped (nanoGPT's convention).
        """
        C, hs, V = self.d_model, self.head_dim, self.vocab_size
        attn = (
            C * self.n_heads * hs + 2 * C * self.n_kv_heads * hs + self.n_heads * hs * C
        )  # wq, wk+wv, wo
        ffn = 3 * C * self.ffn_hidden  # w1, w3, w2
        body = self.n_layers * (attn + ffn + 2 * C) + C  # + 2 norms per block + final norm
        head = V * C  # output projection (the embedding table itself when tied)
        embed = 0 if self.tie_embeddings else V * C
        return body + head + (0 if exclude_embeddings else embed)

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B:

            6 * N + 12 * L * H * Q * T

        N = ``num_params(exclude_embeddings=True)``: every weight that takes part in a matmul,
        i.e. all parameters except the input embedding lookup, with the output head counted
        (tied or not; norm weights are included, a negligible 2*L*C+C). L layers, H query heads,
        Q head_dim, T = ``seq_len`` (default ``max_seq_len``). The attention term counts the full
        T x T score and value matmuls, as PaLM does (no halving for the causal mask); GQA does
        not change it. Activation recomputation is not included (this is the MFU numerator).
        """
        N = self.num_params(exclude_embeddings=True)
        return 6.0 * N + self.attention_flops_per_token(seq_len)

    def attention_flops_per_token(self, seq_len: int | None = None) -> float:
        """The attention term of ``flops_per_token``: 12 * L * H * Q * T (full T x T window)."""
        T = self.max_seq_len if seq_len is None else seq_len
        return 12.0 * self.n_layers * self.n_heads * self.head_dim * T

    def hardware_flops_per_token(
        self, seq_len: int | None = None, recompute: bool = False
    ) -> float:
        """FLOPs the hardware runs per token (the HFU numerator): ``flops_per_token`` plus, under
        activation checkpointing, the forward recomputed in backward (2 * N + 4 * L * H * Q * T,
        a third of it): 8 * N + 16 * L * H * Q * T in all."""
        model = self.flops_per_token(seq_len)
        if not recompute:
            return model
        forward = 2.0 * self.num_params(exclude_embeddings=True)
        return model + forward + self.attention_flops_per_token(seq_len) / 3

    def mfu(
        self, tokens_per_s_per_device: float, peak_flops: float | None, seq_len: int | None = None
    ) -> float | None:
        """Model FLOPs utilisation (0..1): tokens/s per device x ``flops_per_token`` / peak FLOP/s
        of one device (``megapt.hardware``); None without a peak (CPU, unknown GPU)."""
        if not peak_flops:
            return None
        return tokens_per_s_per_device * self.flops_per_token(seq_len) / peak_flops

    def hfu(
        self,
        tokens_per_s_per_device: float,
        peak_flops: float | None,
        seq_len: int | None = None,
        recompute: bool = False,
    ) -> float | None:
        """Hardware FLOPs utilisation: as ``mfu`` with ``hardware_flops_per_token``."""
        if not peak_flops:
            return None
        flops = self.hardware_flops_per_token(seq_len, recompute)
        return tokens_per_s_per_device * flops / peak_flops


# The accounting above in words, for records that carry numbers made with it (benchmark JSON).
MFU_FORMULA = (
    "MFU = tokens_per_s_per_device * (6*N + 12*L*H*Q*T) / peak_flops_per_device; "
    "N = matmul parameters (all except an untied input embedding), L layers, "
    "H query heads, Q head dim, T sequence length (PaLM, Chowdhery et al. 2022, "
    "appendix B; megapt.model.gpt.ModelArgs.flops_per_token)"
)
HFU_FORMULA = (
    "HFU = tokens_per_s_per_device * hardware_flops / peak; hardware_flops = "
    "6*N + 12*L*H*Q*T without activation checkpointing, 8*N + 16*L*H*Q*T with it "
    "(the forward is recomputed; ModelArgs.hardware_flops_per_token)"
)


# Named sizes. vocab_size and max_seq_len come from the tokenizer and the data at run time.
PRESETS: dict[str, dict[str, Any]] = {
    # CPU seconds: 4 layers, GQA 4:2, head_dim 64
    "tiny": dict(
        n_layers=4, d_model=256, n_heads=4, n_kv_heads=2, ffn_hidden=swiglu_hidden(256, 64)
    ),
    # GPT-2 small / medium shapes; SwiGLU at 8/3 width has the params of GPT-2's 4x MLP
    "124m": dict(
        n_layers=12,
        d_model=768,
        n_heads=12,
        n_kv_heads=12,
        ffn_hidden=swiglu_hidden(768),
        tie_embeddings=True,
    ),
    "350m": dict(
        n_layers=24,
        d_model=1024,
        n_heads=16,
        n_kv_heads=16,
        ffn_hidden=swiglu_hidden(1024),
        tie_embeddings=True,
    ),
    # Llama-3.2-1B / 3B shapes (tied, GQA 8 kv heads, theta 5e5)
    "1b": dict(
        n_layers=16,
        d_model=2048,
        n_heads=32,
        n_kv_heads=8,
        ffn_hidden=swiglu_hidden(2048, 256, 1.5),
        tie_embeddings=True,
        rope_theta=500000.0,
    ),
    "3b": dict(
        n_layers=28,
        d_model=3072,
        n_heads=24,
        n_kv_heads=8,
        ffn_hidden=swiglu_hidden(3072, 256),
        tie_embeddings=True,
        rope_theta=500000.0,
    ),
    # Llama-2 shapes
    "7b": dict(
        n_layers=32, d_model=4096, n_heads=32, n_kv_heads=32, ffn_hidden=swiglu_hidden(4096)
    ),
    "13b": dict(
        n_layers=40, d_model=5120, n_heads=40, n_kv_heads=40, ffn_hidden=swiglu_hidden(5120)
    ),
    "70b": dict(
        n_layers=80,
        d_model=8192,
        n_heads=64,
        n_kv_heads=8,
        ffn_hidden=swiglu_hidden(8192, 4096, 1.3),
    ),
}


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5, backends: Backends | None = None):
        super().__init__()
        self.eps = eps
        self.backends = backends or Backends()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps, self.backends.norm)


@dataclass(frozen=True)
class AttentionMask:
    """Which keys each query may see; built once per forward and shared by every layer.

    ``causal``: top-left causal diagonal. ``mask`` (B or 1, 1, T, S) bool, True = may attend
    (sdpa/eager: document masks, cached decoding). ``doc_start`` (B, T) int32: each token's
    document start, for the triton kernel (O(T) instead of a (T, T) mask).
    """

    causal: bool = True
    mask: torch.Tensor | None = None
    doc_start: torch.Tensor | None = None


class AttentionCore(nn.Module):
    """softmax(q k^T / sqrt(hs)) v over sequence-major tensors, its backend resolved once.

    q (B, T, nh, hs), k/v (B, S, n_kv, hs) -> (B, T, nh, hs). The one seam through which
    attention leaves the block: sequence parallelism (``megapt.train.parallel``) wraps it with
    an all-to-all that hands it whole sequences and a share of the heads.
    """

    def __init__(self, backend: str):
        super().__init__()
        self.set_backend(backend)

    def set_backend(self, backend: str) -> None:
        self.backend = backend
        self.fn = ops.attention_impl(backend)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionMask
    ) -> torch.Tensor:
        y = self.fn(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            spec.causal,
            mask=spec.mask,
            doc_start=spec.doc_start,
        )  # (B, nh, T, hs)
        return y.transpose(1, 2)

    def extra_repr(self) -> str:
        return f"backend={self.backend}"


class Attention(nn.Module):
    """Grouped-query attention with RoPE. Head counts are read off the projections' widths
    (``view(B, T, -1, hs)``), so a tensor-parallel shard of wq/wk/wv/wo (whole heads per rank)
    runs this same code on its local heads."""

    def __init__(self, args: ModelArgs, layer_id: int, backends: Backends | None = None):
        super().__init__()
        self.layer_id = layer_id
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.d_model, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.d_model, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.d_model, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.d_model, bias=False)
        self.dropout = nn.Dropout(args.dropout)
        self.core = AttentionCore("sdpa")
        self.set_backends(backends or Backends())

    def set_backends(self, backends: Backends) -> None:
        """Pick the implementations once: training attention (through ``core``), the rope
        backend, and for cached decoding (query offsets, T = 1) sdpa in place of the flash
        kernels, which serve training."""
        for m in self.modules():
            if isinstance(m, AttentionCore):
                m.set_backend(backends.attention)
        self.rope = backends.rope
        decode = "sdpa" if backends.attention in ("triton", "cuda") else backends.attention
        self.decode_fn = ops.attention_impl(decode)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        spec: AttentionMask,
        kv_cache: KVCache | None = None,
        start_pos: int = 0,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        hs = self.head_dim
        q = self.wq(x).view(B, T, -1, hs)  # (B, T, nh, hs)
        k = self.wk(x).view(B, T, -1, hs)  # (B, T, n_kv, hs)
        v = self.wv(x).view(B, T, -1, hs)
        q, k = ops.apply_rope(q, k, cos, sin, self.rope)
        if kv_cache is None:
            y = self.core(q, k, v, spec)  # (B, T, nh, hs)
        else:
            k, v = kv_cache.update(self.layer_id, start_pos, k.transpose(1, 2), v.transpose(1, 2))
            y = self.decode_fn(q.transpose(1, 2), k, v, spec.causal, mask=spec.mask)
            y = y.transpose(1, 2)  # (B, T, nh, hs)
        return self.dropout(self.wo(y.reshape(B, T, -1)))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.d_model, args.ffn_hidden, bias=False)  # gate
        self.w3 = nn.Linear(args.d_model, args.ffn_hidden, bias=False)  # up
        self.w2 = nn.Linear(args.ffn_hidden, args.d_model, bias=False)  # down
        self.dropout = nn.Dropout(args.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int, backends: Backends | None = None):
        super().__init__()
        self.attention_norm = RMSNorm(args.d_model, args.norm_eps, backends)
        self.attention = Attention(args, layer_id, backends)
        self.ffn_norm = RMSNorm(args.d_model, args.norm_eps, backends)
        self.feed_forward = FeedForward(args)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        spec: AttentionMask,
        kv_cache: KVCache | None = None,
        start_pos: int = 0,
    ) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, spec, kv_cache, start_pos)
        return x + self.feed_forward(self.ffn_norm(x))


class OutputHead(nn.Linear):
    """The LM head, (B, T, C) -> logits (B, T, V); with labels, the mean loss instead.

    The loss runs inside this module's forward because ZeRO-3 gathers a module's parameters only
    around that module's own forward: the head weight (V, C) is never touched from outside.
    """

    def __init__(self, d_model: int, vocab_size: int, backends: Backends | None = None):
        super().__init__(d_model, vocab_size, bias=False)
        self.backends = backends or Backends()

    def forward(self, h: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None:
            return super().forward(h)  # (B, T, V)
        return ops.linear_cross_entropy(
            h.reshape(-1, h.shape[-1]), self.weight, labels.reshape(-1), self.backends.loss
        )  # scalar; (chunk, V) logits at a time


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


class ModelOutput(dict):
    """The forward's result: a dict with attribute access.

    A dict (not a dataclass) because DeepSpeed registers its backward-prologue hooks (ZeRO's
    backward set-up, timers) only on tensor/tuple/list/dict outputs of the engine's forward.
    """

    logits: torch.Tensor | None  # (B, T, V); None when labels were given (loss via the fused path)
    loss: torch.Tensor | None  # scalar fp32 mean over labels != -100
    hidden: torch.Tensor | None  # (B, T, C) after the final norm, when return_hidden

    def __init__(
        self,
        logits: torch.Tensor | None = None,
        loss: torch.Tensor | None = None,
        hidden: torch.Tensor | None = None,
    ):
        super().__init__(logits=logits, loss=loss, hidden=hidden)

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class GPT(nn.Module):
    rope_cos: torch.Tensor  # buffers (max_seq_len, hs/2), registered in __init__
    rope_sin: torch.Tensor

    def __init__(
        self,
        args: ModelArgs,
        backends: Backends | None = None,
        *,
        seed: int = 0,
        doc_mask: bool = False,
        eos_id: int | None = None,
    ):
        """Build the model; unless built on the meta device, weights come from ``init_weights(seed)``.

        ``doc_mask``: attend only within documents of a packed row (split after each ``eos_id``
        token) with positions restarting at 0 in each document. The trainer sets
        ``gradient_checkpointing = True`` to recompute each block in backward, and
        ``megapt.train.parallel`` sets ``seq_shard`` under sequence parallelism.
        """
        super().__init__()
        self.args = args
        self.backends = backends or Backends()
        self.doc_mask = doc_mask
        self.eos_id = eos_id
        self.gradient_checkpointing = False
        # (index, count): compute only slice ``index`` of ``count`` equal slices of each sequence,
        # the attention core seeing whole sequences (an all-to-all around it; Ulysses). None: all.
        self.seq_shard: tuple[int, int] | None = None
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.d_model)
        self.layers = nn.ModuleList(Block(args, i, self.backends) for i in range(args.n_layers))
        self.norm = RMSNorm(args.d_model, args.norm_eps, self.backends)
        self.output = OutputHead(args.d_model, args.vocab_size, self.backends)
        self.tie_weights()
        cos, sin = ops.rope_cache(
            args.max_seq_len,
            args.head_dim,
            args.rope_theta,
            device=self.tok_embeddings.weight.device,
        )
        self.register_buffer("rope_cos", cos, persistent=False)  # (max_seq_len, hs/2)
        self.register_buffer("rope_sin", sin, persistent=False)
        if self.tok_embeddings.weight.device.type != "meta":
            self.init_weights(seed)

    def tie_weights(self) -> None:
        if self.args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def set_backends(self, backends: Backends) -> None:
        """Switch every operation's backend (e.g. eager for a reference run)."""
        self.backends = backends
        for m in self.modules():
            if isinstance(m, (RMSNorm, OutputHead)):
                m.backends = backends
            elif isinstance(m, Attention):
                m.set_backends(backends)

    # ---- initialisation: init_weights -> init_parameter, the one rule for every weight ----

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Deterministic init from ``seed``, valid after ``to_empty`` from the meta device.

        Each parameter gets ``init_parameter(name, p, seed)``, so the result does not depend on
        construction order and a meta build equals a direct build on the same device type. Also
        recomputes the RoPE tables and re-ties the output head.
        """
        self.tie_weights()
        for name, p in self.named_parameters():
            if p.device.type == "meta":
                raise RuntimeError(
                    f"init_weights: {name} is on the meta device; call "
                    "model.to_empty(device=...) first"
                )
            self.init_parameter(name, p, seed)
        self.reset_rope_cache()

    @torch.no_grad()
    def init_parameter(self, name: str, p: torch.Tensor, seed: int = 0) -> None:
        """The init of one parameter, by its name: norm weights = 1; linear/embedding weights
        ~ N(0, init_std), wo and w2 (projections into the residual stream) ~ N(0, init_std /
        sqrt(2 L)); drawn from a generator seeded by (seed, name) on the parameter's device.

        Under ``deepspeed.zero.Init`` parameters are partitioned as each submodule is built, so
        the engine calls this for one gathered parameter at a time (``create_engine``).
        """
        if name.endswith("norm.weight"):
            p.fill_(1.0)
            return
        std = self.args.init_std
        if name.endswith(("wo.weight", "w2.weight")):  # projections into the residual stream
            std /= math.sqrt(2 * self.args.n_layers)
        gen = torch.Generator(device=p.device)
        gen.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
        if p.dtype in (torch.float32, torch.float64):
            p.normal_(0.0, std, generator=gen)
        else:  # draw in fp32 so bf16/fp16 weights are the rounded fp32 ones
            draw = torch.empty(p.shape, dtype=torch.float32, device=p.device)
            p.copy_(draw.normal_(0.0, std, generator=gen))

    def to_empty(self, *, device: torch.device | str | int | None, recurse: bool = True) -> GPT:
        """``nn.Module.to_empty`` that keeps the model usable without ``init_weights``: it
        re-ties the head (to_empty makes a new tensor per module) and recomputes the RoPE tables
        (buffers that no checkpoint holds), so ``to_empty`` + ``load_state_dict`` is complete."""
        super().to_empty(device=device, recurse=recurse)
        self.tie_weights()
        self.reset_rope_cache()
        return self

    def reset_rope_cache(self) -> None:
        cos, sin = ops.rope_cache(
            self.args.max_seq_len,
            self.args.head_dim,
            self.args.rope_theta,
            device=self.rope_cos.device,
        )
        self.rope_cos = cos.to(self.rope_cos.dtype)
        self.rope_sin = sin.to(self.rope_sin.dtype)

    # ---- forward ----

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        kv_cache: KVCache | None = None,
        start_pos: int = 0,
        return_hidden: bool = False,
        position_ids: torch.Tensor | None = None,
        doc_mask: bool | None = None,
    ) -> ModelOutput:
        """input_ids (B, T) -> ModelOutput.

        labels (B, T) (-100 = ignore): the mean loss goes through the loss backend (fused
        linear+CE) and logits stay None. kv_cache/start_pos: incremental decoding, the tokens sit
        at positions start_pos .. start_pos+T-1. position_ids (T,) or (B, T) override positions.
        doc_mask (default ``self.doc_mask``): block attention across EOS boundaries (see
        ``attention_inputs``). Under ``seq_shard`` the blocks run on this rank's slice of the
        sequence and ``loss`` is this slice's share of the sequence mean (the shares of a
        sequence-parallel group sum to it).
        """
        spec, cos, sin = self.attention_inputs(
            input_ids, kv_cache, start_pos, position_ids, doc_mask
        )
        tokens, targets = self.local_slice(input_ids), self.local_slice(labels)
        h = self.tok_embeddings(tokens)  # (B, T, C); T is this rank's slice under seq_shard
        for layer in self.layers:
            h = self.run_layer(layer, h, cos, sin, spec, kv_cache, start_pos)
        h = self.norm(h)  # (B, T, C)
        return self.head(h, targets, labels, return_hidden)

    def run_layer(
        self,
        layer: nn.Module,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        spec: AttentionMask,
        kv_cache: KVCache | None,
        start_pos: int,
    ) -> torch.Tensor:
        """One block; recomputed in backward under ``gradient_checkpointing`` while training."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(layer, h, cos, sin, spec, use_reentrant=False)
        return layer(h, cos, sin, spec, kv_cache, start_pos)

    def head(
        self,
        h: torch.Tensor,
        targets: torch.Tensor | None,
        labels: torch.Tensor | None,
        return_hidden: bool,
    ) -> ModelOutput:
        """Final hidden states -> logits, or (with labels) the fused linear + CE loss (no (B, T, V)
        logits). ``targets`` are this rank's slice of ``labels``."""
        if targets is None:
            return ModelOutput(logits=self.output(h), hidden=h if return_hidden else None)
        loss = self.output(h, targets)  # mean over this slice's labels != -100
        if self.seq_shard is not None:
            assert labels is not None  # targets is this rank's slice of labels
            n_here = (targets != ops.IGNORE_INDEX).sum()
            loss = loss * n_here / (labels != ops.IGNORE_INDEX).sum().clamp(min=1)
        return ModelOutput(loss=loss, hidden=h if return_hidden else None)

    def attention_inputs(
        self,
        input_ids: torch.Tensor,
        kv_cache: KVCache | None,
        start_pos: int,
        position_ids: torch.Tensor | None,
        doc_mask: bool | None,
    ) -> tuple[AttentionMask, torch.Tensor, torch.Tensor]:
        """Who sees whom, for the whole sequence, and the RoPE cos/sin of this rank's tokens.

        doc_mask: the triton attention gets each token's document start (B, T) and skips other
        documents' key blocks (O(T) memory); sdpa/eager get the explicit (B, 1, T, T) mask;
        positions restart at 0 per document. Cached decoding past position 0: query i (at
        start_pos + i) sees keys 0 .. start_pos + i.
        """
        B, T = input_ids.shape
        device = input_ids.device
        spec = AttentionMask()
        if self.doc_mask if doc_mask is None else doc_mask:
            if kv_cache is not None:
                raise ValueError(
                    "doc_mask is for packed training rows; it cannot be combined with kv_cache"
                )
            if self.eos_id is None:
                raise ValueError(
                    "doc_mask needs the tokenizer's EOS id: GPT(args, eos_id=tok.eos_id) "
                    "or model.eos_id = tok.eos_id"
                )
            starts = document_starts(input_ids, self.eos_id)  # (B, T)
            if position_ids is None:
                position_ids = torch.arange(T, device=device) - starts  # restart at 0 per document
            if self.backends.attention in ops.DOC_START_BACKENDS:
                spec = AttentionMask(doc_start=starts.to(torch.int32))  # converted once, all layers
            else:  # the document mask is already causal
                spec = AttentionMask(causal=False, mask=document_mask_from_starts(starts))
        elif kv_cache is not None and start_pos > 0:
            S = start_pos + T  # keys held after this step
            mask = None
            if T > 1:  # query i (at position start_pos + i) sees keys 0 .. start_pos + i
                q_pos = torch.arange(start_pos, S, device=device)
                mask = torch.arange(S, device=device)[None, :] <= q_pos[:, None]  # (T, S)
            spec = AttentionMask(causal=False, mask=mask)
        if kv_cache is not None and self.seq_shard is not None:
            raise ValueError("cached decoding runs on whole sequences; clear model.seq_shard first")
        if position_ids is None:
            if start_pos + T > self.args.max_seq_len:
                raise ValueError(
                    f"positions {start_pos}..{start_pos + T - 1} exceed max_seq_len "
                    f"{self.args.max_seq_len} (ModelArgs.max_seq_len / --model.max_seq_len)"
                )
            cos = self.rope_cos[start_pos : start_pos + T]  # (T, hs/2)
            sin = self.rope_sin[start_pos : start_pos + T]
        else:
            cos, sin = (
                self.rope_cos[position_ids],
                self.rope_sin[position_ids],
            )  # (B or T, ..., hs/2)
        t_dim = cos.dim() - 2
        return spec, self.local_slice(cos, dim=t_dim), self.local_slice(sin, dim=t_dim)

    @overload
    def local_slice(self, t: torch.Tensor, dim: int = 1) -> torch.Tensor: ...

    @overload
    def local_slice(self, t: None, dim: int = 1) -> None: ...

    def local_slice(self, t: torch.Tensor | None, dim: int = 1) -> torch.Tensor | None:
        """This rank's slice of ``t`` along its sequence dimension ``dim`` (all of it without
        ``seq_shard``)."""
        if t is None or self.seq_shard is None:
            return t
        index, count = self.seq_shard
        T = t.shape[dim]
        if T % count:
            raise ValueError(
                f"sequence length {T} is not divisible by the {count} "
                "sequence-parallel ranks (data.seq_len must be a multiple of "
                "train.sequence_parallel)"
            )
        return t.narrow(dim, index * (T // count), T // count)

    # ---- generation ----

    def new_kv_cache(self, batch_size: int, max_seq_len: int | None = None) -> KVCache:
        p = self.tok_embeddings.weight
        return KVCache(self.args, batch_size, max_seq_len, device=p.device, dtype=p.dtype)


@dataclass(frozen=True)
class ParamInfo:
    """One parameter tensor of the model: what the memory planner sizes its states from."""

    name: str  # as in GPT.named_parameters() (a tied head appears once, as tok_embeddings.weight)
    shape: tuple[int, ...]
    kind: str  # "embedding" (a lookup table), "norm" (RMSNorm scale) or "linear" (a matmul weight)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def param_table(args: ModelArgs) -> list[ParamInfo]:
    """Every parameter of ``GPT(args)``, read off the model built on the meta device (no memory,
    no init): name, shape and kind. Whatever the model holds, this lists; nothing is re-typed."""
    with torch.device("meta"):
        model = GPT(args)
    kinds: dict[int, str] = {}
    for module in model.modules():  # registration order: the embedding claims a tied head first
        kind = (
            "embedding"
            if isinstance(module, nn.Embedding)
            else "norm"
            if isinstance(module, RMSNorm)
            else "linear"
            if isinstance(module, nn.Linear)
            else None
        )
        for p in module.parameters(recurse=False):
            if kind is None:
                raise TypeError(f"param_table: no kind for a parameter of {type(module).__name__}")
            kinds.setdefault(id(p), kind)
    return [ParamInfo(name, tuple(p.shape), kinds[id(p)]) for name, p in model.named_parameters()]


def document_starts(input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Index of the first token of the document holding each token of a packed row, (B, T) int64.

    A document ends with (and includes) its EOS token; the next token starts a new document.
    Non-decreasing along T; O(B*T). (Same as ``megapt.kernels.flash_attn.doc_start_from_ids``.)
    """
    B, T = input_ids.shape
    idx = torch.arange(T, device=input_ids.device).expand(B, T)
    starts = torch.zeros(B, T, dtype=torch.long, device=input_ids.device)
    starts[:, 1:] = (input_ids[:, :-1] == eos_id).long() * idx[
        :, 1:
    ]  # first token after an EOS, else 0
    return torch.cummax(starts, dim=1).values  # (B, T)


def document_mask_from_starts(starts: torch.Tensor) -> torch.Tensor:
    """(B, T) document starts -> (B, 1, T, T) bool, True where query i may see key j: starts[i] <= j <= i."""
    T = starts.shape[1]
    j = torch.arange(T, device=starts.device)
    return ((j[None, None, :] >= starts[:, :, None]) & (j[None, None, :] <= j[None, :, None]))[
        :, None
    ]


def document_mask(input_ids: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions within each document and the block-diagonal causal mask of a packed row.

    A document ends with (and includes) its EOS token; the next token starts a new document at
    position 0. Returns positions (B, T) and mask (B, 1, T, T), True where query i may see key j.
    """
    starts = document_starts(input_ids, eos_id)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device) - starts  # (B, T)
    return positions, document_mask_from_starts(starts)


class KVCache:
    """Preallocated keys/values, one (B, n_kv, max_T, hs) pair per layer."""

    def __init__(
        self,
        args: ModelArgs,
        batch_size: int,
        max_seq_len: int | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        self.max_seq_len = max_seq_len or args.max_seq_len
        shape = (batch_size, args.n_kv_heads, self.max_seq_len, args.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]

    def update(self, layer: int, start_pos: int, k: torch.Tensor, v: torch.Tensor):
        """Write k/v (B, n_kv, T, hs) at start_pos; return all keys/values so far (B, n_kv, start_pos+T, hs)."""
        B, end = k.shape[0], start_pos + k.shape[2]
        if end > self.max_seq_len:
            raise ValueError(f"KV cache holds {self.max_seq_len} positions, step needs {end}")
        self.k[layer][:B, :, start_pos:end] = k
        self.v[layer][:B, :, start_pos:end] = v
        return self.k[layer][:B, :, :end], self.v[layer][:B, :, :end]
