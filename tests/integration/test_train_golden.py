"""`megapt train` from nothing on the corpus shipped in tests/golden/: it prepares the tokenizer
and shards itself, the loss falls clearly, and the loss curve matches tests/golden/tiny_loss.json.

The corpus (tests/golden/corpus.jsonl, ~300 kB of generated text: tests/golden/make_corpus.py) is
part of the repository, so the comparison runs everywhere and nothing on the host decides it. The
golden file changes only on purpose: after a deliberate change to the model, data or optimiser
maths, regenerate it with

    MEGAPT_UPDATE_GOLDEN=1 pytest tests/integration/test_train_golden.py

and say why in the commit. A missing golden file, or one made on another corpus, is a failure.

Tolerance: RTOL = 0.5 % relative per logged value (train loss at steps 1, 10, ..., 60; val loss at
20, 40, 60). Measured on the 2-core CPU VM (fp32, as the test runs): two runs, and runs with
OMP_NUM_THREADS=1 or 2, give identical curves; perturbing the run at the rounding level (init_std
x (1 + 1e-8), lr x (1 + 1e-6)), a stand-in for another CPU's last-bit differences, moves no logged
value by more than 1.6e-6. Deliberate changes move it far more: lr +1 % by up to 1.1 %, one more
warm-up step or beta2 0.95 -> 0.99 by 2.9 %. (At lr 3e-3 the same rounding-level perturbation moved
the curve by up to 1 %, as much as a real change: hence lr 1e-3 here.)
"""

import hashlib
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

GOLDEN_DIR = Path(__file__).resolve().parents[1] / "golden"
GOLDEN = GOLDEN_DIR / "tiny_loss.json"
CORPUS = GOLDEN_DIR / "corpus.jsonl"
UPDATE = "MEGAPT_UPDATE_GOLDEN"
RTOL = 0.005
STEPS = 60
OVERRIDES = [
    f"--data.sources=[{{path: '{CORPUS}', format: jsonl}}]",
    "--tokenizer.vocab_size=1024",
    "--tokenizer.num_threads=1",
    "--data.num_proc=1",
    "--data.seq_len=64",
    "--data.shard_samples=256",
    "--data.shuffle_buffer=1024",
    "--data.val_fraction=0.15",
    "--model.preset=tiny",
    "--train.micro_batch=8",
    f"--train.max_steps={STEPS}",
    "--train.warmup_steps=10",
    "--train.lr=1e-3",
    "--train.eval_every=20",
    "--train.eval_batches=4",
    "--train.log_every=10",
    "--checkpoint.every=0",
    "--train.sample_tokens=16",
    "--logging.progress=false",
]


def corpus_sha256() -> str:
    return hashlib.sha256(CORPUS.read_bytes()).hexdigest()


def check_golden(path: Path, got: dict, corpus: dict, rtol: float = RTOL) -> list[str]:
    """Every way a run differs from the golden file at ``path``; empty when it matches."""
    regenerate = (
        f"regenerate on purpose with {UPDATE}=1 pytest "
        f"tests/integration/{Path(__file__).name} and say why in the commit"
    )
    if not path.is_file():
        return [f"{path} is missing: the loss curve has nothing to match; {regenerate}"]
    golden = json.loads(path.read_text())
    if golden.get("corpus") != corpus:
        return [
            f"the run's corpus {corpus} is not the golden file's {golden.get('corpus')}: "
            f"tests/golden/corpus.jsonl or the data pipeline changed; {regenerate}"
        ]
    problems = []
    for kind in ("train", "val"):
        if sorted(golden[kind]) != sorted(got[kind]):
            problems.append(
                f"{kind}: logged steps {sorted(got[kind], key=int)} != golden "
                f"{sorted(golden[kind], key=int)}"
            )
            continue
        for step, want in sorted(golden[kind].items(), key=lambda kv: int(kv[0])):
            if not math.isclose(got[kind][step], want, rel_tol=rtol):
                value = got[kind][step]
                problems.append(
                    f"{kind} loss at step {step}: {value:.6f} vs golden {want:.6f} "
                    f"({value / want - 1:+.2%}, tolerance {rtol:.1%})"
                )
    return problems


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("golden")
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    env.pop("MEGAPT_FAULT_NAN_STEPS", None)
    p = subprocess.run(
        [sys.executable, "-m", "megapt.cli", "train"] + OVERRIDES,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-5000:]
    run = cwd / "runs" / "tiny"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    manifest = json.loads((cwd / ".megapt_cache/shards/seq64/manifest.json").read_text())
    return {
        "cwd": cwd,
        "run": run,
        "log": p.stderr + p.stdout,
        "manifest": manifest,
        "train": {r["step"]: r["loss"] for r in rows if r["kind"] == "train"},
        "val": {r["step"]: r["val_loss"] for r in rows if r["kind"] == "val"},
    }


