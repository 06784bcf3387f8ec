"""`megapt finetune`: classification, regression, SFT and LM fine-tuning of a pretrained model.

    megapt finetune -c configs/tiny.yaml --finetune.task=classify \\
        --finetune.init_from=runs/tiny/checkpoints --finetune.train_file=train.jsonl \\
        --finetune.val_file=val.jsonl --finetune.test_file=test.jsonl \\
        --finetune.train_top_layers=2 --finetune.layer_lr_decay=0.8 --finetune.head_lr_mult=10

What trains: ``freeze_embeddings``, ``freeze_layers`` (first k blocks), ``freeze_pattern``
(regex on parameter names), ``train_head_only``, ``train_top_layers`` or LoRA adapters
(``lora_rank > 0``). Only trainable parameters reach the optimizer, in param groups with
layer-wise LR decay and a head LR multiplier. Validation runs every ``eval_every`` steps (or
once per epoch); the best validation metric (accuracy, -MSE or -loss) is kept, training stops
after ``early_stopping_patience`` evaluations without improvement, and the best weights are
written to ``finetune.out_dir`` (a megapt weights folder that ``eval``, ``generate`` and
``export`` read).

Optimisation runs through the same DeepSpeed engine as ``megapt train`` (``create_engine``):
ZeRO stage, precision, gradient accumulation and clipping come from ``train.*`` / ``deepspeed.*``;
only trainable parameters get optimizer state (and ZeRO partitions). ``finetune.batch_size`` rows
per optimizer step are split over ranks x ``train.grad_accum`` micro-batches. Runs under plain
``python`` (one process) or any launcher ``megapt train`` supports (torchrun, deepspeed, srun);
every rank evaluates, rank 0 writes.

``init_from=scratch`` builds a freshly initialised model of ``model.preset`` (baselines).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megapt.config import ConfigError
from megapt.data.tokenizer import Tokenizer
from megapt.errors import NonFiniteLossError
from megapt.finetune.freeze import apply_freezing
from megapt.model.gpt import GPT, ModelArgs
from megapt.model.lora import apply_lora, lora_state_dict, merge_lora
from megapt.model.ops import select_backends
from megapt.tasks import data as D
from megapt.tasks.metrics import majority_baseline
from megapt.tasks.model import build_task_model, check_tokenizer, evaluate_task, task_loss
from megapt.train import dist
from megapt.train.engine import create_engine, engine_stage, gathered
from megapt.train.optim import LRSchedule, param_groups
from megapt.train.process import start_process
from megapt.weights.source import Source, load_source, save_weights

log = logging.getLogger("megapt.finetune")


def _say(msg: str) -> None:
    print(f"finetune: {msg}", flush=True)


# --------------------------------------------------------------------------------------------
# model assembly
# --------------------------------------------------------------------------------------------


def scratch_source(cfg) -> Source:
    """A randomly initialised model of ``cfg.model`` (for from-scratch baselines)."""
    tok = Tokenizer.load(cfg.tokenizer_path)
    max_len = cfg.finetune.max_len or cfg.data.seq_len
    args = ModelArgs.from_config(
        cfg.model, vocab_size=tok.vocab_size, seq_len=max(max_len + 1, cfg.data.seq_len)
    )
    model = GPT(args, select_backends(cfg.model, "cpu"), seed=cfg.run.seed)
    return Source(model, args, cfg.tokenizer_path, "scratch", "scratch")


def get_source(cfg, path: str) -> Source:
    return scratch_source(cfg) if path == "scratch" else load_source(cfg, path)


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


def load_examples(cfg, tok, max_len: int, classes: list[str] | None = None):
    """(train, val, test examples, classes). Classes come from the training labels unless given."""
    ft = cfg.finetune
    task = ft.task
    fields = {
        "classify": [ft.text_field, ft.label_field],
        "regress": [ft.text_field, ft.label_field],
        "sft": [ft.prompt_field, ft.response_field],
        "lm": [ft.text_field],
    }[task]
    if not ft.train_file:
        raise ConfigError("finetune.train_file: required")
    train_rows = D.read_rows(ft.train_file, fields)
    if ft.val_file:
        val_rows = D.read_rows(ft.val_file, fields)
    else:
        train_rows, val_rows = D.split_rows(train_rows, ft.val_fraction, cfg.run.seed)
    test_rows = D.read_rows(ft.test_file, fields) if ft.test_file else []
    if task == "classify":
        if classes is None:
            classes = D.infer_classes(train_rows, ft.label_field)
        if ft.num_classes and ft.num_classes != len(classes):
            raise ConfigError(
                f"finetune.num_classes={ft.num_classes} but {ft.train_file} has "
                f"{len(classes)} distinct labels {classes[:20]}"
            )
        if len(classes) < 2:
            raise D.DataError(
                f"{ft.train_file}: classification needs >= 2 distinct labels, found {classes}"
            )

        def build(rows):
            return D.build_classification(
                rows, tok, max_len, ft.text_field, ft.label_field, classes
            )
    elif task == "regress":

        def build(rows):
            return D.build_regression(rows, tok, max_len, ft.text_field, ft.label_field)
    elif task == "sft":

        def build(rows):
            return D.build_sft(rows, tok, max_len, ft.prompt_field, ft.response_field)
    else:

        def build(rows):
            return D.build_lm(rows, tok, max_len, ft.text_field)

    return build(train_rows), build(val_rows), (build(test_rows) if test_rows else []), classes


# --------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------


def _all_sum(values: list[float]) -> list[float]:
    """Element-wise sum over data-parallel ranks (float64; no-op in a single process)."""
    import torch.distributed as tdist

    t = torch.tensor(values, dtype=torch.float64)
    if tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.all_reduce(t)
    return t.tolist()


def micro_batches(batch: dict, rank: int, world: int, grad_accum: int) -> list[tuple[dict, float]]:
    """This rank's ``grad_accum`` micro-batches of one optimizer batch, each with a loss weight.

    Micro-batch k of rank r holds rows ``idx::world*grad_accum`` (idx = k*world + r). Its weight
    n_k * world * grad_accum / B makes the engine's gradient (mean over ranks of the sum of the
    micro-step losses / grad_accum) equal to the mean row loss over the whole batch, for any split
    of B rows. A rank left without rows runs one row at weight 0 (every rank must step together)."""
    n = world * grad_accum
    rows = len(next(iter(batch.values())))
    out = []
    for k in range(grad_accum):
        idx = k * world + rank
        if n == 1:
            out.append((batch, 1.0))
            continue
        part = {key: v[idx::n] for key, v in batch.items()}
        n_k = len(part["input_ids"])
        if n_k == 0:
            out.append(({key: v[:1] for key, v in batch.items()}, 0.0))
        else:
            out.append((part, n_k * n / rows))
    return out


@dataclass
class Setup:
    """What ``setup`` builds for ``fit`` and ``save``: the data, the task model and its engine."""

    cfg: Any
    task: str
    rank: int
    world: int
    src: Source
    tok: Any  # megapt.data.tokenizer.Tokenizer
    max_len: int
    classes: list[str] | None
    train_ex: list
    val_ex: list
    test_ex: list
    model: torch.nn.Module  # the task model (backbone + head) the engine wraps
    counts: dict[str, int]  # trainable / frozen elements
    lora_names: list[str]
    total: int  # optimizer steps
    eval_every: int
    engine: Any  # deepspeed.DeepSpeedEngine
    teacher: torch.nn.Module | None
    tb: Any = None  # TensorBoard SummaryWriter on rank 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def say(self, msg: str) -> None:
        if self.main:
            _say(msg)


def setup(cfg, *, tb=None, source: Source | None = None) -> Setup:
    """Process, source model, data, task model, freezing, optimizer groups, DeepSpeed engine and
    (with ``finetune.distill_from``) the teacher."""
    ft = cfg.finetune
    task = ft.task
    if cfg.train.sequence_parallel > 1 or cfg.train.tensor_parallel > 1:
        raise ConfigError(
            "finetune: train.sequence_parallel / train.tensor_parallel apply to "
            "`megapt train` only (fine-tuning runs data-parallel); set them to 1"
        )
    if task == "none":
        raise ConfigError("finetune.task: choose classify, regress, sft or lm")
    # every rank gets run.seed: new heads and LoRA adapters start identical everywhere; progress
    # is reported by `say`, the log shows warnings only
    proc = start_process(cfg, same_seed=True, log_level=logging.WARNING)
    rank, world = proc.rank, proc.world_size

    def say(msg: str) -> None:
        if rank == 0:
            _say(msg)

    src = source if source is not None else get_source(cfg, ft.init_from or "")
    tok = src.tokenizer()
    check_tokenizer(tok, task, str(src.tokenizer_path))
    if tok.vocab_size > src.args.vocab_size:
        raise ConfigError(
            f"tokenizer {src.tokenizer_path} has {tok.vocab_size} tokens but the model "
            f"{src.path} embeds only {src.args.vocab_size}: wrong tokenizer for this model"
        )
    max_len = min(ft.max_len or cfg.data.seq_len, src.args.max_seq_len - 1)
    classes = (
        src.meta.get("classes")
        if task == "classify" and src.meta.get("task") == "classify"
        else None
    )
    train_ex, val_ex, test_ex, classes = load_examples(cfg, tok, max_len, classes)
    model = build_task_model(src, task, len(classes or []), ft.pooling, ft.head_dropout)
    n_layers = src.args.n_layers
    if task in ("classify", "regress") and not src.args.tie_embeddings:
        src.model.output.weight.requires_grad_(False)  # the LM head is unused by a pooled head

    lora_names: list[str] = []
    if ft.lora_rank > 0:
        try:
            lora_names = apply_lora(
                src.model, ft.lora_rank, ft.lora_alpha, ft.lora_targets, ft.lora_dropout
            )
        except ValueError as exc:  # targets that name no Linear layer
            raise ConfigError(f"finetune.lora_targets: {exc}") from None
        if task in ("classify", "regress"):
            for p in model.head.parameters():
                p.requires_grad_(True)
    counts = apply_freezing(
        model,
        n_layers,
        freeze_embeddings=ft.freeze_embeddings,
        freeze_layers=ft.freeze_layers,
        freeze_pattern=ft.freeze_pattern,
        train_head_only=ft.train_head_only,
        train_top_layers=ft.train_top_layers,
    )
    groups = param_groups(
        model,
        ft.weight_decay,
        lr=ft.lr,
        n_layers=n_layers,
        layer_lr_decay=ft.layer_lr_decay,
        head_lr_mult=ft.head_lr_mult,
    )

    steps_per_epoch = math.ceil(len(train_ex) / ft.batch_size)
    total = ft.max_steps or steps_per_epoch * ft.epochs
    warmup = int(total * ft.warmup_frac)
    eval_every = ft.eval_every or steps_per_epoch

    # ---- the DeepSpeed engine, as `megapt train` builds it: ZeRO stage, precision, grad accumulation
    # and clipping from cfg.train / cfg.deepspeed. finetune.batch_size rows per optimizer step are
    # split over world_size x grad_accum micro-batches.
    ga = cfg.train.grad_accum
    ecfg = copy.deepcopy(cfg)
    ecfg.train.micro_batch = max(1, math.ceil(ft.batch_size / (world * ga)))
    if cfg.train.activation_checkpointing:  # the switch lives on the backbone (also under a head)
        src.model.gradient_checkpointing = True
        ecfg.train.activation_checkpointing = False
    stage = engine_stage(cfg.train.precision, cfg.deepspeed.zero_stage)[0]
    if stage == 3:
        say("ZeRO stage 3: evaluation and best-weight snapshots gather parameters on every rank")
    # warmup then linear decay to 0 at `total`, scaling each group's own peak LR
    schedule = LRSchedule(ft.lr, 0.0, warmup, total, "linear")
    bundle = create_engine(
        ecfg,
        model,
        world_size=world,
        param_groups=[{k: v for k, v in g.items() if k != "names"} for g in groups],
        schedule=schedule,
    )
    engine = bundle.engine
    dev = engine.device

    teacher = None
    if ft.distill_from:
        tsrc = get_source(cfg, ft.distill_from)
        if tsrc.args.vocab_size != src.args.vocab_size and task in ("lm", "sft"):
            raise ConfigError(
                f"finetune.distill_from: teacher vocab {tsrc.args.vocab_size} != student "
                f"vocab {src.args.vocab_size}; KL needs the same tokenizer"
            )
        t_classes = len(tsrc.meta.get("classes", [])) if tsrc.meta else 0
        if task in ("classify", "regress") and not tsrc.extra:
            raise ConfigError(
                f"finetune.distill_from={ft.distill_from}: a {task} teacher must be a "
                "fine-tuned folder with a head (written by megapt finetune)"
            )
        teacher = (
            build_task_model(
                tsrc,
                task,
                t_classes or len(classes or []),
                tsrc.meta.get("pooling", ft.pooling),
                0.0,
            )
            .to(dev)
            .eval()
        )
        low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision)
        if low is not None:
            teacher.to(low)  # the engine feeds it the same dtype as the student
        for p in teacher.parameters():
            p.requires_grad_(False)

    say(
        f"task={task} source={src.path} ({src.kind}) rows train/val/test={len(train_ex)}/{len(val_ex)}/"
        f"{len(test_ex)} trainable={counts['trainable']:,} frozen={counts['frozen']:,} params "
        f"in {len(groups)} groups; lora={len(lora_names)} layers; steps={total} device={dev} "
        f"engine=DeepSpeed ZeRO-{stage} {cfg.train.precision} world_size={world} grad_accum={ga}"
    )
    return Setup(
        cfg,
        task,
        rank,
        world,
        src,
        tok,
        max_len,
        classes,
        train_ex,
        val_ex,
        test_ex,
        model,
        counts,
        lora_names,
        total,
        eval_every,
        engine,
        teacher,
        tb,
    )


def fit(s: Setup) -> dict:
    """The training loop with evaluation every ``eval_every`` steps and early stopping; the best
    validation weights end up in the engine's module, and the test split is evaluated with them.
    Returns the results (``best_step``, ``steps``, ``val``, ``history``, ``test``...)."""
    cfg, ft, task, engine = s.cfg, s.cfg.finetune, s.task, s.engine
    module, dev, ga = engine.module, engine.device, cfg.train.grad_accum
    trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]

    def evaluate(examples) -> dict:
        # every rank runs the same evaluation (ZeRO-3 forwards need all ranks); rank 0's metrics
        # decide, so early stopping and best-step selection agree everywhere
        m = evaluate_task(module, examples, task, s.classes, ft.batch_size, s.tok.pad_id, dev)
        engine.train()
        return dist.broadcast_object(m)

    best = {"score": -math.inf, "step": 0, "metrics": None}
    best_state: dict[str, torch.Tensor] = {}
    bad_evals, step, t0 = 0, 0, time.time()
    history = []
    stop = False
    epoch = 0
    while not stop:
        engine.train()
        for batch in D.batches(
            s.train_ex, ft.batch_size, s.tok.pad_id, True, cfg.run.seed + epoch, task == "regress"
        ):
            rows = len(batch["input_ids"])
            loss_sum = 0.0
            for part, weight in micro_batches(batch, s.rank, s.world, ga):
                part = {k: v.to(dev) for k, v in part.items()}
                loss = task_loss(
                    engine, part, task, s.teacher, ft.distill_alpha, ft.distill_temperature
                )
                n_k = len(part["input_ids"]) if weight else 0
                lv = float(loss.detach())
                local, bad = _all_sum([lv * n_k, 0.0 if math.isfinite(lv) else 1.0])
                if bad:
                    raise NonFiniteLossError(
                        f"the loss is not finite at step {step + 1} (on {int(bad)} rank(s)); "
                        f"nothing was saved. Lower finetune.lr (now {ft.lr:g}), check the data "
                        f"and the source weights, then run again"
                    )
                loss_sum += local
                engine.backward(loss if weight == 1.0 else loss * weight)
                engine.step()
            step += 1
            train_loss = loss_sum / rows  # mean row loss of the batch over all ranks
            if s.tb is not None and s.main:
                s.tb.add_scalar("finetune/train_loss", train_loss, step)
            if step % s.eval_every == 0 or step == s.total:
                m = evaluate(s.val_ex)
                history.append({"step": step, "train_loss": train_loss, "val_score": m["score"]})
                improved = m["score"] > best["score"]
                if improved:
                    best = {"score": m["score"], "step": step, "metrics": m}
                    with gathered([p for _, p in trainable]):
                        best_state = {n: p.detach().clone() for n, p in trainable}
                    bad_evals = 0
                else:
                    bad_evals += 1
                if s.tb is not None and s.main:
                    s.tb.add_scalar("finetune/val_score", m["score"], step)
                s.say(
                    f"step {step}/{s.total} train_loss {train_loss:.4f} val_score {m['score']:.4f}"
                    f"{' (best)' if improved else ''} {time.time() - t0:.0f}s"
                )
                if ft.early_stopping_patience and bad_evals >= ft.early_stopping_patience:
                    s.say(
                        f"early stop: {bad_evals} evaluations without improvement; best at step {best['step']}"
                    )
                    stop = True
            if step >= s.total or stop:
                stop = True
                break
        epoch += 1

    # best-checkpoint selection: restore the best validation weights into the engine's module
    params = dict(module.named_parameters())
    with gathered([params[n] for n in best_state], modifier_rank=0), torch.no_grad():
        for n, v in best_state.items():
            params[n].copy_(v)
    results = {
        "task": task,
        "init_from": s.src.path,
        "best_step": best["step"],
        "steps": step,
        "val": best["metrics"],
        "trainable_params": s.counts["trainable"],
        "history": history,
    }
    if s.test_ex:
        results["test"] = evaluate(s.test_ex)
        if task == "classify":
            results["majority_baseline"] = majority_baseline(
                [e.label for e in s.train_ex], [e.label for e in s.test_ex]
            )
        s.say(
            f"test: {json.dumps({k: v for k, v in results['test'].items() if not isinstance(v, (dict, list))})}"
        )
    return results


def best_score(results: dict) -> float:
    """The best validation score of ``fit``'s results (-inf when nothing was evaluated)."""
    return results["val"]["score"] if results["val"] else -math.inf


