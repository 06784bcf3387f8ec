"""Text generation with a KV cache: greedy, temperature, top-k, top-p, stop tokens, batches.

    outs = generate(model, [tok.encode("def "), tok.encode("import os\\n")], max_new_tokens=64,
                    temperature=0.8, top_k=50, top_p=0.95, stop_ids=[tok.eos_id], seed=0)

Batches of prompts: prompts of equal length run together as one batch (one position per step
for the whole batch, so the model needs no padding mask); prompts of different lengths are
grouped by length and each group is one batch. Outputs come back in input order. Sampling uses
one generator per row, seeded from (seed, row index), so a run is reproducible.

    megapt generate --from runs/tiny/checkpoints --prompt "def " --max-tokens 64 --temperature 0
"""
from __future__ import annotations

import sys
from collections import defaultdict
from typing import Optional, Sequence

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


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generators: Optional[Sequence[torch.Generator]] = None) -> torch.Tensor:
    """(B, V) -> (B,) token ids. temperature 0 = greedy (argmax)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = F.softmax(logits, dim=-1)
    if generators is None:
        return torch.multinomial(probs, 1).squeeze(-1)
    return torch.cat([torch.multinomial(probs[i: i + 1], 1, generator=g).view(1)
                      for i, g in enumerate(generators)])


def _logits_last(model, ids: torch.Tensor, kv_cache=None, start_pos: int = 0) -> torch.Tensor:
    out = model(ids, kv_cache=kv_cache, start_pos=start_pos)
    return out.logits[:, -1, :].float()  # (B, V)


def _new_cache(model, batch: int, max_len: int):
    return model.new_kv_cache(batch, max_len)


@torch.no_grad()
def _generate_group(model, prompts: torch.Tensor, max_new: int, temperature: float, top_k: int,
                    top_p: float, stop_ids: set[int], generators, use_cache: bool) -> list[list[int]]:
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
    if temperature < 0:
        raise UsageError(f"temperature (--temperature) must be >= 0 (0 = greedy), "
                         f"got {temperature}")
    if top_k < 0:
        raise UsageError(f"top_k (--top-k) must be >= 0 (0 = off), got {top_k}")


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, stop_ids: Sequence[int] = (), seed: int = 0,
             use_cache: bool = True, max_seq_len: Optional[int] = None) -> list[list[int]]:
    """New tokens for each prompt (stop token excluded), in input order. Settings out of range, an
    empty prompt or one too long for the model raise UsageError (a ValueError)."""
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    limit = max_seq_len or getattr(getattr(model, "args", None), "max_seq_len", None)
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise UsageError(f"prompt {i} is empty: give at least one token")
        if limit is not None and len(p) + max_new_tokens > limit:
            raise UsageError(f"prompt {i}: {len(p)} prompt tokens + "
                             f"max_new_tokens={max_new_tokens} exceed the model's "
                             f"max_seq_len={limit}; shorten the prompt or --max-tokens")
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
            res = _generate_group(model, batch, max_new_tokens, temperature, top_k, top_p,
                                  set(int(s) for s in stop_ids), gens, use_cache)
            for i, r in zip(idx, res):
                out[i] = r
    finally:
        model.train(was_training)
    return out


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def add_args(p) -> None:
    p.add_argument("--from", dest="source", default="",
                   help="checkpoint dir, finetune output or HF folder (default: finetune.init_from, else newest checkpoint)")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable: a batch)")
    p.add_argument("--prompt-file", default="", help="one prompt per line")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[],
                   help="stop token: a piece of the vocabulary (e.g. '<|endoftext|>') or an integer id; EOS always stops")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", action="store_true", help="recompute the whole prefix each step (slow; for checks)")
    p.add_argument("--int8", action="store_true", help="int8 weight-only quantized linears")


def _stop_ids(tok, stops: list[str]) -> list[int]:
    ids = [tok.eos_id]
    for s in stops:
        if s.lstrip("-").isdigit():
            ids.append(int(s))
            continue
        enc = tok.encode(s)
        if len(enc) != 1:
            raise UsageError(f"--stop {s!r} is {len(enc)} tokens {enc}; a stop must be one token "
                             f"(or give its id)")
        ids.append(enc[0])
    return ids


def cli_main(cfg, args) -> int:
    from megapt.finetune.source import load_source

    check_sampling(args.max_tokens, args.temperature, args.top_k, args.top_p)  # before loading
    prompts = list(args.prompt)
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                prompts += [line.rstrip("\n").replace("\\n", "\n") for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"--prompt-file {args.prompt_file}: cannot read it "
                             f"({getattr(exc, 'strerror', None) or exc})") from None
    if not prompts:
        prompts = [cfg.train.sample_prompt]
    for i, p in enumerate(prompts):
        if not p:
            raise UsageError(f"prompt {i} is empty: give some text (--prompt 'def ')")
    src = load_source(cfg, args.source)
    model, tok = src.model, src.tokenizer()
    if args.int8:
        from megapt.quantize import quantize_int8

        quantize_int8(model)
    enc = []
    for i, p in enumerate(prompts):
        ids = tok.encode(p)
        if not ids:
            raise UsageError(f"prompt {i} ({p!r}) encodes to zero tokens")
        enc.append(ids)
    outs = generate(model, enc, args.max_tokens, args.temperature, args.top_k, args.top_p,
                    _stop_ids(tok, args.stop), args.seed, use_cache=not args.no_cache)
    for p, o in zip(prompts, outs):
        sys.stdout.write(f"=== {p!r}\n{p}{tok.decode(o)}\n")
    return 0
