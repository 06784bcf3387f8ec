"""SentencePiece tokenizer: train on the cleaned corpus, load, encode/decode.

Training streams the corpus (``sentence_iterator``): documents are cut at line boundaries into
pieces of at most ``max_sentence_length / 4`` characters (newlines kept, so pieces such as
``"):\\n"`` and indentation runs are learnt); SentencePiece samples ``input_sentence_size`` of
them (shuffled). The normaliser is the identity (cleaning already applied NFKC) and whitespace is
kept verbatim, so ``decode(encode(text)) == text`` for cleaned text. Special tokens are
``user_defined_symbols`` (ids right after ``<unk>``); bos/eos/pad of SentencePiece itself are off.

Batch encoding (``encode_arrays``, what the shard writer uses) gives exactly
``SentencePieceProcessor.encode``'s ids, faster: a BPE model's documents are cut into segments no
vocabulary piece crosses, and each distinct segment is encoded once (``tok.encoder_path`` says how:
the C extension ``megapt.data._segcache``, its pure-Python fallback, or plain sentencepiece).

The ``.model`` file is written atomically, with a JSON sidecar (``spm.json``) recording the
special tokens, vocab size, sha256 and training statistics.

    tok = Tokenizer.load(cfg.tokenizer_path)   # clear error naming the path when missing
    ids = tok.encode("def f(x):\\n    return x\\n") + [tok.eos_id]
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import re
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from megapt.config import TokenizerConfig
from megapt.errors import EXIT_DATA, UserError

# Encoding paths, fastest first; ``Tokenizer.encoder_path`` names the one a tokenizer uses. All
# three give exactly ``SentencePieceProcessor.encode``'s ids (the cached ones are enabled only after
# the checks in ``Tokenizer._choose_encoder``).
#   segcache-c        the C extension megapt.data._segcache: fine segments (words, punctuation runs,
#                     single digits, each with its leading spaces) cached in a C hash table
#   segment-cache-py  a Python dict of coarse segments (a run of spaces + what follows, up to the
#                     next space); used when the extension is not built
#   sentencepiece     plain ``sp.encode`` (unigram models, unusual normalisers, ...)
SEGCACHE_C, SEGMENT_CACHE_PY, PLAIN = "segcache-c", "segment-cache-py", "sentencepiece"

# SentencePiece BPE only merges adjacent symbols into vocabulary pieces; when no piece contains a
# segment boundary, a document's ids are the concatenation of its segments' ids.
_SEGMENT = re.compile(r" +[^ ]*|[^ ]+")
_CACHE_MAX = 2_000_000
_SEGCACHE_MAX_ENTRIES = 1_000_000  # per process; cleared when full (the stdlib corpus needs ~130k)
_SEGCACHE_MAX_BYTES = 256 << 20
_PROBE = "def f(x_1):\n    return  x_1 + 23.5e-3  # ok\n\tpass\n   "


def _segcache_module():
    """The C extension module, or None when it was not built (no compiler at install time)."""
    import importlib

    try:
        return importlib.import_module("megapt.data._segcache")
    except ImportError:
        return None


class TokenizerError(UserError, RuntimeError):
    """A tokenizer cannot be trained or loaded; the message names the path and what to do."""

    exit_code = EXIT_DATA
    kind = "tokenizer error"


class TokenizerNotFoundError(TokenizerError, FileNotFoundError):
    pass


def sidecar_path(model_path: str | os.PathLike) -> Path:
    return Path(model_path).with_suffix(".json")


class Tokenizer:
    """A SentencePiece model plus the special-token ids megapt uses (EOS between documents, PAD)."""

    def __init__(
        self,
        model_proto: bytes,
        *,
        path: str | os.PathLike | None = None,
        eos_token: str = "<|endoftext|>",
        pad_token: str = "<|pad|>",
    ):
        import sentencepiece as spm

        self._proto = bytes(model_proto)
        self.path = Path(path) if path else None
        self.eos_token, self.pad_token = eos_token, pad_token
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=self._proto)
        except Exception as exc:  # noqa: BLE001 - sentencepiece: RuntimeError/OSError for bad protos
            raise TokenizerError(
                f"{path or 'tokenizer'}: not a valid sentencepiece model ({exc}); "
                f"delete it and run `megapt tokenizer train`"
            ) from None
        self.sha256 = hashlib.sha256(self._proto).hexdigest()
        self._cache: dict[str, list[int]] = {}
        self._array_cache: dict[str, dict] = {}
        self._segcache: Any = (
            None  # a SegmentCache (C extension or its Python fallback) once chosen
        )
        self._plain_markers: tuple[str, ...] = ("\u2581",)
        self.encoder_path, self.encoder_note = self._choose_encoder()
        self.segment_cache = self.encoder_path != PLAIN
        self.vocab_size = self.sp.get_piece_size()
        self.eos_id = self._special_id(eos_token)
        self.pad_id = self._special_id(pad_token)

    def _special_id(self, piece: str) -> int:
        i = self.sp.piece_to_id(piece)
        if i == self.sp.unk_id() or self.sp.id_to_piece(i) != piece:
            raise TokenizerError(
                f"{self.path or 'tokenizer'}: special token {piece!r} is not in the vocabulary; "
                f"retrain with it in tokenizer.special_tokens (`megapt tokenizer train`)"
            )
        return i

    def _choose_encoder(self) -> tuple[str, str]:
        """Pick the fastest exact encoding path; returns (path, why not a faster one).

        Segment caching is exact for a BPE model when (1) the normaliser is the identity and keeps
        every space (no dummy prefix, no whitespace collapsing, spaces escaped to U+2581 as a
        prefix), (2) unknown characters fall back to bytes (otherwise sentencepiece merges a run of
        unknown characters into one id, across segment boundaries), (3) there are no UNUSED pieces
        (their resegmentation table is shared by the whole text), and (4) no NORMAL piece, with
        U+2581 read as a space, contains a segment boundary: then no merge crosses a boundary and
        BPE on the segments alone performs the same merges. User-defined pieces are matched as
        wholes in the raw text, and a literal U+2581 acts as a space, so documents containing
        either go through plain ``sp.encode``. A probe string is compared at the end.
        Unigram encoding is already fast, and its Viterbi ties (e.g. 22 spaces as 8+12 or 12+8)
        may break differently inside a segment than in the whole document, so it is not cached.
        """
        try:
            from sentencepiece import sentencepiece_model_pb2 as pb

            proto = pb.ModelProto()
            proto.ParseFromString(self._proto)
        except Exception as exc:  # noqa: BLE001 - no protobuf: the plain path is exact
            return PLAIN, f"model proto not readable ({exc.__class__.__name__})"
        ns, ts, P = proto.normalizer_spec, proto.trainer_spec, pb.ModelProto.SentencePiece
        self._plain_markers = (
            "\u2581",
            *(p.piece for p in proto.pieces if p.type == P.USER_DEFINED),
        )
        if ts.model_type != pb.TrainerSpec.BPE:
            return PLAIN, "not a BPE model"
        if (
            ns.add_dummy_prefix
            or ns.remove_extra_whitespaces
            or not ns.escape_whitespaces
            or ns.precompiled_charsmap
            or ts.treat_whitespace_as_suffix
        ):
            return PLAIN, "normaliser is not the identity with verbatim spaces"
        if not ts.byte_fallback:
            return PLAIN, "no byte fallback"
        if any(p.type == P.UNUSED for p in proto.pieces):
            return PLAIN, "model has UNUSED pieces"
        normal = [p.piece.replace("\u2581", " ") for p in proto.pieces if p.type == P.NORMAL]
        note = ""
        mod = _segcache_module()
        if mod is None:
            note = "C extension megapt.data._segcache not built"
        else:
            cache = mod.SegmentCache()
            crossing = [p for p in normal if len(cache.split(p)) > 1]
            if crossing:
                note = f"{len(crossing)} vocabulary pieces cross the fine segment split (e.g. {crossing[:3]})"
            elif self._probe_matches(cache.split):
                self._segcache = cache
                return SEGCACHE_C, ""
            else:
                note = "fine segment split disagrees with sentencepiece on the probe"
        if any(len(_SEGMENT.findall(p)) > 1 for p in normal) or not self._probe_matches(
            _SEGMENT.findall
        ):
            return PLAIN, f"{note}; coarse segment split not exact for this model"
        return SEGMENT_CACHE_PY, note

    def _probe_matches(self, split) -> bool:
        return self.sp.encode(_PROBE) == [i for seg in split(_PROBE) for i in self.sp.encode(seg)]

    def _needs_plain(self, text: str) -> bool:
        """A literal U+2581 or a user-defined piece in ``text``: no segment shortcut."""
        return any(m in text for m in self._plain_markers)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise TokenizerNotFoundError(
                f"{path}: tokenizer not found. Create it with `megapt tokenizer train` (or `megapt data prepare`) "
                f"using the same config, or set tokenizer.path to an existing .model file"
            )
        eos, pad = "<|endoftext|>", "<|pad|>"
        side = sidecar_path(path)
        if side.is_file():
            try:
                meta = json.loads(side.read_text())
                eos, pad = meta.get("eos_token", eos), meta.get("pad_token", pad)
            except json.JSONDecodeError:
                pass
        return cls(path.read_bytes(), path=path, eos_token=eos, pad_token=pad)

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many documents (single thread; run several processes for parallelism)."""
        if self.encoder_path == SEGCACHE_C:
            return [a.tolist() for a in self.encode_arrays(texts, "uint32")]
        if self.encoder_path == PLAIN:
            return self.sp.encode(texts, num_threads=1)
        return [self.encode_cached(t) for t in texts]

    def encode_arrays(self, texts: list[str], dtype="uint32") -> list:
        """Like ``encode_batch`` but one numpy array per document (what the shard writer packs)."""
        import numpy as np

        dtype = np.dtype(dtype)
        if self.encoder_path == SEGCACHE_C:
            return [self._encode_segcache(t, dtype) for t in texts]
        if self.encoder_path == PLAIN:
            return [np.array(ids, dtype=dtype) for ids in self.sp.encode(texts, num_threads=1)]
        cache = self._array_cache.setdefault(dtype.str, {})
        out = []
        for text in texts:
            if self._needs_plain(text):
                out.append(np.array(self.sp.encode(text), dtype=dtype))
                continue
            segs = _SEGMENT.findall(text)
            miss = [s for s in set(segs) if s not in cache]
            if miss:
                if len(cache) > _CACHE_MAX // 2:
                    cache.clear()
                    miss = list(set(segs))
                for seg, ids in zip(miss, self.sp.encode(miss, num_threads=1)):
                    cache[seg] = np.array(ids, dtype=dtype)
            out.append(
                np.concatenate(list(map(cache.__getitem__, segs)))
                if segs
                else np.empty(0, dtype=dtype)
            )
        return out

    def _encode_segcache(self, text: str, dtype):
        """One document through the C segment cache; sentencepiece encodes only unseen segments."""
        import numpy as np

        if self._needs_plain(text):
            return np.array(self.sp.encode(text), dtype=dtype)
        if dtype.kind != "u" or dtype.itemsize not in (2, 4):  # e.g. int64: numpy checks the range
            return np.array(self._encode_segcache(text, np.dtype("uint32")).tolist(), dtype=dtype)
        cache = self._segcache
        width = dtype.itemsize
        try:
            r = cache.encode(text, width)
            if type(r) is list:  # the distinct segments not cached yet
                if (
                    len(cache) + len(r) > _SEGCACHE_MAX_ENTRIES
                    or cache.nbytes > _SEGCACHE_MAX_BYTES
                ):
                    cache.clear()
                    r = cache.encode(text, width)
                cache.add(r, self.sp.encode(r, num_threads=1))
                r = cache.encode(text, width)  # every segment is cached now: the ids
        except UnicodeEncodeError:  # lone surrogates have no UTF-8 form: let sentencepiece decide
            return np.array(self.sp.encode(text), dtype=dtype)
        return np.frombuffer(r, dtype="<u2" if width == 2 else "<u4").astype(dtype, copy=False)

    def encode_cached(self, text: str) -> list[int]:
        """Same ids as ``encode``, via the segment cache of the active encoder path."""
        if self.encoder_path == SEGCACHE_C:
            import numpy as np

            return self._encode_segcache(text, np.dtype("uint32")).tolist()
        if self.encoder_path == PLAIN or self._needs_plain(text):
            return self.sp.encode(text)
        cache = self._cache
        segs = _SEGMENT.findall(text)
        miss = [s for s in set(segs) if s not in cache]
        if miss:
            if len(cache) > _CACHE_MAX:
                cache.clear()
                miss = list(set(segs))
            cache.update(zip(miss, self.sp.encode(miss, num_threads=1)))
        return list(itertools.chain.from_iterable(map(cache.__getitem__, segs)))

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def __len__(self) -> int:
        return self.vocab_size

    # pickled as the model bytes (for worker processes)
    def __getstate__(self) -> dict:
        return {
            "proto": self._proto,
            "path": self.path,
            "eos": self.eos_token,
            "pad": self.pad_token,
        }

    def __setstate__(self, st: dict) -> None:
        type(self).__init__(
            self, st["proto"], path=st["path"], eos_token=st["eos"], pad_token=st["pad"]
        )

    def __repr__(self) -> str:
        return (
            f"Tokenizer({self.path}, vocab={self.vocab_size}, eos={self.eos_id}, pad={self.pad_id}, "
            f"encoder={self.encoder_path})"
        )


