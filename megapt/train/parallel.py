"""Sequence and tensor parallelism on DeepSpeed, composed with ZeRO data parallelism.

    layout = Layout.from_config(cfg, world_size, model_args)  # checks; ConfigError names knobs
    ds_config = build_ds_config(cfg, layout.dp)               # + tensor_parallel section (engine)
    bundle = create_engine(cfg, factory, world_size=layout.dp, layout=layout)

Ranks: ``world = dp x group`` with ``group = train.sequence_parallel x train.tensor_parallel`` (one
of the two is 1: composing them is refused). Consecutive ranks form a group (DeepSpeed's own
convention for both: ``parallel_state_sp`` and ``groups._init_tp_mesh_device``); rank r is
data-parallel replica ``r // group``. Every rank of a group reads the same samples: the loader runs
on the data-parallel world (``layout.dp`` ranks), so its exact/elastic resume semantics hold there.

Sequence parallelism (Ulysses, ``train.sequence_parallel: N``): each rank embeds and runs the
blocks on 1/N of every sequence (``GPT.seq_shard``); around attention DeepSpeed's
``DistributedAttention`` all-to-alls q/k/v from sequence-sharded to head-sharded (whole sequences,
nh/N heads) and the output back, so every attention backend (Triton flash, document masks) runs
unchanged on whole sequences. RoPE positions and document starts are those of each rank's slice
of the full row. Each rank's loss is its slice's share of the sequence mean (the shares sum to
it), so the gradients DeepSpeed sums over the group are the full-sequence ones. GQA with fewer KV
heads than N (N a multiple of n_kv_heads): K/V heads are repeated to N before the all-to-all, so
each rank gets the K/V head its query heads use (more all-to-all bytes, same maths).

Tensor parallelism (``train.tensor_parallel: N``): DeepSpeed AutoTP training with our partition
rules (``PARTITION_RULES``): wq/wk/wv/w1/w3 column-parallel, wo/w2 row-parallel (an all-reduce
after each), whole heads per rank (n_kv_heads must be a multiple of N); attention reads its local
head counts off the sharded projections. Embedding, norms and output head stay replicated:
DeepSpeed's vocab-parallel head expects an HF ``lm_head`` and computes its own loss, while ours
runs the fused linear + cross-entropy inside the head.

Also here: the ZeRO-3 settings sequence parallelism needs, the resume check of a checkpoint's
layout, and reading full weights from a universal checkpoint (tensor-parallel consolidation).
"""

from __future__ import annotations

import argparse
import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn as nn

from megapt.config import Config, ConfigError
from megapt.model.gpt import GPT, AttentionCore, AttentionMask, Block, ModelArgs

log = logging.getLogger("megapt.train")

# AutoTP partition rules for megapt's GPT (DeepSpeed ``tensor_parallel.partition_config``):
# parameter-name regexes -> column (output dim split, all-reduce of the input grad in backward)
# or row (input dim split, all-reduce of the output in forward). Unmatched layers stay replicated.
PARTITION_RULES = (
    {
        "patterns": [r".*\.attention\.w[qkv]\.weight$", r".*\.feed_forward\.w[13]\.weight$"],
        "partition_type": "column",
    },
    {
        "patterns": [r".*\.attention\.wo\.weight$", r".*\.feed_forward\.w2\.weight$"],
        "partition_type": "row",
    },
)


_SHARDED = [re.compile(p) for rule in PARTITION_RULES for p in rule["patterns"]]


def tp_sharded(name: str) -> bool:
    """Whether tensor parallelism shards parameter ``name`` (else it stays whole on every rank)."""
    return any(p.match(name) for p in _SHARDED)


def sp_zero3_reduce_bucket(configured: int, largest_param: int) -> int:
    """The reduce bucket ZeRO-3 gets under sequence parallelism (see ``finalize_ds_config``)."""
    return max(int(configured), int(largest_param))


