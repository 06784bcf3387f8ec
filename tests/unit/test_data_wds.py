"""WebDataset interoperability, both ways: the `webdataset` package reads megapt's shards, and
`megapt data index` turns WebDataset token shards written by another tool into a shard set that
megapt's loader streams with its global order and exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from megapt.cli import main
from megapt.data.manifest import load_manifest
from tests.unit.loader_util import VOCAB, data_cfg, loaders, make_set, run_global, sample

SEQ = 8
COUNTS = (20, 17, 13, 9)  # samples per foreign shard; the last one becomes the val split


def test_webdataset_reads_megapt_shards_sample_for_sample(tmp_path):
    make_set(tmp_path, 40, shard_samples=16)
    m = load_manifest(tmp_path)
    urls = [str(tmp_path / e["name"]) for e in m["splits"]["train"]["shards"]]
    got = list(wds.WebDataset(urls, shardshuffle=False))
    assert len(got) == 40
    for i, s in enumerate(got):
        assert set(s) >= {"__key__", "tokens"}
        assert s["__key__"] == f"train-000-{i:09d}"
        tokens = np.frombuffer(s["tokens"], dtype="<u2")  # m["dtype"] = uint16, little-endian
        assert (tokens == sample(i, 1)).all()


def _foreign_set(
    d: Path,
    *,
    ext: str = "npy",
    dtype=np.int32,
    tag: int = 5,
    lengths: dict | None = None,
    drop: set = frozenset(),
) -> list[int]:
    """WebDataset shards written by webdataset's own TarWriter: per sample a token member plus a
    .json member; sample ids run across shards in name order. Returns the ids per shard."""
    d.mkdir(parents=True, exist_ok=True)
    i = 0
    for k, n in enumerate(COUNTS):
        with wds.TarWriter(str(d / f"corpus-{k:04d}.tar")) as w:
            for _ in range(n):
                row = sample(i, tag).astype(dtype)
                if lengths and i in lengths:
                    row = row[: lengths[i]]
                rec = {"__key__": f"doc{i:06d}", "json": {"id": i}}
                if i not in drop:
                    rec[ext] = row if ext == "npy" else row.astype(dtype).tobytes()
                w.write(rec)
                i += 1
    return list(COUNTS)


def _index(d: Path, *args: str) -> int:
    return main(["data", "index", str(d), "--vocab-size", str(VOCAB), "--eos-id", "1", *args])


def test_index_foreign_npy_shards_then_exact_resume_at_another_world_size(tmp_path, capsys):
    d = tmp_path / "foreign"
    _foreign_set(d)
    assert _index(d, "--val-shards", "1") == 0
    m = json.loads((d / "manifest.json").read_text())
    assert m["seq_len"] == SEQ and m["member"] == {
        "ext": "npy",
        "encoding": "npy",
        "dtype": "int32",
    }
    assert [e["samples"] for e in m["splits"]["train"]["shards"]] == list(COUNTS[:-1])
    assert m["splits"]["val"]["samples"] == COUNTS[-1]
    n = sum(COUNTS[:-1])  # 50 train samples, ids 0..49
    cfg = data_cfg()
    # every sample once per epoch, for any world size, in one global order
    ref, _ = run_global(loaders(cfg, d, 1, 5), 2 * n // 5)
    ids = [i for tag, i in ref]
    assert sorted(ids[:n]) == list(range(n)) and sorted(ids[n:]) == list(range(n))
    # 2 ranks for 3 steps, then resumed at 3 ranks for 12 steps: the same global stream
    first, state = run_global(loaders(cfg, d, 2, 2), 3)
    rest, _ = run_global(loaders(cfg, d, 3, 2, state=state), 12)
    assert first + rest == ref[: len(first) + len(rest)]
    # the validation split: the last shard, once in finite mode
    val, _ = run_global(loaders(cfg, d, 1, 3, split="val", infinite=False), 3)
    assert sorted(i for _, i in val) == list(range(n, n + COUNTS[-1]))


def test_index_raw_members_of_another_dtype_with_other_members_beside_them(tmp_path):
    d = tmp_path / "raw"
    _foreign_set(d, ext="bin", dtype=np.uint32)
    assert _index(d, "--ext", "bin", "--dtype", "uint32") == 0
    n = sum(COUNTS)
    orders = []
    for verify in (True, False):  # whole reads and (falling back from) member reads
        order, _ = run_global(loaders(data_cfg(verify_checksums=verify), d, 2, 3), 10)
        assert sorted(i for _, i in order[:n]) == list(range(n))  # 60 rows: one epoch and one
        orders.append(order)
    assert orders[0] == orders[1]
    assert main(["data", "verify", "--dir", str(d)]) == 0  # sha256 and every sample's tokens


@pytest.mark.parametrize(
    "case,needle",
    [
        ("lengths", "sample 'doc000021' has 5 tokens, earlier samples 9"),
        ("missing", "1 sample(s) without a .npy member (['doc000003'])"),
        ("range", "outside [0, vocab_size=100)"),
    ],
)
def test_index_refuses_samples_it_cannot_train_on(tmp_path, capsys, case, needle):
    d = tmp_path / case
    if case == "lengths":
        _foreign_set(d, lengths={21: 5})
    elif case == "missing":
        _foreign_set(d, drop={3})
    else:
        _foreign_set(d)
    args = [
        "data",
        "index",
        str(d),
        "--eos-id",
        "1",
        "--ext",
        "npy",
        "--vocab-size",
        "100" if case == "range" else str(VOCAB),
    ]
    assert main(args) == 5
    err = capsys.readouterr().err
    assert needle in err and "corpus-" in err and "Traceback" not in err
    assert not (d / "manifest.json").exists()


def test_index_refuses_float_arrays_and_needs_a_vocabulary(tmp_path, capsys):
    d = tmp_path / "floats"
    _foreign_set(d, dtype=np.float32)
    assert _index(d) == 5
    assert "float32" in capsys.readouterr().err
    assert main(["data", "index", str(d), "--tokenizer", str(tmp_path / "none.model")]) == 5
    assert main(["data", "index", str(d), "--vocab-size", "512"]) == 2
    assert "--eos-id" in capsys.readouterr().err
