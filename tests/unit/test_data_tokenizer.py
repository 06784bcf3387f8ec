"""Tokenizer: round trip, special tokens, the segment cache, atomic files, clear errors."""
from __future__ import annotations

import hashlib
import json

import pytest

from megapt.config import TokenizerConfig
from megapt.data.tokenizer import (Tokenizer, TokenizerError, TokenizerNotFoundError, sidecar_path,
                                   train_tokenizer)
from test_data_util import make_docs

SAMPLES = [
    "def f(x):\n    return x  # two  spaces\n\n\nclass A:\n\tpass\n",
    "  leading spaces and trailing   ",
    "Unicode: Grüße, 東京, naïve café — ok",
    "emoji never seen in training: 🦜 and a rare ∮ symbol",
    "numbers 1234567890 and 3.14159",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "spm.model"
    return train_tokenizer(TokenizerConfig(vocab_size=420, num_threads=1), make_docs(150), out)


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_reproduces_the_text(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_vocab_and_special_token_ids(tok):
    assert 256 < tok.vocab_size <= 420  # byte fallback pieces + learnt pieces, at most the requested size
    assert tok.id_to_piece(tok.eos_id) == "<|endoftext|>"
    assert tok.id_to_piece(tok.pad_id) == "<|pad|>"
    assert tok.eos_id != tok.pad_id
    ids = tok.encode("first doc<|endoftext|>second doc")
    assert ids.count(tok.eos_id) == 1  # the special token is one id, not spelled out
    assert tok.decode([tok.eos_id]) == "<|endoftext|>"


def test_segment_cache_gives_exactly_the_sentencepiece_ids(tok):
    assert tok.segment_cache
    texts = make_docs(40, seed=9) + SAMPLES + ["a\u2581 b", "", "   ", "x" * 3000]
    assert tok.encode_batch(texts) == [tok.sp.encode(t) for t in texts]
    assert tok.encode_batch(texts) == [tok.sp.encode(t) for t in texts]  # warm cache, same answer


def test_model_file_is_complete_and_sidecar_records_its_sha256(tok):
    path = tok.path
    assert not list(path.parent.glob("*.tmp"))
    meta = json.loads(sidecar_path(path).read_text())
    assert meta["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() == tok.sha256
    assert meta["eos_id"] == tok.eos_id and meta["pad_id"] == tok.pad_id
    again = Tokenizer.load(path)
    assert again.encode(SAMPLES[0]) == tok.encode(SAMPLES[0]) and again.sha256 == tok.sha256


def test_tokenizer_survives_pickling_for_worker_processes(tok):
    import pickle

    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(SAMPLES[2]) == tok.encode(SAMPLES[2]) and clone.eos_id == tok.eos_id


def test_unigram_model_type_round_trips_and_batches_like_single_encodes(tmp_path):
    import random

    rng = random.Random(0)  # indented code: whitespace pieces of 4, 8, 12, 16 spaces get learnt
    code = ["\n".join(" " * rng.choice([4, 8, 12, 16, 20, 24]) + rng.choice(["x = 1", "return y", "foo(bar)", "(2),"])
                      for _ in range(40)) for _ in range(60)]
    t = train_tokenizer(TokenizerConfig(model_type="unigram", vocab_size=400, num_threads=1),
                        make_docs(100) + code, tmp_path / "u.model")
    assert t.decode(t.encode(SAMPLES[0])) == SAMPLES[0]
    # a 22-space run scores the same as 2+8+12 or 2+12+8: batch encoding must break ties like encode()
    texts = SAMPLES + code[:20] + ["x),\n" + " " * 22 + "(2)", " " * 32 + "y"]
    assert t.encode_batch(texts) == [t.sp.encode(x) for x in texts]


def test_missing_tokenizer_error_names_path_and_command(tmp_path):
    with pytest.raises(TokenizerNotFoundError) as exc:
        Tokenizer.load(tmp_path / "nope" / "spm.model")
    assert str(tmp_path / "nope" / "spm.model") in str(exc.value)
    assert "megapt tokenizer train" in str(exc.value)


def test_corrupt_model_file_is_a_clear_error(tmp_path):
    p = tmp_path / "bad.model"
    p.write_bytes(b"not a protobuf at all")
    with pytest.raises(TokenizerError, match="bad.model"):
        Tokenizer.load(p)


def test_empty_corpus_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match="empty corpus"):
        train_tokenizer(TokenizerConfig(vocab_size=300), [], tmp_path / "spm.model")
    assert not (tmp_path / "spm.model").exists()


def test_array_encoding_matches_list_encoding(tok):
    texts = make_docs(30, seed=11) + SAMPLES + ["a\u2581 b", ""]
    for dtype in ("uint16", "uint32"):
        got = tok.encode_arrays(texts, dtype)
        assert [a.tolist() for a in got] == [tok.sp.encode(t) for t in texts]
        assert all(a.dtype == dtype for a in got)
