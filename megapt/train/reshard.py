"""Universal (reshardable) checkpoint loading: a checkpoint of any ZeRO stage and world size resumes
at any other (``--checkpoint.universal=true``).

Sources:
  * ZeRO 1-3: ``ds_universal/zero/<param>/{fp32,exp_avg,exp_avg_sq}.pt``, written once by
    ``megapt ckpt universal CKPT`` (DeepSpeed's ds_to_universal).
  * ZeRO-0: the checkpoint's own ``ds/mp_rank_00_model_states.pt`` holds the whole model and
    optimizer state in one file; nothing to convert.
Targets: ZeRO-0 (fp32, our ``GuardedAdamW``) and ZeRO 1-3 in any precision, with or without CPU
optimizer offload. Each rank reads one parameter at a time and writes its own share of it: the model
weight, the fp32 master weight, Adam's ``exp_avg`` and ``exp_avg_sq``.

The rest comes from ``megapt.json``, where every save records ``optimizer_meta``: each optimizer
group's hyperparameters (name, lr, initial_lr, weight_decay, betas, eps), parameter names and Adam
step, the LR scheduler's state, DeepSpeed's step counters and loss scaler. After a universal load
the optimizer therefore holds what a plain resume would give it.

Why megapt does this itself instead of ``engine.load_checkpoint`` with ``load_universal`` (measured
with DeepSpeed 0.19.8, the version pinned here; recheck before trusting it after an upgrade):
  * Into ZeRO-3 (``load_hp_checkpoint_state_from_checkpoint_dir_stage3``) it copies group 0's
    hyperparameters into every group: the no-decay group comes back as ``name='decay'`` with
    ``weight_decay=0.1``, so norms and embeddings get weight decay.
  * It puts one ``step`` tensor, taken from the checkpoint's first sub-group, into the state of
    every sub-group. torch's AdamW increments each state's step in place, so with our two groups
    the shared tensor advances by 2 per optimizer step and Adam's bias correction goes wrong.
  * It only moves between ZeRO 1 and 2, or from 3 to 3: into ZeRO-0 it fails with
    ``AttributeError: 'NoneType' object has no attribute 'copy'``, from 3 to 0/1/2 and from 1/2
    to 3 with an AssertionError.
Here every sub-group gets its own step tensor, and group hyperparameters are restored by position
and checked by name.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from megapt.train import parallel
from megapt.train.checkpoint import DS_TAG, UNIVERSAL_TAG, CheckpointError, weights_only_loads

log = logging.getLogger("megapt.train")

HYPERPARAMETERS = ("name", "lr", "initial_lr", "weight_decay", "betas", "eps")
STATE_KEYS = ("fp32", "exp_avg", "exp_avg_sq")  # per-parameter tensors a universal load restores
ZERO0_FILE = "mp_rank_00_model_states.pt"


# --------------------------------------------------------------------------------------------
# How each DeepSpeed optimizer wrapper holds its state (DeepSpeed 0.19.8)
# --------------------------------------------------------------------------------------------


def _kind(opt: Any) -> str:
    """``plain`` (ZeRO-0: the client optimizer itself), ``mapped`` (ZeRO-1/2 and the bf16 stage-1
    optimizer: flat fp32 partitions, each model parameter linked to its fragment through
    ``_hp_mapping``), ``stage3``; anything else cannot take a universal load."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if isinstance(opt, DeepSpeedZeroOptimizer_Stage3):
        kind = "stage3"
    elif isinstance(opt, (DeepSpeedZeroOptimizer, BF16_Optimizer)):
        kind = "mapped"
    elif isinstance(opt, torch.optim.Optimizer):
        kind = "plain"
    else:
        raise CheckpointError(
            f"a universal checkpoint cannot be loaded into DeepSpeed's {type(opt).__name__} "
            "(fp16 at ZeRO stage 0); use --deepspeed.zero_stage=1 or higher, or train.precision "
            "fp32/bf16"
        )
    if getattr(opt, "swap_optimizer", False):
        raise CheckpointError(
            "a universal checkpoint cannot be loaded into an NVMe-offloaded optimizer"
        )
    return kind


def _base(opt: Any, kind: str) -> torch.optim.Optimizer:
    return opt if kind == "plain" else opt.optimizer


def _params_by_group(opt: Any, kind: str) -> list[list[torch.nn.Parameter]]:
    """The model parameters of each optimizer group, in the group's order."""
    base = _base(opt, kind)
    if kind == "plain":
        return [list(g["params"]) for g in base.param_groups]
    if kind == "mapped":
        return [list(g) for g in _mapped_lists(opt)[0]]
    groups: list[list] = [[] for _ in base.param_groups]
    # sub-groups in order: each group's parameters in order
    for sub, params in enumerate(opt.fp16_groups):
        groups[opt.sub_group_to_group_id[sub]].extend(params)
    return groups


