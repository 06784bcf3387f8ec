"""DeepSpeed engine set-up: the ds_config, the optimizer (groups and LR schedule from
``megapt.train.optim``). The only module that imports deepspeed (besides train/checkpoint and
weights/consolidate, which only touch its checkpoint tools, and reshard, which loads universal
checkpoints into the engine's optimizer).

    ds_config = build_ds_config(cfg, world_size=2)        # the single place a ds_config is made
    bundle = create_engine(cfg, lambda: GPT(args, seed=cfg.run.seed), world_size=2)
    bundle.engine(input_ids, labels=labels).loss -> bundle.engine.backward(loss) -> bundle.engine.step()

Precision notes (measured with DeepSpeed 0.19.8):
  * fp32: any ZeRO stage. At stage 0 the optimizer is our ``GuardedAdamW``: it clips the global grad
    norm itself (so the pre-clip norm is reported, as ZeRO stages do), with DeepSpeed's norm and
    clip formula (``global_grad_norm``, ``clip_grads_``), and skips a step whose gradients are not
    finite (as ZeRO stages 1-3 do), so clipping and NaN handling are the same at every stage.
  * bf16: at ZeRO-0 DeepSpeed keeps bf16 gradients and no fp32 master weights, so small updates are
    rounded away and training drifts. We therefore run bf16 with fp32 master weights: ZeRO stage >= 1
    (bf16 + ``zero_stage: 0`` is upgraded to stage 1 with fp32 gradient accumulation, with a warning).
  * fp16: dynamic loss scaling (``loss_scale: 0``); overflowing steps are skipped by DeepSpeed.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from megapt.config import Config, ConfigError
from megapt.train import parallel
from megapt.train.optim import LRSchedule, ScheduledLR, adamw_impl, lr_schedule, param_groups

log = logging.getLogger("megapt.train")

STEPS_PER_PRINT = 10**9  # DeepSpeed's own progress print: off (we log ourselves)


# --------------------------------------------------------------------------------------------
# ds_config
# --------------------------------------------------------------------------------------------


def engine_stage(precision: str, zero_stage: int) -> tuple[int, bool]:
    """(the ZeRO stage DeepSpeed runs for ``deepspeed.zero_stage`` at ``train.precision``, whether
    it was raised). The one place of the rule "bf16 at ZeRO-0 runs as stage 1": DeepSpeed 0.19 keeps
    no fp32 master weights for bf16 at stage 0, so that runs as stage 1 with fp32 gradient
    accumulation (see the module docstring). The trainer, fine-tuning, the benchmark and the memory
    planner all ask this function."""
    if precision == "bf16" and zero_stage == 0:
        return 1, True
    return zero_stage, False


def build_ds_config(cfg: Config, world_size: int = 1) -> dict:
    """The DeepSpeed config for ``cfg`` at ``world_size`` data-parallel ranks (user JSON merged in).
    Under sequence/tensor parallelism that is the world size / (sp x tp) (``Layout.dp``)."""
    t, ds = cfg.train, cfg.deepspeed
    stage, raised = engine_stage(t.precision, ds.zero_stage)
    zero: dict[str, Any] = {"stage": stage}
    if stage >= 1:
        zero.update(
            reduce_bucket_size=ds.reduce_bucket_size,
            overlap_comm=ds.overlap_comm,
            contiguous_gradients=ds.contiguous_gradients,
        )
    if stage in (1, 2):
        zero.update(allgather_bucket_size=ds.allgather_bucket_size, reduce_scatter=True)
    if stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=ds.stage3_prefetch_bucket_size,
            stage3_param_persistence_threshold=ds.stage3_param_persistence_threshold,
            # no gathered 16-bit copy in each save (it would gather the whole model on rank 0);
            # `megapt ckpt consolidate` merges the fp32 partitions offline instead
            stage3_gather_16bit_weights_on_model_save=False,
        )
        if ds.zero_hpz_partition_size > 1:  # ZeRO++ hpZ: secondary partition within a node
            zero["zero_hpz_partition_size"] = ds.zero_hpz_partition_size
    if ds.offload_optimizer != "none":
        zero["offload_optimizer"] = {
            "device": ds.offload_optimizer,
            "pin_memory": ds.offload_optimizer == "cpu" and torch.cuda.is_available(),
        }
    if ds.offload_params != "none":
        zero["offload_param"] = {
            "device": ds.offload_params,
            "pin_memory": torch.cuda.is_available(),
        }

    conf: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch * t.grad_accum * world_size,
        # fp32 ZeRO-0 clips inside GuardedAdamW (reports the pre-clip norm, skips non-finite steps)
        "gradient_clipping": 0.0 if (stage == 0 and t.precision == "fp32") else t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16", "check_grad_overflow": True},
        "fp16": {
            "enabled": t.precision == "fp16",
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "wall_clock_breakdown": False,
        "steps_per_print": STEPS_PER_PRINT,
        "zero_allow_untested_optimizer": True,
        # no "checkpoint.load_universal": megapt loads universal checkpoints (train/reshard.py)
    }
    if raised:  # bf16 at ZeRO-0 run as stage 1: fp32 gradient accumulation
        conf["data_types"] = {"grad_accum_dtype": "fp32"}
    conf.update(parallel.ds_config_sections(cfg))  # tensor_parallel (AutoTP), when set
    if ds.config_file:
        conf = merge_user_ds_config(conf, load_user_ds_config(ds.config_file), ds.config_file, cfg)
    return conf


def load_user_ds_config(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"deepspeed.config_file: {p} not found")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"deepspeed.config_file: {p} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"deepspeed.config_file: {p}: top level must be a JSON object")
    return data


def _get(d: dict, dotted: str) -> Any:
    node: Any = d
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


_MISSING = object()

# ds_config key -> the megapt key that decides it (for the conflict message)
_CHECKED = {
    "train_micro_batch_size_per_gpu": "train.micro_batch",
    "gradient_accumulation_steps": "train.grad_accum",
    "train_batch_size": "train.micro_batch * train.grad_accum * world_size",
    "zero_optimization.stage": "deepspeed.zero_stage",
    "bf16.enabled": "train.precision",
    "fp16.enabled": "train.precision",
    "zero_optimization.offload_optimizer.device": "deepspeed.offload_optimizer",
    "zero_optimization.offload_param.device": "deepspeed.offload_params",
}


def merge_user_ds_config(ours: dict, user: dict, path: str, cfg: Config) -> dict:
    """Check a user's ds_config against ours; every conflict is listed in one error. Keys we do not
    decide (bucket sizes, comms options...) are taken from the user's file."""
    problems = []
    for key, source in _CHECKED.items():
        theirs = _get(user, key)
        if theirs is _MISSING or theirs == "auto":
            continue
        mine = _get(ours, key)
        if mine is _MISSING:
            mine = "none" if key.endswith(".device") else None
        if theirs != mine and not (key.endswith(".device") and theirs == "none" and mine == "none"):
            problems.append(
                f"{key}: file says {theirs!r}, megapt config gives {mine!r} (set by {source})"
            )
    if (
        "bf16" in user
        and isinstance(user["bf16"], dict)
        and user["bf16"].get("enabled") is True
        and _get(user, "fp16.enabled") is True
    ):
        problems.append("bf16.enabled and fp16.enabled are both true")
    clip = _get(user, "gradient_clipping")
    if clip is not _MISSING and float(clip) != float(cfg.train.grad_clip):
        problems.append(
            f"gradient_clipping: file says {clip!r}, megapt config gives {cfg.train.grad_clip!r} "
            "(set by train.grad_clip)"
        )
    for section, what in (
        ("optimizer", "AdamW from train.lr/beta1/beta2/eps/weight_decay"),
        ("scheduler", "the LR schedule from train.warmup_steps/schedule/min_lr"),
    ):
        if section in user:
            problems.append(
                f"{section}: megapt builds {what}; remove the '{section}' section from the file"
            )
    if problems:
        raise ConfigError(
            f"deepspeed.config_file {path}: {len(problems)} conflict(s) with the megapt config:\n  "
            + "\n  ".join(problems)
        )

    def merge(a: dict, b: dict) -> dict:
        out = copy.deepcopy(a)
        for k, v in b.items():
            out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        return out

    merged = merge(ours, {k: v for k, v in user.items() if v != "auto"})
    for key in (
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "train_batch_size",
        "gradient_clipping",
    ):
        merged[key] = ours[key]  # "auto" or equal: ours is authoritative
    return merged


