"""Input sources: formats, K-way input splitting, weighted mixing, the built-in stdlib corpus."""

from __future__ import annotations

import sysconfig
from collections import Counter
from pathlib import Path

import pytest

from megapt.config import DataConfig, SourceConfig
from megapt.data.sources import (
    DataError,
    ReadStats,
    iter_documents,
    iter_source,
    mix_streams,
    repeat_weighted,
    stdlib_files,
)
from tests.unit.data_util import make_docs, write_jsonl

DOCS = make_docs(12, seed=3)


def docs_of(**kw) -> list[str]:
    return list(iter_source(SourceConfig(**kw)))


def test_text_directory_is_one_document_per_file_in_sorted_order(tmp_path):
    for i, d in enumerate(DOCS[:5]):
        (tmp_path / "sub").mkdir(exist_ok=True)
        (tmp_path / ("sub" if i % 2 else ".") / f"f{i}.txt").write_text(d)
    (tmp_path / ".hidden.txt").write_text("not a document")
    got = docs_of(path=str(tmp_path))
    # sorted by relative path: f0, f2, f4 (top level) then sub/f1, sub/f3
    assert got == [DOCS[0], DOCS[2], DOCS[4], DOCS[1], DOCS[3]]


def test_glob_selects_matching_files(tmp_path):
    for i, d in enumerate(DOCS[:4]):
        (tmp_path / f"doc{i}.{'md' if i < 2 else 'txt'}").write_text(d)
    assert docs_of(path=str(tmp_path / "*.md")) == DOCS[:2]


def test_non_utf8_text_files_are_skipped_and_counted(tmp_path):
    (tmp_path / "a.txt").write_text(DOCS[0])
    (tmp_path / "b.txt").write_bytes("caf\xe9 latin-1".encode("latin-1"))
    st = ReadStats()
    assert list(iter_source(SourceConfig(path=str(tmp_path)), st)) == [DOCS[0]]
    assert st.undecodable == [str(tmp_path / "b.txt")]


def test_jsonl_reads_the_configured_field(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", DOCS, field="content")
    assert docs_of(path=str(tmp_path / "d.jsonl"), text_field="content") == DOCS


def test_jsonl_errors_name_file_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "ok"}\n{"text": 3}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: field 'text' is int, expected a string"):
        docs_of(path=str(p))
    p.write_text('{"text": "ok"}\n["x"]\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: a JSON list, expected an object"):
        docs_of(path=str(p))
    p.write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: invalid JSON"):
        docs_of(path=str(p))


def _rows_with_gaps(tmp_path, fmt: str) -> SourceConfig:
    """Five rows: texts a, b, c and two rows without one (a missing field / a null)."""
    rows = [
        {"text": "a", "id": 1},
        {"id": 2},
        {"text": "b", "id": 3},
        {"text": None, "id": 4},
        {"text": "c", "id": 5},
    ]
    if fmt == "jsonl":
        return SourceConfig(path=str(write_jsonl(tmp_path / "d.jsonl", rows, raw=True)))
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
        return SourceConfig(path=str(tmp_path / "d.parquet"))
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    return SourceConfig(path=str(tmp_path / "ds"), format="hf")


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "hf"])
def test_rows_without_text_are_dropped_and_counted_by_every_reader(tmp_path, fmt):
    """One policy for jsonl, parquet and HF: a missing or null text is dropped and counted (never
    an error in one reader and silent in another)."""
    st = ReadStats()
    assert list(iter_source(_rows_with_gaps(tmp_path, fmt), st)) == ["a", "b", "c"]
    assert (st.docs, st.no_text) == (3, 2)
    assert st.no_text_example.endswith(("d.jsonl:2 (keys ['id'])", "d.parquet:row 2", "ds:row 2"))


@pytest.mark.parametrize("fmt", ["parquet", "hf"])
def test_a_text_column_of_another_type_is_an_error_naming_it(tmp_path, fmt):
    rows = [{"text": 1}, {"text": 2}]
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
        src = SourceConfig(path=str(tmp_path / "d.parquet"))
    else:
        import datasets

        datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
        src = SourceConfig(path=str(tmp_path / "ds"), format="hf")
    with pytest.raises(DataError, match=r"column 'text' holds int64, expected strings"):
        list(iter_source(src))


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        docs_of(path=str(tmp_path / "nope.jsonl"))


