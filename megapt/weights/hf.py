"""Hugging Face Llama format in and out: name mapping, config, reading and writing the folder.

Our blocks are Llama blocks (RMSNorm, RoPE with HF's rotate_half convention, SwiGLU, GQA), so
export is a rename: no permutation of q/k rows is needed.

    export_hf(model, args, "hf_tiny/", tokenizer_path)   # ours -> HF (`megapt export --format hf`)
    model, args = load_hf("hf_tiny/")                    # HF -> ours (any reader of an HF folder)

The HF folder holds config.json (LlamaForCausalLM), model.safetensors, generation_config.json
and, when a sentencepiece model is known, tokenizer.model + tokenizer_config.json +
special_tokens_map.json, so ``AutoModelForCausalLM.from_pretrained(dir)`` and
``AutoTokenizer.from_pretrained(dir)`` load it unchanged.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path

import torch

from megapt.errors import EXIT_CHECKPOINT, UsageError, UserError
from megapt.model.gpt import GPT, ModelArgs

# (our name, HF name); {i} is the block index.
_NAME_MAP: list[tuple[str, str]] = [
    ("tok_embeddings.weight", "model.embed_tokens.weight"),
    ("layers.{i}.attention.wq.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    ("layers.{i}.attention.wk.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    ("layers.{i}.attention.wv.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    ("layers.{i}.attention.wo.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("layers.{i}.feed_forward.w1.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    ("layers.{i}.feed_forward.w3.weight", "model.layers.{i}.mlp.up_proj.weight"),
    ("layers.{i}.feed_forward.w2.weight", "model.layers.{i}.mlp.down_proj.weight"),
    ("layers.{i}.attention_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("layers.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
]


def _compile(pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace(r"\{i\}", r"(\d+)") + "$")


_OURS_TO_HF = [(_compile(a), b) for a, b in _NAME_MAP]
_HF_TO_OURS = [(_compile(b), a) for a, b in _NAME_MAP]


def _rename(name: str, table) -> str | None:
    for pat, target in table:
        m = pat.match(name)
        if m:
            return target.replace("{i}", m.group(1)) if m.groups() else target
    return None


def ours_to_hf_name(name: str) -> str | None:
    return _rename(name, _OURS_TO_HF)


def hf_to_ours_name(name: str) -> str | None:
    return _rename(name, _HF_TO_OURS)


# --------------------------------------------------------------------------------------------
# config.json <-> ModelArgs
# --------------------------------------------------------------------------------------------


def hf_config_dict(
    args,
    eos_id: int | None = None,
    pad_id: int | None = None,
    bos_id: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """A LlamaForCausalLM config.json for our ModelArgs."""
    head_dim = args.d_model // args.n_heads
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": args.vocab_size,
        "hidden_size": args.d_model,
        "intermediate_size": args.ffn_hidden,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": args.max_seq_len,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,  # transformers < 5
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": args.rope_theta,
        },  # transformers >= 5
        "rope_scaling": None,
        "tie_word_embeddings": bool(args.tie_embeddings),
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": args.init_std,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": str(dtype).replace("torch.", ""),
        "dtype": str(dtype).replace("torch.", ""),
        "use_cache": True,
    }


class ExportError(UserError, ValueError):
    """A model or folder that cannot be read or converted; the message names the key or tensor."""

    exit_code = EXIT_CHECKPOINT
    kind = "model error"


def args_from_hf_config(cfg: dict, source: str = "config.json"):
    """ModelArgs for a Llama-architecture config.json; raises naming every unsupported key."""
    problems = []
    arch = cfg.get("architectures") or ["LlamaForCausalLM"]
    if (
        cfg.get("model_type", "llama") not in ("llama", "mistral", "qwen2")
        and "LlamaForCausalLM" not in arch
    ):
        problems.append(
            f"model_type={cfg.get('model_type')!r}: only Llama-architecture models are supported"
        )
    for key in (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "vocab_size",
    ):
        if key not in cfg:
            problems.append(f"{key}: missing")
    if problems:
        raise ExportError(f"{source}: " + "; ".join(problems))
    if cfg.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={cfg['hidden_act']!r}: only 'silu' (SwiGLU) is supported")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        problems.append("attention_bias/mlp_bias: biases are not supported")
    n_heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_heads
    if head_dim * n_heads != cfg["hidden_size"]:
        problems.append(
            f"head_dim={head_dim}: must equal hidden_size/num_attention_heads="
            f"{cfg['hidden_size']}/{n_heads}"
        )
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    for key in ("rope_parameters", "rope_scaling"):  # transformers >= 5 / < 5; either may scale
        spec = cfg.get(key)
        kind = spec.get("rope_type", spec.get("type")) if isinstance(spec, dict) else None
        if kind not in ("default", None):
            problems.append(f"{key} type {kind!r}: only plain RoPE is supported (no scaling)")
    if problems:
        raise ExportError(f"{source}: " + "; ".join(problems))
    theta = (rope.get("rope_theta") if isinstance(rope, dict) else None) or cfg.get(
        "rope_theta", 10000.0
    )
    return ModelArgs(
        n_layers=cfg["num_hidden_layers"],
        d_model=cfg["hidden_size"],
        n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
        ffn_hidden=cfg["intermediate_size"],
        vocab_size=cfg["vocab_size"],
        max_seq_len=cfg.get("max_position_embeddings", 2048),
        rope_theta=float(theta),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        init_std=float(cfg.get("initializer_range", 0.02)),
    )


# --------------------------------------------------------------------------------------------
# state dicts
# --------------------------------------------------------------------------------------------


def _model_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters only (no RoPE buffers), tied weights once (first name wins)."""
    return {n: p.detach() for n, p in model.named_parameters()}


