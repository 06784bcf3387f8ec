"""The four hot operations of the model, each behind a backend chosen once from config.

    backends = select_backends(cfg.model, "cuda")   # resolves "auto", logs the choice once
    y = attention(q, k, v, causal=True, backend=backends.attention)

Backends per operation (``eager`` is always the reference math):

    attention  eager | sdpa | triton | cuda   q (B, nh, T, hs), k/v (B, n_kv, S, hs) -> (B, nh, T, hs)
    norm       eager | triton | cuda          RMSNorm over the last dim
    rope       eager | triton                 rotary embedding, HF Llama "rotate_half" layout
    loss       eager | chunked | triton       linear + cross-entropy without full logits (chunked/triton)

``auto`` resolves to the Triton kernels of ``megapt.kernels`` on CUDA when they are importable,
else to ``sdpa`` (attention) / ``eager`` (norm, rope) / ``chunked`` (loss). Asking explicitly for
a backend that cannot run here is an error that names it; nothing falls back silently in the
hot path. ``megapt.kernels`` is imported only when a triton/cuda backend is selected.
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from megapt.config import ConfigError

log = logging.getLogger("megapt")

IGNORE_INDEX = -100

ATTENTION_BACKENDS = ("eager", "sdpa", "triton", "cuda")
NORM_BACKENDS = ("eager", "triton", "cuda")
ROPE_BACKENDS = ("eager", "triton")
LOSS_BACKENDS = ("eager", "chunked", "triton")
DOC_START_BACKENDS = ("triton",)  # attention backends that take document starts instead of a mask


@dataclass(frozen=True)
class Backends:
    """Resolved backend per operation (no ``auto`` left). The defaults run on any device."""

    attention: str = "sdpa"
    norm: str = "eager"
    rope: str = "eager"
    loss: str = "chunked"

    def __post_init__(self) -> None:
        bad = [
            f"{op}={getattr(self, op)!r} (choose from {', '.join(allowed)})"
            for op, allowed in (
                ("attention", ATTENTION_BACKENDS),
                ("norm", NORM_BACKENDS),
                ("rope", ROPE_BACKENDS),
                ("loss", LOSS_BACKENDS),
            )
            if getattr(self, op) not in allowed
        ]
        if bad:
            raise ValueError("unknown model backend(s): " + "; ".join(bad))

    def describe(self) -> str:
        return f"attention={self.attention} norm={self.norm} rope={self.rope} loss={self.loss}"


# --------------------------------------------------------------------------------------------
# Kernel lookup (lazy: megapt.kernels is imported only for triton/cuda backends)
# --------------------------------------------------------------------------------------------

_KERNEL_CACHE: dict[tuple[str, str], Callable[..., Any]] = {}
_KERNEL_ERRORS: dict[tuple[str, str], str] = {}


def _find_kernel(backend: str, name: str) -> Callable[..., Any] | None:
    """``megapt.kernels.<name>`` (``megapt.kernels.cuda.<name>`` for cuda), or None when missing."""
    key = (backend, name)
    if key not in _KERNEL_CACHE:
        try:  # the package resolves names lazily: a missing submodule raises ImportError here
            mod = importlib.import_module(
                "megapt.kernels.cuda" if backend == "cuda" else "megapt.kernels"
            )
            fn = getattr(mod, name)
        except (ImportError, AttributeError) as exc:
            _KERNEL_ERRORS[key] = f"{type(exc).__name__}: {exc}"
            return None
        _KERNEL_CACHE[key] = fn
    return _KERNEL_CACHE[key]


def _missing(backend: str, name: str) -> str:
    where = "megapt.kernels.cuda" if backend == "cuda" else "megapt.kernels"
    return f"{where}.{name} is not available ({_KERNEL_ERRORS.get((backend, name), 'not found')})"


def _kernel(backend: str, name: str) -> Callable[..., Any]:
    fn = _find_kernel(backend, name)
    if fn is None:
        raise RuntimeError(
            f"model backend {backend!r}: {_missing(backend, name)}; choose another backend, "
            "e.g. --model.attention=sdpa --model.norm=eager --model.rope=eager --model.loss=chunked"
        )
    return fn


def _cuda_extension_problem() -> str:
    """Why ``megapt.kernels.cuda`` cannot build its C++ extension here ("" when it can)."""
    check = getattr(importlib.import_module("megapt.kernels.cuda"), "extension_available", None)
    if check is None:
        return ""
    ok, why = check()
    return "" if ok else f"the CUDA extension cannot be built: {why}"


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# Backend selection
# --------------------------------------------------------------------------------------------

_KERNEL_FOR = {
    "attention": "flash_attention",
    "norm": "rms_norm",
    "rope": "apply_rope",
    "loss": "fused_linear_cross_entropy",
}
_LOGGED: set[tuple[str, Backends]] = set()


def select_backends(model_cfg: Any, device: str | torch.device) -> Backends:
    """Resolve ``model_cfg.attention/norm/rope/loss`` (``auto`` or a name) for ``device``.

    ``model_cfg`` is a :class:`megapt.config.ModelConfig` (anything with those four attributes and
    optionally ``doc_mask``). Raises ``ConfigError`` naming every requested backend that cannot
    run on this device or whose kernel is missing. Logs the result once per distinct choice.
    """
    device_type = torch.device(device).type
    on_cuda = device_type == "cuda"
    doc_mask = bool(getattr(model_cfg, "doc_mask", False))
    triton_ok = on_cuda and _triton_importable()
    cpu_default = {"attention": "sdpa", "norm": "eager", "rope": "eager", "loss": "chunked"}

    chosen: dict[str, str] = {}
    problems: list[str] = []
    for op in ("attention", "norm", "rope", "loss"):
        want = getattr(model_cfg, op, "auto") or "auto"
        kernel = _KERNEL_FOR[op]
        # doc_mask: the triton flash kernel takes per-row document starts (O(T), no (T, T) mask)
        # and the triton rope per-sample cos/sin; sdpa/eager get the explicit (B, 1, T, T) mask.
        # Only a cuda attention kernel (none takes document starts) is refused.
        if want == "auto":
            use_triton = triton_ok and _find_kernel("triton", kernel) is not None
            chosen[op] = "triton" if use_triton else cpu_default[op]
            continue
        if doc_mask and op == "attention" and want == "cuda":
            problems.append(
                "model.attention=cuda: model.doc_mask is not supported by the cuda attention backend; "
                "use triton (document starts, O(T) memory) or sdpa/eager (explicit mask)"
            )
        elif want in ("triton", "cuda"):
            if not on_cuda:
                problems.append(f"model.{op}={want}: needs a CUDA device, running on {device_type}")
            elif want == "triton" and not _triton_importable():
                problems.append(
                    f"model.{op}=triton: triton is not installed (pip install -e '.[gpu]')"
                )
            elif _find_kernel(want, kernel) is None:
                problems.append(f"model.{op}={want}: {_missing(want, kernel)}")
            elif want == "cuda" and (why := _cuda_extension_problem()):
                problems.append(f"model.{op}=cuda: {why}")
        chosen[op] = want
    if problems:
        raise ConfigError(
            f"model backends: {len(problems)} requested backend(s) unavailable:\n  "
            + "\n  ".join(problems)
        )
    backends = Backends(**chosen)
    if (device_type, backends) not in _LOGGED:
        _LOGGED.add((device_type, backends))
        log.info("model backends on %s: %s", device_type, backends.describe())
    return backends


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------


AttentionFn = Callable[..., torch.Tensor]


def attention_impl(backend: str) -> AttentionFn:
    """The attention function of ``backend``, resolved once (kernel lookup included).

    The result is called as ``fn(q, k, v, causal, mask=None, doc_start=None)`` with the shapes of
    :func:`attention`; ``megapt.model.gpt.Attention`` picks it at construction, so the hot path
    does no backend dispatch. Raises ``ValueError`` for an unknown backend and ``RuntimeError``
    when a triton/cuda kernel is missing.
    """
    if backend == "sdpa":
        return _attention_sdpa
    if backend == "eager":
        return _attention_eager_checked
    if backend in ("triton", "cuda"):
        return functools.partial(_attention_kernel, backend, _kernel(backend, "flash_attention"))
    raise ValueError(
        f"unknown attention backend {backend!r} (choose from {', '.join(ATTENTION_BACKENDS)})"
    )


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    backend: str = "sdpa",
    *,
    mask: torch.Tensor | None = None,
    doc_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention with grouped-query heads.

    q (B, nh, T, hs); k, v (B, n_kv, S, hs) with n_kv dividing nh -> (B, nh, T, hs).
    ``causal`` aligns the causal diagonal top-left (query i sees keys <= i; use it with T == S).
    ``mask``: optional bool, True = may attend, broadcastable to (B, nh, T, S); combined with
    ``causal`` when both are given. Only eager and sdpa take a mask.
    ``doc_start``: optional (B, T) int, index of the first token of each token's document
    (packed rows, ``gpt.document_starts``); query i then sees keys doc_start[i] .. i. Only the
    triton backend takes it (with causal=True); the others need the equivalent ``mask``.
    One-off calls (tests, benchmarks); the model resolves ``attention_impl`` once instead.
    """
    return attention_impl(backend)(q, k, v, causal, mask=mask, doc_start=doc_start)


