"""Which parameters train: ``apply_freezing`` sets ``requires_grad`` from the fine-tuning rules.

``megapt.train.optim.param_groups`` then hands ONLY trainable parameters to the optimizer, so
frozen ones get no optimizer state (no Adam moments, no weight decay) and stay bit-identical;
it also applies the layer-wise LR decay and the head LR multiplier.
"""

from __future__ import annotations

import re

import torch.nn as nn

from megapt.train.optim import block_index, is_embedding, is_head


def apply_freezing(
    model: nn.Module,
    n_layers: int,
    *,
    freeze_embeddings: bool = False,
    freeze_layers: int = 0,
    freeze_pattern: str = "",
    train_head_only: bool = False,
    train_top_layers: int = 0,
) -> dict[str, int]:
    """Set requires_grad on every parameter; returns {"trainable": n, "frozen": n} (elements).

    Rules compose: a parameter is frozen when any rule freezes it.
    ``train_top_layers=N`` freezes embeddings and every block below the top N (head, final norm
    and the top N blocks train). ``train_head_only`` freezes everything but ``head.*``.
    """
    if freeze_layers < 0 or freeze_layers > n_layers:
        raise ValueError(f"finetune.freeze_layers: must be in [0, {n_layers}], got {freeze_layers}")
    if train_top_layers < 0 or train_top_layers > n_layers:
        raise ValueError(
            f"finetune.train_top_layers: must be in [0, {n_layers}], got {train_top_layers}"
        )
    try:
        pattern = re.compile(freeze_pattern) if freeze_pattern else None
    except re.error as exc:
        raise ValueError(
            f"finetune.freeze_pattern: invalid regex {freeze_pattern!r}: {exc}"
        ) from None
    matched = 0
    for name, p in model.named_parameters():
        frozen = False
        b = block_index(name)
        if freeze_embeddings and is_embedding(name):
            frozen = True
        if b is not None and b < freeze_layers:
            frozen = True
        if pattern is not None and pattern.search(name):
            frozen, matched = True, matched + 1
        if train_head_only and not is_head(name):
            frozen = True
        if train_top_layers and not is_head(name):
            if is_embedding(name) or (b is not None and b < n_layers - train_top_layers):
                frozen = True
        if "lora_" in name:  # adapters always train
            frozen = False
        elif not p.requires_grad:  # already frozen (e.g. LoRA base weights) stays frozen
            frozen = True
        p.requires_grad_(not frozen)
    if pattern is not None and matched == 0:
        raise ValueError(
            f"finetune.freeze_pattern {freeze_pattern!r} matched no parameter; "
            f"names look like {[n for n, _ in model.named_parameters()][:4]}"
        )
    counts = {"trainable": 0, "frozen": 0}
    for p in _unique_params(model):
        counts["trainable" if p.requires_grad else "frozen"] += p.numel()
    if counts["trainable"] == 0:
        raise ValueError("finetune: every parameter is frozen; nothing to train")
    return counts


def _unique_params(model: nn.Module):
    seen = set()
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            yield p
