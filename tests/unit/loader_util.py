"""Tiny synthetic shard sets for the loader tests: every sample encodes its own id.

Row layout (seq_len + 1 tokens): ``[id, tag, (id * 7 + tag + j) % VOCAB for j = 2 ..]`` so a
test can read the id and set tag of every sample and notice any misread token.
"""

from __future__ import annotations

import numpy as np
import torch

from megapt.config import DataConfig
from megapt.data.loader import build_loader
from megapt.data.shard import write_token_dataset

VOCAB = 60000
SEQ = 8


def sample(i: int, tag: int, seq_len: int = SEQ) -> np.ndarray:
    row = (i * 7 + tag + np.arange(seq_len + 1)) % VOCAB
    row[0], row[1] = i, tag
    return row.astype(np.uint16)


def make_set(
    path,
    n: int,
    *,
    tag: int = 1,
    shard_samples: int = 16,
    seq_len: int = SEQ,
    val: int = 0,
    tokenizer_sha256: str = "ab" * 32,
) -> None:
    splits = {"train": (sample(i, tag, seq_len) for i in range(n))}
    if val:
        splits["val"] = (sample(i, tag + 100, seq_len) for i in range(val))
    write_token_dataset(
        path,
        splits,
        seq_len=seq_len,
        vocab_size=VOCAB,
        shard_samples=shard_samples,
        tokenizer_sha256=tokenizer_sha256,
    )


def data_cfg(**kw) -> DataConfig:
    kw.setdefault("seq_len", SEQ)
    kw.setdefault("shuffle_buffer", 10)
    return DataConfig(**kw)


def ids_of(batch: dict) -> list[tuple[int, int]]:
    """(tag, id) of every row, after checking that the row is intact and labels are shifted."""
    x, y = batch["input_ids"], batch["labels"]
    assert (
        x.dtype == torch.long and y.dtype == torch.long and x.shape == y.shape and x.shape[1] == SEQ
    )
    out = []
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        i, tag = row_x[0], row_x[1]
        full = sample(i, tag).astype(np.int64).tolist()
        assert row_x == full[:-1] and row_y == full[1:], f"sample {tag}/{i} misread"
        out.append((tag, i))
    return out


def loaders(
    cfg,
    shard_dir,
    W: int,
    B: int,
    *,
    workers: int = 0,
    seed: int = 0,
    infinite: bool = True,
    split: str = "train",
    state: dict | None = None,
):
    out = []
    for r in range(W):
        ld = build_loader(
            cfg,
            shard_dir,
            split,
            rank=r,
            world_size=W,
            micro_batch=B,
            seed=seed,
            infinite=infinite,
            num_workers=workers,
            pin_memory=False,
        )
        if state is not None:
            ld.load_state_dict(state)
        out.append(ld)
    return out


def run_global(lds, steps: int) -> tuple[list, dict]:
    """Simulate lock-step training on len(lds) ranks; return the global sample order and state."""
    its = [iter(ld) for ld in lds]
    order = []
    for _ in range(steps):
        for it in its:
            order += ids_of(next(it))
    states = [ld.state_dict() for ld in lds]
    assert all(s == states[0] for s in states), "ranks disagree on the loader state"
    for it in its:
        it.close()
    return order, states[0]
