"""Training metrics: the log line, ``metrics.jsonl``, TensorBoard, peak memory.

The MFU the trainer logs is ``ModelArgs.mfu`` (6N + 12·L·H·Q·T per token, PaLM appendix B)
against the dense peak of the device for the training precision from ``megapt.hardware`` (no
sparsity). On CPU there is no meaningful peak: MFU is reported as None. The attention term counts
the full T x T window even under ``model.doc_mask``, where the kernel skips blocks across document
boundaries: the same convention as an unmasked run (comparable across runs), an overstatement of
the work done there (the trainer logs the attention share of the count at start).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("megapt.train")


def peak_memory_gb() -> float | None:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        import resource

        return (
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        )  # KiB on Linux -> GiB (RSS)
    except Exception:  # noqa: BLE001 - no `resource` (Windows) or no rusage: no figure  # pragma: no cover
        return None


SUPERSEDED = "metrics-superseded.jsonl"


def superseded(row: dict, start_step: int) -> bool:
    """Whether a ``metrics.jsonl`` row describes work a run starting after ``start_step`` redoes:
    a row of a later step, or an ``event`` row (a skipped attempt *after* its step) of that step."""
    step = row.get("step")
    if not isinstance(step, int):
        return True
    return step > start_step or (row.get("kind") == "event" and step >= start_step)


def truncate_rows(path: Path, start_step: int) -> int:
    """Keep the rows of ``path`` (metrics.jsonl) up to ``start_step`` (see ``superseded``), so a
    resumed run has one row per step; the others (and a torn last line) are appended to
    ``metrics-superseded.jsonl`` beside it, never lost. Atomic: tmp file + rename. Returns the
    number of rows moved."""
    if not path.is_file():
        return 0
    keep: list[str] = []
    moved: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
            drop = not isinstance(row, dict) or superseded(row, start_step)
        except json.JSONDecodeError:  # a line torn by a kill
            drop = True
        (moved if drop else keep).append(line)
    if not moved:
        return 0
    with open(path.with_name(SUPERSEDED), "a", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in moved))
        f.flush()
        os.fsync(f.fileno())
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in keep))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return len(moved)


class Metrics:
    """Rank-0 sink: text log, one JSON line per optimizer step, TensorBoard scalars.

    ``start_step``: the step training starts after (the resumed checkpoint's, 0 for a fresh run).
    Rows a previous run wrote past it are moved out of ``metrics.jsonl`` (``truncate_rows``) and
    TensorBoard purges its events from ``start_step + 1`` on, so every step has one row."""

    def __init__(self, run_dir: Path, *, enabled: bool, tensorboard: bool, start_step: int = 0):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.tb = None
        self._jsonl: Any = None  # metrics.jsonl, open while enabled
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        moved = truncate_rows(self.run_dir / "metrics.jsonl", start_step)
        if moved:
            log.info(
                "metrics: %d row(s) of steps after %d (a run that went past its last "
                "checkpoint) moved to %s; this run writes them again",
                moved,
                start_step,
                self.run_dir / SUPERSEDED,
            )
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=start_step + 1)
            except ImportError as exc:  # pragma: no cover
                log.warning("TensorBoard disabled (%s): pip install tensorboard", exc)

    def record(self, kind: str, step: int, values: dict) -> None:
        """kind: train | val | event. Non-None numbers go to TensorBoard under ``kind/``."""
        if not self.enabled:
            return
        row = {"kind": kind, "step": step, "time": round(time.time(), 3), **values}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None:
                    self.tb.add_scalar(f"{kind}/{k}", v, step)

    def text(self, text: str, step: int, tag: str = "sample") -> None:
        if self.enabled and self.tb is not None:
            self.tb.add_text(tag, text, step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
            self.tb = None


def format_train_line(step: int, max_steps: int, v: dict) -> str:
    parts = [f"step {step}/{max_steps}", f"loss {v['loss']:.4f}", f"lr {v['lr']:.3e}"]
    if v.get("grad_norm") is not None:
        parts.append(f"grad_norm {v['grad_norm']:.3f}")
    parts.append(f"tok/s {v['tokens_per_s']:,.0f}")
    if v.get("mfu") is not None:
        parts.append(f"mfu {100 * v['mfu']:.1f}%")
    if v.get("peak_mem_gb") is not None:
        parts.append(f"peak_mem {v['peak_mem_gb']:.2f}GB")
    if v.get("loss_scale") is not None:
        parts.append(f"loss_scale {v['loss_scale']:.0f}")
    if v.get("skipped_total"):
        parts.append(f"skipped {v['skipped_total']}")
    return " | ".join(parts)