def training_sentences(texts: Iterable[str], max_chars: int, counts: dict) -> Iterator[str]:
    """Cut documents at line boundaries into pieces of at most ``max_chars`` characters.

    A line longer than ``max_chars`` is cut into ``max_chars`` pieces, each sliced once from the
    line (linear in its length, whatever it is: a 50 MB one-line document takes a fraction of a
    second); the last piece (1 to ``max_chars`` characters) starts the next buffer."""
    for doc in texts:
        counts["docs"] = counts.get("docs", 0) + 1
        counts["chars"] = counts.get("chars", 0) + len(doc)
        buf: list[str] = []
        size = 0
        for line in doc.splitlines(keepends=True):
            if len(line) > max_chars:  # a single overlong line: hard split
                if buf:
                    yield "".join(buf)
                    buf, size = [], 0
                cut = (len(line) - 1) // max_chars * max_chars
                for start in range(0, cut, max_chars):
                    yield line[start : start + max_chars]
                line = line[cut:]
            if size + len(line) > max_chars and buf:
                yield "".join(buf)
                buf, size = [], 0
            buf.append(line)
            size += len(line)
        if buf:
            yield "".join(buf)


def train_tokenizer(
    tc: TokenizerConfig,
    texts: Iterable[str],
    out_path: str | os.PathLike,
    *,
    log=None,
    progress: bool = False,
) -> Tokenizer:
    """Train a SentencePiece model on ``texts`` and write it (atomically) to ``out_path``.

    SentencePiece first reads every piece, then trains; ``log`` gets a line when the reading is
    done (documents, characters, pieces, seconds) and when training starts, and ``progress`` shows
    a tqdm bar of the characters read."""
    import sentencepiece as spm
    from tqdm import tqdm

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    missing = [t for t in (tc.eos_token, tc.pad_token) if t not in tc.special_tokens]
    if missing:
        raise TokenizerError(f"tokenizer.special_tokens must contain {missing}")
    counts: dict = {}
    sentences = training_sentences(texts, max(16, tc.max_sentence_length // 4), counts)
    first = next(sentences, None)
    if first is None:
        raise TokenizerError(
            f"{out_path}: no training text (empty corpus); check data.sources / `megapt data clean`"
        )

    bar = tqdm(
        desc="tokenizer: read", unit="char", unit_scale=True, disable=not progress, mininterval=1.0
    )
    t0 = time.time()

    def all_sentences() -> Iterator[str]:
        yield first
        bar.update(len(first))
        for s in sentences:
            counts["sentences"] = counts.get("sentences", 0) + 1
            bar.update(len(s))
            yield s
        bar.close()
        n = counts.get("sentences", 0) + 1
        used = min(n, tc.input_sentence_size) if tc.input_sentence_size else n
        if log is not None:
            mchars = counts.get("chars", 0) / 1e6
            log(
                f"tokenizer: read {counts.get('docs', 0)} docs, {mchars:.1f} M chars -> {n} pieces "
                f"in {time.time() - t0:.1f}s; training {tc.model_type} vocab {tc.vocab_size} on "
                f"{used} of them"
            )

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=all_sentences(),
            model_writer=model,
            model_type=tc.model_type,
            vocab_size=tc.vocab_size,
            byte_fallback=tc.byte_fallback,
            user_defined_symbols=list(tc.special_tokens),
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
            input_sentence_size=tc.input_sentence_size,
            shuffle_input_sentence=True,
            max_sentence_length=tc.max_sentence_length,
            character_coverage=tc.character_coverage,
            num_threads=tc.num_threads or os.cpu_count() or 1,
            hard_vocab_limit=False,
            minloglevel=2,
        )
    except RuntimeError as exc:
        raise TokenizerError(
            f"{out_path}: sentencepiece training failed: {exc}. With byte_fallback the vocab needs "
            f"room for 256 byte pieces + special tokens + the corpus' characters; a tiny corpus "
            f"may not support vocab_size={tc.vocab_size}"
        ) from None
    seconds = time.time() - t0
    proto = model.getvalue()
    tok = Tokenizer(proto, path=out_path, eos_token=tc.eos_token, pad_token=tc.pad_token)
    tmp = out_path.with_name(out_path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(proto)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out_path)
    from megapt.data.manifest import atomic_write_json

    atomic_write_json(
        sidecar_path(out_path),
        {
            "model": out_path.name,
            "sha256": tok.sha256,
            "model_type": tc.model_type,
            "vocab_size": tok.vocab_size,
            "requested_vocab_size": tc.vocab_size,
            "eos_token": tc.eos_token,
            "eos_id": tok.eos_id,
            "pad_token": tc.pad_token,
            "pad_id": tok.pad_id,
            "special_tokens": {t: tok.sp.piece_to_id(t) for t in tc.special_tokens},
            "byte_fallback": tc.byte_fallback,
            "trained_on": {
                "docs": counts.get("docs", 0),
                "chars": counts.get("chars", 0),
                "sentences": counts.get("sentences", 0) + 1,
            },
            "seconds": round(seconds, 2),
        },
    )
    return tok


# --------------------------------------------------------------------------------------------
# CLI: `megapt tokenizer train`
# --------------------------------------------------------------------------------------------


def add_args(parser) -> None:
    parser.add_argument(
        "--input", default="", help="cleaned-text folder (default: <work_dir>/clean)"
    )
    parser.add_argument(
        "--out",
        default="",
        help="model path (default: tokenizer.path or <work_dir>/tokenizer/spm.model)",
    )
    parser.add_argument("--force", action="store_true", help="train even if the model file exists")


def cli_main(cfg, args) -> int:
    """Exit codes: 0 done, 2 bad config, 5 data or tokenizer error (megapt.errors)."""
    from megapt.data.clean import clean_dir_of, iter_mixed_docs

    out = Path(args.out) if args.out else cfg.tokenizer_path
    if out.is_file() and not args.force:
        print(f"tokenizer: {out} exists ({Tokenizer.load(out)}); --force to retrain")
        return 0
    src = Path(args.input) if args.input else clean_dir_of(cfg)
    t0 = time.time()
    tok = train_tokenizer(
        cfg.tokenizer, iter_mixed_docs(cfg, src), out, log=print, progress=cfg.logging.progress
    )
    print(
        f"tokenizer: trained {cfg.tokenizer.model_type} vocab {tok.vocab_size} in {time.time() - t0:.1f}s "
        f"-> {out} (eos {tok.eos_id}, pad {tok.pad_id}, sha256 {tok.sha256[:12]})"
    )
    return 0
