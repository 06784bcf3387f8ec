"""Task heads on top of the GPT backbone: sequence classification and regression.

Model math only (no I/O). The backbone is any module whose ``forward(input_ids,
return_hidden=True)`` returns an object with ``.hidden`` of shape (B, T, C) (megapt ``GPT``).

Sequences are right-padded: a causal model never lets a real token see a pad that comes after
it, so the backbone needs no attention mask; pooling then reads only the real positions.

    model = GPTForSequenceClassification(gpt, num_classes=5, pooling="last", dropout=0.1)
    out = model(input_ids, attention_mask, labels)   # out.logits (B, 5), out.loss
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


def pool_hidden(
    hidden: torch.Tensor, attention_mask: torch.Tensor | None, pooling: str
) -> torch.Tensor:
    """(B, T, C) hidden states -> (B, C).

    ``last``: the last position whose mask is 1 (works for right or left padding);
    ``mean``: the average over positions whose mask is 1.
    """
    B, T, _ = hidden.shape
    if attention_mask is None:
        attention_mask = torch.ones(B, T, dtype=torch.long, device=hidden.device)
    mask = attention_mask.to(hidden.device)
    if bool((mask.sum(dim=1) == 0).any()):
        raise ValueError("pool_hidden: a sequence has no real tokens (attention_mask all zero)")
    if pooling == "last":
        pos = torch.arange(T, device=hidden.device).expand(B, T)
        last = torch.where(mask.bool(), pos, torch.full_like(pos, -1)).max(dim=1).values  # (B,)
        return hidden[torch.arange(B, device=hidden.device), last]  # (B, C)
    if pooling == "mean":
        m = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
        return (hidden * m).sum(dim=1) / m.sum(dim=1)
    raise ValueError(f"pooling must be 'last' or 'mean', got {pooling!r}")


class SequenceHead(nn.Module):
    """dropout -> Linear(d_model, n_out). n_out = classes (classification) or 1 (regression)."""

    def __init__(self, d_model: int, n_out: int, dropout: float = 0.0, init_std: float = 0.02):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(d_model, n_out, bias=True)
        nn.init.normal_(self.proj.weight, std=init_std)
        nn.init.zeros_(self.proj.bias)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.proj(self.dropout(pooled))


@dataclass
class HeadOutput:
    logits: torch.Tensor  # (B, n_out)
    loss: torch.Tensor | None = None
    pooled: torch.Tensor | None = None  # (B, C)


class GPTForSequenceClassification(nn.Module):
    """Backbone + pooled head. ``num_classes=1`` with ``regression=True`` gives an MSE regressor.

    Parameters are named ``backbone.*`` and ``head.*`` so freezing rules and layer-wise LR can
    tell them apart.
    """

    def __init__(
        self,
        backbone: nn.Module,
        d_model: int,
        num_classes: int,
        pooling: str = "last",
        dropout: float = 0.0,
        regression: bool = False,
    ):
        super().__init__()
        if pooling not in ("last", "mean"):
            raise ValueError(f"pooling must be 'last' or 'mean', got {pooling!r}")
        if regression and num_classes != 1:
            raise ValueError(f"a regression head has one output, got num_classes={num_classes}")
        if not regression and num_classes < 2:
            raise ValueError(f"classification needs >= 2 classes, got {num_classes}")
        self.backbone = backbone
        self.pooling = pooling
        self.regression = regression
        self.num_classes = num_classes
        self.head = SequenceHead(d_model, num_classes, dropout)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> HeadOutput:
        hidden = self.backbone(input_ids, return_hidden=True).hidden  # (B, T, C)
        pooled = pool_hidden(hidden, attention_mask, self.pooling)  # (B, C)
        logits = self.head(pooled.to(self.head.proj.weight.dtype))  # (B, n_out)
        loss = None
        if labels is not None:
            if self.regression:
                loss = F.mse_loss(logits.squeeze(-1).float(), labels.float())
            else:
                loss = F.cross_entropy(logits.float(), labels.long())
        return HeadOutput(logits=logits, loss=loss, pooled=pooled)
