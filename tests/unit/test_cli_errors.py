"""User errors of every `megapt` verb: one line on stderr naming the culprit, the documented exit
code (megapt/errors.py, README "Exit codes"), never a traceback. Tracebacks are for bugs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from megapt.cli import VERBS, main
from megapt.errors import EXIT_CHECKPOINT, EXIT_CODES, EXIT_DATA, EXIT_USAGE

REPO = Path(__file__).resolve().parents[2]
NO_SOURCE = "MISSING': no such file or directory"
NO_MODEL = "MISSING: model path not found"

# verb -> (arguments with MISSING / EMPTY / OUT placeholders, exit code, text the message holds)
CASES: dict[tuple, tuple[list[str], int, str]] = {
    ("data", "clean"): (["--data.sources=[{path: MISSING}]"], EXIT_DATA, NO_SOURCE),
    ("tokenizer", "train"): (["--input", "EMPTY"], EXIT_DATA, "EMPTY: no complete cleaned text"),
    ("data", "shard"): (["--input", "EMPTY"], EXIT_DATA, "spm.model: tokenizer not found"),
    ("data", "merge"): (["--dir", "EMPTY"], EXIT_DATA, "EMPTY: no partial manifests"),
    ("data", "verify"): (["--dir", "EMPTY"], EXIT_DATA, "manifest.json: not found"),
    ("data", "index"): (
        ["EMPTY", "--vocab-size=512", "--eos-id=1"],
        EXIT_DATA,
        "EMPTY: no *.tar files to index",
    ),
    ("data", "prepare"): (["--data.sources=[{path: MISSING}]"], EXIT_DATA, NO_SOURCE),
    ("finetune",): (
        [
            "--finetune.task=classify",
            "--finetune.init_from=MISSING",
            "--finetune.train_file=x.jsonl",
        ],
        EXIT_CHECKPOINT,
        NO_MODEL,
    ),
    ("eval",): (["--from", "MISSING"], EXIT_CHECKPOINT, NO_MODEL),
    ("generate",): (["--from", "MISSING", "--prompt", "def "], EXIT_CHECKPOINT, NO_MODEL),
    ("export",): (["--from", "MISSING", "--out", "OUT"], EXIT_CHECKPOINT, NO_MODEL),
    ("plan",): (["--gpu", "zzz"], EXIT_USAGE, "unknown GPU 'zzz'"),
    ("bench",): (["compare", "MISSING", "MISSING"], EXIT_USAGE, "MISSING: cannot read benchmark"),
    ("ckpt", "consolidate"): (["MISSING"], EXIT_CHECKPOINT, "MISSING: no such checkpoint folder"),
    ("ckpt", "universal"): (["MISSING"], EXIT_CHECKPOINT, "MISSING: no such checkpoint folder"),
    ("config",): (["--save", "/dev/null/x.yaml"], EXIT_USAGE, "/dev/null/x.yaml: cannot write"),
}


def _args(args: list[str], tmp_path: Path) -> list[str]:
    (tmp_path / "empty").mkdir(exist_ok=True)
    subs = {
        "MISSING": str(tmp_path / "missing"),
        "EMPTY": str(tmp_path / "empty"),
        "OUT": str(tmp_path / "out"),
    }
    return [re.sub("MISSING|EMPTY|OUT", lambda m: subs[m.group()], a) for a in args]


def test_every_verb_has_a_user_error_case():
    assert set(CASES) | {("train",)} == set(VERBS)


@pytest.mark.parametrize("verb", sorted(CASES), ids=lambda v: "-".join(v))
def test_a_user_error_is_one_line_with_the_documented_exit_code(
    verb, tmp_path, capsys, monkeypatch
):
    args, code, needle = CASES[verb]
    monkeypatch.chdir(tmp_path)
    common = [
        f"--run.work_dir={tmp_path / 'work'}",
        f"--run.out_dir={tmp_path / 'runs'}",
        "--logging.progress=false",
        "--logging.tensorboard=false",
    ]
    rc = main([*verb, *_args(args, tmp_path), *common])
    out, err = capsys.readouterr()
    assert rc == code, (out, err)
    # `megapt ckpt ...` prints through its own handler (same code, shorter prefix)
    prefix = "megapt ckpt: " if verb[0] == "ckpt" else f"megapt {' '.join(verb)}: "
    assert err.startswith(prefix) and _args([needle], tmp_path)[0] in err, err
    assert err.count("\n") == 1 and "Traceback" not in err, err


def test_train_with_a_missing_data_source_exits_5_without_a_traceback(tmp_path):
    src = tmp_path / "nope"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "megapt",
            "train",
            f"--data.sources=[{{path: {src}}}]",
            f"--run.work_dir={tmp_path / 'work'}",
            f"--run.out_dir={tmp_path / 'runs'}",
            "--logging.progress=false",
            "--train.device=cpu",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert r.returncode == EXIT_DATA, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last == f"megapt train: data error: data source '{src}': no such file or directory"
    assert "Traceback" not in r.stderr


def test_a_bug_keeps_its_traceback(monkeypatch):
    """Only user errors are shortened: anything else is a bug and propagates (exit 1, traceback)."""
    import megapt.planner

    def boom(*a, **k):
        raise KeyError("internal")

    monkeypatch.setattr(megapt.planner, "plan_memory", boom)
    with pytest.raises(KeyError, match="internal"):
        main(["plan"])


def test_readme_exit_code_table_is_the_one_in_megapt_errors():
    """One table of exit codes for every verb: the README's rows are megapt.errors.EXIT_CODES."""
    from megapt.train.preempt import PREEMPT_EXIT_CODE

    text = (REPO / "README.md").read_text()
    section = text.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| (\d+) \| ([^|]+?) \|", section, flags=re.M))
    assert {int(k): v for k, v in rows.items()} == EXIT_CODES
    assert PREEMPT_EXIT_CODE in EXIT_CODES


@pytest.mark.parametrize(
    "argv, code, last",
    [
        (["ckpt"], EXIT_USAGE, "megapt ckpt: usage error: which one? (consolidate, universal)"),
        (["ckpt", "--help"], 0, None),
        (
            ["ckpt", "frobnicate"],
            EXIT_USAGE,
            "megapt ckpt: usage error: unknown verb 'ckpt frobnicate'",
        ),
        (["bogusverb"], EXIT_USAGE, "megapt: usage error: unknown verb 'bogusverb'"),
    ],
)
def test_a_verb_group_alone_or_an_unknown_verb_is_a_usage_error(argv, code, last, capsys):
    # they exited 1 (SystemExit with the usage text), which the exit-code table keeps for bugs
    assert main(argv) == code
    out, err = capsys.readouterr()
    if last is None:
        assert "consolidate" in out and not err
    else:
        assert err.strip().splitlines()[-1] == last and not out
