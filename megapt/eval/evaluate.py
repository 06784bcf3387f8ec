"""`megapt eval`: perplexity on held-out shards or text files; accuracy/F1/confusion matrix for
a fine-tuned classifier. Writes JSON and TensorBoard scalars.

    megapt eval -c configs/tiny.yaml --from runs/tiny/checkpoints                 # val shards
    megapt eval --from runs/tiny/checkpoints --text notes.txt --int8             # + int8 cost
    megapt eval --from runs/tiny/finetune --data test.jsonl                      # classifier

Text files are tokenized, joined with EOS and cut into non-overlapping windows of ``seq_len``
tokens (+1 for the shifted labels), exactly like the training shards.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from megapt.config import ConfigError
from megapt.data.loader import build_loader
from megapt.quantize import quantize_int8, weight_bytes
from megapt.tasks import data as D
from megapt.tasks.metrics import classification_metrics, regression_metrics
from megapt.tasks.model import build_task_model, predict
from megapt.urls import location
from megapt.weights.source import load_source


@torch.no_grad()
def perplexity(model, batches: Iterable[dict], max_batches: int = 0, device="cpu") -> dict:
    """Token-weighted mean next-token loss over ``batches`` of dict(input_ids, labels)."""
    model.eval()
    total, count, n = 0.0, 0, 0
    for batch in batches:
        ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
        k = int((labels != -100).sum())
        if k == 0:
            continue
        total += float(model(ids, labels=labels).loss) * k
        count += k
        n += 1
        if max_batches and n >= max_batches:
            break
    if count == 0:
        raise ValueError("perplexity: no tokens to evaluate")
    loss = total / count
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": count, "batches": n}


def text_windows(tok, paths: list[str], seq_len: int, batch_size: int) -> list[dict]:
    """Batches of consecutive (seq_len + 1)-token windows over the EOS-joined documents."""
    stream: list[int] = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise ConfigError(f"{p}: text file not found")
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise ConfigError(f"{p}: empty text file")
        stream += tok.encode(text) + [tok.eos_id]
    n = len(stream) // (seq_len + 1)
    if n == 0:
        raise ConfigError(
            f"{paths}: {len(stream)} tokens, fewer than one window of seq_len+1={seq_len + 1}"
        )
    rows = torch.tensor(stream[: n * (seq_len + 1)]).view(n, seq_len + 1)
    return [
        {"input_ids": rows[i : i + batch_size, :-1], "labels": rows[i : i + batch_size, 1:]}
        for i in range(0, n, batch_size)
    ]


def shard_batches(cfg, shard_dir: Path, split: str, batch_size: int, tokenizer_sha256: str | None):
    return build_loader(
        cfg.data,
        shard_dir,
        split,
        rank=0,
        world_size=1,
        micro_batch=batch_size,
        seed=cfg.run.seed,
        infinite=False,
        tokenizer_sha256=tokenizer_sha256,
    )


def evaluate_lm(
    cfg,
    model,
    tok,
    *,
    texts: list[str],
    shard_dir: str,
    split: str,
    batch_size: int,
    max_batches: int,
    int8: bool,
    seq_len: int,
) -> dict:
    def batches():
        if texts:
            return text_windows(tok, texts, seq_len, batch_size)
        sd = location(shard_dir) if shard_dir else cfg.shard_dir  # a folder or a URL
        return shard_batches(cfg, sd, split, batch_size, tok.sha256)

    where = ", ".join(texts) if texts else f"{shard_dir or cfg.shard_dir} [{split}]"
    t0 = time.time()
    res = {"data": where, "fp32": perplexity(model, batches(), max_batches)}
    res["fp32"]["seconds"] = round(time.time() - t0, 2)
    if int8:
        before = weight_bytes(model)
        names = quantize_int8(model)
        t0 = time.time()
        q = perplexity(model, batches(), max_batches)
        q["seconds"] = round(time.time() - t0, 2)
        q["quantized_linears"] = len(names)
        res["int8"] = q
        res["int8_cost"] = {
            "ppl_ratio": q["ppl"] / res["fp32"]["ppl"],
            "ppl_delta": q["ppl"] - res["fp32"]["ppl"],
            "loss_delta": q["loss"] - res["fp32"]["loss"],
            "weight_bytes_fp32": before,
            "weight_bytes_int8": weight_bytes(model),
        }
    return res


def evaluate_classifier(cfg, src, tok, data_file: str, batch_size: int) -> dict:
    meta = src.meta
    task = meta.get("task")
    if task not in ("classify", "regress"):
        raise ConfigError(
            f"{src.path}: not a fine-tuned classifier/regressor (finetune.json task={task!r})"
        )
    ft = cfg.finetune
    rows = D.read_rows(data_file, [ft.text_field, ft.label_field])
    max_len = meta.get("max_len") or cfg.data.seq_len
    classes = meta.get("classes") or []
    model = build_task_model(src, task, len(classes), meta.get("pooling", "last"), 0.0)
    if task == "classify":
        ex = D.build_classification(rows, tok, max_len, ft.text_field, ft.label_field, classes)
        y, p = predict(model, ex, task, batch_size, tok.pad_id, "cpu")
        return {"data": data_file, **classification_metrics(y, p, classes)}
    ex = D.build_regression(rows, tok, max_len, ft.text_field, ft.label_field)
    y, p = predict(model, ex, task, batch_size, tok.pad_id, "cpu")
    return {"data": data_file, **regression_metrics(y, p)}


def _scalars(prefix: str, d: dict):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _scalars(f"{prefix}/{k}", v)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            yield f"{prefix}/{k}", float(v)


def add_args(p) -> None:
    p.add_argument(
        "--from",
        dest="source",
        default="",
        help="checkpoint dir, finetune output or HF folder (default: finetune.init_from, else newest checkpoint)",
    )
    p.add_argument(
        "--text", action="append", default=[], help="text file for perplexity (repeatable)"
    )
    p.add_argument(
        "--shards", default="", help="shard folder or URL (default: the config's shard_dir)"
    )
    p.add_argument("--split", default="val", choices=["val", "train"])
    p.add_argument(
        "--data", default="", help="jsonl/csv rows (text, label) to score a fine-tuned classifier"
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-batches", type=int, default=0, help="0 = all")
    p.add_argument(
        "--seq-len", type=int, default=0, help="window for --text (default data.seq_len)"
    )
    p.add_argument(
        "--int8",
        action="store_true",
        help="also evaluate the int8 weight-only model and report the cost",
    )
    p.add_argument("--out", default="", help="JSON path (default <run_dir>/eval.json)")


def cli_main(cfg, args) -> int:
    src = load_source(cfg, args.source)
    tok = src.tokenizer()
    result: dict = {"model": src.path, "kind": src.kind}
    if args.data or src.meta.get("task") in ("classify", "regress"):
        data_file = args.data or cfg.finetune.test_file
        if not data_file:
            raise ConfigError(
                f"{src.path} is a fine-tuned {src.meta.get('task')} model: pass --data ROWS.jsonl"
            )
        result["classification"] = evaluate_classifier(cfg, src, tok, data_file, args.batch_size)
        m = result["classification"]
        print(
            "eval: "
            + ", ".join(f"{k}={m[k]:.4f}" for k in ("accuracy", "macro_f1", "mse", "r2") if k in m)
            + f" on {m['n']} rows of {data_file}"
        )
    else:
        seq_len = min(args.seq_len or cfg.data.seq_len, src.args.max_seq_len)
        result["lm"] = evaluate_lm(
            cfg,
            src.model,
            tok,
            texts=args.text,
            shard_dir=args.shards,
            split=args.split,
            batch_size=args.batch_size,
            max_batches=args.max_batches,
            int8=args.int8,
            seq_len=seq_len,
        )
        lm = result["lm"]
        line = f"eval: loss {lm['fp32']['loss']:.4f} ppl {lm['fp32']['ppl']:.3f} over {lm['fp32']['tokens']} tokens"
        if "int8" in lm:
            c = lm["int8_cost"]
            line += (
                f"; int8 ppl {lm['int8']['ppl']:.3f} (x{c['ppl_ratio']:.4f}, "
                f"weights {c['weight_bytes_fp32'] / 2**20:.1f} -> {c['weight_bytes_int8'] / 2**20:.1f} MiB)"
            )
        print(line)
    out = Path(args.out) if args.out else cfg.run_dir / "eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    if cfg.logging.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(str(cfg.run_dir / "tb_eval")) as tb:
            for k, v in _scalars(
                "eval", {k: v for k, v in result.items() if k in ("lm", "classification")}
            ):
                if "confusion_matrix" not in k:
                    tb.add_scalar(k, v, 0)
    print(f"eval: wrote {out}")
    return 0
