"""Cleaning: each normalisation step, each filter with its drop reason, dedup counts, outputs."""

from __future__ import annotations

import json
import unicodedata

import pytest

from megapt.cli import main
from megapt.config import CleanConfig
from megapt.data.clean import Cleaner, char_fractions, normalize, run_clean
from megapt.data.sources import DataError
from tests.unit.data_util import make_docs, tiny_cfg, write_jsonl

LONG = "A perfectly ordinary sentence about tokens and shards. " * 3  # passes every default filter


def test_nfkc_folds_compatibility_characters_and_can_be_turned_off():
    text = "ﬁle ＡＢＣ ① x²"  # ligature, full-width letters, circled digit, superscript
    assert normalize(text, CleanConfig()) == "file ABC 1 x2"
    assert normalize(text, CleanConfig(nfkc=False)) == text


def test_control_characters_removed_but_newline_and_tab_kept():
    text = "a\x00b\x07c\td\ne\x1bf\x7fg\x85h"
    assert normalize(text, CleanConfig()) == "abc\td\nefgh"
    assert normalize(text, CleanConfig(strip_control=False, normalize_whitespace=False)) == text


def test_windows_newlines_become_unix_newlines():
    assert normalize("one\r\ntwo\rthree", CleanConfig()) == "one\ntwo\nthree"


def test_whitespace_cleanup_strips_trailing_spaces_and_long_blank_runs():
    text = "\n\nline one   \n\tindented\t\n\n\n\n\n\nafter five blank lines  \n\n"
    out = normalize(text, CleanConfig())
    assert out == "line one\n\tindented\n\n\nafter five blank lines"
    # two blank lines (PEP 8 spacing) survive untouched
    assert normalize("a\n\n\nb", CleanConfig()) == "a\n\n\nb"
    assert normalize(text, CleanConfig(normalize_whitespace=False)) == text


@pytest.mark.parametrize(
    "text,cc,reason",
    [
        ("   \n  ", CleanConfig(), "empty"),
        ("short text", CleanConfig(min_chars=64), "too_short"),
        ("word " * 100, CleanConfig(max_chars=100), "too_long"),
        ("{}[]()<>!!@@##$$%%^^&&**" * 5 + "abc", CleanConfig(min_chars=1), "symbols"),
        ("1234567890 " * 10 + "ab", CleanConfig(min_chars=1), "few_letters"),
    ],
)
def test_each_filter_drops_with_its_reason(text, cc, reason):
    c = Cleaner(cc)
    assert c(text) is None
    assert c.stats()["dropped"][reason] == 1
    assert c.stats()["docs_out"] == 0


def test_documents_passing_all_filters_are_kept():
    c = Cleaner(CleanConfig())
    assert c(LONG) == LONG.rstrip()
    assert c.stats()["docs_out"] == 1 and sum(c.stats()["dropped"].values()) == 0


def test_character_shares_match_a_plain_definition_on_unicode_text():
    text = "Grüße, 東京! ٣ apples — 42 × π ≈ 131.9\tok"
    letters = sum(ch.isalpha() for ch in text) / len(text)
    symbols = sum(not (ch.isalnum() or ch.isspace()) for ch in text) / len(text)
    assert char_fractions(text) == pytest.approx((letters, symbols))


def test_exact_duplicates_after_cleaning_are_dropped_and_counted():
    c = Cleaner(CleanConfig())
    assert c(LONG) is not None
    assert c(LONG + "   \n\n") is None  # same text once trailing whitespace is cleaned
    assert c(LONG.upper()) is not None  # different text
    assert c(LONG) is None
    assert c.stats()["dropped"]["duplicate"] == 2
    c2 = Cleaner(CleanConfig(dedup=False))
    assert c2(LONG) is not None and c2(LONG) is not None


def test_clean_job_writes_jsonl_and_stats_with_drop_counts(tmp_path):
    docs = make_docs(30) + ["tiny", make_docs(1)[0], "∑" * 33]
    cfg = tiny_cfg(tmp_path, docs=docs)
    st = run_clean(cfg, progress=False)
    out = tmp_path / "work" / "clean"
    kept = [json.loads(line)["text"] for line in (out / st["files"][0]).read_text().splitlines()]
    assert len(kept) == 30 and kept[0] == docs[0].rstrip("\n")  # trailing newline: EOS ends a doc
    saved = json.loads((out / "stats-part000-of001.json").read_text())
    assert saved["dropped"]["too_short"] == 1
    assert saved["dropped"]["duplicate"] == 1
    assert saved["dropped"]["symbols"] == 1
    assert saved["docs_in"] == 33 and saved["docs_out"] == 30
    assert not list(out.glob("*.tmp"))
    assert all(unicodedata.is_normalized("NFKC", d) for d in kept)


def test_clean_with_nothing_left_is_a_clear_error(tmp_path):
    cfg = tiny_cfg(tmp_path, docs=["a", "b", "c"])
    with pytest.raises(DataError, match="no documents left"):
        run_clean(cfg, progress=False)


