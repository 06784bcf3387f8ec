"""metrics.jsonl after a resume: one row per step (rows past the resumed step move aside)."""

from __future__ import annotations

import json

from megapt.train.metrics import SUPERSEDED, Metrics


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_resume_keeps_one_row_per_step_and_moves_the_rest_aside(tmp_path):
    m = Metrics(tmp_path, enabled=True, tensorboard=False)
    for step in range(1, 6):
        m.record("train", step, {"loss": 10.0 - step})
        if step == 4:
            m.record("val", 4, {"val_loss": 5.5})
    m.record("event", 4, {"skipped_attempt": 6})  # an attempt after step 4 that was skipped
    m._jsonl.write('{"kind": "train", "step": 6, "lo')  # torn by a kill mid-write
    m.close()
    # resumed from the step-4 checkpoint: steps 1-4 (and step 4's evaluation) stay; step 5, the
    # attempt after 4 and the torn row are redone by this run
    m = Metrics(tmp_path, enabled=True, tensorboard=False, start_step=4)
    m.record("train", 5, {"loss": 4.9})
    m.close()
    rows = _rows(tmp_path / "metrics.jsonl")
    assert [(r["kind"], r["step"]) for r in rows] == [
        ("train", 1),
        ("train", 2),
        ("train", 3),
        ("train", 4),
        ("val", 4),
        ("train", 5),
    ]
    assert rows[-1]["loss"] == 4.9
    aside = (tmp_path / SUPERSEDED).read_text().splitlines()
    assert len(aside) == 3 and json.loads(aside[0])["loss"] == 5.0 and aside[2].endswith('"lo')
    assert not list(tmp_path.glob("*.tmp"))


def test_a_fresh_run_in_an_old_run_dir_starts_a_fresh_metrics_file(tmp_path):
    m = Metrics(tmp_path, enabled=True, tensorboard=False)
    m.record("train", 1, {"loss": 1.0})
    m.close()
    m = Metrics(tmp_path, enabled=True, tensorboard=False)  # not resumed: starts at step 0
    m.record("train", 1, {"loss": 2.0})
    m.close()
    assert [r["loss"] for r in _rows(tmp_path / "metrics.jsonl")] == [2.0]
    assert [r["loss"] for r in _rows(tmp_path / SUPERSEDED)] == [1.0]
