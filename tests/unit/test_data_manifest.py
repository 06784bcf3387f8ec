"""Manifest loading and shard verification: every corruption is a ShardError naming the file."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import numpy as np
import pytest

from megapt.data.manifest import check_tokenizer, load_manifest, verify_dir
from megapt.data.shard import write_token_dataset
from megapt.data.tarformat import ShardError, iter_shard, verify_shard

SEQ = 8


@pytest.fixture
def shards(tmp_path):
    rng = np.random.default_rng(1)
    rows = [rng.integers(0, 500, SEQ + 1) for _ in range(12)]
    m = write_token_dataset(
        tmp_path,
        {"train": rows},
        seq_len=SEQ,
        vocab_size=500,
        shard_samples=5,
        tokenizer_sha256="ab" * 32,
    )
    return tmp_path, m


def entry_for(path) -> dict:
    data = path.read_bytes()
    return {
        "name": path.name,
        "samples": 1,
        "tokens": SEQ + 1,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def test_intact_shards_verify(shards):
    d, m = shards
    assert verify_dir(d) == (3, [])
    e = m["splits"]["train"]["shards"][0]
    verify_shard(d / e["name"], e, sample_len=SEQ + 1, dtype="uint16")


def test_missing_shard(shards):
    d, m = shards
    e = m["splits"]["train"]["shards"][1]
    (d / e["name"]).unlink()
    with pytest.raises(ShardError, match=rf"{e['name']}: shard file missing"):
        verify_shard(d / e["name"], e)


def test_size_mismatch(shards):
    d, m = shards
    e = m["splits"]["train"]["shards"][0]
    with open(d / e["name"], "ab") as f:
        f.write(b"\0" * 512)
    with pytest.raises(ShardError, match=rf"{e['name']}: size mismatch"):
        verify_shard(d / e["name"], e)


def test_checksum_mismatch_same_size(shards):
    d, m = shards
    e = m["splits"]["train"]["shards"][0]
    raw = bytearray((d / e["name"]).read_bytes())
    raw[600] ^= 0xFF  # one flipped bit in a token payload
    (d / e["name"]).write_bytes(bytes(raw))
    with pytest.raises(ShardError, match=rf"{e['name']}: sha256 mismatch"):
        verify_shard(d / e["name"], e)
    checked, errors = verify_dir(d)
    assert checked == 3 and len(errors) == 1 and e["name"] in errors[0]


def test_truncated_tar_is_detected_even_when_the_manifest_matches_it(shards, tmp_path):
    d, m = shards
    src = d / m["splits"]["train"]["shards"][0]["name"]
    cut = tmp_path / "cut.tar"
    cut.write_bytes(src.read_bytes()[:1800])  # ends inside the second member
    e = entry_for(cut)
    e["samples"] = 5
    with pytest.raises(ShardError, match=r"cut\.tar: truncated"):
        verify_shard(cut, e, sample_len=SEQ + 1, dtype="uint16")
    cut.write_bytes(
        src.read_bytes()[:2048]
    )  # ends exactly between members: fewer samples than listed
    e = dict(entry_for(cut), samples=5)
    with pytest.raises(ShardError, match=r"cut\.tar: truncated tar: 2 samples"):
        verify_shard(cut, e, sample_len=SEQ + 1, dtype="uint16")


@pytest.mark.parametrize("name", ["../escape.tokens", "/etc/passwd.tokens", "a/../../b.tokens"])
def test_member_names_escaping_the_directory_are_refused(tmp_path, name):
    path = tmp_path / "evil.tar"
    payload = np.zeros(SEQ + 1, dtype="<u2").tobytes()
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        tf.addfile(info, io.BytesIO(payload))
    with pytest.raises(ShardError, match=r"evil\.tar: unsafe tar member name"):
        verify_shard(path, entry_for(path), sample_len=SEQ + 1, dtype="uint16")
    assert not (tmp_path.parent / "escape.tokens").exists()


def test_garbage_file_is_a_corrupt_tar(tmp_path):
    p = tmp_path / "junk.tar"
    p.write_bytes(b"this is not a tar archive" * 40)
    with pytest.raises(ShardError, match=r"junk\.tar: truncated or corrupt"):
        list(iter_shard(p, sample_len=SEQ + 1, dtype="uint16"))


def test_missing_manifest_names_file_and_command(tmp_path):
    with pytest.raises(ShardError) as exc:
        load_manifest(tmp_path)
    assert str(tmp_path / "manifest.json") in str(exc.value) and "megapt data prepare" in str(
        exc.value
    )


def test_unmerged_partial_manifests_point_to_merge(shards, tmp_path):
    d = tmp_path / "parts"
    write_token_dataset(
        d, {"train": [np.zeros(SEQ + 1)] * 3}, seq_len=SEQ, vocab_size=500, job=1, num_jobs=2
    )
    with pytest.raises(ShardError, match="megapt data merge"):
        load_manifest(d)


def test_invalid_json_and_schema_errors_name_the_file(shards):
    d, m = shards
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(ShardError, match=r"manifest\.json: not valid JSON"):
        load_manifest(d)
    bad = dict(m, dtype="uint32", seq_len="8")
    bad["splits"]["train"]["samples"] += 1
    (d / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(ShardError) as exc:
        load_manifest(d)
    msg = str(exc.value)
    assert (
        "manifest.json" in msg
        and "seq_len" in msg
        and "dtype" in msg
        and "splits.train: totals" in msg
    )


def test_shard_names_in_manifest_cannot_point_outside(shards):
    d, m = shards
    m["splits"]["train"]["shards"][0]["name"] = "../other/train.tar"
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ShardError, match="plain file name"):
        load_manifest(d)


class FakeTok:
    def __init__(self, sha, vocab=500, eos=1):
        self.sha256, self.vocab_size, self.eos_id, self.path = sha, vocab, eos, "/x/spm.model"


def test_tokenizer_mismatch_is_refused(shards):
    d, _ = shards
    m = load_manifest(d)
    check_tokenizer(m, FakeTok("ab" * 32))
    check_tokenizer(m, "ab" * 32)
    with pytest.raises(
        ShardError,
        match=r"manifest\.json: shards were written with a different tokenizer.*spm\.model",
    ):
        check_tokenizer(m, FakeTok("cd" * 32))
    with pytest.raises(ShardError, match="vocab_size 600"):
        check_tokenizer(m, FakeTok("ab" * 32, vocab=600))


@pytest.mark.parametrize("quick", [False, True])
def test_verify_fails_a_shard_whose_tokens_exceed_the_vocabulary(tmp_path, capsys, quick):
    """A shard consistent with its manifest (sizes, sha256, tar) but holding a token id >= the
    vocabulary size fails `megapt data verify` (exit 5), as training would refuse it."""
    from megapt.cli import main

    rng = np.random.default_rng(2)
    rows = [rng.integers(0, 300, SEQ + 1) for _ in range(10)]
    rows[7][3] = 300  # one id past the vocabulary, in the second shard
    m = write_token_dataset(
        tmp_path,
        {"train": rows},
        seq_len=SEQ,
        vocab_size=300,
        shard_samples=5,
        tokenizer_sha256="ab" * 32,
    )
    bad = m["splits"]["train"]["shards"][1]["name"]
    rc = main(["data", "verify", "--dir", str(tmp_path), *(["--quick"] if quick else [])])
    out, err = capsys.readouterr()
    assert rc == 5
    want = f"BAD  {tmp_path / bad}: sample train-000-000000007: token id 300 >= vocab_size 300"
    assert want in out, out
    assert "2 shard(s)" in out and "1 ok, 1 bad" in out
    assert err.startswith("megapt data verify: data error: 1 of 2 shard(s)")
    assert err.count("\n") == 1
