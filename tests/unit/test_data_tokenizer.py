"""Tokenizer: round trip, special tokens, the segment cache, atomic files, clear errors."""

from __future__ import annotations

import hashlib
import json
import time

import pytest

from megapt.config import TokenizerConfig
from megapt.data.tokenizer import (
    Tokenizer,
    TokenizerError,
    TokenizerNotFoundError,
    _segcache_module,
    sidecar_path,
    train_tokenizer,
    training_sentences,
)
from tests.unit.data_util import make_docs

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
    assert (
        256 < tok.vocab_size <= 420
    )  # byte fallback pieces + learnt pieces, at most the requested size
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
    code = [
        "\n".join(
            " " * rng.choice([4, 8, 12, 16, 20, 24])
            + rng.choice(["x = 1", "return y", "foo(bar)", "(2),"])
            for _ in range(40)
        )
        for _ in range(60)
    ]
    t = train_tokenizer(
        TokenizerConfig(model_type="unigram", vocab_size=400, num_threads=1),
        make_docs(100) + code,
        tmp_path / "u.model",
    )
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


def test_a_very_long_line_is_cut_in_linear_time():
    """A 32 MB one-line document is cut into training pieces in well under a second (the old hard
    split re-sliced the rest of the line for every piece: 64 s for 32 MB on this 2-core VM, 278 s
    for 40 MB); the pieces are the line, in order, each at most max_chars."""
    line = ("alpha beta(gamma) 12 " * (32 * 2**20 // 21 + 1))[: 32 * 2**20]
    counts: dict = {}
    t0 = time.perf_counter()
    pieces = list(training_sentences([line + "\nshort tail\n"], 2048, counts))
    took = time.perf_counter() - t0
    assert took < 5.0, f"{took:.1f}s for a 32 MB line"
    assert "".join(pieces) == line + "\nshort tail\n"
    assert len(pieces) == 16384 + 1 and {len(x) for x in pieces[:-1]} == {2048}
    assert counts == {"docs": 1, "chars": len(line) + 12}


def test_training_says_what_it_read_before_sentencepiece_trains(tmp_path):
    msgs: list[str] = []
    line = ("alpha beta(gamma) 12 " * 60_000)[: 2**20]  # 1 MB, one line
    docs = [line, "def f(x):\n    return x\n"]
    train_tokenizer(
        TokenizerConfig(vocab_size=300, num_threads=1),
        docs,
        tmp_path / "spm.model",
        log=msgs.append,
    )
    assert len(msgs) == 1
    assert msgs[0].startswith("tokenizer: read 2 docs, 1.0 M chars -> 513 pieces in ")
    assert msgs[0].endswith("; training bpe vocab 300 on 513 of them")


def test_array_encoding_matches_list_encoding(tok):
    texts = make_docs(30, seed=11) + SAMPLES + ["a\u2581 b", ""]
    for dtype in ("uint16", "uint32"):
        got = tok.encode_arrays(texts, dtype)
        assert [a.tolist() for a in got] == [tok.sp.encode(t) for t in texts]
        assert all(a.dtype == dtype for a in got)


# --------------------------------------------------------------------------------------------
# Encoder paths: the C segment cache (megapt.data._segcache) and its fallbacks give sp's ids
# --------------------------------------------------------------------------------------------

FUZZ_ATOMS = (
    list("abcXYZxyz")
    + ["def", "self", "return", "__init__", "_", "__", "0", "7", "42", "3.14", "1e-5"]
    + list("()[]{}:;,.=+-*/<>!?'\"#@%&|\\^~`$")
    + ["):", "->", "==", "...", "'''", '"""']
    + [" ", "  ", "    ", "        ", "\t", "\n", "\n\n", "\n    ", "\r\n"]
    + [
        "é",
        "café",
        "naïve",
        "Grüße",
        "—",
        "“",
        "”",
        "«",
        "東京",
        "日本語",
        "🦜",
        "∮",
        "\u00a0",
        "\u3000",
        "\u2581",
        "x\u2581y",
        "<|endoftext|>",
        "<|pad|>",
        "<|",
        "|>",
        "\x00",
    ]
)


def fuzz_docs(n: int, seed: int) -> list[str]:
    import random

    rng = random.Random(seed)
    return [""] + [
        "".join(rng.choice(FUZZ_ATOMS) for _ in range(rng.randint(1, 120))) for _ in range(n)
    ]


def stdlib_docs(step: int = 60) -> list[str]:
    from megapt.data.sources import stdlib_files

    return [f.read_text(encoding="utf-8", errors="replace") for f in stdlib_files()[::step]]


needs_c = pytest.mark.skipif(
    _segcache_module() is None, reason="C extension not built (no compiler at install)"
)


@pytest.fixture(scope="module")
def code_tok(tmp_path_factory):
    """A BPE model trained like megapt's default one, on stdlib code plus non-ASCII text."""
    texts = stdlib_docs(60) + fuzz_docs(300, seed=1)
    out = tmp_path_factory.mktemp("code_tok") / "spm.model"
    return train_tokenizer(TokenizerConfig(vocab_size=1200, num_threads=1), texts, out)


@needs_c
def test_c_segment_split_follows_the_documented_rule(code_tok):
    import random
    import re

    split = code_tok._segcache.split
    assert split("def f(x_1):\n    return  12") == [
        "def",
        " f",
        "(",
        "x",
        "_",
        "1",
        "):\n",
        "    return",
        "  1",
        "2",
    ]
    assert split("ab  ") == ["ab", "  "] and split("   ") == ["   "] and split("") == []
    assert split("naïve café—ok 東京!") == [
        "naïve",
        " café—ok",
        " 東京",
        "!",
    ]  # non-ASCII never splits
    # on ASCII text the C split is this regex: letters | one digit | other non-space (with '_'),
    # each with its leading spaces; a trailing space run alone
    fine = re.compile(r" *(?:[^\W\d_]+|\d|(?:[^\w ]|_)+)| +")
    rng = random.Random(3)
    for _ in range(300):
        text = "".join(rng.choice(FUZZ_ATOMS[:60]) for _ in range(rng.randint(0, 60)))
        assert split(text) == fine.findall(text)


@needs_c
@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_c_segment_cache_gives_exactly_the_sentencepiece_ids(code_tok, dtype):
    assert code_tok.encoder_path == "segcache-c", code_tok.encoder_note
    texts = stdlib_docs(97)[:12] + fuzz_docs(400, seed=2) + SAMPLES
    for _ in range(2):  # cold, then warm cache
        got = code_tok.encode_arrays(texts, dtype)
        assert all(a.dtype == dtype for a in got)
        assert [a.tolist() for a in got] == [code_tok.sp.encode(t) for t in texts]
    assert code_tok.encode_batch(texts[:50]) == [code_tok.sp.encode(t) for t in texts[:50]]
    assert code_tok.encode_cached(texts[20]) == code_tok.sp.encode(texts[20])


@needs_c
def test_c_segment_cache_stays_exact_when_it_is_evicted(code_tok, monkeypatch):
    import megapt.data.tokenizer as tk

    fresh = Tokenizer(code_tok._proto)
    monkeypatch.setattr(tk, "_SEGCACHE_MAX_ENTRIES", 40)
    texts = fuzz_docs(120, seed=4)
    sizes = []
    for t in texts:
        assert fresh.encode_arrays([t], "uint16")[0].tolist() == fresh.sp.encode(t)
        sizes.append(len(fresh._segcache))
    assert max(sizes) <= 40 + 120  # cleared when full; at most one document's segments beyond
    assert any(b < a for a, b in zip(sizes, sizes[1:]))  # it was cleared


def test_without_the_c_extension_the_python_cache_gives_the_same_ids(code_tok, monkeypatch):
    import sys

    monkeypatch.setitem(
        sys.modules, "megapt.data._segcache", None
    )  # `import` now raises ImportError
    fallback = Tokenizer(code_tok._proto)
    assert fallback.encoder_path == "segment-cache-py" and "not built" in fallback.encoder_note
    texts = fuzz_docs(150, seed=5) + SAMPLES
    want = [code_tok.sp.encode(t) for t in texts]
    assert [a.tolist() for a in fallback.encode_arrays(texts, "uint32")] == want
    assert fallback.encode_batch(texts) == want


@needs_c
def test_vocabulary_crossing_the_split_disables_the_c_cache(tmp_path):
    import io

    import sentencepiece as spm

    # split_by_unicode_script=False lets BPE learn pieces that join letters and punctuation ("x(", "._")
    texts = stdlib_docs(60)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        model_type="bpe",
        vocab_size=1200,
        byte_fallback=True,
        user_defined_symbols=["<|endoftext|>", "<|pad|>"],
        unk_id=0,
        bos_id=-1,
        eos_id=-1,
        pad_id=-1,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        add_dummy_prefix=False,
        split_by_whitespace=True,
        split_by_unicode_script=False,
        max_sentence_length=8192,
        num_threads=1,
        minloglevel=2,
    )
    t = Tokenizer(model.getvalue())
    assert t.encoder_path != "segcache-c" and "cross the fine segment split" in t.encoder_note
    docs = texts[:5] + fuzz_docs(100, seed=6)
    assert [a.tolist() for a in t.encode_arrays(docs, "uint16")] == [t.sp.encode(d) for d in docs]
