"""Fine-tuning rows: read jsonl / csv / HF datasets saved to disk, tokenize, batch.

Every row error names the file and the row number (1-based, as an editor shows it):

    rows = read_rows("train.jsonl", ["text", "label"])
    ds = ClassificationData.build(rows, tok, max_len=256, classes=None, source="train.jsonl")
    for batch in batches(ds.examples, batch_size=16, pad_id=tok.pad_id, shuffle=True, seed=0): ...
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from megapt.errors import EXIT_DATA, UserError


class DataError(UserError, ValueError):
    """A bad row or file; the message names the file, row and field."""

    exit_code = EXIT_DATA
    kind = "data error"


@dataclass
class Row:
    where: str  # "file:row" for error messages
    values: dict


def read_rows(path: str, fields: Sequence[str]) -> list[Row]:
    """Rows of a .jsonl / .json (list) / .csv / .tsv file or a ``datasets.save_to_disk`` folder
    (or a .parquet file). Every row must have every field in ``fields``."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{path}: file not found")
    rows: list[Row] = []
    if p.is_dir() or p.suffix == ".parquet":
        import datasets

        if p.is_dir():
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                if "train" not in ds:
                    raise DataError(f"{path}: DatasetDict without a 'train' split (has {list(ds)})")
                ds = ds["train"]
        else:
            ds = datasets.Dataset.from_parquet(str(p))
        for i, r in enumerate(ds):
            rows.append(Row(f"{path}:row {i + 1}", dict(r)))
    elif p.suffix in (".jsonl", ".ndjson"):
        with p.open(encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{i}: invalid JSON: {exc}") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path}:{i}: expected a JSON object, got {type(obj).__name__}")
                rows.append(Row(f"{path}:{i}", obj))
    elif p.suffix == ".json":
        data = json.loads(p.read_text(encoding="utf-8"))
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of objects")
        rows = [Row(f"{path}:item {i}", r) for i, r in enumerate(data)]
    elif p.suffix in (".csv", ".tsv"):
        with p.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if p.suffix == ".tsv" else ",")
            for i, r in enumerate(reader, 2):  # line 1 is the header
                rows.append(Row(f"{path}:{i}", dict(r)))
    else:
        raise DataError(
            f"{path}: unknown format {p.suffix!r}; use .jsonl, .json, .csv, .tsv, .parquet "
            "or a datasets.save_to_disk folder"
        )
    if not rows:
        raise DataError(f"{path}: no rows")
    for r in rows:
        missing = [f for f in fields if f not in r.values or r.values[f] is None]
        if missing:
            raise DataError(f"{r.where}: missing field(s) {missing} (has {sorted(r.values)})")
    return rows


