"""`megapt generate`: sample text from any model ``megapt.weights.source`` loads, with a KV cache
(the sampling itself: ``megapt.model.sampling``).

    megapt generate --from runs/tiny/checkpoints --prompt "def " --max-tokens 64 --temperature 0
"""

from __future__ import annotations

import sys

from megapt.errors import UsageError
from megapt.model.sampling import check_sampling, generate
from megapt.quantize import quantize_int8
from megapt.weights.source import load_source

# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def add_args(p) -> None:
    p.add_argument(
        "--from",
        dest="source",
        default="",
        help="checkpoint dir, finetune output or HF folder (default: finetune.init_from, else newest checkpoint)",
    )
    p.add_argument(
        "--prompt", action="append", default=[], help="prompt text (repeatable: a batch)"
    )
    p.add_argument("--prompt-file", default="", help="one prompt per line")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument(
        "--stop",
        action="append",
        default=[],
        help="stop token: a piece of the vocabulary (e.g. '<|endoftext|>') or an integer id; EOS always stops",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-cache",
        action="store_true",
        help="recompute the whole prefix each step (slow; for checks)",
    )
    p.add_argument("--int8", action="store_true", help="int8 weight-only quantized linears")


def _stop_ids(tok, stops: list[str]) -> list[int]:
    ids = [tok.eos_id]
    for s in stops:
        if s.lstrip("-").isdigit():
            ids.append(int(s))
            continue
        enc = tok.encode(s)
        if len(enc) != 1:
            raise UsageError(
                f"--stop {s!r} is {len(enc)} tokens {enc}; a stop must be one token "
                f"(or give its id)"
            )
        ids.append(enc[0])
    return ids


def cli_main(cfg, args) -> int:
    check_sampling(args.max_tokens, args.temperature, args.top_k, args.top_p)  # before loading
    prompts = list(args.prompt)
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                prompts += [line.rstrip("\n").replace("\\n", "\n") for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(
                f"--prompt-file {args.prompt_file}: cannot read it "
                f"({getattr(exc, 'strerror', None) or exc})"
            ) from None
    if not prompts:
        prompts = [cfg.train.sample_prompt]
    for i, p in enumerate(prompts):
        if not p:
            raise UsageError(f"prompt {i} is empty: give some text (--prompt 'def ')")
    src = load_source(cfg, args.source)
    model, tok = src.model, src.tokenizer()
    if args.int8:
        quantize_int8(model)
    enc = []
    for i, p in enumerate(prompts):
        ids = tok.encode(p)
        if not ids:
            raise UsageError(f"prompt {i} ({p!r}) encodes to zero tokens")
        enc.append(ids)
    outs = generate(
        model,
        enc,
        args.max_tokens,
        args.temperature,
        args.top_k,
        args.top_p,
        _stop_ids(tok, args.stop),
        args.seed,
        use_cache=not args.no_cache,
    )
    for p, o in zip(prompts, outs):
        sys.stdout.write(f"=== {p!r}\n{p}{tok.decode(o)}\n")
    return 0
