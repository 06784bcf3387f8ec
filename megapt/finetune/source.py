"""Where a model comes from: one loader for fine-tuning, eval, generate and export.

``load_source(cfg, path)`` accepts

* a megapt checkpoint folder (``<run>/checkpoints`` -> its newest valid step, or one
  ``step_XXXXXXX``), any ZeRO stage: weights are gathered by ``megapt.train.consolidate``;
* a megapt weights folder (``model.safetensors`` + ``model_config.json`` [+ ``tokenizer.model``,
  ``finetune.json`` and ``head.*`` tensors for a fine-tuned classifier]) as written by
  ``megapt finetune`` and ``megapt export --format megapt``;
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
from typing import Optional

import torch

from megapt.config import ConfigError


@dataclass
class Source:
    model: torch.nn.Module  # megapt GPT (backbone), eval mode, fp32, on CPU
    args: object  # ModelArgs
    tokenizer_path: Optional[Path]
    path: str
    kind: str  # "checkpoint" | "weights" | "hf"
    meta: dict = field(default_factory=dict)  # finetune.json of a fine-tuned folder
    extra: dict = field(default_factory=dict)  # tensors that are not backbone weights (head.*)

    def tokenizer(self):
        from megapt.data.tokenizer import Tokenizer

        if self.tokenizer_path is None:
            raise ConfigError(f"{self.path}: no tokenizer.model found beside the weights; "
                              "pass --tokenizer.path=SPM.model")
        return Tokenizer.load(self.tokenizer_path)


def _backends(cfg):
    from megapt.model.ops import select_backends

    return select_backends(cfg.model, "cpu")


def _tokenizer_beside(folder: Path, cfg) -> Optional[Path]:
    if (folder / "tokenizer.model").is_file():
        return folder / "tokenizer.model"
    p = cfg.tokenizer_path
    return p if p.is_file() else None


def _args_from_json(d: dict):
    from megapt.model.gpt import ModelArgs

    names = {f.name for f in dataclasses.fields(ModelArgs)}
    return ModelArgs(**{k: v for k, v in d.items() if k in names})


def _build(args, cfg, state: dict, where: str):
    from megapt.export import load_weights
    from megapt.model.gpt import GPT

    model = GPT(args, _backends(cfg))
    if args.tie_embeddings:
        state = {k: v for k, v in state.items() if k != "output.weight"}
    load_weights(model, state, where)
    return model.eval()


def _load_weights_folder(folder: Path, cfg) -> Source:
    from safetensors.torch import load_file

    args = _args_from_json(json.loads((folder / "model_config.json").read_text()))
    state = load_file(str(folder / "model.safetensors"))
    extra = {k: v for k, v in state.items() if k.startswith("head.")}
    backbone = {k: v.float() for k, v in state.items() if not k.startswith("head.") and ".lora_" not in k}
    meta = json.loads((folder / "finetune.json").read_text()) if (folder / "finetune.json").is_file() else {}
    model = _build(args, cfg, backbone, str(folder / "model.safetensors"))
    return Source(model, args, _tokenizer_beside(folder, cfg), str(folder), "weights", meta, extra)


def _load_checkpoint(path: Path, cfg) -> Source:
    from megapt.train import consolidate

    try:
        ckpt = consolidate.resolve(path)  # newest valid step of a root; manifest verified
    except Exception as exc:  # CheckpointError
        raise ConfigError(str(exc)) from None
    args = _args_from_json(json.loads((ckpt / "model_config.json").read_text()))
    state = consolidated_state_dict(ckpt)
    model = _build(args, cfg, state, str(ckpt))
    return Source(model, args, _tokenizer_beside(ckpt, cfg), str(ckpt), "checkpoint")


def consolidated_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """fp32 model weights of a megapt checkpoint of any ZeRO stage (TRAIN's
    ``megapt.train.consolidate.full_state_dict``: ZeRO partitions merged by DeepSpeed's zero_to_fp32)."""
    from megapt.train import consolidate

    return {k: v.float() for k, v in consolidate.full_state_dict(Path(ckpt)).items()}


def load_source(cfg, path: str = "") -> Source:
    from megapt.export import is_hf_dir, load_hf

    path = path or cfg.finetune.init_from
    if not path:
        if not cfg.checkpoint_dir.exists():
            raise ConfigError(f"no model given: pass --from PATH (or --finetune.init_from=PATH); "
                              f"the run has no checkpoints in {cfg.checkpoint_dir}")
        path = str(cfg.checkpoint_dir)
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{path}: model path not found (megapt checkpoint dir, weights folder or HF folder)")
    if (p / "model_config.json").is_file() and (p / "model.safetensors").is_file():
        return _load_weights_folder(p, cfg)
    if is_hf_dir(p):
        model, args = load_hf(p, _backends(cfg))
        return Source(model.eval(), args, _tokenizer_beside(p, cfg), str(p), "hf")
    if (p / "megapt.json").is_file() or any(p.glob("step_*")):
        return _load_checkpoint(p, cfg)
    raise ConfigError(f"{path}: not a megapt checkpoint (step_*/), megapt weights folder "
                      "(model.safetensors + model_config.json) or Hugging Face folder (config.json + *.safetensors)")


def save_weights(out_dir: str | os.PathLike, model: torch.nn.Module, args, tokenizer_path=None,
                 meta: Optional[dict] = None, extra: Optional[dict] = None,
                 dtype: torch.dtype = torch.float32) -> Path:
    """Write a megapt weights folder atomically (tmp folder + rename)."""
    from safetensors.torch import save_file

    from megapt.export import atomic_folder

    state = {}
    for n, p in model.named_parameters():  # tied weights once (the first name)
        state[n] = p.detach().to(dtype).contiguous().cpu()
    for k, v in (extra or {}).items():
        state[k] = v.detach().to(dtype).contiguous().cpu()
    with atomic_folder(out_dir) as tmp:
        save_file(state, str(tmp / "model.safetensors"))
        (tmp / "model_config.json").write_text(json.dumps(dataclasses.asdict(args), indent=2))
        if meta:
            (tmp / "finetune.json").write_text(json.dumps(meta, indent=2))
        if tokenizer_path:
            shutil.copyfile(tokenizer_path, tmp / "tokenizer.model")
    return Path(out_dir)


def save_megapt(src: Source, out_dir: str, dtype: torch.dtype = torch.float32) -> Path:
    return save_weights(out_dir, src.model, src.args, src.tokenizer_path, src.meta, src.extra, dtype)