def test_parquet_column_and_missing_column_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"text": DOCS, "id": list(range(len(DOCS)))}),
        tmp_path / "d.parquet",
        row_group_size=5,
    )
    assert docs_of(path=str(tmp_path / "d.parquet")) == DOCS
    with pytest.raises(DataError, match=r"no column 'body'.*'text'"):
        docs_of(path=str(tmp_path / "d.parquet"), text_field="body")


def test_hf_dataset_saved_to_disk_and_local_data_files(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(str(tmp_path / "ds"))
    assert docs_of(path=str(tmp_path / "ds")) == DOCS  # auto-detected
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": DOCS[:3]}),
            "validation": datasets.Dataset.from_dict({"text": DOCS[3:5]}),
        }
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    assert docs_of(path=str(tmp_path / "dd"), format="hf", split="validation") == DOCS[3:5]
    with pytest.raises(DataError, match="splits"):
        docs_of(path=str(tmp_path / "dd"), format="hf", split="test")
    write_jsonl(tmp_path / "files" / "a.jsonl", DOCS[:4])
    assert docs_of(path=str(tmp_path / "files" / "*.jsonl"), format="hf") == DOCS[:4]


@pytest.mark.parametrize("fmt", ["jsonl", "text"])
def test_k_way_split_partitions_the_documents(tmp_path, fmt):
    if fmt == "jsonl":
        src = SourceConfig(path=str(write_jsonl(tmp_path / "d.jsonl", DOCS)))
    else:
        for i, d in enumerate(DOCS):
            (tmp_path / f"{i:02d}.txt").write_text(d)
        src = SourceConfig(path=str(tmp_path))
    parts = [list(iter_source(src, num_shards=3, shard_index=i)) for i in range(3)]
    assert sorted(d for p in parts for d in p) == sorted(DOCS)
    assert all(len(p) == 4 for p in parts)


def test_mixing_is_seeded_and_yields_every_item_once():
    a, b = [f"a{i}" for i in range(50)], [f"b{i}" for i in range(20)]
    m1 = list(mix_streams([a, b], [1.0, 3.0], seed=7))
    assert m1 == list(mix_streams([a, b], [1.0, 3.0], seed=7))
    assert m1 != list(mix_streams([a, b], [1.0, 3.0], seed=8))
    assert sorted(m1) == sorted(a + b)
    # the heavier source is drawn first more often: b finishes well before a
    assert m1.index("b19") < m1.index("a49")


def test_weights_repeat_or_subsample_a_source_deterministically():
    items = list(range(200))
    twice = Counter(repeat_weighted(lambda: items, 2.0, seed=1, src=0))
    assert set(twice.values()) == {2} and len(twice) == 200
    half = list(repeat_weighted(lambda: items, 0.5, seed=1, src=0))
    assert 70 < len(half) < 130 and len(set(half)) == len(half)
    assert half == list(repeat_weighted(lambda: items, 0.5, seed=1, src=0))


def test_weighted_sources_in_iter_documents(tmp_path):
    pa = write_jsonl(tmp_path / "a.jsonl", DOCS[:4])
    pb = write_jsonl(tmp_path / "b.jsonl", DOCS[4:6])
    cfg = DataConfig(sources=[SourceConfig(path=str(pa)), SourceConfig(path=str(pb), weight=2.0)])
    got = Counter(iter_documents(cfg, seed=0))
    assert got == Counter({**{d: 1 for d in DOCS[:4]}, **{d: 2 for d in DOCS[4:6]}})


def test_builtin_corpus_is_the_sorted_stdlib_without_site_packages():
    files = stdlib_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    rel = [f.relative_to(root).as_posix() for f in files]
    assert rel == sorted(rel)
    assert "os.py" in rel and "json/decoder.py" in rel
    assert not any("site-packages" in r or "dist-packages" in r for r in rel)
    assert all(r.endswith(".py") for r in rel)
    # the default source reads them; undecodable test files are skipped, not fatal
    st = ReadStats()
    first = next(
        iter_source(SourceConfig(path="stdlib", format="python"), st, num_shards=50, shard_index=0)
    )
    assert first == files[0].read_text(encoding="utf-8")