# --------------------------------------------------------------------------------------------
# Optimizer and LR schedule
# --------------------------------------------------------------------------------------------


def global_grad_norm(grad_groups: list[list[torch.Tensor]]) -> torch.Tensor:
    """The global L2 norm of the gradients, ``grad_groups`` holding one list per optimizer group,
    computed the way DeepSpeed 0.19.8's ZeRO-1/2 optimizer computes it (``get_grad_norm_direct`` and
    ``combine_grad_norm_groups`` in deepspeed/runtime/zero/stage_1_and_2.py): every tensor's norm in
    fp64, their squares summed per group and rounded to fp32, the square root taken in fp32, the
    group norms combined by an fp32 2-norm. fp32 ZeRO-0 (``GuardedAdamW``) reports and clips by this
    norm, so every stage clips by the same number: ZeRO-0 at one process reproduces ZeRO-1/2 bit for
    bit. (ZeRO-3 keeps fp64 until the groups are combined, a last-bit difference.) A per-tensor fp32
    norm, as before, reads ~1e-6 low on tensors of 1e5 elements. Returns an fp32 scalar tensor."""
    norms = []
    for grads in grad_groups:
        if grads:
            squares = torch.stack([torch.linalg.vector_norm(g.detach().double(), 2) for g in grads])
            norms.append(squares.pow(2).sum().float().pow(1.0 / 2))
    if not norms:
        return torch.zeros((), dtype=torch.float32)
    return torch.linalg.vector_norm(torch.stack(norms), ord=2)


