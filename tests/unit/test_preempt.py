"""The pre-emption marker the Slurm scripts requeue on (megapt/train/preempt.py): written after the
save, only where the launcher asks, never half-written. Its use by real Slurm jobs, with 2 ranks
and srun's kill-on-bad-exit: tests/integration/test_cluster_launch.py."""

from __future__ import annotations

from pathlib import Path

from megapt.train.preempt import MARKER_ENV, mark_saved


def test_marker_names_the_saved_step_and_checkpoint(tmp_path):
    marker = tmp_path / "jobs" / "megapt-17.r2.preempted"  # its folder need not exist yet
    ckpt = tmp_path / "run" / "checkpoints" / "step_0000042"
    assert mark_saved(42, ckpt, env={MARKER_ENV: str(marker)}) == marker
    fields = dict(kv.split("=", 1) for kv in marker.read_text().split())
    assert fields["step"] == "42" and Path(fields["checkpoint"]) == ckpt
    assert [p.name for p in marker.parent.iterdir()] == [marker.name]  # no temporary file left


def test_no_marker_without_a_launcher_asking_for_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert mark_saved(3, tmp_path / "step_0000003", env={}) is None
    assert list(tmp_path.iterdir()) == []


def test_a_marker_that_cannot_be_written_is_reported_not_raised(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    # the checkpoint is safe; the job just is not requeued, and the log says how to continue
    assert mark_saved(5, tmp_path / "ck", env={MARKER_ENV: str(blocker / "sub" / "m")}) is None
    assert "will not be requeued" in caplog.text and "--resume" in caplog.text