def _mapped_lists(opt: Any) -> tuple[list, list]:
    """(model parameters per group, this rank's flat fp32 partition per group)."""
    if hasattr(opt, "bf16_groups"):  # BF16_Optimizer
        return opt.bf16_groups, opt.fp32_groups_flat_partition
    return opt.bit16_groups, opt.single_partition_of_fp32_groups


def _state_keys(opt: Any, kind: str) -> list[tuple[int, torch.Tensor]]:
    """(group index, tensor keying ``base.state``) for every optimizer state entry on this rank."""
    base = _base(opt, kind)
    if kind == "plain":
        return [(i, p) for i, g in enumerate(base.param_groups) for p in g["params"]]
    if kind == "mapped":
        return list(enumerate(_mapped_lists(opt)[1]))
    return [
        (opt.sub_group_to_group_id[sub], flat)
        for sub, flat in enumerate(opt.fp32_partitioned_groups_flat)
    ]


# --------------------------------------------------------------------------------------------
# Save side: what megapt.json records
# --------------------------------------------------------------------------------------------


def optimizer_meta(engine: Any, scheduler: Any) -> dict | None:
    """JSON for megapt.json: per group its hyperparameters, parameter names and Adam step; the LR
    scheduler's state; DeepSpeed's step counters and loss scaler. Local to this rank (no
    collective). None for an optimizer a universal load cannot take (saving goes on)."""
    opt = engine.optimizer
    try:
        kind = _kind(opt)
    except CheckpointError:
        return None
    base = _base(opt, kind)
    steps: dict[int, int] = {}
    for gi, key in _state_keys(opt, kind):
        state = base.state.get(key) or {}
        if "step" in state:
            steps[gi] = max(steps.get(gi, 0), int(state["step"]))
    names = {id(p): n for n, p in engine.module.named_parameters()}
    groups = []
    for gi, (g, params) in enumerate(zip(base.param_groups, _params_by_group(opt, kind))):
        entry = {k: (list(g[k]) if k == "betas" else g[k]) for k in HYPERPARAMETERS if k in g}
        entry.update(step=steps.get(gi, 0), params=[names[id(p)] for p in params])
        groups.append(entry)
    sched = {k: v for k, v in scheduler.state_dict().items() if _plain(v)}
    meta = {
        "groups": groups,
        "lr_scheduler": sched,
        "global_steps": int(engine.global_steps),
        "global_samples": int(engine.global_samples),
        "skipped_steps": int(engine.skipped_steps),
    }
    scaler = getattr(opt, "loss_scaler", None)
    if scaler is not None:
        meta["loss_scaler"] = {
            k: v for k, v in vars(scaler).items() if isinstance(v, (bool, int, float))
        }
    return meta


