"""Shard writer and sharding job: format, packing, split, K-way split + merge, resume, errors."""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections import Counter

import numpy as np
import pytest

from megapt.data.clean import run_clean
from megapt.data.manifest import MANIFEST, load_manifest, merge_manifests, verify_dir
from megapt.data.shard import shard_corpus, write_token_dataset
from megapt.data.sources import DataError
from megapt.data.tarformat import ShardError, iter_shard, write_shards
from megapt.data.tokenizer import Tokenizer, train_tokenizer
from tests.unit.data_util import tiny_cfg


def read_split(shard_dir, split):
    m = load_manifest(shard_dir)
    rows = []
    for e in m["splits"][split]["shards"]:
        rows += [
            arr
            for _, arr in iter_shard(
                shard_dir / e["name"], sample_len=m["seq_len"] + 1, dtype=m["dtype"]
            )
        ]
    return rows


# --------------------------------------------------------------------------------------------
# write_token_dataset / write_shards
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab,dtype", [(500, np.uint16), (70000, np.uint32)])
def test_token_dataset_format_counts_dtype_and_checksums(tmp_path, vocab, dtype):
    rng = np.random.default_rng(0)
    train = [rng.integers(0, vocab, 9) for _ in range(23)]
    val = [rng.integers(0, vocab, 9) for _ in range(4)]
    m = write_token_dataset(
        tmp_path, {"train": train, "val": val}, seq_len=8, vocab_size=vocab, shard_samples=10
    )
    assert m["dtype"] == np.dtype(dtype).name
    assert [e["samples"] for e in m["splits"]["train"]["shards"]] == [10, 10, 3]
    assert m["splits"]["train"]["samples"] == 23 and m["splits"]["train"]["tokens"] == 23 * 9
    assert m["splits"]["val"]["samples"] == 4
    first = m["splits"]["train"]["shards"][0]
    path = tmp_path / first["name"]
    assert first["name"] == "train-000-00000.tar"
    assert first["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert first["bytes"] == path.stat().st_size
    with tarfile.open(path) as tf:
        members = tf.getmembers()
        assert [x.name for x in members[:2]] == [
            "train-000-000000000.tokens",
            "train-000-000000001.tokens",
        ]
        raw = tf.extractfile(members[1]).read()
    assert np.array_equal(np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")), train[1])
    got = read_split(tmp_path, "train")
    assert all(np.array_equal(a, b) for a, b in zip(got, train)) and len(got) == 23
    # keys keep counting across shards of the job
    with tarfile.open(tmp_path / "train-000-00002.tar") as tf:
        assert tf.getnames()[0] == "train-000-000000020.tokens"


@pytest.mark.parametrize("dtype,sample_len", [("uint16", 9), ("uint32", 300)])
def test_shards_are_byte_identical_to_what_tarfile_writes(tmp_path, dtype, sample_len):
    # reproducible, standard archives: the same members (mode 0644, mtime 0, no owner) written by
    # Python's tarfile give the same bytes, hence the same sha256
    rng = np.random.default_rng(1)
    rows = [rng.integers(0, 500, sample_len).astype(dtype) for _ in range(23)]
    entries = write_shards(
        rows, tmp_path, "train", 3, sample_len=sample_len, dtype=dtype, shard_samples=10
    )
    assert [e["samples"] for e in entries] == [10, 10, 3]
    for k, e in enumerate(entries):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
            for n in range(10 * k, 10 * k + e["samples"]):
                payload = rows[n].astype(np.dtype(dtype).newbyteorder("<")).tobytes()
                info = tarfile.TarInfo(f"train-003-{n:09d}.tokens")
                info.size, info.mtime, info.mode = len(payload), 0, 0o644
                tf.addfile(info, io.BytesIO(payload))
        assert (tmp_path / e["name"]).read_bytes() == buf.getvalue()
        assert e["sha256"] == hashlib.sha256(buf.getvalue()).hexdigest()


def test_interrupted_writer_leaves_no_partial_shard(tmp_path):
    def samples():
        for i in range(25):
            if i == 15:
                raise KeyboardInterrupt
            yield np.full(5, i, dtype=np.uint16)

    with pytest.raises(KeyboardInterrupt):
        write_shards(samples(), tmp_path, "train", 0, sample_len=5, shard_samples=10)
    # the first full shard is complete and visible; the half-written second one is gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-000-00000.tar"]
    assert (
        len(list(iter_shard(tmp_path / "train-000-00000.tar", sample_len=5, dtype="uint16"))) == 10
    )


def test_wrong_sample_length_is_refused(tmp_path):
    with pytest.raises(ValueError, match="shape"):
        write_shards([np.zeros(4)], tmp_path, "train", sample_len=5)


# --------------------------------------------------------------------------------------------
# The sharding job on a tiny corpus
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Cleaned tiny corpus + tokenizer shared by the sharding tests (read-only)."""
    root = tmp_path_factory.mktemp("corpus")
    cfg = tiny_cfg(root)
    run_clean(cfg, progress=False)
    from megapt.data.clean import iter_mixed_docs

    tok = train_tokenizer(cfg.tokenizer, iter_mixed_docs(cfg), cfg.tokenizer_path)
    return cfg, tok


def run_job(cfg, tok, out, **kw):
    return shard_corpus(cfg, out_dir=out, tokenizer=tok, progress=False, log=lambda *a: None, **kw)


def test_samples_are_the_eos_separated_token_stream(corpus, tmp_path):
    cfg, tok = corpus
    cfg.data.val_fraction = 0.0
    try:
        m = run_job(cfg, tok, tmp_path)
    finally:
        cfg.data.val_fraction = 0.1
    from megapt.data.clean import iter_mixed_docs

    stream = [t for d in iter_mixed_docs(cfg) for t in tok.encode(d) + [tok.eos_id]]
    rows = read_split(tmp_path, "train")
    L = cfg.data.seq_len + 1
    assert all(len(r) == L for r in rows)
    assert np.array_equal(np.concatenate(rows), np.array(stream[: len(rows) * L]))
    assert len(stream) - len(rows) * L == m["dropped_tokens"] < L
    assert m["splits"]["val"]["samples"] == 0 and m["docs"]["val"] == 0


def test_shard_job_names_its_tokenizer_encoder_at_start(corpus, tmp_path):
    cfg, tok = corpus
    lines = []
    shard_corpus(cfg, out_dir=tmp_path, tokenizer=tok, progress=False, log=lines.append)
    assert f"tokenizer encoder {tok.encoder_path}" in lines[0]
    assert tok.encoder_path in (
        "segcache-c",
        "segment-cache-py",
    )  # a megapt BPE model is always cached


def test_validation_split_is_by_document_and_independent_of_processes(corpus, tmp_path):
    cfg, tok = corpus
    m1 = run_job(cfg, tok, tmp_path / "a", num_proc=1)
    m2 = run_job(cfg, tok, tmp_path / "b", num_proc=2)

    def sha(m):
        return [
            (e["name"], e["sha256"]) for s in ("train", "val") for e in m["splits"][s]["shards"]
        ]

    assert sha(m1) == sha(m2)  # byte-identical shards with 1 and 2 worker processes
    assert m1["docs"]["val"] > 0 and m1["splits"]["val"]["samples"] > 0

    # no document is in both splits: decode the val stream, split at EOS, compare with train
    def docs_of(split):
        flat = np.concatenate(read_split(tmp_path / "a", split)).tolist()
        text = tok.decode(flat)
        return {
            d for d in text.split("<|endoftext|>")[1:-1]
        }  # whole docs only (first/last may be cut)

    assert docs_of("val") and not (docs_of("val") & docs_of("train"))


def test_k_way_split_and_merge_equals_the_single_job(corpus, tmp_path):
    cfg, tok = corpus
    single = run_job(cfg, tok, tmp_path / "one", block_bytes=4096)
    for i in range(3):
        m = run_job(cfg, tok, tmp_path / "three", job=i, num_jobs=3, block_bytes=4096)
        assert (tmp_path / "three" / f"manifest-part-{i:03d}-of-003.json").is_file()
        assert m["jobs"] == {"num_shards": 3, "done": [i]}
    assert not (tmp_path / "three" / MANIFEST).exists()  # only `data merge` writes it
    merged = merge_manifests(tmp_path / "three")
    assert load_manifest(tmp_path / "three")["jobs"] == {"num_shards": 3, "done": [0, 1, 2]}
    for split in ("train", "val"):
        a = Counter(r.tobytes() for r in read_split(tmp_path / "one", split))
        b = Counter(r.tobytes() for r in read_split(tmp_path / "three", split))
        assert (
            a == b
            and sum(a.values())
            == single["splits"][split]["samples"]
            == merged["splits"][split]["samples"]
        )
    assert merged["docs"] == single["docs"] and merged["dropped_tokens"] == single["dropped_tokens"]
    assert verify_dir(tmp_path / "three")[1] == []


def test_merge_names_the_jobs_that_have_not_finished(corpus, tmp_path):
    cfg, tok = corpus
    run_job(cfg, tok, tmp_path, job=1, num_jobs=3, block_bytes=4096)
    with pytest.raises(ShardError, match=r"2 of 3 jobs.*\[0, 2\]"):
        merge_manifests(tmp_path)


def test_rerun_skips_a_complete_job_and_cleans_leftover_tmp_files(corpus, tmp_path):
    cfg, tok = corpus
    run_job(cfg, tok, tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.tar")}
    (tmp_path / "train-000-00099.tar.tmp").write_bytes(b"half a shard")  # as if killed mid-write
    m = run_job(cfg, tok, tmp_path)
    assert m["_run"]["skipped"]
    assert not list(tmp_path.glob("*.tmp"))
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.tar")} == before


def test_rerun_redoes_a_job_whose_shards_are_incomplete(corpus, tmp_path):
    cfg, tok = corpus
    m1 = run_job(cfg, tok, tmp_path)
    (tmp_path / m1["splits"]["train"]["shards"][-1]["name"]).unlink()
    m2 = run_job(cfg, tok, tmp_path)
    assert not m2["_run"]["skipped"]
    assert verify_dir(tmp_path) == (
        len(m1["splits"]["train"]["shards"]) + len(m1["splits"]["val"]["shards"]),
        [],
    )
    assert m2["splits"] == m1["splits"]  # deterministic: the same shards again


def test_changed_parameters_redo_the_job(corpus, tmp_path):
    cfg, tok = corpus
    run_job(cfg, tok, tmp_path)
    cfg.data.shard_samples = 7
    try:
        m = run_job(cfg, tok, tmp_path)
    finally:
        cfg.data.shard_samples = 16
    assert not m["_run"]["skipped"]
    assert all(e["samples"] <= 7 for e in m["splits"]["train"]["shards"])
    assert verify_dir(tmp_path)[1] == []


def test_empty_input_is_a_clear_error(corpus, tmp_path):
    cfg, tok = corpus
    clean = tmp_path / "clean"
    clean.mkdir()
    (clean / "src00-part000-of001.jsonl").write_text("")
    (clean / "stats-part000-of001.json").write_text('{"files": ["src00-part000-of001.jsonl"]}')
    with pytest.raises(DataError, match="empty input"):
        run_job(cfg, tok, tmp_path / "out", clean_dir=clean)
    assert not list((tmp_path / "out").glob("*.tar")) and not (tmp_path / "out" / MANIFEST).exists()


def test_corpus_smaller_than_one_sample_is_a_clear_error(corpus, tmp_path):
    cfg, tok = corpus
    clean = tmp_path / "clean"
    clean.mkdir()
    (clean / "src00-part000-of001.jsonl").write_text('{"text": "tiny"}\n')
    (clean / "stats-part000-of001.json").write_text('{"files": ["src00-part000-of001.jsonl"]}')
    with pytest.raises(DataError, match="too small.*seq_len"):
        run_job(cfg, tok, tmp_path / "out", clean_dir=clean)


def test_missing_cleaned_text_names_the_command(corpus, tmp_path):
    cfg, tok = corpus
    with pytest.raises(DataError, match="megapt data clean"):
        run_job(cfg, tok, tmp_path / "out", clean_dir=tmp_path / "nothing")


def test_shards_record_the_tokenizer_they_were_made_with(corpus, tmp_path):
    cfg, tok = corpus
    m = run_job(cfg, tok, tmp_path)
    assert m["tokenizer_sha256"] == hashlib.sha256(cfg.tokenizer_path.read_bytes()).hexdigest()
    assert (
        m["vocab_size"] == Tokenizer.load(cfg.tokenizer_path).vocab_size
        and m["eos_id"] == tok.eos_id
    )


def test_shards_are_standard_tars_that_webdataset_reads(tmp_path):
    import webdataset as wds

    rows = [np.arange(i, i + 9, dtype=np.uint16) for i in range(7)]
    m = write_token_dataset(tmp_path, {"train": rows}, seq_len=8, vocab_size=500, shard_samples=4)
    # same bytes as Python's tarfile module would write for these members
    ref = tmp_path / "ref.tar"
    with tarfile.open(ref, "w", format=tarfile.USTAR_FORMAT) as tf:
        for i, r in enumerate(rows[:4]):
            info = tarfile.TarInfo(f"train-000-{i:09d}.tokens")
            info.size, info.mtime, info.mode = r.nbytes, 0, 0o644
            tf.addfile(info, io.BytesIO(r.tobytes()))
    assert (tmp_path / "train-000-00000.tar").read_bytes() == ref.read_bytes()
    urls = [str(tmp_path / e["name"]) for e in m["splits"]["train"]["shards"]]
    got = list(wds.WebDataset(urls, shardshuffle=False))
    assert [s["__key__"] for s in got] == [f"train-000-{i:09d}" for i in range(7)]
    assert all(np.array_equal(np.frombuffer(s["tokens"], "<u2"), r) for s, r in zip(got, rows))


def test_resharding_with_another_job_count_replaces_the_old_split(corpus, tmp_path):
    cfg, tok = corpus
    for i in range(3):
        run_job(cfg, tok, tmp_path, job=i, num_jobs=3, block_bytes=4096)
    merge_manifests(tmp_path)
    m = run_job(cfg, tok, tmp_path, block_bytes=4096)  # now as one job: writes manifest.json itself
    assert load_manifest(tmp_path)["jobs"] == {"num_shards": 1, "done": [0]}
    assert not list(tmp_path.glob("manifest-part-*-of-003.json"))
    assert not list(tmp_path.glob("*-001-*.tar")) and not list(tmp_path.glob("*-002-*.tar"))
    assert verify_dir(tmp_path) == (
        len(m["splits"]["train"]["shards"]) + len(m["splits"]["val"]["shards"]),
        [],
    )