def save(s: Setup, results: dict) -> Path:
    """Write the fine-tuned weights (fp32; LoRA merged or kept as tensors, the head as ``head.*``),
    ``finetune.json`` and ``results.json`` to ``finetune.out_dir`` (rank 0 writes; at ZeRO-3 every
    rank gathers). Returns the folder."""
    ft, task, module = s.cfg.finetune, s.task, s.engine.module
    out_dir = Path(ft.out_dir) if ft.out_dir else s.cfg.run_dir / "finetune"
    meta = {
        "task": task,
        "classes": s.classes,
        "pooling": ft.pooling,
        "init_from": s.src.path,
        "best_step": results["best_step"],
        "val_score": best_score(results),
        "max_len": s.max_len,
    }
    if s.lora_names and not ft.merge_lora:  # readers fold the adapters in with these
        meta["lora"] = {"rank": ft.lora_rank, "alpha": ft.lora_alpha, "targets": ft.lora_targets}
    with gathered(list(module.parameters())):  # ZeRO-3: full weights while saving (rank 0 writes)
        if s.lora_names and ft.merge_lora:
            merge_lora(s.src.model)
        extra = {}
        if task in ("classify", "regress"):
            extra = {f"head.{k}": v for k, v in s.model.head.state_dict().items()}
        if s.lora_names and not ft.merge_lora:
            extra.update(lora_state_dict(s.src.model))
        if s.main:  # fp32 on disk whatever the training precision
            save_weights(out_dir, s.src.model, s.src.args, s.src.tokenizer_path, meta, extra)
            (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    dist.barrier()
    return out_dir


def finetune(cfg, *, tb=None, source: Source | None = None, keep_engine: bool = False) -> dict:
    """Run fine-tuning as configured (``setup``, ``fit``, ``save``); returns the results dict (also
    written as results.json).

    ``source``: start from this already-loaded model instead of ``finetune.init_from``.
    ``keep_engine``: also return the DeepSpeed engine as ``results["engine"]`` (tests, notebooks)."""
    s = setup(cfg, tb=tb, source=source)
    results = fit(s)
    out_dir = save(s, results)
    results["out_dir"] = str(out_dir)
    s.say(f"best step {results['best_step']} val_score {best_score(results):.4f}; wrote {out_dir}")
    if keep_engine:
        results["engine"] = s.engine
    return results
