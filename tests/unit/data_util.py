"""Helpers for the data tests: a tiny deterministic corpus and a config pointing at tmp_path."""

from __future__ import annotations

import json
import random
from pathlib import Path

from megapt.config import load_config

WORDS = (
    "the model reads tokens from shards and learns to predict the next one while the loader "
    "streams samples in a fixed order so that training can resume exactly where it stopped "
    "data is cleaned normalised deduplicated and split into train and validation parts"
).split()


def make_docs(n: int, seed: int = 0) -> list[str]:
    """n distinct documents (prose and a little code), 150-900 characters each."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        lines = []
        for _ in range(rng.randint(3, 12)):
            if rng.random() < 0.3:
                name = rng.choice(WORDS)
                lines.append(f"def {name}_{i}(x):\n    return x + {rng.randint(0, 99)}\n")
            else:
                lines.append(
                    " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 14))).capitalize()
                    + "."
                )
        docs.append(f"Document {i}.\n" + "\n".join(lines))
    return docs


def write_jsonl(path: Path, docs: list, field: str = "text", raw: bool = False) -> Path:
    """One ``{field: doc}`` per line (``raw``: the docs are whole JSON objects)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d if raw else {field: d}) + "\n")
    return path


def tiny_cfg(tmp_path: Path, *extra: str, docs: list[str] | None = None, vocab: int = 400):
    """Config with a jsonl source of ``docs`` (default 120 docs) and everything under tmp_path."""
    src = write_jsonl(tmp_path / "raw" / "docs.jsonl", make_docs(120) if docs is None else docs)
    overrides = [
        f"--run.work_dir={tmp_path / 'work'}",
        f"--data.sources=[{{path: '{src}'}}]",
        f"--tokenizer.vocab_size={vocab}",
        "--tokenizer.num_threads=1",
        "--data.seq_len=32",
        "--data.shard_samples=16",
        "--data.num_proc=1",
        "--data.val_fraction=0.1",
        "--data.clean.min_chars=20",
        "--logging.progress=false",
        *extra,
    ]
    return load_config(None, overrides)