def split_rows(rows: list[Row], val_fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """Deterministic train/val split (seeded shuffle of row indices)."""
    idx = list(range(len(rows)))
    random.Random(seed).shuffle(idx)
    n_val = max(1, int(round(len(rows) * val_fraction)))
    val = sorted(idx[:n_val])
    train = sorted(idx[n_val:])
    return [rows[i] for i in train], [rows[i] for i in val]


# --------------------------------------------------------------------------------------------
# classification / regression
# --------------------------------------------------------------------------------------------


@dataclass
class Example:
    input_ids: list[int]
    label: float | int = 0
    labels: list[int] | None = None  # per-token labels (SFT / LM)


def _label_key(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v).strip()


def infer_classes(rows: Iterable[Row], label_field: str) -> list[str]:
    """Sorted distinct labels (numeric labels sorted numerically)."""
    keys = sorted({_label_key(r.values[label_field]) for r in rows})
    try:
        return sorted(keys, key=lambda k: float(k))
    except ValueError:
        return keys


def encode_text(tok, text: str, max_len: int, where: str) -> list[int]:
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: empty text")
    ids = tok.encode(text)
    if not ids:
        raise DataError(f"{where}: text encodes to zero tokens")
    return ids[:max_len]


def build_classification(
    rows: list[Row], tok, max_len: int, text_field: str, label_field: str, classes: list[str]
) -> list[Example]:
    index = {c: i for i, c in enumerate(classes)}
    out = []
    for r in rows:
        key = _label_key(r.values[label_field])
        if key not in index:
            raise DataError(
                f"{r.where}: label {r.values[label_field]!r} is not one of the "
                f"{len(classes)} classes {classes[:20]}"
            )
        out.append(Example(encode_text(tok, r.values[text_field], max_len, r.where), index[key]))
    return out


def build_regression(
    rows: list[Row], tok, max_len: int, text_field: str, label_field: str
) -> list[Example]:
    out = []
    for r in rows:
        try:
            y = float(r.values[label_field])
        except (TypeError, ValueError):
            raise DataError(
                f"{r.where}: regression label {r.values[label_field]!r} is not a number"
            ) from None
        out.append(Example(encode_text(tok, r.values[text_field], max_len, r.where), y))
    return out


# --------------------------------------------------------------------------------------------
# SFT: loss only on the response
# --------------------------------------------------------------------------------------------


def build_sft(
    rows: list[Row], tok, max_len: int, prompt_field: str, response_field: str
) -> list[Example]:
    """input = prompt + response + EOS; labels = -100 on the prompt, the response tokens (+EOS)
    elsewhere, already shifted so labels[t] is the target for input[t]."""
    out = []
    for r in rows:
        prompt, response = r.values[prompt_field], r.values[response_field]
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f"{r.where}: empty prompt ({prompt_field!r})")
        if not isinstance(response, str) or not response.strip():
            raise DataError(f"{r.where}: empty response ({response_field!r})")
        p_ids, r_ids = tok.encode(prompt), tok.encode(response) + [tok.eos_id]
        if len(p_ids) >= max_len:
            raise DataError(
                f"{r.where}: prompt has {len(p_ids)} tokens, no room for the response "
                f"within max_len={max_len}"
            )
        seq = (p_ids + r_ids)[: max_len + 1]
        # targets for positions 0..len-2 are seq[1:]; prompt positions predict prompt tokens -> -100
        labels = [-100] * (len(p_ids) - 1) + seq[len(p_ids) :]
        out.append(Example(seq[:-1], 0, labels))
    return out


def build_lm(rows: list[Row], tok, max_len: int, text_field: str) -> list[Example]:
    out = []
    for r in rows:
        ids = encode_text(tok, r.values[text_field], max_len + 1, r.where) + [tok.eos_id]
        ids = ids[: max_len + 1]
        if len(ids) < 2:
            raise DataError(f"{r.where}: text too short for language modelling")
        out.append(Example(ids[:-1], 0, ids[1:]))
    return out


# --------------------------------------------------------------------------------------------
# batching (right padding)
# --------------------------------------------------------------------------------------------


def collate(
    examples: Sequence[Example], pad_id: int, regression: bool = False
) -> dict[str, torch.Tensor]:
    T = max(len(e.input_ids) for e in examples)
    B = len(examples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    tok_labels = torch.full((B, T), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        if e.labels is not None:
            tok_labels[i, :n] = torch.tensor(e.labels)
    batch = {"input_ids": ids, "attention_mask": mask}
    if examples[0].labels is not None:
        batch["labels"] = tok_labels
    else:
        batch["labels"] = torch.tensor(
            [e.label for e in examples], dtype=torch.float32 if regression else torch.long
        )
    return batch


def batches(
    examples: Sequence[Example],
    batch_size: int,
    pad_id: int,
    shuffle: bool,
    seed: int,
    regression: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    idx = list(range(len(examples)))
    if shuffle:
        random.Random(seed).shuffle(idx)
    for s in range(0, len(idx), batch_size):
        yield collate([examples[i] for i in idx[s : s + batch_size]], pad_id, regression)
