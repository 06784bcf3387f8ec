"""User errors and the exit codes of every `megapt` verb (one table; README "Exit codes").

A ``UserError`` is input the user can fix: a bad config value, a missing or unreadable file, a
corrupt shard, an incompatible checkpoint, an argument out of range. ``megapt.cli`` catches it for
every verb and prints one line, ``megapt <verb>: <kind>: <message>``, on stderr (no traceback),
then exits with the error's ``exit_code``. Anything else that escapes a verb is a bug: Python
prints its traceback and the exit code is 1.

Each error family subclasses ``UserError`` where it is defined (``ConfigError`` in config.py,
``DataError`` in data/sources.py, ``ShardError`` in data/tarformat.py, ``CheckpointError`` in
train/checkpoint.py, ...) and sets ``exit_code`` and ``kind`` from the table below. This module
imports nothing from megapt, so every module can use it.
"""

from __future__ import annotations

EXIT_OK = 0  # finished
EXIT_ERROR = 1  # unexpected error (a bug): traceback printed
EXIT_USAGE = 2  # bad config / override / command-line argument (also argparse's own errors)
EXIT_NONFINITE = 3  # train: train.max_bad_steps non-finite steps in a row
EXIT_CHECKPOINT = 4  # missing, corrupt, incompatible or unsupported checkpoint / model folder
EXIT_DATA = 5  # missing, unreadable or invalid input data, shards or tokenizer
EXIT_PREEMPTED = 75  # train: pre-empted (SIGTERM/SIGUSR1), checkpoint saved: requeue + --resume
EXIT_INTERRUPTED = 130  # Ctrl-C

# code -> meaning: the single source of the README table (a test holds them together)
EXIT_CODES: dict[int, str] = {
    EXIT_OK: "finished",
    EXIT_ERROR: "unexpected error (a bug: traceback printed); also a negative verdict of `plan` "
    "(does not fit) and `bench` (regression / failed point), which print why",
    EXIT_USAGE: "config or usage error: bad key, type or value, bad command-line argument",
    EXIT_NONFINITE: "`train`: too many non-finite steps in a row (train.max_bad_steps); "
    "`finetune`: a non-finite loss",
    EXIT_CHECKPOINT: "checkpoint or model error: missing, corrupt, incompatible or unsupported",
    EXIT_DATA: "data error: missing, unreadable or invalid input text, shards or tokenizer",
    EXIT_PREEMPTED: "`train`: pre-empted (SIGTERM/SIGUSR1); checkpoint saved, resume with --resume",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
}


class UserError(Exception):
    """Bad input the user can fix; the message names the file, key or argument and what to do."""

    exit_code: int = EXIT_USAGE
    kind: str = "error"


class UsageError(UserError, ValueError):
    """A command-line argument or function argument out of range (exit 2)."""

    exit_code = EXIT_USAGE
    kind = "usage error"


class NonFiniteLossError(UserError):
    """Training diverged: the loss became NaN/inf (exit 3). Not a bug in megapt: the learning
    rate, the data or the starting weights need a change, and the message says which run."""

    exit_code = EXIT_NONFINITE
    kind = "non-finite loss"
