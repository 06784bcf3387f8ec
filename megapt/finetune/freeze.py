"""Which parameters train, and at which learning rate.

Freezing sets ``requires_grad=False``; ``param_groups`` then hands ONLY trainable parameters to
the optimizer, so frozen ones get no optimizer state (no Adam moments, no weight decay) and stay
bit-identical.

Layer-wise LR decay (ELECTRA/BEiT style): with L blocks, depth 0 = embeddings, depth i+1 =
block i, depth L+1 = final norm and the task head; a parameter at depth d trains at
``lr * decay ** (L + 1 - d)``. The new head additionally gets ``head_lr_mult``.
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Optional

import torch.nn as nn

_BLOCK = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def block_index(name: str) -> Optional[int]:
    m = _BLOCK.search(name)
    return int(m.group(1)) if m else None


def is_head(name: str) -> bool:
    return name.startswith("head.")


def is_embedding(name: str) -> bool:
    return "tok_embeddings" in name


def depth_of(name: str, n_layers: int) -> int:
    if is_embedding(name):
        return 0
    b = block_index(name)
    return b + 1 if b is not None else n_layers + 1


def apply_freezing(model: nn.Module, n_layers: int, *, freeze_embeddings: bool = False,
                   freeze_layers: int = 0, freeze_pattern: str = "", train_head_only: bool = False,
                   train_top_layers: int = 0) -> dict[str, int]:
    """Set requires_grad on every parameter; returns {"trainable": n, "frozen": n} (elements).

    Rules compose: a parameter is frozen when any rule freezes it.
    ``train_top_layers=N`` freezes embeddings and every block below the top N (head, final norm
    and the top N blocks train). ``train_head_only`` freezes everything but ``head.*``.
    """
    if freeze_layers < 0 or freeze_layers > n_layers:
        raise ValueError(f"finetune.freeze_layers: must be in [0, {n_layers}], got {freeze_layers}")
    if train_top_layers < 0 or train_top_layers > n_layers:
        raise ValueError(f"finetune.train_top_layers: must be in [0, {n_layers}], got {train_top_layers}")
    try:
        pattern = re.compile(freeze_pattern) if freeze_pattern else None
    except re.error as exc:
        raise ValueError(f"finetune.freeze_pattern: invalid regex {freeze_pattern!r}: {exc}") from None
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
        raise ValueError(f"finetune.freeze_pattern {freeze_pattern!r} matched no parameter; "
                         f"names look like {[n for n, _ in model.named_parameters()][:4]}")
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


def param_groups(model: nn.Module, n_layers: int, lr: float, weight_decay: float,
                 layer_lr_decay: float = 1.0, head_lr_mult: float = 1.0) -> list[dict]:
    """AdamW param groups of trainable parameters only, one per (depth, decay?, head?).

    Norm gains, biases and embeddings get no weight decay. Each group carries ``lr`` and
    ``lr_scale`` (its lr / base lr) so an LR schedule can rescale it.
    """
    if not 0.0 < layer_lr_decay <= 1.0:
        raise ValueError(f"finetune.layer_lr_decay: must be in (0, 1], got {layer_lr_decay}")
    groups: dict[tuple, list] = defaultdict(list)
    names: dict[tuple, list] = defaultdict(list)
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        depth = depth_of(name, n_layers)
        scale = layer_lr_decay ** (n_layers + 1 - depth)
        if is_head(name):
            scale *= head_lr_mult
        no_decay = p.ndim < 2 or is_embedding(name)
        key = (round(scale, 12), no_decay, is_head(name))
        groups[key].append(p)
        names[key].append(name)
    out = []
    for key in sorted(groups, key=lambda k: (k[0], k[1], k[2])):
        scale, no_decay, head = key
        out.append({"params": groups[key], "names": names[key], "lr": lr * scale, "lr_scale": scale,
                    "weight_decay": 0.0 if no_decay else weight_decay})
    return out
