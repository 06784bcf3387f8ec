"""Task models and their losses and metrics, shared by fine-tuning (``megapt finetune``) and
evaluation (``megapt eval``): a backbone with a pooled head for classify/regress, the backbone
itself for lm/sft.

    model = build_task_model(src, "classify", num_classes=3, pooling="last", dropout=0.1)
    loss = task_loss(model, batch, "classify")
    metrics = evaluate_task(model, examples, "classify", classes, batch_size, pad_id, device)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from megapt.config import ConfigError
from megapt.model.heads import GPTForSequenceClassification
from megapt.tasks import data as D
from megapt.tasks.metrics import classification_metrics, regression_metrics
from megapt.weights.hf import load_weights
from megapt.weights.source import Source


def build_task_model(src: Source, task: str, num_classes: int, pooling: str, dropout: float):
    """classify/regress: backbone + pooled head (head weights from ``src.extra`` when present);
    lm/sft: the backbone itself."""
    if task in ("lm", "sft"):
        return src.model
    regression = task == "regress"
    model = GPTForSequenceClassification(
        src.model, src.args.d_model, 1 if regression else num_classes, pooling, dropout, regression
    )
    if src.extra:
        head_state = {k[len("head.") :]: v.float() for k, v in src.extra.items()}
        load_weights(model.head, head_state, f"{src.path} (head)")
    return model


def check_tokenizer(tok, task: str, where: str) -> None:
    missing = []
    for name in ("pad_id", "eos_id"):
        v = getattr(tok, name, None)
        if v is None or v < 0:
            missing.append(name.replace("_id", ""))
    if missing:
        raise ConfigError(
            f"{where}: tokenizer has no {' / '.join(missing)} token, needed for {task} "
            "(batches are padded; SFT responses end with EOS); retrain it with "
            "tokenizer.pad_token / tokenizer.eos_token in tokenizer.special_tokens"
        )


# --------------------------------------------------------------------------------------------
# loss / evaluation
# --------------------------------------------------------------------------------------------


def distill_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None,
    temperature: float,
) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), averaged over masked positions.

    logits (..., V); mask (...) bool of the positions that count (None = all)."""
    t = temperature
    s_logp = F.log_softmax(student_logits.float() / t, dim=-1)
    t_logp = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)  # (...)
    if mask is not None:
        kl = kl[mask]
    return kl.mean() * t * t


def task_loss(
    model, batch: dict, task: str, teacher=None, alpha: float = 0.0, temperature: float = 1.0
):
    """Training loss for one batch (with optional distillation toward ``teacher``)."""
    if task in ("lm", "sft"):
        if teacher is None:
            return model(batch["input_ids"], labels=batch["labels"]).loss
        logits = model(batch["input_ids"]).logits  # (B, T, V): needed for the KL term
        labels = batch["labels"]
        ce = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        with torch.no_grad():
            t_logits = teacher(batch["input_ids"]).logits
        kl = distill_kl(logits, t_logits, labels != -100, temperature)
        return (1 - alpha) * ce + alpha * kl
    out = model(batch["input_ids"], batch["attention_mask"], batch["labels"])
    if teacher is None:
        return out.loss
    with torch.no_grad():
        t_logits = teacher(batch["input_ids"], batch["attention_mask"]).logits
    if task == "regress":
        return (1 - alpha) * out.loss + alpha * F.mse_loss(out.logits.float(), t_logits.float())
    return (1 - alpha) * out.loss + alpha * distill_kl(out.logits, t_logits, None, temperature)


@torch.no_grad()
def predict(model, examples, task: str, batch_size: int, pad_id: int, device) -> tuple[list, list]:
    """(true labels, predictions) for classify/regress."""
    model.eval()
    y_true, y_pred = [], []
    for batch in D.batches(examples, batch_size, pad_id, False, 0, task == "regress"):
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(batch["input_ids"], batch["attention_mask"]).logits
        if task == "regress":
            y_pred += logits.squeeze(-1).float().tolist()
        else:
            y_pred += logits.argmax(-1).tolist()
        y_true += batch["labels"].tolist()
    return y_true, y_pred


@torch.no_grad()
def lm_loss(model, examples, batch_size: int, pad_id: int, device) -> dict:
    """Token-weighted mean loss over labelled positions and its perplexity."""
    model.eval()
    total, count = 0.0, 0
    for batch in D.batches(examples, batch_size, pad_id, False, 0):
        batch = {k: v.to(device) for k, v in batch.items()}
        n = int((batch["labels"] != -100).sum())
        total += float(model(batch["input_ids"], labels=batch["labels"]).loss) * n
        count += n
    loss = total / max(count, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": count}


def evaluate_task(
    model, examples, task: str, classes, batch_size: int, pad_id: int, device
) -> dict:
    """Metrics dict with a ``score`` (higher is better) used for model selection."""
    if task == "classify":
        y, p = predict(model, examples, task, batch_size, pad_id, device)
        m = classification_metrics(y, p, classes)
        m["score"] = m["accuracy"]
    elif task == "regress":
        y, p = predict(model, examples, task, batch_size, pad_id, device)
        m = regression_metrics(y, p)
        m["score"] = -m["mse"]
    else:
        m = lm_loss(model, examples, batch_size, pad_id, device)
        m["score"] = -m["loss"]
    return m