def _no_doc_start(backend: str, doc_start: torch.Tensor | None) -> None:
    if doc_start is not None:
        raise ValueError(
            f"attention backend {backend!r} takes no doc_start; pass the explicit document "
            "mask (gpt.document_mask) or use the triton backend"
        )


def _attention_sdpa(q, k, v, causal=True, *, mask=None, doc_start=None):
    _no_doc_start("sdpa", doc_start)
    if mask is not None and causal:
        mask = mask & _causal_mask(q.shape[-2], k.shape[-2], q.device)
    gqa = k.shape[1] != q.shape[1]
    if gqa and q.device.type == "cuda" and (mask is not None or q.dtype == torch.float32):
        # on CUDA only the flash kernel (fp16/bf16, no mask) takes enable_gqa; otherwise SDPA
        # would drop to the slow math kernel, so repeat kv heads for the memory-efficient one
        k, v, gqa = _repeat_kv(k, q.shape[1]), _repeat_kv(v, q.shape[1]), False
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal and mask is None, enable_gqa=gqa
    )


def _attention_eager_checked(q, k, v, causal=True, *, mask=None, doc_start=None):
    _no_doc_start("eager", doc_start)
    return attention_eager(q, k, v, causal, mask)


def _attention_kernel(backend, flash, q, k, v, causal=True, *, mask=None, doc_start=None):
    if mask is not None:
        raise ValueError(
            f"attention backend {backend!r} takes no explicit mask (doc_mask, cached "
            "decoding); use sdpa or eager"
        )
    if doc_start is not None:
        if backend != "triton":
            _no_doc_start(backend, doc_start)
        return flash(q, k, v, causal=causal, doc_start=doc_start)
    return flash(q, k, v, causal=causal)


