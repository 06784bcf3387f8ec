"""`megapt <verb>`: thin. Parses arguments, loads the config, calls one function.

Every verb takes ``-c/--config FILE`` (repeatable; later files win) and any number of
``--section.key=value`` overrides. Each verb lives in its own module, which provides
``add_args(parser)`` (optional) and ``cli_main(cfg, args) -> int``; modules are imported only
when their verb runs, so ``megapt data ...`` never imports DeepSpeed.

Errors: a ``megapt.errors.UserError`` (bad config, argument, file, data, checkpoint) escaping a
verb becomes one line ``megapt <verb>: <kind>: <message>`` on stderr and the error's exit code
(the table in megapt/errors.py); Ctrl-C exits 130; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib
import re
import sys
import traceback
from typing import NoReturn

from megapt.config import describe, load_config, save_config, to_dict
from megapt.errors import EXIT_INTERRUPTED, EXIT_USAGE, UsageError, UserError

# verb (one or two words) -> (module, one-line help)
VERBS: dict[tuple[str, ...], tuple[str, str]] = {
    ("data", "clean"): ("megapt.data.clean", "normalise, filter and deduplicate raw text"),
    ("tokenizer", "train"): (
        "megapt.data.tokenizer",
        "train a sentencepiece tokenizer on the corpus",
    ),
    ("data", "shard"): (
        "megapt.data.shard",
        "tokenize in parallel and write WebDataset shards + manifest",
    ),
    ("data", "merge"): ("megapt.data.manifest", "merge partial manifests of a split shard job"),
    ("data", "verify"): ("megapt.data.manifest", "check every shard against its manifest"),
    ("data", "index"): ("megapt.data.wds", "write a manifest for existing WebDataset token shards"),
    ("data", "prepare"): (
        "megapt.data.prepare",
        "clean + tokenizer + shards, skipping steps already done",
    ),
    ("train",): ("megapt.train.trainer", "pretrain (DeepSpeed engine; prepares data when needed)"),
    ("finetune",): ("megapt.finetune.cli", "fine-tune: classification, regression, SFT, LoRA"),
    ("eval",): ("megapt.eval.evaluate", "perplexity / accuracy on held-out data"),
    ("generate",): ("megapt.generate", "sample text from a checkpoint (KV cache)"),
    ("export",): ("megapt.export", "export to / import from Hugging Face format"),
    ("plan",): ("megapt.planner", "predict per-GPU memory before launch"),
    ("bench",): ("megapt.bench.cli", "throughput / MFU / memory benchmarks"),
    ("ckpt", "consolidate"): (
        "megapt.weights.consolidate",
        "write one safetensors file from a ZeRO checkpoint",
    ),
    ("ckpt", "universal"): (
        "megapt.weights.consolidate",
        "convert a ZeRO checkpoint to a reshardable universal one",
    ),
    ("config",): ("megapt.cli", "print the resolved config (or --describe every key)"),
}

_OVERRIDE = re.compile(r"^--?[A-Za-z_][\w]*\.[\w.]+=")


def _usage() -> str:
    lines = [
        "usage: megapt <verb> [-c CONFIG.yaml ...] [--section.key=value ...] [options]",
        "",
        "verbs:",
    ]
    for verb, (_, text) in VERBS.items():
        lines.append(f"  {' '.join(verb):<22} {text}")
    return "\n".join(lines)


def _find_verb(argv: list[str]) -> tuple[tuple[str, ...], list[str]] | None:
    if len(argv) >= 2 and tuple(argv[:2]) in VERBS:
        return tuple(argv[:2]), argv[2:]
    if argv and (argv[0],) in VERBS:
        return (argv[0],), argv[1:]
    return None


def _no_verb(argv: list[str]) -> int:
    """`megapt GROUP --help` lists the verbs (exit 0); a group without its verb or an unknown verb
    is a usage error (the list and one line naming it on stderr, exit 2)."""
    groups = {v[0] for v in VERBS if len(v) > 1}
    if argv[0] in groups and argv[1:2] in (["-h"], ["--help"]):
        print(_usage())
        return 0
    print(_usage(), file=sys.stderr)
    if argv[0] in groups:
        subs = ", ".join(v[1] for v in VERBS if len(v) > 1 and v[0] == argv[0])
        what = f"which one? ({subs})" if len(argv) == 1 else f"unknown verb {' '.join(argv[:2])!r}"
        print(f"megapt {argv[0]}: usage error: {what}", file=sys.stderr)
    else:
        print(f"megapt: usage error: unknown verb {argv[0]!r}", file=sys.stderr)
    return EXIT_USAGE


# `megapt config`: the verb implemented here


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--describe", action="store_true", help="list every key with default and help")
    p.add_argument("--save", default="", help="also write the resolved config to this YAML file")


def cli_main(cfg, args) -> int:
    import yaml

    if args.describe:
        print("\n".join(describe()))
        return 0
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    if args.save:
        try:
            save_config(cfg, args.save)
        except OSError as exc:
            why = exc.strerror or exc
            raise UsageError(f"--save {args.save}: cannot write it ({why})") from None
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    found = _find_verb(argv)
    if found is None:
        return _no_verb(argv)
    verb, rest = found
    module_name, text = VERBS[verb]
    module = importlib.import_module(module_name)
    overrides = [a for a in rest if _OVERRIDE.match(a)]
    rest = [a for a in rest if not _OVERRIDE.match(a)]
    parser = argparse.ArgumentParser(prog="megapt " + " ".join(verb), description=text)
    parser.add_argument(
        "-c", "--config", action="append", default=[], help="YAML config file (repeatable)"
    )
    if verb == ("config",):
        add_args(parser)
    elif hasattr(module, "add_args"):
        try:
            module.add_args(parser, verb)
        except TypeError:
            module.add_args(parser)
    args = parser.parse_args(rest)
    args.verb = verb
    fn = cli_main if verb == ("config",) else module.cli_main
    name = "megapt " + " ".join(verb)
    try:
        return int(fn(load_config(args.config, overrides), args) or 0)
    except UserError as exc:
        print(f"{name}: {exc.kind}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def run(argv: list[str] | None = None) -> NoReturn:
    """The `megapt` command (console script and ``python -m megapt``): ``main(argv)`` in a process
    that prints every thread's Python stack on a crash (faulthandler: SIGSEGV, SIGABRT, ...) and
    ends through ``megapt.train.dist.exit_process``. Scripts that start megapt processes call this
    rather than ``sys.exit(main(...))``."""
    from megapt.train.dist import exit_process

    faulthandler.enable()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's usage errors and --help
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - a bug: its traceback, then the same exit as any other process
        traceback.print_exc()
        code = 1
    exit_process(code)


if __name__ == "__main__":
    run()