def clip_grads_(grads: list[torch.Tensor], norm: torch.Tensor, max_norm: float) -> None:
    """Scale ``grads`` in place to a global norm of at most ``max_norm`` with DeepSpeed 0.19.8's
    formula (``unscale_and_clip_grads``, loss scale 1): ``clip = max(1, (norm + 1e-6) / max_norm)``
    in fp32, gradients multiplied by ``1 / clip`` (a no-op when the norm is within the limit)."""
    clip = torch.clamp(((norm / 1.0) + 1e-6) / max_norm, min=1.0)
    torch._foreach_mul_(grads, 1.0 / clip)


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that (1) computes the global grad norm (``global_grad_norm``: the same computation as
    DeepSpeed's ZeRO stages), (2) skips the update when it is not finite and sets ``overflow``
    (DeepSpeed then zeroes grads, counts a skipped step and does not advance the LR schedule), (3)
    clips to ``max_grad_norm`` (``clip_grads_``: DeepSpeed's formula). Used for fp32 ZeRO-0, where
    DeepSpeed runs the client optimizer as is; gradients are already all-reduced when ``step`` runs,
    so all ranks agree."""

    def __init__(self, params, max_grad_norm: float = 0.0, **kw):
        super().__init__(params, **kw)
        self.max_grad_norm = max_grad_norm
        self.overflow = False
        self._global_grad_norm: float | None = None

    @torch.no_grad()
    def step(self, closure=None):
        groups = [[p.grad for p in g["params"] if p.grad is not None] for g in self.param_groups]
        norm = global_grad_norm(groups)
        norm_f = float(norm)
        self._global_grad_norm = norm_f
        self.overflow = not math.isfinite(norm_f)
        if self.overflow:
            return None
        grads = [g for group in groups for g in group]
        if self.max_grad_norm > 0 and grads:
            clip_grads_(grads, norm, self.max_grad_norm)
        return super().step(closure)


def check_param_groups(groups: list[dict]) -> list[dict]:
    """Explicit optimizer groups (fine-tuning): each needs ``params``, ``lr`` and ``weight_decay``, and
    holds only trainable parameters (frozen ones must get no optimizer state nor ZeRO partition)."""
    problems, seen = [], set()
    for i, g in enumerate(groups):
        missing = [k for k in ("params", "lr", "weight_decay") if k not in g]
        if missing:
            problems.append(f"group {i}: missing {missing}")
            continue
        for p in g["params"]:
            if not p.requires_grad:
                problems.append(f"group {i}: holds a parameter with requires_grad=False")
            if id(p) in seen:
                problems.append(f"group {i}: a parameter appears in more than one group")
            seen.add(id(p))
    if not seen:
        problems.append("no trainable parameter in any group")
    if problems:
        raise ValueError("create_engine(param_groups=...): " + "; ".join(problems))
    return [dict(g, params=list(g["params"])) for g in groups]


def build_optimizer(
    cfg: Config, model: nn.Module, groups: list[dict] | None = None
) -> torch.optim.Optimizer:
    """AdamW over ``groups`` (each with its own lr / weight_decay) or, by default, the weight-decay
    groups of every trainable parameter at ``train.lr`` (``megapt.train.optim.param_groups``)."""
    t = cfg.train
    groups = param_groups(model, t.weight_decay) if groups is None else check_param_groups(groups)
    kw: dict[str, Any] = dict(
        lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, weight_decay=t.weight_decay
    )
    if cfg.deepspeed.offload_optimizer != "none":
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # JIT-builds a CPU op on first use (~1 min)

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kw)
    kw.update(adamw_impl(groups))
    if engine_stage(t.precision, cfg.deepspeed.zero_stage)[0] == 0 and t.precision == "fp32":
        return GuardedAdamW(groups, max_grad_norm=t.grad_clip, **kw)
    return torch.optim.AdamW(groups, **kw)


# --------------------------------------------------------------------------------------------
# Engine
# --------------------------------------------------------------------------------------------


def _skip_cpu_shm_comm_build() -> None:
    """On the CPU accelerator DeepSpeed JIT-compiles a shared-memory comm op (gcc, ~1-4 min) at its
    first comm init; it only speeds up inference all-reduce, our collectives go through gloo. Skip
    the build unless MEGAPT_DS_SHM_COMM=1."""
    import importlib
    import os

    from deepspeed.accelerator import get_accelerator

    if (
        get_accelerator().device_name() == "cpu"
        and os.environ.get("MEGAPT_DS_SHM_COMM", "0") != "1"
    ):
        # (`import deepspeed.comm.torch as m` would give the torch package: deepspeed.comm re-exports it)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # type: ignore[attr-defined]


@dataclass
class EngineBundle:
    engine: Any  # deepspeed.DeepSpeedEngine
    optimizer: Any
    scheduler: ScheduledLR
    ds_config: dict
    schedule: LRSchedule


ModelFactory = Callable[[], nn.Module]


def create_engine(
    cfg: Config,
    model: nn.Module | ModelFactory,
    *,
    world_size: int,
    init_weights: Callable[[Any, str, torch.Tensor], None] | None = None,
    param_groups: list[dict] | None = None,
    schedule: LRSchedule | None = None,
    layout: parallel.Layout | None = None,
) -> EngineBundle:
    """Build the model (under ``deepspeed.zero.Init`` for ZeRO-3), the optimizer with weight-decay
    groups, our LR schedule, and ``deepspeed.initialize``. ``model`` is a module or a factory; with a
    factory and ZeRO-3 the parameters are partitioned as they are created, then
    ``init_weights(module, name, param)`` runs for one gathered parameter at a time on rank 0 and
    DeepSpeed scatters the result. Without ZeRO-3 the factory is expected to initialise the weights.

    ``param_groups`` (fine-tuning; needs ``model`` as a module): explicit optimizer groups, each a dict
    with ``params`` (trainable parameters only: nothing else gets optimizer state or a ZeRO
    partition), ``lr`` (that group's peak LR) and ``weight_decay``. ``schedule`` replaces the one
    from ``train.*``; its multiplier ``lr(step) / peak`` scales every group's own peak LR
    (``megapt.train.optim.set_lr``).

    ``layout`` (sequence/tensor parallelism, ``megapt.train.parallel``): its process groups are
    made before the model, the model is prepared for it (Ulysses attention) and DeepSpeed gets
    the matching ``mpu``; ``world_size`` is then the data-parallel size, ``layout.dp``."""
    if param_groups is not None and not isinstance(model, nn.Module):
        raise ValueError(
            "create_engine(param_groups=...): pass the model as a module (the groups name its parameters)"
        )
    import deepspeed

    _skip_cpu_shm_comm_build()
    if torch.distributed.is_initialized():
        # DeepSpeed's comm layer must wrap our process group before zero.Init, or ZeRO-3 in a
        # fresh process sees a world size of 1 (and fails its batch-size check at >1 rank).
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
    ds_config = build_ds_config(cfg, world_size)
    stage = ds_config["zero_optimization"]["stage"]
    # ---- sequence / tensor parallelism: process groups before the model (zero.Init uses them)
    mpu = parallel.init_groups(layout) if layout is not None else None
    if isinstance(model, nn.Module):
        module = model
    elif stage == 3:
        # dtype comes from the config's bf16/fp16 sections. Passing dtype= explicitly is a trap in
        # DeepSpeed 0.19.8: with a config it is ignored for the accelerator default (bf16 on CPU).
        zero_init = parallel.zero_init_kwargs(layout, mpu)
        with deepspeed.zero.Init(config_dict_or_path=ds_config, **zero_init):
            module = model()
        if init_weights is not None:
            # one parameter at a time: never more than one full tensor gathered on a rank
            for name, p in module.named_parameters():
                with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                    # rank 0 of the group the parameter is partitioned over (the data-parallel
                    # group under tensor parallelism; the world otherwise)
                    if torch.distributed.get_rank(p.ds_process_group) == 0:  # type: ignore[attr-defined]
                        init_weights(module, name, p)
    else:
        module = model()
    if layout is not None:
        module = parallel.prepare_model(module, layout, mpu)
        ds_config = parallel.finalize_ds_config(ds_config, module, layout)

    if cfg.train.activation_checkpointing:
        if not hasattr(module, "gradient_checkpointing"):
            raise ConfigError(
                "train.activation_checkpointing: this model has no gradient_checkpointing switch"
            )
        module.gradient_checkpointing = True  # type: ignore[assignment]  # GPT recomputes each block in backward

    optimizer = build_optimizer(cfg, module, param_groups)
    schedule = schedule if schedule is not None else lr_schedule(cfg)
    scheduler = ScheduledLR(optimizer, schedule)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, mpu=mpu
    )
    skip_identity_allreduce(engine, stage)
    parallel.fix_replicated_shapes(engine.module, layout)
    parallel.log_engine_groups(engine, layout)
    if cfg.train.compile:
        engine.compile()
    return EngineBundle(engine, optimizer, scheduler, ds_config, schedule)


def skip_identity_allreduce(engine, stage: int) -> bool:
    """ZeRO-0 on one data-parallel rank: turn DeepSpeed's post-backward gradient allreduce off.

    There it is an identity that still flattens every gradient into a bucket, runs a one-rank
    all_reduce and copies the bucket back (1.3 s of a 5.6 s backward for 124m on CPU). The
    gradients are averaged over 1 rank, so nothing changes numerically. ZeRO 1-3 are left alone:
    their reduction also moves gradients into the optimizer's partitions. Returns True if skipped."""
    if stage != 0 or int(getattr(engine, "dp_world_size", 0) or 0) != 1:
        return False
    if not getattr(engine, "enable_backward_allreduce", False):
        return False
    engine.enable_backward_allreduce = False
    log.info(
        "ZeRO-0 on one data-parallel rank: DeepSpeed's gradient allreduce (an identity here) is skipped"
    )
    return True


def gathered(params: list, modifier_rank: int | None = None):
    """Context in which ZeRO-3 partitioned ``params`` hold their full tensors (every rank takes part;
    changes made on ``modifier_rank`` are scattered back on exit). Stages 0-2: nothing to do."""
    import contextlib

    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)
