"""WebDataset interoperability: index existing WebDataset token shards as a megapt shard set.

megapt's own shards are WebDataset shards (megapt.data.tarformat): ``webdataset.WebDataset(urls)``
yields ``{"__key__": key, "tokens": bytes}`` per sample. The other way round, ``megapt data
index URL_OR_DIR`` reads the ``*.tar`` files directly in a folder or under a URL prefix (not in
sub-folders), written by any tool, and writes ``manifest.json`` beside them so that megapt's
loader streams them with its global order and exact resume.

Accepted samples: each sample (the members sharing a key, WebDataset's rule: the name up to the
first dot of its last part) carries its tokens in one member with extension ``--ext``:

* ``npy``: a ``.npy`` array (``numpy.save``), 1-D, of uint16, uint32, int32 or int64;
* any other extension (``tokens``, ``bin``, ``u16`` ...): raw little-endian tokens of
  ``--dtype`` (uint16, uint32, int32 or int64; default the dtype megapt uses for the vocabulary).

Every sample must hold the same number of tokens, ``seq_len + 1`` (the loader trains on fixed
rows: inputs and labels shifted by one); token ids must be in ``[0, vocab_size)``. Other members
(``.json``, ``.txt`` ...) are ignored. Anything else (varying lengths, a sample without the
member, a 2-D array, floats, compressed tars) is an error naming the shard and sample. The
vocabulary comes from ``--tokenizer`` (a megapt sentencepiece model; its sha256, vocab size and
EOS id are recorded) or ``--vocab-size`` / ``--eos-id``; training with ``megapt train`` then needs
a tokenizer with the same vocab size and EOS id (the model's vocabulary comes from it). The last
``--val-shards`` shards (in name order) become the ``val`` split.

    megapt data index s3://bucket/wds-corpus --ext npy --tokenizer spm.model --val-shards 1
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np

from megapt.data.manifest import MANIFEST, build_manifest
from megapt.data.remote import open_store, write_json
from megapt.data.tarformat import (
    MEMBER_DTYPES,
    TOKENS_EXT,
    MemberSpec,
    ShardError,
    check_member_name,
    decode_member,
    dtype_for_vocab,
    split_key,
)
from megapt.errors import UsageError
from megapt.urls import join, location


def index_shard(
    data: bytes, where: str, spec: MemberSpec, vocab_size: int, sample_len: int | None
) -> tuple[int, int]:
    """(samples, tokens per sample) of one foreign shard; ShardError naming the sample when it
    does not fit the accepted layout."""
    keys: dict[str, bool] = {}
    n = 0
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
            for info in tf:
                check_member_name(info.name, where)
                key, ext = split_key(info.name)
                keys.setdefault(key, False)
                if ext != spec.ext or not info.isfile():
                    continue
                if keys[key]:
                    raise ShardError(f"{where}: sample {key!r} has two .{spec.ext} members")
                keys[key] = True
                f = tf.extractfile(info)
                payload = f.read() if f is not None else b""
                tokens = decode_member(
                    payload, spec, spec.dtype or "uint16", f"{where}: sample {key!r}"
                )
                if spec.encoding == "npy" and spec.dtype and tokens.dtype.name != spec.dtype:
                    raise ShardError(
                        f"{where}: sample {key!r} holds {tokens.dtype.name}, the "
                        f"first sample {spec.dtype}; one dtype per shard set"
                    )
                if sample_len is None:
                    sample_len = len(tokens)
                    if sample_len < 3:
                        raise ShardError(
                            f"{where}: sample {key!r} has {sample_len} tokens; "
                            f"megapt needs seq_len + 1 >= 3"
                        )
                elif len(tokens) != sample_len:
                    raise ShardError(
                        f"{where}: sample {key!r} has {len(tokens)} tokens, earlier "
                        f"samples {sample_len}; megapt trains on fixed-length "
                        f"samples (seq_len + 1 tokens): pack them first"
                    )
                if len(tokens) and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
                    raise ShardError(
                        f"{where}: sample {key!r}: token ids in "
                        f"[{int(tokens.min())}, {int(tokens.max())}], outside "
                        f"[0, vocab_size={vocab_size})"
                    )
                n += 1
    except (tarfile.TarError, EOFError) as exc:
        raise ShardError(f"{where}: not a readable (uncompressed) tar: {exc}") from None
    lacking = [k for k, has in keys.items() if not has]
    if lacking:
        raise ShardError(
            f"{where}: {len(lacking)} sample(s) without a .{spec.ext} member "
            f"({lacking[:3]}); use --ext to name the member holding the tokens"
        )
    return n, sample_len or 0


def _detect_ext(data: bytes, where: str) -> str:
    exts: dict[str, int] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        for info in tf:
            if info.isfile():
                ext = split_key(info.name)[1]
                exts[ext] = exts.get(ext, 0) + 1
    for ext in ("npy", TOKENS_EXT):
        if ext in exts:
            return ext
    raise UsageError(
        f"{where}: no .npy or .tokens members (found {sorted(exts)}); name the "
        f"member holding the tokens with --ext (raw little-endian: add --dtype)"
    )


def _npy_dtype(data: bytes, ext: str) -> str:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        for info in tf:
            if info.isfile() and split_key(info.name)[1] == ext:
                f = tf.extractfile(info)
                arr = np.load(io.BytesIO(f.read() if f else b""), allow_pickle=False)
                return arr.dtype.name
    return "uint16"


def index_shards(
    where: str | Path,
    *,
    vocab_size: int,
    eos_id: int,
    pad_id: int,
    tokenizer_sha256: str = "",
    ext: str = "",
    dtype: str = "",
    val_shards: int = 0,
    pattern: str = "*.tar",
    remote=None,
    force: bool = False,
    log=print,
) -> dict:
    """Build and write ``manifest.json`` for the foreign WebDataset shards at ``where``."""
    store = open_store(where, remote)
    if store.exists(MANIFEST) and not force:
        raise UsageError(f"{join(location(str(where)), MANIFEST)} exists; --force replaces it")
    names = sorted(n for n in store.list() if fnmatch.fnmatch(n, pattern))
    if not names:
        raise ShardError(
            f"{where}: no {pattern} files to index (only the folder itself is "
            f"read, not sub-folders)"
        )
    if val_shards >= len(names):
        raise UsageError(f"--val-shards {val_shards}: there are only {len(names)} shards")
    spec = None
    sample_len = None
    entries = []
    for i, name in enumerate(names):
        url = store.url(name)
        try:
            data = store.read_bytes(name)
        except FileNotFoundError:
            raise ShardError(f"{url}: listed but gone") from None
        if spec is None:
            e = ext or _detect_ext(data, url)
            if e == "npy":
                stored = _npy_dtype(data, e)
                if stored not in MEMBER_DTYPES:
                    raise ShardError(
                        f"{url}: .npy tokens of {stored}; megapt reads {', '.join(MEMBER_DTYPES)}"
                    )
                spec = MemberSpec(e, "npy", stored, strict=False)
            else:
                d = dtype or dtype_for_vocab(vocab_size)
                if d not in MEMBER_DTYPES:
                    raise UsageError(f"--dtype {d}: choose one of {', '.join(MEMBER_DTYPES)}")
                spec = MemberSpec(e, "raw", d, strict=False)
        n, sample_len = index_shard(data, url, spec, vocab_size, sample_len)
        entries.append(
            {
                "name": name,
                "samples": n,
                "tokens": n * sample_len,
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        )
        log(f"index: {name}: {n} samples x {sample_len} tokens ({i + 1}/{len(names)})")
    assert spec is not None and sample_len is not None
    cut = len(entries) - val_shards
    m = build_manifest(
        seq_len=sample_len - 1,
        vocab_size=vocab_size,
        eos_id=eos_id,
        pad_id=pad_id,
        tokenizer_sha256=tokenizer_sha256,
        splits={"train": entries[:cut], "val": entries[cut:]},
        sources=[{"path": str(where), "format": "webdataset"}],
    )
    m["member"] = spec.as_dict()  # read leniently: other members of a sample are skipped
    write_json(store, MANIFEST, m)
    return m


# --------------------------------------------------------------------------------------------
# CLI: `megapt data index`
# --------------------------------------------------------------------------------------------


def add_args(parser) -> None:
    parser.add_argument(
        "where", help="folder or URL (s3://, gs://, https://) holding the .tar shards"
    )
    parser.add_argument(
        "--ext", default="", help="member extension holding the tokens (default: npy, else tokens)"
    )
    parser.add_argument(
        "--dtype",
        default="",
        help=f"raw members: stored dtype, one of "
        f"{', '.join(MEMBER_DTYPES)} (default: uint16 below a 65536 vocabulary)",
    )
    parser.add_argument(
        "--tokenizer",
        default="",
        help="megapt tokenizer the tokens were made with (default: tokenizer.path when it exists)",
    )
    parser.add_argument("--vocab-size", type=int, default=0, help="without a tokenizer")
    parser.add_argument("--eos-id", type=int, default=None, help="without a tokenizer")
    parser.add_argument(
        "--pad-id", type=int, default=None, help="without a tokenizer (default: eos)"
    )
    parser.add_argument(
        "--val-shards", type=int, default=0, help="last N shards form the val split"
    )
    parser.add_argument("--pattern", default="*.tar", help="shard file names to index")
    parser.add_argument("--force", action="store_true", help="replace an existing manifest.json")


def cli_main(cfg, args) -> int:
    """Exit codes: 0 written, 2 bad arguments, 5 a shard that is not in an accepted layout."""
    from megapt.data.tokenizer import Tokenizer

    tok_path = Path(args.tokenizer) if args.tokenizer else cfg.tokenizer_path
    if args.vocab_size:
        if args.eos_id is None:
            raise UsageError("--vocab-size needs --eos-id (the end-of-document token id)")
        vocab, eos, sha = args.vocab_size, args.eos_id, ""
        pad = args.pad_id if args.pad_id is not None else eos
    elif args.tokenizer or tok_path.is_file():
        tok = Tokenizer.load(tok_path)
        vocab, eos, pad, sha = tok.vocab_size, tok.eos_id, tok.pad_id, tok.sha256
    else:
        raise UsageError(
            f"no tokenizer at {tok_path}: give --tokenizer PATH or --vocab-size N --eos-id K"
        )
    if args.val_shards < 0:
        raise UsageError(f"--val-shards must be >= 0, got {args.val_shards}")
    where = location(args.where)
    m = index_shards(
        where,
        vocab_size=vocab,
        eos_id=eos,
        pad_id=pad,
        tokenizer_sha256=sha,
        ext=args.ext,
        dtype=args.dtype,
        val_shards=args.val_shards,
        pattern=args.pattern,
        remote=cfg.data.remote,
        force=args.force,
    )
    tr, va = m["splits"]["train"], m["splits"]["val"]
    print(
        f"index: {join(where, MANIFEST)}: seq_len {m['seq_len']}, train {tr['samples']} samples "
        f"/ {len(tr['shards'])} shards, val {va['samples']} samples / {len(va['shards'])} "
        f"shards, member {m.get('member', {'ext': TOKENS_EXT, 'encoding': 'raw'})}"
    )
    return 0