@dataclass(frozen=True)
class Layout:
    """How the world splits: ``dp`` data-parallel replicas of a group of ``sp x tp`` ranks."""

    world: int
    sp: int = 1
    tp: int = 1

    @property
    def group(self) -> int:
        """Ranks that share one batch (a sequence- or tensor-parallel group)."""
        return self.sp * self.tp

    @property
    def dp(self) -> int:
        return self.world // self.group

    def dp_rank(self, rank: int) -> int:
        return rank // self.group

    def group_rank(self, rank: int) -> int:
        return rank % self.group

    def mean_loss(self, total: float) -> float:
        """Mean loss from the sum of every rank's loss: sequence-parallel ranks hold shares of
        one loss (they add up), every other rank a whole copy (they average)."""
        return total * self.sp / self.world

    def describe(self) -> str:
        return f"data {self.dp} x sequence {self.sp} x tensor {self.tp} = {self.world} ranks"

    @classmethod
    def from_config(cls, cfg: Config, world: int, args: ModelArgs | None = None) -> Layout:
        """The run's layout; a ``ConfigError`` lists every problem (world size, head counts)."""
        problems = layout_problems(cfg, world)
        if args is not None:
            problems += head_problems(args, cfg.train.sequence_parallel, cfg.train.tensor_parallel)
        if problems:
            raise ConfigError(
                f"parallel layout: {len(problems)} problem(s):\n  " + "\n  ".join(problems)
            )
        return cls(world, cfg.train.sequence_parallel, cfg.train.tensor_parallel)


def layout_problems(cfg: Config, world: int) -> list[str]:
    """What makes ``cfg``'s sequence/tensor parallelism impossible at ``world`` ranks."""
    sp, tp = cfg.train.sequence_parallel, cfg.train.tensor_parallel
    hpz = cfg.deepspeed.zero_hpz_partition_size
    group = sp * tp
    e = []
    if group > 1 and world % group:
        knob = "train.sequence_parallel" if sp > 1 else "train.tensor_parallel"
        e.append(
            f"{knob}: {group} does not divide the world size {world}; the world must be "
            f"a whole number of groups of {group} ranks"
        )
    if hpz > 1 and world % hpz:
        e.append(
            f"deepspeed.zero_hpz_partition_size: {hpz} does not divide the world size {world} "
            "(use the GPUs per node)"
        )
    return e


def head_problems(args: Any, sp: int, tp: int) -> list[str]:
    """Head-count rules: Ulysses splits (or, for fewer KV heads, repeats) heads over the sequence
    ranks; AutoTP gives every rank whole K/V heads."""
    e = []
    if sp > 1:
        if args.n_heads % sp:
            e.append(
                f"train.sequence_parallel: {sp} must divide the {args.n_heads} query heads "
                "(each rank attends over n_heads / sequence_parallel of them)"
            )
        if args.n_kv_heads % sp and sp % args.n_kv_heads:
            e.append(
                f"train.sequence_parallel: {sp} and the {args.n_kv_heads} KV heads must "
                "divide one another (KV heads are split over the ranks, or repeated when "
                "there are fewer of them than ranks)"
            )
    if tp > 1 and args.n_kv_heads % tp:
        e.append(
            f"train.tensor_parallel: {tp} must divide the {args.n_kv_heads} KV heads "
            "(AutoTP gives every rank whole K/V heads; with fewer KV heads than ranks use "
            "sequence parallelism, which repeats them, or a smaller tensor_parallel)"
        )
    if tp > 1 and args.ffn_hidden % tp:
        e.append(f"train.tensor_parallel: {tp} must divide ffn_hidden {args.ffn_hidden}")
    return e


# --------------------------------------------------------------------------------------------
# ds_config and process groups
# --------------------------------------------------------------------------------------------


def ds_config_sections(cfg: Config) -> dict:
    """The ds_config sections tensor parallelism adds (``build_ds_config`` merges them)."""
    tp = cfg.train.tensor_parallel
    if tp <= 1:
        return {}
    return {
        "tensor_parallel": {
            "autotp_size": tp,
            "partition_config": {
                "use_default_specs": False,
                "layer_specs": [dict(r) for r in PARTITION_RULES],
            },
        }
    }