def to_hf_state_dict(
    model: torch.nn.Module, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in _model_params(model).items():
        hf = ours_to_hf_name(name)
        if hf is None:
            raise ExportError(
                f"parameter {name!r} has no Hugging Face Llama equivalent "
                "(merge LoRA adapters / drop task heads before export)"
            )
        out[hf] = (t.to(dtype) if dtype is not None else t).contiguous().cpu()
    return out


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``state`` (our names) into ``model``; every missing/unexpected/mis-shaped tensor is
    named in one error. A tied output weight may be absent."""
    params = dict(model.named_parameters(remove_duplicate=False))
    tied = (
        getattr(model, "output", None) is not None
        and getattr(model, "tok_embeddings", None) is not None
        and model.output.weight is model.tok_embeddings.weight
    )
    problems = []
    for name, p in params.items():
        if name not in state:
            if name == "output.weight" and tied:
                continue
            problems.append(f"missing tensor {name} (model expects {tuple(p.shape)})")
        elif tuple(state[name].shape) != tuple(p.shape):
            problems.append(
                f"tensor {name}: checkpoint shape {tuple(state[name].shape)} "
                f"!= model shape {tuple(p.shape)}"
            )
    buffers = {n for n, _ in model.named_buffers()}
    for name in state:
        if name not in params and name not in buffers:
            problems.append(f"unexpected tensor {name}")
    if problems:
        head = problems[:20] + ([f"... {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise ExportError(f"{source}: checkpoint does not fit the model:\n  " + "\n  ".join(head))
    with torch.no_grad():
        for name, p in params.items():
            if name in state:
                p.copy_(state[name].to(p.dtype))


def read_safetensors_dir(model_dir: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, or the shards named by model.safetensors.index.json."""
    from safetensors.torch import load_file

    single = model_dir / "model.safetensors"
    index = model_dir / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        out: dict[str, torch.Tensor] = {}
        for f in files:
            out.update(load_file(str(model_dir / f)))
        return out
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ExportError(
            f"{model_dir}: no model.safetensors (or index) found; only safetensors weights are read"
        )
    out = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def is_hf_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file() and any(p.glob("*.safetensors"))


def load_hf(model_dir: str | os.PathLike, backends=None):
    """Build our GPT from a local Hugging Face Llama folder. Returns (model, args)."""
    model_dir = Path(model_dir)
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise ExportError(f"{model_dir}: not a Hugging Face model folder (no config.json)")
    args = args_from_hf_config(json.loads(cfg_path.read_text()), str(cfg_path))
    hf_state = read_safetensors_dir(model_dir)
    state, unknown = {}, []
    for name, t in hf_state.items():
        ours = hf_to_ours_name(name)
        if ours is None:
            if "rotary_emb" in name:  # old checkpoints store inv_freq
                continue
            unknown.append(name)
        else:
            state[ours] = t
    if unknown:
        raise ExportError(
            f"{model_dir}: tensors with no megapt equivalent: {unknown[:10]}"
            + (f" ... ({len(unknown)} total)" if len(unknown) > 10 else "")
        )
    if args.tie_embeddings:
        state.pop("output.weight", None)
    model = GPT(args, backends) if backends is not None else GPT(args)
    load_weights(model, state, str(model_dir))
    return model, args


# --------------------------------------------------------------------------------------------
# tokenizer files
# --------------------------------------------------------------------------------------------


def write_hf_tokenizer(
    spm_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    eos_token: str,
    pad_token: str,
    max_len: int,
) -> dict:
    """Copy the sentencepiece model as tokenizer.model and write a LlamaTokenizer config whose
    encoding matches ours (no BOS, dummy prefix as in the .model). Returns the special ids."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    spm_path, out_dir = Path(spm_path), Path(out_dir)
    sp = spm.SentencePieceProcessor(model_file=str(spm_path))
    ids = {}
    for role, piece in (("eos", eos_token), ("pad", pad_token)):
        pid = sp.piece_to_id(piece)
        if pid == sp.unk_id() and piece != sp.id_to_piece(sp.unk_id()):
            raise ExportError(
                f"{spm_path}: tokenizer has no {role} token {piece!r}; "
                f"retrain it with {piece!r} in tokenizer.special_tokens"
            )
        ids[role] = pid
    proto = pb.ModelProto()
    proto.ParseFromString(spm_path.read_bytes())
    add_prefix = bool(proto.normalizer_spec.add_dummy_prefix)
    unk = sp.id_to_piece(sp.unk_id()) if sp.unk_id() >= 0 else None
    bos = sp.id_to_piece(sp.bos_id()) if sp.bos_id() >= 0 else None
    ids["bos"] = sp.bos_id() if sp.bos_id() >= 0 else None
    shutil.copyfile(spm_path, out_dir / "tokenizer.model")
    specials = {"eos_token": eos_token, "pad_token": pad_token, "unk_token": unk, "bos_token": bos}
    specials = {k: v for k, v in specials.items() if v is not None}
    tok_cfg = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": add_prefix,
        "legacy": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
        **specials,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    (out_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    return ids


def write_safetensors(state: dict, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """``safetensors.torch.save_file``, then the file mode every other file gets (0644 under the
    usual umask): safetensors creates its files 0600, so teammates on a shared cluster could not
    read exported or consolidated weights."""
    from safetensors.torch import save_file

    save_file(state, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    """This process's umask, read without setting it (os.umask would change it for the loader's
    threads for a moment); 0o022 where /proc is not there."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