def _plain(v: Any) -> bool:
    if isinstance(v, (list, tuple)):
        return all(_plain(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _plain(x) for k, x in v.items())
    return v is None or isinstance(v, (bool, int, float, str))


# --------------------------------------------------------------------------------------------
# Load side
# --------------------------------------------------------------------------------------------

Reader = Callable[
    [str, int], dict
]  # (parameter name, numel) -> {"fp32"|"exp_avg"|"exp_avg_sq": flat fp32}


def _universal_reader(ckpt: Path) -> Reader:
    root = Path(ckpt) / UNIVERSAL_TAG / "zero"

    def read(name: str, numel: int) -> dict:
        out = {}
        for key in STATE_KEYS:
            f = root / name / f"{key}.pt"
            if not f.is_file():
                raise CheckpointError(
                    f"{f}: missing; {ckpt} was saved for another model, or its "
                    f"{UNIVERSAL_TAG}/ is incomplete (run megapt ckpt universal {ckpt} again)"
                )
            obj = torch.load(f, map_location="cpu", weights_only=True)
            out[key] = _flat(obj["param"] if isinstance(obj, dict) else obj, numel, f)
        return out

    return read


def _zero0_reader(ckpt: Path, saved_groups: list | None, target_names: list[list[str]]) -> Reader:
    """Reads a ZeRO-0 checkpoint's one file: ``module`` (the weights) and ``optimizer`` (the
    GuardedAdamW state, keyed by position across the groups)."""
    f = Path(ckpt) / DS_TAG / ZERO0_FILE
    if not f.is_file():
        raise CheckpointError(f"{f}: missing; not a complete ZeRO-0 checkpoint")
    sd = torch.load(f, map_location="cpu", weights_only=True)
    osd = sd.get("optimizer") if isinstance(sd, dict) else None
    if not isinstance(osd, dict) or "state" not in osd or "param_groups" not in osd:
        raise CheckpointError(
            f"{f}: no optimizer state in it (a ZeRO-0 checkpoint saved with fp16 keeps it "
            "inside DeepSpeed's FP16_Optimizer, which a universal load does not read)"
        )
    names = [g["params"] for g in saved_groups] if saved_groups else target_names
    index: dict[str, Any] = {}
    for gi, group in enumerate(osd["param_groups"]):
        if gi < len(names):
            index.update(zip(names[gi], group["params"]))
    module, state = sd["module"], osd["state"]

    def read(name: str, numel: int) -> dict:
        if name not in module or index.get(name) not in state:
            raise CheckpointError(
                f"{f}: no weight or optimizer state for {name}; saved for another model"
            )
        st = state[index[name]]
        return {
            "fp32": _flat(module[name], numel, f),
            "exp_avg": _flat(st["exp_avg"], numel, f),
            "exp_avg_sq": _flat(st["exp_avg_sq"], numel, f),
        }

    return read


def _tp_local(read: Reader, module: torch.nn.Module) -> Reader:
    """Under tensor parallelism a rank holds its AutoTP shard of wq/wk/wv/w1/w3 (rows) and wo/w2
    (columns) while a checkpoint holds them whole: read the whole tensor and keep this rank's
    part (``parallel.local_shard``); other parameters are read as they are."""

    def read_local(name: str, numel: int) -> dict:
        whole = parallel.whole_numel(module, name)
        if whole is None:
            return read(name, numel)
        return {
            k: parallel.local_shard(module, name, v).reshape(-1)
            for k, v in read(name, whole).items()
        }

    return read_local


def _flat(t: Any, numel: int, where: Path) -> torch.Tensor:
    t = torch.as_tensor(t)
    if t.numel() != numel:
        raise CheckpointError(f"{where}: {t.numel()} elements, this model's parameter has {numel}")
    return t.detach().reshape(-1).float()


def _step_value(base: torch.optim.Optimizer, group: dict, like: torch.Tensor, step: int) -> Any:
    """Adam's step the way ``base`` keeps it: torch's Adam/AdamW a float32 tensor (on the
    parameter's device when fused or capturable, else on the CPU), DeepSpeedCPUAdam an int."""
    if not isinstance(base, torch.optim.Adam):
        return int(step)
    if group.get("fused") or group.get("capturable"):
        return torch.tensor(float(step), dtype=torch.float32, device=like.device)
    return torch.tensor(float(step))


def load_universal(engine: Any, scheduler: Any, ckpt: Path, meta: dict) -> None:
    """Load ``ckpt`` (any ZeRO stage, any world size; a ZeRO 1-3 one converted by ``megapt ckpt
    universal``) into ``engine`` at this run's stage and world size. Collective at ZeRO-3."""
    ckpt = Path(ckpt)
    opt = engine.optimizer
    kind = _kind(opt)  # refuses what it cannot load before anything changes
    base = _base(opt, kind)
    params = _params_by_group(opt, kind)
    names = {id(p): n for n, p in engine.module.named_parameters()}
    target_names = [[names[id(p)] for p in group] for group in params]
    saved = meta.get("optimizer")
    saved_groups = saved["groups"] if saved else None
    if saved_groups is not None:
        mine = [g.get("name") for g in base.param_groups]
        theirs = [g.get("name") for g in saved_groups]
        if mine != theirs or [sorted(n) for n in target_names] != [
            sorted(g["params"]) for g in saved_groups
        ]:
            raise CheckpointError(
                f"{ckpt}: optimizer groups {theirs} hold other parameters than this run's "
                f"{mine}; use the model and trainable parameters it was saved with"
            )
    else:
        log.warning(
            "%s: saved without optimizer metadata (older megapt): group hyperparameters come "
            "from this "
            "run's config and Adam's step from the checkpoint's step",
            ckpt,
        )
    steps = (
        [int(g["step"]) for g in saved_groups]
        if saved_groups
        else [int(meta["step"])] * len(params)
    )
    source_stage = int(meta.get("zero_stage") or 0)
    with weights_only_loads(ckpt), torch.no_grad():
        read = (
            _zero0_reader(ckpt, saved_groups, target_names)
            if source_stage == 0
            else _universal_reader(ckpt)
        )
        read = _tp_local(read, engine.module)
        if kind == "plain":
            _load_plain(base, read, names, steps)
        elif kind == "mapped":
            _load_mapped(opt, base, read, names, steps)
        else:
            _load_stage3(opt, base, read, names, steps)
    if saved_groups is not None:
        for g, s in zip(base.param_groups, saved_groups):
            g.update(
                {k: (tuple(s[k]) if k == "betas" else s[k]) for k in HYPERPARAMETERS if k in s}
            )
    _load_counters(engine, opt, scheduler, saved, meta)
    log.info(
        "universal load: ZeRO-%d checkpoint at world size %s -> %s (%s), %d parameters, "
        "Adam step %s",
        source_stage,
        meta.get("world_size"),
        type(opt).__name__,
        kind,
        len(names),
        sorted(set(steps)),
    )


def _load_plain(base, read: Reader, names: dict, steps: list[int]) -> None:
    for gi, g in enumerate(base.param_groups):
        for p in g["params"]:
            full = read(names[id(p)], p.numel())
            p.data.copy_(full["fp32"].view_as(p))
            base.state[p] = {
                "step": _step_value(base, g, p, steps[gi]),
                "exp_avg": full["exp_avg"].view_as(p).to(p.dtype, copy=True),
                "exp_avg_sq": full["exp_avg_sq"].view_as(p).to(p.dtype, copy=True),
            }


def _load_mapped(opt, base, read: Reader, names: dict, steps: list[int]) -> None:
    lp_groups, flats = _mapped_lists(opt)
    for gi, (lps, flat) in enumerate(zip(lp_groups, flats)):
        state = {"exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}
        dst = {"fp32": flat, **state}
        for lp in lps:
            full = read(names[id(lp)], lp.numel())
            lp.data.copy_(full["fp32"].view_as(lp))  # every rank holds the whole model copy
            m = lp._hp_mapping  # this rank's fragment of lp, if any
            if m is None:
                continue
            src, at = m.lp_fragment_address, m.hp_fragment_address
            for key in STATE_KEYS:
                dst[key].narrow(0, at.start, at.numel).copy_(
                    full[key].narrow(0, src.start, src.numel)
                )
        base.state[flat] = {
            "step": _step_value(base, base.param_groups[gi], flat, steps[gi]),
            **state,
        }
    opt._hp_optimizer_states_linked = (
        False  # DeepSpeed links the fragments to the new state tensors
    )


def _load_stage3(opt, base, read: Reader, names: dict, steps: list[int]) -> None:
    import torch.distributed as dist

    opt.checkpoint_event_prologue()  # every parameter partitioned
    for sub, flat in enumerate(opt.fp32_partitioned_groups_flat):
        gi = opt.sub_group_to_group_id[sub]
        state = {"exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}
        dst = {"fp32": flat, **state}
        for p in opt.fp16_groups[sub]:
            full = read(names[id(p)], p.ds_numel)
            _, offset, numel = opt.grad_position[opt.get_param_id(p)]  # numel: the padded partition
            group = opt._get_param_partition_group(p)
            rank, world = dist.get_rank(group=group), dist.get_world_size(group=group)
            for key in STATE_KEYS:
                part = F.pad(full[key], (0, numel * world - full[key].numel())).narrow(
                    0, numel * rank, numel
                )
                dst[key].narrow(0, offset, numel).copy_(part)
                if key == "fp32":
                    p.ds_tensor.data.copy_(part.view_as(p.ds_tensor))
        base.state[flat] = {
            "step": _step_value(base, base.param_groups[gi], flat, steps[gi]),
            **state,
        }
    opt.checkpoint_event_epilogue()  # persistent (never partitioned) parameters gathered again


def _load_counters(engine, opt, scheduler, saved: dict | None, meta: dict) -> None:
    """LR scheduler state, DeepSpeed's step counters and loss scaler, as a plain resume restores
    them."""
    step = int(meta["step"])
    attempts = int(meta.get("attempt", step))
    if saved:
        scheduler.load_state_dict(dict(saved["lr_scheduler"]))
        engine.global_steps = saved["global_steps"]
        engine.global_samples = saved["global_samples"]
        engine.skipped_steps = saved["skipped_steps"]
        scaler = getattr(opt, "loss_scaler", None)
        for k, v in (saved.get("loss_scaler") or {}).items():
            if scaler is not None and hasattr(scaler, k):
                setattr(scaler, k, v)
    else:  # the schedule advances once per applied step
        scheduler.load_state_dict({"last_epoch": step})
        engine.global_steps = attempts
        engine.global_samples = attempts * engine.train_batch_size()
        engine.skipped_steps = int(meta.get("skipped_total", 0))