def init_groups(layout: Layout) -> Any:
    """Create DeepSpeed's process groups for ``layout`` (collective: every rank calls it) and
    return the ``mpu`` to hand to ``deepspeed.initialize``; None for plain data parallelism."""
    if layout.sp > 1:
        from deepspeed.runtime.sequence_parallel import parallel_state_sp

        if parallel_state_sp._SEQUENCE_PARALLEL_GROUP is None:  # once per process group
            parallel_state_sp.initialize_sequence_parallel(layout.sp)
        return UlyssesMPU()
    if layout.tp > 1:
        from deepspeed.utils import groups

        groups._init_tp_mesh_device(tensor_model_parallel_size=layout.tp)
        return groups
    return None


class UlyssesMPU:
    """DeepSpeed's Ulysses groups (``parallel_state_sp``) as the ``mpu`` of deepspeed.initialize,
    minus one alias: ``parallel_state_sp`` answers the model-parallel questions with the sequence
    group, so checkpoints recorded ``tp_degree = sp`` (DeepSpeed 0.19.8) and ds_to_universal then
    looked for sp model-state files that do not exist. Sequence ranks hold whole weights: the
    tensor-parallel degree is 1."""

    initialize_sequence_parallel = None  # DeepSpeed's marker for a Ulysses mpu (hasattr checks)

    def __getattr__(self, name: str) -> Any:
        from deepspeed.runtime.sequence_parallel import parallel_state_sp

        return getattr(parallel_state_sp, name)

    @staticmethod
    def get_tensor_model_parallel_world_size() -> int:
        return 1

    @staticmethod
    def get_tensor_model_parallel_rank() -> int:
        return 0


def zero_init_kwargs(layout: Layout | None, mpu: Any) -> dict:
    """``deepspeed.zero.Init`` arguments for the groups of ``init_groups``: the mpu (its data-
    parallel size decides the batch check) and, under tensor parallelism, the data-parallel
    group to partition over (AutoTP then gathers each weight and keeps its own shard)."""
    if mpu is None or layout is None:
        return {}
    if layout.tp > 1:
        return {"mpu": mpu, "data_parallel_group": mpu.get_data_parallel_group()}
    return {"mpu": mpu}


def prepare_model(model: nn.Module, layout: Layout, mpu: Any) -> nn.Module:
    """Sequence parallelism: give ``model`` its slice (``seq_shard``) and wrap every attention
    core in the Ulysses all-to-all. Tensor parallelism needs nothing here: DeepSpeed shards the
    linear layers inside ``deepspeed.initialize`` (``tensor_parallel`` in the ds_config)."""
    if layout.sp <= 1:
        return model
    if not isinstance(model, GPT):
        raise ConfigError("train.sequence_parallel: needs megapt's GPT (seq_shard, attention core)")
    group = mpu.get_sequence_parallel_group()
    model.seq_shard = (mpu.get_sequence_parallel_rank(), layout.sp)
    for layer in cast("list[Block]", model.layers):
        # a drop-in for the core (same call); typed as the AttentionCore it wraps
        layer.attention.core = UlyssesAttention(layer.attention.core, group, layout.sp)  # type: ignore[assignment]
    return model


def finalize_ds_config(ds_config: dict, module: nn.Module, layout: Layout | None) -> dict:
    """ZeRO-3 under sequence parallelism: DeepSpeed 0.19.8 averages gradients that go through its
    reduce-scatter path over all data x sequence ranks, which makes them 1/sp too small (the
    all-reduce path divides by the data-parallel size only, as every other stage does; measured:
    grad norms halve at sp=2). So reduce_scatter is turned off and the reduce bucket is made to
    hold the largest parameter, which keeps every bucket on the all-reduce path."""
    zero = ds_config.get("zero_optimization", {})
    if layout is None or layout.sp <= 1 or zero.get("stage") != 3:
        return ds_config
    largest = max(int(getattr(p, "ds_numel", p.numel())) for p in module.parameters())
    zero["reduce_scatter"] = False
    zero["reduce_bucket_size"] = sp_zero3_reduce_bucket(zero.get("reduce_bucket_size", 0), largest)
    return ds_config


