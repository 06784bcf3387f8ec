"""`megapt export`: write a model (any source ``megapt.weights.source`` reads) as a Hugging Face
Llama folder or as megapt weights.

    megapt export --format hf --from runs/tiny/checkpoints --out hf_tiny/     # ours -> HF
    megapt export --format megapt --from hf_tiny/ --out tiny.safetensors     # HF -> ours

The formats themselves live in ``megapt.weights`` (``hf``: the HF folder; ``source``: megapt
weights folders and files).
"""

from __future__ import annotations

import torch

from megapt.errors import UsageError
from megapt.weights.hf import export_hf
from megapt.weights.source import load_source, save_megapt

# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def add_args(p) -> None:
    p.add_argument(
        "--format",
        choices=["hf", "megapt"],
        default="hf",
        help="hf: write a Hugging Face folder; megapt: write our weights folder "
        "(model.safetensors, model_config.json, tokenizer.model) or, with --out "
        "NAME.safetensors, that one file (model config in its metadata, no "
        "tokenizer)",
    )
    p.add_argument(
        "--from",
        dest="source",
        default="",
        help="megapt checkpoint dir or HF folder (default: finetune.init_from, else the newest checkpoint)",
    )
    p.add_argument(
        "--out",
        required=True,
        help="output folder (hf, megapt) or NAME.safetensors file (megapt); nothing is "
        "written outside it but its .tmp while writing",
    )
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")


def cli_main(cfg, args) -> int:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    if args.format == "hf" and args.out.endswith(".safetensors"):
        raise UsageError(
            f"--out {args.out}: --format hf writes a folder (config.json, "
            f"model.safetensors, tokenizer); give a folder name, or --format megapt "
            f"for one .safetensors file"
        )
    src = load_source(cfg, args.source)
    if args.format == "hf":
        out = export_hf(
            src.model,
            src.args,
            args.out,
            src.tokenizer_path,
            cfg.tokenizer.eos_token,
            cfg.tokenizer.pad_token,
            dtype,
        )
        print(
            f"export: wrote Hugging Face LlamaForCausalLM folder {out} "
            f"({src.args.num_params() / 1e6:.2f}M params, {args.dtype}) from {src.path}"
        )
    else:
        out = save_megapt(src, args.out, dtype)
        what = "weights"
        if out.is_file():
            what = "weights file (model config in its metadata; no tokenizer)"
        print(f"export: wrote megapt {what} {out} from {src.path}")
    return 0
