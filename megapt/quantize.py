"""int8 weight-only quantization for inference: per-output-channel symmetric.

    W (out, in) fp32  ->  q = round(W / s) in [-127, 127] int8,  s = max|W[row]| / 127  (out,)
    y = x @ (q * s)^T            (dequantised on the fly; activations stay in float)

Weights take 1 byte + 4 bytes per output channel instead of 4 (fp32) or 2 (bf16) bytes.
Embeddings and norms stay in float (an embedding lookup is not a matmul). ``megapt eval
--int8`` reports the perplexity of both models side by side.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> (int8 (out, in), fp32 scale (out,)). Zero rows get scale 1."""
    w = w.detach().float()
    amax = w.abs().amax(dim=1)  # (out,)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """Inference-only Linear with int8 weights and a per-output-channel fp32 scale."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = quantize_per_channel(linear.weight)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        self.register_buffer(
            "bias", None if linear.bias is None else linear.bias.detach().float().clone()
        )
        self.compute_dtype = linear.weight.dtype
        # the LM head (OutputHead) also computes the loss when given labels: keep its backend
        backends = getattr(linear, "backends", None)
        self.loss_backend = getattr(backends, "loss", None)

    @property
    def weight(self) -> torch.Tensor:
        """Dequantised weight (out, in) in the original dtype (for code that reads ``.weight``)."""
        return (self.qweight.float() * self.scale[:, None]).to(self.compute_dtype)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        b = None if self.bias is None else self.bias.to(x.dtype)
        if labels is None:
            return F.linear(x, self.weight.to(x.dtype), b)
        if self.loss_backend is None or b is not None:
            raise TypeError("Int8Linear: labels are only accepted for a quantized LM head")
        from megapt.model import ops

        return ops.linear_cross_entropy(
            x.reshape(-1, x.shape[-1]),
            self.weight.to(x.dtype),
            labels.reshape(-1),
            self.loss_backend,
        )

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, int8 per-channel"


def quantize_int8(model: nn.Module, skip: tuple[str, ...] = ()) -> list[str]:
    """Replace every nn.Linear (except names containing a ``skip`` entry) in place; returns the
    replaced names. A Linear whose weight is tied to an embedding is quantized as a copy (the
    embedding stays float)."""
    replaced = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and not any(s in name for s in skip):
            parent_name, _, leaf = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, leaf, Int8Linear(module))
            replaced.append(name)
    return replaced


def weight_bytes(model: nn.Module) -> int:
    """Bytes of parameters + buffers (what the weights cost in memory)."""
    seen, n = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            n += t.numel() * t.element_size()
    return n