def fix_replicated_shapes(module: nn.Module, layout: Layout | None) -> int:
    """AutoTP + ZeRO-3: DeepSpeed 0.19.8 records the universal-checkpoint map of every parameter
    AutoTP leaves whole (norms, embedding, head) from ``param.shape``, which ZeRO-3 has already
    emptied to (0,) (its real shape is ``ds_shape``); ds_to_universal then refuses the checkpoint
    ("a shard of N elements, but the map describes 0"). Rebuild those maps from ``ds_shape``.
    Returns how many were fixed."""
    if layout is None or layout.tp <= 1:
        return 0
    from deepspeed.checkpoint.affine import replicated_map
    from deepspeed.checkpoint.constants import (
        AFFINE_MAP,
        AFFINE_MAP_PARAMS,
        TP_REPLICATED_PARAMETER_PATTERNS,
        UNIVERSAL_CHECKPOINT_INFO,
    )

    info = getattr(module, UNIVERSAL_CHECKPOINT_INFO, None) or {}
    maps = info.get(AFFINE_MAP, {}).get(AFFINE_MAP_PARAMS, {})
    replicated = set(info.get(TP_REPLICATED_PARAMETER_PATTERNS, ()))
    fixed = 0
    for name, p in module.named_parameters():
        pattern = rf"^{re.escape(name)}$"
        shape = tuple(getattr(p, "ds_shape", p.shape))
        entry = maps.get(pattern)
        if pattern in replicated and entry is not None and tuple(entry["logical_shape"]) != shape:
            maps[pattern] = replicated_map(shape, layout.tp).to_dict()
            fixed += 1
    return fixed


def log_engine_groups(engine: Any, layout: Layout | None) -> None:
    """Say which groups DeepSpeed actually built (the layout as the engine sees it, hpZ)."""
    if layout is not None and layout.group > 1:
        log.info(
            "parallel layout: %s; DeepSpeed data-parallel size %s, sequence-parallel size %s",
            layout.describe(),
            getattr(engine, "dp_world_size", "?"),
            getattr(engine, "sequence_parallel_size", "?"),
        )
    from deepspeed.utils import groups

    hpz = groups._get_zero_param_intra_parallel_group()
    if hpz is not None:
        log.info(
            "ZeRO++ hpZ: parameters are all-gathered within groups of %d ranks (secondary "
            "partition)",
            torch.distributed.get_world_size(hpz),
        )


