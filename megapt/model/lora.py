"""LoRA adapters (Hu et al. 2021): y = x W^T + (alpha / r) * (x A^T) B^T, W frozen.

Model math only. ``LoRALinear`` keeps the wrapped layer's ``weight`` (and ``bias``) under the
same names, so a model with adapters still loads plain checkpoints (``strict=False`` for the
adapter tensors), and ``merge_lora`` folds every adapter back into its weight, giving a plain
``nn.Linear`` model with identical outputs.

    names = apply_lora(model, rank=8, alpha=16, targets=["wq", "wv"])   # freezes everything else
    ...train...
    merge_lora(model)                                                    # plain model again
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F


class LoRALinear(nn.Linear):
    """A Linear whose frozen weight is shared with the layer it replaces, plus A (r, in), B (out, r).

    B starts at zero, so the adapted model equals the base model before training.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank, self.alpha = rank, float(alpha)
        self.scaling = self.alpha / rank
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=dev, dtype=dt))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=dev, dtype=dt))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = F.linear(x, self.weight, self.bias)
        delta = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        return base + self.scaling * delta

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain Linear with W + (alpha/r) B A (computed in fp32, cast back)."""
        out = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        delta = (self.lora_B.float() @ self.lora_A.float()) * self.scaling  # (out, in)
        out.weight.copy_((self.weight.float() + delta).to(self.weight.dtype))
        if self.bias is not None:
            out.bias.copy_(self.bias)
        return out

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, rank={self.rank}, alpha={self.alpha}"


def _matches(name: str, targets: list[str]) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return any(leaf == t or re.fullmatch(t, name) for t in targets)


def apply_lora(
    model: nn.Module,
    rank: int,
    alpha: float,
    targets: list[str],
    dropout: float = 0.0,
    freeze_base: bool = True,
) -> list[str]:
    """Replace every nn.Linear whose leaf name is in ``targets`` (or whose full name matches one
    as a regex) by a LoRALinear; freeze all other parameters when ``freeze_base``.
    Returns the replaced module names; raises when nothing matched."""
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    replaced = []
    for name, module in list(model.named_modules()):
        if (
            isinstance(module, nn.Linear)
            and not isinstance(module, LoRALinear)
            and _matches(name, targets)
        ):
            if name.rsplit(".", 1)[-1] == "output":
                raise ValueError(
                    f"LoRA target {name!r}: the LM head is not supported (the loss reads "
                    "output.weight directly through the fused linear+cross-entropy)"
                )
            parent_name, _, leaf = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, leaf, LoRALinear(module, rank, alpha, dropout))
            replaced.append(name)
    if not replaced:
        linears = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        )
        raise ValueError(
            f"LoRA targets {targets} matched no Linear layer; Linear leaf names are {linears}"
        )
    return replaced


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base weight in place; returns how many were merged."""
    n = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent_name, _, leaf = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, leaf, module.merged())
            n += 1
    return n


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors (small file to save next to the base checkpoint)."""
    return {k: v for k, v in model.state_dict().items() if ".lora_A" in k or ".lora_B" in k}
