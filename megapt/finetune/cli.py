"""`megapt finetune`: fine-tune as configured (``megapt.finetune.run.finetune``) or, with
``--example stdlib``, run the built-in example (``megapt.finetune.stdlib_example``).

    megapt finetune -c configs/tiny.yaml --finetune.task=classify --finetune.train_file=train.jsonl
    megapt finetune -c configs/tiny.yaml --example stdlib
"""

from __future__ import annotations

from megapt.finetune.run import finetune
from megapt.finetune.stdlib_example import run_example
from megapt.train.dist import detect_launcher_env


def add_args(p) -> None:
    p.add_argument(
        "--example",
        choices=["stdlib"],
        default=None,
        help="run the built-in example (stdlib module-family classification; no download)",
    )
    p.add_argument(
        "--example-lrs",
        type=float,
        nargs="+",
        default=None,
        help="example: LR grid per arm, best on validation kept (default 5e-4 1e-3 2e-3 4e-3)",
    )
    p.add_argument(
        "--example-seeds",
        type=int,
        nargs="+",
        default=None,
        help="example: seeds to repeat each run with (default: run.seed)",
    )


def cli_main(cfg, args) -> int:
    if getattr(args, "example", None) == "stdlib":
        run_example(cfg, lrs=args.example_lrs, seeds=args.example_seeds)
        return 0
    tb = None
    if cfg.logging.tensorboard and detect_launcher_env().rank == 0:  # one event file per run
        from torch.utils.tensorboard import SummaryWriter

        tb = SummaryWriter(str(cfg.run_dir / "tb_finetune"))
    try:
        finetune(cfg, tb=tb)
    finally:
        if tb is not None:
            tb.close()
    return 0