class UlyssesAttention(nn.Module):
    """DeepSpeed's ``DistributedAttention`` around one of our attention cores.

    In: q (B, T/N, nh, hs), k/v (B, T/N, n_kv, hs) on each of N ranks; the all-to-all hands the
    core (B, T, nh/N, hs) and (B, T, n_kv/N, hs) (whole sequences, this rank's heads) and returns
    (B, T/N, nh, hs). The mask spec (causal, document mask or starts) describes the whole
    sequence. Fewer KV heads than ranks: each is repeated N / n_kv times first, so rank r's query
    heads (a contiguous block inside one KV group) meet their own KV head.
    """

    def __init__(self, core: AttentionCore, group: Any, sp: int):
        super().__init__()
        from deepspeed.sequence.layer import DistributedAttention

        self.sp = sp
        self.attn = DistributedAttention(core, group, scatter_idx=2, gather_idx=1)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionMask
    ) -> torch.Tensor:
        n_kv = k.shape[2]
        if n_kv < self.sp:
            k = k.repeat_interleave(self.sp // n_kv, dim=2)  # (B, T/N, N, hs)
            v = v.repeat_interleave(self.sp // n_kv, dim=2)
        return self.attn(q, k, v, 0, None, spec)  # batch dim 0; RoPE already applied


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def layout_meta(layout: Layout) -> dict:
    """What a checkpoint records of the layout (megapt.json)."""
    return {"sequence_parallel": layout.sp, "tensor_parallel": layout.tp}


def check_resume(meta: dict, layout: Layout, universal: bool, ckpt: Path) -> None:
    """A checkpoint resumes directly only at its own layout; a universal one at any."""
    saved = (int(meta.get("sequence_parallel", 1)), int(meta.get("tensor_parallel", 1)))
    if universal or saved == (layout.sp, layout.tp):
        return
    from megapt.train.checkpoint import CheckpointError

    raise CheckpointError(
        f"{ckpt}: saved with sequence_parallel {saved[0]} x tensor_parallel {saved[1]}; this run "
        f"has {layout.sp} x {layout.tp}. Convert it once: megapt ckpt universal {ckpt}\n"
        "then resume with --checkpoint.universal=true"
    )


def tensor_parallel_state_dict(
    ckpt: Path, ds_dir: Path, universal_dir: Path, tied: bool
) -> dict[str, torch.Tensor]:
    """Full fp32 weights of a tensor-parallel checkpoint: DeepSpeed's zero_to_fp32 reads one
    model-parallel rank only, so the shards are merged by its universal conversion (the
    checkpoint's own ``universal_dir`` when converted already, else a temporary one beside it:
    fp32 weights and Adam moments, 12 bytes per parameter, deleted afterwards)."""
    if universal_dir.is_dir():
        sd = universal_state_dict(universal_dir)
    else:
        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        with tempfile.TemporaryDirectory(prefix=".megapt-merge-", dir=ckpt.parent) as tmp:
            ds_to_universal(
                argparse.Namespace(
                    input_folder=str(ds_dir),
                    output_folder=str(Path(tmp) / "u"),
                    num_extract_workers=1,
                    num_merge_workers=1,
                    keep_temp_folder=False,
                    strict=True,
                    inject_missing_state=False,
                )
            )
            sd = universal_state_dict(Path(tmp) / "u")
    if tied and "output.weight" not in sd:
        sd["output.weight"] = sd["tok_embeddings.weight"]  # one tensor, as the model ties them
    return sd


def whole_numel(module: nn.Module, name: str) -> int | None:
    """The element count of parameter ``name`` before AutoTP cut it into shards, or None when
    this rank holds it whole (no tensor parallelism, or a parameter AutoTP does not shard)."""
    from deepspeed.module_inject.layers import LinearAllreduce, LinearLayer

    owner = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
    if not isinstance(owner, (LinearLayer, LinearAllreduce)) or owner.tp_world_size <= 1:
        return None
    return int(torch.Size(owner._orig_weight_shape).numel())


def local_shard(module: nn.Module, name: str, full: torch.Tensor) -> torch.Tensor:
    """This rank's part of parameter ``name`` given its whole tensor (a universal checkpoint holds
    whole tensors): under AutoTP, a column-parallel weight keeps its rows of the shard, a row-
    parallel one its columns (DeepSpeed's ``_partition_sizes`` and ``tp_index``); everything else,
    and every parameter without tensor parallelism, is the whole tensor. For a loader that writes
    universal state into a tensor-parallel engine itself."""
    from deepspeed.module_inject.layers import LinearAllreduce, LinearLayer

    owner = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
    if not isinstance(owner, (LinearLayer, LinearAllreduce)) or owner.tp_world_size <= 1:
        return full
    dim = 1 if isinstance(owner, LinearAllreduce) else 0
    shape = owner._orig_weight_shape
    return full.view(shape).split(list(owner._partition_sizes), dim=dim)[owner.tp_index]


def universal_state_dict(universal_dir: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights from a universal checkpoint (``ds_to_universal`` output): one
    ``zero/<name>/fp32.pt`` per parameter, already merged over ZeRO partitions and tensor-parallel
    shards. Tied weights appear once, under the name the engine registered first."""
    zero = Path(universal_dir) / "zero"
    out = {}
    for d in sorted(p for p in zero.iterdir() if p.is_dir()):
        state = torch.load(d / "fp32.pt", map_location="cpu", weights_only=True)
        out[d.name] = (state["param"] if isinstance(state, dict) else state).float()
    return out
