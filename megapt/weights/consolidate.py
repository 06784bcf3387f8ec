"""`megapt ckpt consolidate` and `megapt ckpt universal`.

    megapt ckpt consolidate runs/tiny/checkpoints [--out DIR] [--dtype fp32|bf16]
        -> DIR/model.safetensors (full weights, one file) + model_config.json (ModelArgs)
           + tokenizer.model + config.yaml; DIR defaults to <run_dir>/consolidated/step_XXXXXXX.
           ZeRO 1/2/3 partitions are merged with DeepSpeed's zero_to_fp32.

    megapt ckpt universal runs/tiny/checkpoints/step_0000300
        -> adds ds_universal/ to a ZeRO 1-3 checkpoint (DeepSpeed's ds_to_universal), after which it
           resumes at any world size and ZeRO stage 0-3 with --checkpoint.universal=true (loaded by
           megapt.train.reshard). A ZeRO-0 checkpoint needs no conversion (it says so, exit 0).

Both accept a checkpoint folder (step_XXXXXXX) or a checkpoint root (the newest valid one is used);
both verify the checkpoint's manifest first and write atomically (tmp folder + rename).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from megapt.train import parallel
from megapt.train.checkpoint import (
    DS_TAG,
    MANIFEST,
    STEP_RE,
    UNIVERSAL_TAG,
    CheckpointError,
    find_latest_valid,
    read_meta,
    verify_checkpoint,
    weights_only_loads,
    write_manifest,
)
from megapt.weights.hf import atomic_folder, write_safetensors

log = logging.getLogger("megapt.train")


def resolve(path: str | os.PathLike) -> Path:
    """A valid checkpoint folder from a step folder or a checkpoint root."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{p}: no such checkpoint folder")
    if not (p / MANIFEST).is_file() and not STEP_RE.match(p.name):
        latest = find_latest_valid(p)
        if latest is None:
            raise CheckpointError(
                f"{p}: no valid checkpoint (step_XXXXXXX with a {MANIFEST}) in it"
            )
        p = latest
    problems = verify_checkpoint(p)
    if problems:
        raise CheckpointError(f"{p}: not a valid checkpoint:\n  " + "\n  ".join(problems[:10]))
    return p


def full_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """fp32 weights of the whole model from any ZeRO stage's checkpoint (CPU, no process group)."""
    meta = read_meta(ckpt)
    ds_dir = ckpt / DS_TAG
    if int(meta.get("tensor_parallel", 1)) > 1:  # shards of every weight: merged by DeepSpeed
        tied = bool((meta.get("model_args") or {}).get("tie_embeddings"))
        sd = parallel.tensor_parallel_state_dict(ckpt, ds_dir, ckpt / UNIVERSAL_TAG, tied)
    elif (meta.get("zero_stage") or 0) > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with weights_only_loads(ckpt):
            sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=DS_TAG)
    else:
        files = sorted(ds_dir.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise CheckpointError(f"{ds_dir}: no mp_rank_*_model_states.pt")
        state = torch.load(files[0], map_location="cpu", weights_only=True)
        sd = {k: v.float() for k, v in state["module"].items()}
    return {k: v.detach().float().contiguous() for k, v in sd.items()}


def consolidate(ckpt: Path, out: Path, dtype: str = "fp32") -> Path:
    meta = read_meta(ckpt)
    sd = full_state_dict(ckpt)
    cast = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    seen: dict[int, str] = {}
    tensors = {}
    for k, v in sd.items():  # tied weights share storage; safetensors needs separate tensors
        v = v.to(cast)
        tensors[k] = v.clone() if v.data_ptr() in seen else v
        seen[v.data_ptr()] = k
    with atomic_folder(out) as tmp:
        write_safetensors(
            tensors,
            tmp / "model.safetensors",
            metadata={"format": "pt", "megapt_step": str(meta.get("step")), "dtype": dtype},
        )
        (tmp / "model_config.json").write_text(
            json.dumps(meta.get("model_args"), indent=1), encoding="utf-8"
        )
        for name in ("tokenizer.model", "config.yaml"):
            if (ckpt / name).is_file():
                shutil.copy2(ckpt / name, tmp / name)
    return Path(out)


def to_universal(ckpt: Path) -> Path:
    """Add ds_universal/ to a ZeRO 1-3 ``ckpt`` (DeepSpeed's ds_to_universal), rewrite the manifest.
    Nothing is written outside ``ckpt/ds_universal`` but the manifest: ds_to_universal also writes a
    ``latest_universal`` file beside its output folder, so it writes into a scratch folder that is
    removed afterwards. A ZeRO-0 checkpoint is returned as is (``is_universal``)."""
    if is_universal(ckpt):
        return ckpt
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    final = ckpt / UNIVERSAL_TAG
    scratch = ckpt / (UNIVERSAL_TAG + ".tmp")
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir()
    out = scratch / UNIVERSAL_TAG
    try:
        with weights_only_loads(ckpt):
            ds_to_universal(
                argparse.Namespace(
                    input_folder=str(ckpt / DS_TAG),
                    output_folder=str(out),
                    num_extract_workers=1,
                    num_merge_workers=1,
                    keep_temp_folder=False,
                    strict=True,
                    inject_missing_state=False,
                )
            )
        if final.exists():
            shutil.rmtree(final)
        os.replace(out, final)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    write_manifest(ckpt)  # the new files are covered by the (atomically rewritten) manifest
    return final


def is_universal(ckpt: Path) -> bool:
    """A ZeRO-0 checkpoint holds the whole model and optimizer state in one file: it loads at any
    world size and ZeRO stage (--checkpoint.universal=true) without conversion."""
    return not read_meta(ckpt).get("zero_stage")


def add_args(parser: argparse.ArgumentParser, verb: tuple = ()) -> None:
    parser.add_argument(
        "checkpoint", help="checkpoint folder (step_XXXXXXX) or checkpoint root (newest valid)"
    )
    if verb == ("ckpt", "consolidate"):
        parser.add_argument(
            "--out", default="", help="output folder (default <run_dir>/consolidated/step_XXXXXXX)"
        )
        parser.add_argument(
            "--dtype", choices=["fp32", "bf16"], default="fp32", help="weight dtype to write"
        )


def cli_main(cfg: Any, args: argparse.Namespace) -> int:
    """Exit codes: 0 ok, 4 missing/invalid checkpoint."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        ckpt = resolve(args.checkpoint)
        if tuple(args.verb) == ("ckpt", "universal"):
            resume = (
                f"megapt train ... --resume --checkpoint.universal=true --checkpoint.load={ckpt}"
            )
            if is_universal(ckpt):
                print(
                    f"nothing to convert: {ckpt} is a ZeRO-0 checkpoint (the whole model and "
                    "optimizer state in one file); it loads at any world size and ZeRO stage 0-3 "
                    f"with: {resume}"
                )
                return 0
            out = to_universal(ckpt)
            print(
                f"universal checkpoint written: {out}\nresume at any world size and ZeRO stage "
                f"0-3 with: {resume}"
            )
            return 0
        out = Path(args.out) if args.out else ckpt.parent.parent / "consolidated" / ckpt.name
        consolidate(ckpt, out, args.dtype)
        print(
            f"consolidated weights: {out / 'model.safetensors'} ({args.dtype}), model config: "
            f"{out / 'model_config.json'}"
        )
        return 0
    except CheckpointError as exc:
        print(f"megapt ckpt: {exc}", file=sys.stderr)
        return 4
