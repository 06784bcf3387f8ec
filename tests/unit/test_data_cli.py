"""`megapt data ...` / `megapt tokenizer train` through megapt.cli.main with overrides."""

from __future__ import annotations

from megapt.cli import main
from megapt.data.manifest import load_manifest
from tests.unit.data_util import make_docs, write_jsonl


def overrides(tmp_path, *extra):
    src = tmp_path / "raw" / "docs.jsonl"
    if not src.exists():
        write_jsonl(src, make_docs(80))
    return [
        f"--run.work_dir={tmp_path / 'work'}",
        f"--data.sources=[{{path: '{src}'}}]",
        "--tokenizer.vocab_size=400",
        "--tokenizer.num_threads=1",
        "--data.seq_len=32",
        "--data.shard_samples=32",
        "--data.num_proc=1",
        "--data.clean.min_chars=20",
        "--logging.progress=false",
        *extra,
    ]


def test_prepare_then_verify_then_detect_corruption(tmp_path, capsys):
    o = overrides(tmp_path)
    assert main(["data", "prepare", *o]) == 0
    out = capsys.readouterr().out
    assert "trained tokenizer" in out and "shards ->" in out
    shard_dir = tmp_path / "work" / "shards" / "seq32"
    m = load_manifest(shard_dir)
    assert m["splits"]["train"]["samples"] > 0

    assert main(["data", "prepare", *o]) == 0  # idempotent
    assert "nothing to do" in capsys.readouterr().out

    assert main(["data", "verify", *o]) == 0
    assert " 0 bad" in capsys.readouterr().out
    bad = shard_dir / m["splits"]["train"]["shards"][0]["name"]
    raw = bytearray(bad.read_bytes())
    raw[700] ^= 1
    bad.write_bytes(bytes(raw))
    assert main(["data", "verify", *o]) == 5  # the data-error exit code of every verb
    out, err = capsys.readouterr()
    assert bad.name in out and "sha256 mismatch" in out
    assert err.startswith("megapt data verify: data error: 1 of 14 shard(s)")
    assert "Traceback" not in err


def test_split_shard_jobs_then_merge(tmp_path, capsys):
    o = overrides(tmp_path)
    assert main(["data", "clean", *o]) == 0
    assert main(["tokenizer", "train", *o]) == 0
    assert "trained bpe" in capsys.readouterr().out
    for i in range(2):
        assert main(["data", "shard", "--num-shards", "2", "--shard-index", str(i), *o]) == 0
    assert "megapt data merge" in capsys.readouterr().out
    assert main(["data", "merge", *o]) == 0
    assert "merged 2 partial manifest(s)" in capsys.readouterr().out
    assert load_manifest(tmp_path / "work" / "shards" / "seq32")["jobs"]["done"] == [0, 1]


def test_shard_without_tokenizer_says_how_to_make_one(tmp_path, capsys):
    o = overrides(tmp_path)
    assert main(["data", "clean", *o]) == 0
    assert main(["data", "shard", *o]) == 5
    err = capsys.readouterr().err
    assert "spm.model" in err and "megapt tokenizer train" in err


def test_verify_without_shards_is_an_error_naming_the_manifest(tmp_path, capsys):
    assert main(["data", "verify", *overrides(tmp_path)]) == 5
    assert "manifest.json: not found" in capsys.readouterr().err


def test_bad_shard_index_is_refused(tmp_path, capsys):
    assert (
        main(["data", "shard", "--num-shards", "2", "--shard-index", "2", *overrides(tmp_path)])
        == 2
    )


def test_changed_sources_are_flagged_and_force_rebuilds(tmp_path, capsys):
    o = overrides(tmp_path)
    assert main(["data", "prepare", *o]) == 0
    before = load_manifest(tmp_path / "work" / "shards" / "seq32")["docs"]
    write_jsonl(tmp_path / "raw" / "docs.jsonl", make_docs(100))  # the source changed
    capsys.readouterr()
    assert main(["data", "prepare", *o]) == 0
    assert "warning: the shards" in capsys.readouterr().out
    assert main(["data", "prepare", "--force", *o]) == 0
    after = load_manifest(tmp_path / "work" / "shards" / "seq32")["docs"]
    assert after["train"] + after["val"] == 100 != before["train"] + before["val"]
    assert main(["data", "prepare", *o]) == 0
    assert "warning" not in capsys.readouterr().out
