"""Where a model comes from: one loader for fine-tuning, eval, generate and export.

``load_source(cfg, path)`` accepts

* a megapt checkpoint folder (``<run>/checkpoints`` -> its newest valid step, or one
  ``step_XXXXXXX``), any ZeRO stage: weights are gathered by ``megapt.weights.consolidate``;
* a megapt weights folder (``model.safetensors`` + ``model_config.json`` [+ ``tokenizer.model``,
  ``finetune.json`` and ``head.*`` tensors for a fine-tuned classifier]) as written by
  ``megapt finetune`` and ``megapt export --format megapt --out DIR``;
* a megapt weights file ``NAME.safetensors`` as written by ``megapt export --format megapt --out
  NAME.safetensors``: the same tensors, the model config (and finetune.json) in the file's
  safetensors metadata (``megapt.model_config``, ``megapt.finetune``); no tokenizer inside, it
  comes from ``tokenizer.path``;
* a Hugging Face Llama folder (``config.json`` + safetensors) on local disk.

An empty path means ``finetune.init_from``, else the newest checkpoint of the run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megapt.data.tokenizer import Tokenizer, TokenizerNotFoundError
from megapt.errors import UsageError
from megapt.model.gpt import GPT, ModelArgs
from megapt.model.ops import select_backends
from megapt.weights import consolidate
from megapt.weights.hf import (
    ExportError,
    atomic_folder,
    is_hf_dir,
    load_hf,
    load_weights,
    write_safetensors,
)


@dataclass
class Source:
    model: torch.nn.Module  # megapt GPT (backbone), eval mode, fp32, on CPU
    args: object  # ModelArgs
    tokenizer_path: Path | None
    path: str
    kind: str  # "checkpoint" | "weights" | "hf"
    meta: dict = field(default_factory=dict)  # finetune.json of a fine-tuned folder
    extra: dict = field(default_factory=dict)  # tensors that are not backbone weights (head.*)

    def tokenizer(self):
        if self.tokenizer_path is None:
            raise TokenizerNotFoundError(
                f"{self.path}: no tokenizer.model found beside the "
                "weights; pass --tokenizer.path=SPM.model"
            )
        return Tokenizer.load(self.tokenizer_path)


def _backends(cfg):
    return select_backends(cfg.model, "cpu")


def _tokenizer_beside(folder: Path, cfg) -> Path | None:
    if (folder / "tokenizer.model").is_file():
        return folder / "tokenizer.model"
    p = cfg.tokenizer_path
    return p if p.is_file() else None


def _args_from_json(d: dict):
    names = {f.name for f in dataclasses.fields(ModelArgs)}
    return ModelArgs(**{k: v for k, v in d.items() if k in names})


def _build(args, cfg, state: dict, where: str):
    model = GPT(args, _backends(cfg))
    if args.tie_embeddings:
        state = {k: v for k, v in state.items() if k != "output.weight"}
    load_weights(model, state, where)
    return model.eval()


def _backbone(state: dict, meta: dict, where: str) -> dict:
    """The base model's tensors of a saved state (fp32): the ``head.*`` tensors left out, LoRA
    adapters saved unmerged (finetune.merge_lora=false) folded into their weights,
    W + (alpha / r) B A, as ``LoRALinear.merged`` does, so every reader of the folder (eval,
    generate, export, init_from) gets the fine-tuned model, not the base."""
    out = {
        k: v.float() for k, v in state.items() if not k.startswith("head.") and ".lora_" not in k
    }
    adapters = sorted(k[: -len(".lora_A")] for k in state if k.endswith(".lora_A"))
    if not adapters:
        return out
    alpha = (meta.get("lora") or {}).get("alpha")
    if alpha is None:
        raise ExportError(
            f"{where}: holds LoRA adapters ({adapters[0]}.lora_A, ...) without their alpha in the "
            f"fine-tuning metadata (saved by an older megapt); fine-tune again (the default "
            f"finetune.merge_lora=true folds them into the weights)"
        )
    for name in adapters:
        a, b = state[f"{name}.lora_A"].float(), state.get(f"{name}.lora_B")
        if b is None or f"{name}.weight" not in out:
            raise ExportError(f"{where}: LoRA adapter {name} without its lora_B or base weight")
        out[f"{name}.weight"] = out[f"{name}.weight"] + (b.float() @ a) * (
            float(alpha) / a.shape[0]
        )
    return out


def _load_weights_folder(folder: Path, cfg) -> Source:
    from safetensors.torch import load_file

    args = _args_from_json(json.loads((folder / "model_config.json").read_text()))
    state = load_file(str(folder / "model.safetensors"))
    extra = {k: v for k, v in state.items() if k.startswith("head.")}
    meta = (
        json.loads((folder / "finetune.json").read_text())
        if (folder / "finetune.json").is_file()
        else {}
    )
    backbone = _backbone(state, meta, str(folder / "model.safetensors"))
    model = _build(args, cfg, backbone, str(folder / "model.safetensors"))
    return Source(model, args, _tokenizer_beside(folder, cfg), str(folder), "weights", meta, extra)


def _load_weights_file(path: Path, cfg) -> Source:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # noqa: BLE001 - safetensors: its own error types for a bad header
        raise ExportError(f"{path}: not a readable safetensors file ({exc})") from None
    if WEIGHTS_META_ARGS not in meta:
        raise ExportError(
            f"{path}: a safetensors file without megapt's model config in its "
            f"metadata ({WEIGHTS_META_ARGS}); pass a megapt weights folder or a "
            f"Hugging Face folder"
        )
    args = _args_from_json(json.loads(meta[WEIGHTS_META_ARGS]))
    state = load_file(str(path))
    extra = {k: v for k, v in state.items() if k.startswith("head.")}
    ft_meta = json.loads(meta[WEIGHTS_META_FINETUNE]) if WEIGHTS_META_FINETUNE in meta else {}
    backbone = _backbone(state, ft_meta, str(path))
    model = _build(args, cfg, backbone, str(path))
    tok = cfg.tokenizer_path if cfg.tokenizer_path.is_file() else None
    return Source(model, args, tok, str(path), "weights", ft_meta, extra)


def _load_checkpoint(path: Path, cfg) -> Source:
    ckpt = consolidate.resolve(path)  # newest valid step of a root, verified; CheckpointError
    args = _args_from_json(json.loads((ckpt / "model_config.json").read_text()))
    state = consolidated_state_dict(ckpt)
    model = _build(args, cfg, state, str(ckpt))
    return Source(model, args, _tokenizer_beside(ckpt, cfg), str(ckpt), "checkpoint")


def consolidated_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """fp32 model weights of a megapt checkpoint of any ZeRO stage (``consolidate.full_state_dict``:
    ZeRO partitions merged by DeepSpeed's zero_to_fp32)."""
    return {k: v.float() for k, v in consolidate.full_state_dict(Path(ckpt)).items()}


def load_source(cfg, path: str = "") -> Source:
    """The model at ``path``; a missing or unknown path is an ExportError (exit 4) naming it."""
    path = path or cfg.finetune.init_from
    if not path:
        if not cfg.checkpoint_dir.exists():
            raise ExportError(
                f"no model given: pass --from PATH (or --finetune.init_from=PATH); "
                f"the run has no checkpoints in {cfg.checkpoint_dir}"
            )
        path = str(cfg.checkpoint_dir)
    p = Path(path)
    if not p.exists():
        raise ExportError(
            f"{path}: model path not found (megapt checkpoint dir, weights folder or HF folder)"
        )
    if p.is_file() and p.suffix == ".safetensors":
        return _load_weights_file(p, cfg)
    if (p / "model_config.json").is_file() and (p / "model.safetensors").is_file():
        return _load_weights_folder(p, cfg)
    if is_hf_dir(p):
        model, args = load_hf(p, _backends(cfg))
        return Source(model.eval(), args, _tokenizer_beside(p, cfg), str(p), "hf")
    if (p / "megapt.json").is_file() or any(p.glob("step_*")):
        return _load_checkpoint(p, cfg)
    raise ExportError(
        f"{path}: not a megapt checkpoint (step_*/), megapt weights folder "
        "(model.safetensors + model_config.json) or Hugging Face folder (config.json + *.safetensors)"
    )


WEIGHTS_META_ARGS, WEIGHTS_META_FINETUNE = "megapt.model_config", "megapt.finetune"


def save_weights(
    out_dir: str | os.PathLike,
    model: torch.nn.Module,
    args,
    tokenizer_path=None,
    meta: dict | None = None,
    extra: dict | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a megapt weights folder atomically (tmp folder + rename), or, when ``out_dir`` ends in
    ``.safetensors``, that one file (tmp file + rename) with the model config and ``meta`` in its
    safetensors metadata; the tokenizer is not part of a single file."""

    state = {}
    for n, p in model.named_parameters():  # tied weights once (the first name)
        state[n] = p.detach().to(dtype).contiguous().cpu()
    for k, v in (extra or {}).items():
        state[k] = v.detach().to(dtype).contiguous().cpu()
    out = Path(out_dir)
    if out.suffix == ".safetensors":
        if out.is_dir():
            raise UsageError(
                f"{out}: is a folder; remove it or choose another name for the weights file"
            )
        out.parent.mkdir(parents=True, exist_ok=True)
        info = {"format": "pt", WEIGHTS_META_ARGS: json.dumps(dataclasses.asdict(args))}
        if meta:
            info[WEIGHTS_META_FINETUNE] = json.dumps(meta)
        tmp = out.with_name(out.name + ".tmp")
        try:
            write_safetensors(state, tmp, metadata=info)
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
        return out
    with atomic_folder(out_dir) as tmp:
        write_safetensors(state, tmp / "model.safetensors")
        (tmp / "model_config.json").write_text(json.dumps(dataclasses.asdict(args), indent=2))
        if meta:
            (tmp / "finetune.json").write_text(json.dumps(meta, indent=2))
        if tokenizer_path:
            shutil.copyfile(tokenizer_path, tmp / "tokenizer.model")
    return Path(out_dir)


def save_megapt(src: Source, out_dir: str, dtype: torch.dtype = torch.float32) -> Path:
    return save_weights(
        out_dir, src.model, src.args, src.tokenizer_path, src.meta, src.extra, dtype
    )