@contextlib.contextmanager
def atomic_folder(out_dir: str | os.PathLike):
    """Yield ``<out_dir>.tmp`` to fill; on success it replaces ``out_dir`` in one rename, so a
    failed or killed write never leaves a half-written folder under the final name."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():  # never replaced: it may be anything of the user's
        raise UsageError(f"{out}: exists and is not a folder; remove it or write somewhere else")
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    yield tmp
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def export_hf(
    model: torch.nn.Module,
    args,
    out_dir: str | os.PathLike,
    tokenizer_path=None,
    eos_token: str = "<|endoftext|>",
    pad_token: str = "<|pad|>",
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a transformers-loadable LlamaForCausalLM folder (atomically: tmp dir + rename)."""

    with atomic_folder(out_dir) as tmp:
        ids: dict = {"eos": None, "pad": None, "bos": None}
        if tokenizer_path:
            ids = write_hf_tokenizer(tokenizer_path, tmp, eos_token, pad_token, args.max_seq_len)
        state = to_hf_state_dict(model, dtype)
        if args.tie_embeddings:
            state.pop("lm_head.weight", None)
        write_safetensors(state, tmp / "model.safetensors", metadata={"format": "pt"})
        cfg = hf_config_dict(
            args, eos_id=ids["eos"], pad_id=ids["pad"], bos_id=ids["bos"], dtype=dtype
        )
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        gen = {"eos_token_id": ids["eos"], "pad_token_id": ids["pad"], "bos_token_id": ids["bos"]}
        (tmp / "generation_config.json").write_text(
            json.dumps({k: v for k, v in gen.items() if v is not None}, indent=2)
        )
    return Path(out_dir)