def test_cli_clean_reports_counts_and_skips_when_up_to_date(tmp_path, capsys):
    cfg = tiny_cfg(tmp_path, docs=make_docs(10) + ["x"])
    args = [
        "data",
        "clean",
        f"--run.work_dir={cfg.run.work_dir}",
        f"--data.sources=[{{path: '{cfg.data.sources[0].path}'}}]",
        "--data.clean.min_chars=20",
        "--logging.progress=false",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "kept 10/11" in out and "too_short 1" in out
    assert main(args) == 0
    assert "up to date" in capsys.readouterr().out


def _clean_cli(tmp_path, source: str, *extra: str) -> list[str]:
    return [
        "data",
        "clean",
        f"--run.work_dir={tmp_path / 'work'}",
        f"--data.sources=[{source}]",
        "--data.clean.min_chars=20",
        "--logging.progress=false",
        *extra,
    ]


def test_rows_without_text_are_counted_in_the_clean_stats(tmp_path, capsys):
    rows = [{"text": d} for d in make_docs(6)] + [{"id": 1}, {"text": None}]
    src = write_jsonl(tmp_path / "raw" / "d.jsonl", rows, raw=True)
    assert main(_clean_cli(tmp_path, f"{{path: '{src}'}}")) == 0
    out = capsys.readouterr().out
    assert "kept 6/8 docs" in out and "no_text 2" in out
    st = json.loads((tmp_path / "work" / "clean" / "stats-part000-of001.json").read_text())
    assert st["dropped"]["no_text"] == 2 and st["sources"][0]["no_text"] == 2
    assert st["docs_in"] == st["docs_out"] + sum(st["dropped"].values()) == 8  # kept + dropped


def test_a_source_without_any_text_names_the_field(tmp_path, capsys):
    src = write_jsonl(tmp_path / "raw" / "d.jsonl", [{"body": d} for d in make_docs(3)], raw=True)
    assert main(_clean_cli(tmp_path, f"{{path: '{src}'}}")) == 5
    err = capsys.readouterr().err
    assert err.startswith("megapt data clean: data error: ")
    assert "field 'text'" in err and "d.jsonl:1" in err
    assert "'body'" in err and err.count("\n") == 1


LATIN1 = "caf\xe9 cr\xe8me br\xfbl\xe9e".encode("latin-1")


@pytest.mark.parametrize("content", [bytes(range(256)) * 64, LATIN1], ids=["binary", "latin1"])
def test_a_wholly_non_utf8_input_says_it_was_skipped_as_non_utf8(tmp_path, capsys, content):
    (tmp_path / "in.txt").write_bytes(content)
    assert main(_clean_cli(tmp_path, f"{{path: '{tmp_path / 'in.txt'}', format: text}}")) == 5
    err = capsys.readouterr().err
    assert err.startswith("megapt data clean: data error: ") and err.count("\n") == 1, err
    assert "1 file(s) skipped as not UTF-8" in err and str(tmp_path / "in.txt") in err


def test_hf_format_errors_name_the_file_with_the_data_error_code(tmp_path, capsys):
    """`format: hf` on a jsonl with invalid UTF-8, or on a folder of mixed files: one line naming
    the file, exit 5 (not a `datasets` traceback)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9 latin-1 here"}\n')
    assert main(_clean_cli(tmp_path, f"{{path: '{bad}', format: hf}}")) == 5
    err = capsys.readouterr().err
    head = f"megapt data clean: data error: {bad}: not valid UTF-8 (first bad byte at offset 30)"
    assert err.startswith(head), err
    assert err.count("\n") == 1
    mixed = tmp_path / "mixed"
    write_jsonl(mixed / "a.jsonl", make_docs(3))
    pq.write_table(pa.table({"text": make_docs(3)}), mixed / "b.parquet")
    assert main(_clean_cli(tmp_path, f"{{path: '{mixed}', format: hf}}")) == 5
    err = capsys.readouterr().err
    assert err.startswith("megapt data clean: data error: ") and err.count("\n") == 1, err
    assert "a.jsonl (json)" in err and "b.parquet (parquet)" in err


def test_split_clean_jobs_deduplicate_globally(tmp_path, capsys):
    """With --num-shards K every distinct text is kept once across the jobs, as one job keeps it:
    the texts the tokenizer and the shard jobs read are those of a 1-job clean (order aside)."""
    from megapt.config import load_config
    from megapt.data.clean import iter_mixed_docs

    docs = make_docs(24)
    raw = docs + docs[::2] + docs[:5]  # 17 copies; job i of 2 takes rows i, i+2, ...
    src = write_jsonl(tmp_path / "raw" / "d.jsonl", raw)
    one = _clean_cli(tmp_path, f"{{path: '{src}'}}", "--out", str(tmp_path / "one"))
    assert main(one) == 0
    capsys.readouterr()
    for i in range(2):
        split = ["--num-shards", "2", "--shard-index", str(i)]
        assert main(_clean_cli(tmp_path, f"{{path: '{src}'}}", *split)) == 0
    out = capsys.readouterr().out
    stats = (tmp_path / "work" / "clean").glob("stats-*")
    per_job = sum(json.loads(p.read_text())["docs_out"] for p in stats)
    assert per_job > 24  # each job alone kept copies the other job also kept
    assert f"{per_job - 24} document(s) kept by one job are duplicates" in out
    cfg = load_config(None, [f"--data.sources=[{{path: '{src}'}}]"])
    single = list(iter_mixed_docs(cfg, tmp_path / "one"))
    split = list(iter_mixed_docs(cfg, tmp_path / "work" / "clean"))
    assert len(single) == len(set(single)) == 24
    assert len(split) == len(set(split)) == 24 and sorted(split) == sorted(single)