@pytest.mark.timeout(700)
def test_train_prepares_data_and_the_loss_falls(tiny_run):
    train, val = tiny_run["train"], tiny_run["val"]
    assert sorted(val) == [20, 40, 60] and len(train) == STEPS
    ln_v = math.log(1024)  # loss of a uniform guess
    assert train[1] > 0.9 * ln_v  # starts near chance...
    first10 = sum(train[s] for s in range(1, 11)) / 10
    last10 = sum(train[s] for s in range(STEPS - 9, STEPS + 1)) / 10
    assert last10 < first10 - 1.0, (first10, last10)
    assert val[60] < val[20] - 0.2 and val[60] < ln_v - 1.0, val  # ...and held-out loss falls
    for name in ("config.yaml", "sample.txt", "tb"):
        assert (tiny_run["run"] / name).exists(), name
    log = tiny_run["log"]
    assert "run dir" in log and "TensorBoard" in log and "checkpoints" in log
    ckpts = list((tiny_run["run"] / "checkpoints").glob("step_*"))
    assert [c.name for c in ckpts] == [f"step_{STEPS:07d}"]  # every=0: only the final one


@pytest.mark.timeout(700)
def test_loss_curve_matches_golden(tiny_run):
    m = tiny_run["manifest"]
    corpus = {
        "sha256": corpus_sha256(),
        "tokenizer_sha256": m["tokenizer_sha256"],
        "train_tokens": m["splits"]["train"]["tokens"],
    }
    logged = {k: v for k, v in tiny_run["train"].items() if k % 10 == 0 or k == 1}
    got = {
        "train": {str(k): v for k, v in sorted(logged.items())},
        "val": {str(k): v for k, v in sorted(tiny_run["val"].items())},
    }
    if os.environ.get(UPDATE) == "1":
        import torch

        GOLDEN.write_text(
            json.dumps(
                {
                    "what": "tiny preset, vocab 1024, seq 64, micro 8, 60 steps on "
                    "tests/golden/corpus.jsonl; see tests/integration/test_train_golden.py",
                    "overrides": OVERRIDES[1:],
                    "rtol": RTOL,
                    "corpus": corpus,
                    "made_with": {"python": platform.python_version(), "torch": torch.__version__},
                    **got,
                },
                indent=1,
            )
            + "\n"
        )
        pytest.skip(f"{UPDATE}=1: golden file rewritten ({GOLDEN}); unset it to compare")
    problems = check_golden(GOLDEN, got, corpus)
    assert not problems, "\n".join(problems)


# ---- the comparison itself can fail (no training: seconds) --------------------------------


def _golden_curve() -> tuple[dict, dict]:
    golden = json.loads(GOLDEN.read_text())
    return {k: dict(golden[k]) for k in ("train", "val")}, golden["corpus"]


def test_a_missing_golden_file_is_a_failure_that_says_how_to_regenerate(tmp_path):
    got, corpus = _golden_curve()
    (problem,) = check_golden(tmp_path / "tiny_loss.json", got, corpus)
    assert "is missing" in problem and f"{UPDATE}=1" in problem
    assert not (tmp_path / "tiny_loss.json").exists()  # nothing is written behind the user's back


def test_a_curve_off_by_more_than_the_tolerance_or_another_corpus_fails():
    got, corpus = _golden_curve()
    assert check_golden(GOLDEN, got, corpus) == []
    step = sorted(got["val"], key=int)[-1]
    off = {"train": got["train"], "val": {**got["val"], step: got["val"][step] * (1 + 2 * RTOL)}}
    (problem,) = check_golden(GOLDEN, off, corpus)
    assert f"val loss at step {step}" in problem
    within = {"train": got["train"], "val": {**got["val"], step: got["val"][step] * (1 + RTOL / 2)}}
    assert check_golden(GOLDEN, within, corpus) == []
    (problem,) = check_golden(GOLDEN, got, {**corpus, "train_tokens": corpus["train_tokens"] + 1})
    assert "corpus" in problem and f"{UPDATE}=1" in problem


def test_golden_file_was_made_on_the_shipped_corpus_and_the_generator_reproduces_it():
    import importlib.util

    golden = json.loads(GOLDEN.read_text())
    assert golden["corpus"]["sha256"] == corpus_sha256()
    spec = importlib.util.spec_from_file_location("make_corpus", GOLDEN_DIR / "make_corpus.py")
    make_corpus = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_corpus)
    assert make_corpus.render() == CORPUS.read_text(encoding="utf-8")
    assert 200_000 < CORPUS.stat().st_size < 600_000  # a few hundred kB: seconds to prepare