def attention_eager(q, k, v, causal=True, mask=None):
    """Reference math, softmax in fp32 (or wider); materialises the (B, nh, T, S) score matrix."""
    nh, T, S = q.shape[1], q.shape[-2], k.shape[-2]
    k, v = _repeat_kv(k, nh), _repeat_kv(v, nh)  # (B, nh, S, hs)
    scores = (q @ k.transpose(-2, -1)).to(_acc_dtype(q)) * (
        1.0 / math.sqrt(q.shape[-1])
    )  # (B, nh, T, S)
    allowed = mask
    if causal:
        tri = _causal_mask(T, S, q.device)
        allowed = tri if allowed is None else allowed & tri
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(dim=-1).to(v.dtype) @ v  # (B, nh, T, hs)


def _causal_mask(T: int, S: int, device: torch.device) -> torch.Tensor:
    return torch.ones(T, S, dtype=torch.bool, device=device).tril()  # (T, S), top-left aligned


def _repeat_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(B, n_kv, S, hs) -> (B, n_heads, S, hs); kv head j serves query heads j*g .. j*g+g-1."""
    n_kv = x.shape[1]
    if n_kv == n_heads:
        return x
    return x.repeat_interleave(n_heads // n_kv, dim=1)


# --------------------------------------------------------------------------------------------
# RMSNorm and RoPE
# --------------------------------------------------------------------------------------------


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str = "eager"
) -> torch.Tensor:
    """x / rms(x) * weight over the last dim; normalised in fp32, cast back, then scaled (Llama)."""
    if backend == "eager":
        xf = x.to(_acc_dtype(x))
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return y.to(x.dtype) * weight
    if backend in ("triton", "cuda"):
        return _kernel(backend, "rms_norm")(x, weight, eps)
    raise ValueError(f"unknown norm backend {backend!r} (choose from {', '.join(NORM_BACKENDS)})")


def rope_cache(
    max_seq_len: int,
    head_dim: int,
    theta: float = 10000.0,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (max_seq_len, head_dim // 2) in fp32: angle[p, i] = p * theta^(-2i/hs).

    The aranges are integer and cast after: ``deepspeed.zero.Init(dtype=bf16)`` turns floating
    tensors made by ``torch.arange`` into bf16, which rounds positions above 256.
    """
    dims = torch.arange(0, head_dim, 2, device=device, dtype=torch.int64).to(torch.float32)
    inv_freq = 1.0 / (theta ** (dims / head_dim))  # (hs/2,)
    pos = torch.arange(max_seq_len, device=device, dtype=torch.int64).to(torch.float32)
    angles = torch.outer(pos, inv_freq)  # (max_seq_len, hs/2)
    return angles.cos(), angles.sin()


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: str = "eager"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (B, T, nh, hs) and k (B, T, n_kv, hs) by position.

    cos/sin: (T, hs/2) shared by the batch, or (B, T, hs/2) for per-sample positions (doc_mask,
    position_ids). HF Llama "rotate_half" layout: dim i pairs with dim i + hs/2.
    """
    if backend == "eager":
        return _rope_eager(q, cos, sin), _rope_eager(k, cos, sin)
    if backend == "triton":
        return _kernel("triton", "apply_rope")(q, k, cos, sin)
    raise ValueError(f"unknown rope backend {backend!r} (choose from {', '.join(ROPE_BACKENDS)})")


def _rope_eager(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos = torch.cat((cos, cos), dim=-1)  # (..., T, hs)
    sin = torch.cat((sin, sin), dim=-1)
    cos = cos[None, :, None, :] if cos.dim() == 2 else cos[:, :, None, :]  # (B or 1, T, 1, hs)
    sin = sin[None, :, None, :] if sin.dim() == 2 else sin[:, :, None, :]
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)  # rotate_half
    acc = _acc_dtype(x)
    return (x.to(acc) * cos + rotated.to(acc) * sin).to(x.dtype)


# --------------------------------------------------------------------------------------------
# Linear + cross-entropy
# --------------------------------------------------------------------------------------------


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    backend: str = "chunked",
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``labels``, over non-ignored rows.

    hidden (N, C), weight (V, C), labels (N,) -> scalar (fp32; fp64 for fp64 eager inputs).
    ``chunked`` (pure PyTorch) and ``triton`` are ``megapt.kernels``' chunked/fused linear-CE:
    they never hold more than (chunk_size, V) logits. ``eager`` materialises all (N, V). Every
    backend returns 0 (not NaN) when all labels are ``ignore_index``, so an all-padding
    micro-batch cannot poison a run.
    """
    if backend == "eager":
        logits = (hidden @ weight.t()).to(_acc_dtype(hidden))  # (N, V)
        n_valid = (labels != ignore_index).sum().clamp(min=1)
        return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum") / n_valid
    if backend == "chunked":
        fn = _kernel("chunked", "chunked_linear_cross_entropy")
    elif backend == "triton":
        fn = _kernel("triton", "fused_linear_cross_entropy")
    else:
        raise ValueError(
            f"unknown loss backend {backend!r} (choose from {', '.join(LOSS_BACKENDS)})"
        )
    return fn(hidden, weight, labels, ignore_index=ignore_index, chunk_size=chunk_size)


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    """fp32 for half types, the input's own dtype when wider (fp64 in gradient checks)."""
    return torch.promote_types(t.dtype, torch.float32)
