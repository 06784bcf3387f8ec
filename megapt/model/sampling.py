"""Text generation with a KV cache: greedy, temperature, top-k, top-p, stop tokens, batches.

    outs = generate(model, [tok.encode("def "), tok.encode("import os\\n")], max_new_tokens=64,
                    temperature=0.8, top_k=50, top_p=0.95, stop_ids=[tok.eos_id], seed=0)

Batches of prompts: prompts of equal length run together as one batch (one position per step
for the whole batch, so the model needs no padding mask); prompts of different lengths are
grouped by length and each group is one batch. Outputs come back in input order. Sampling uses
one generator per row, seeded from (seed, row index), so a run is reproducible.

Used by ``megapt generate`` (megapt/generate.py) and the trainer's end-of-run sample.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from megapt.errors import UsageError


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """(B, V) logits with everything outside the top-k / nucleus set to -inf."""
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        # drop a token when the mass strictly before it already reaches top_p (keeps >= 1 token)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    generators: Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """(B, V) -> (B,) token ids. temperature 0 = greedy (argmax)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = F.softmax(logits, dim=-1)
    if generators is None:
        return torch.multinomial(probs, 1).squeeze(-1)
    return torch.cat(
        [
            torch.multinomial(probs[i : i + 1], 1, generator=g).view(1)
            for i, g in enumerate(generators)
        ]
    )


def _logits_last(model, ids: torch.Tensor, kv_cache=None, start_pos: int = 0) -> torch.Tensor:
    out = model(ids, kv_cache=kv_cache, start_pos=start_pos)
    return out.logits[:, -1, :].float()  # (B, V)


def _new_cache(model, batch: int, max_len: int):
    return model.new_kv_cache(batch, max_len)


@torch.no_grad()
def _generate_group(
    model,
    prompts: torch.Tensor,
    max_new: int,
    temperature: float,
    top_k: int,
    top_p: float,
    stop_ids: set[int],
    generators,
    use_cache: bool,
) -> list[list[int]]:
    B, T0 = prompts.shape
    seqs = prompts
    done = torch.zeros(B, dtype=torch.bool, device=prompts.device)
    new_tokens: list[list[int]] = [[] for _ in range(B)]
    cache = _new_cache(model, B, T0 + max_new) if use_cache else None
    logits = _logits_last(model, prompts, cache, 0)
    for step in range(max_new):
        nxt = sample_next(logits, temperature, top_k, top_p, generators)  # (B,)
        for i in range(B):
            if done[i]:
                continue
            t = int(nxt[i])
            if t in stop_ids:
                done[i] = True
            else:
                new_tokens[i].append(t)
        if bool(done.all()) or step == max_new - 1:
            break
        seqs = torch.cat([seqs, nxt.view(B, 1)], dim=1)
        if use_cache:
            logits = _logits_last(model, nxt.view(B, 1), cache, T0 + step)
        else:
            logits = _logits_last(model, seqs)
    return new_tokens


def check_sampling(max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
    """UsageError (exit 2 from the CLI) naming the first setting out of range."""
    if max_new_tokens < 1:
        raise UsageError(f"max_new_tokens (--max-tokens) must be >= 1, got {max_new_tokens}")
    if not 0.0 < top_p <= 1.0:
        raise UsageError(f"top_p (--top-p) must be in (0, 1], got {top_p}")
    if not 0 <= temperature < math.inf:  # NaN fails too
        raise UsageError(
            f"temperature (--temperature) must be finite and >= 0 (0 = greedy), got {temperature}"
        )
    if top_k < 0:
        raise UsageError(f"top_k (--top-k) must be >= 0 (0 = off), got {top_k}")


@torch.no_grad()
def generate(
    model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_ids: Sequence[int] = (),
    seed: int = 0,
    use_cache: bool = True,
    max_seq_len: int | None = None,
) -> list[list[int]]:
    """New tokens for each prompt (stop token excluded), in input order. Settings out of range, an
    empty prompt or one too long for the model raise UsageError (a ValueError)."""
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    limit = max_seq_len or getattr(getattr(model, "args", None), "max_seq_len", None)
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise UsageError(f"prompt {i} is empty: give at least one token")
        if limit is not None and len(p) + max_new_tokens > limit:
            raise UsageError(
                f"prompt {i}: {len(p)} prompt tokens + "
                f"max_new_tokens={max_new_tokens} exceed the model's "
                f"max_seq_len={limit}; shorten the prompt or --max-tokens"
            )
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    groups: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        groups[len(p)].append(i)
    out: list[list[int]] = [[] for _ in prompts]
    try:
        for _, idx in sorted(groups.items()):
            batch = torch.tensor([list(prompts[i]) for i in idx], dtype=torch.long, device=device)
            gens = None
            if temperature > 0:
                gens = []
                for i in idx:
                    g = torch.Generator(device=device)
                    g.manual_seed(seed * 1_000_003 + i)
                    gens.append(g)
            res = _generate_group(
                model,
                batch,
                max_new_tokens,
                temperature,
                top_k,
                top_p,
                set(int(s) for s in stop_ids),
                gens,
                use_cache,
            )
            for i, r in zip(idx, res):
                out[i] = r
    finally:
        model.train(was_training)
    return out
