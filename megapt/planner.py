"""`megapt plan`: predict per-GPU memory of a run before launching it.

    megapt plan -c configs/7b-1node-zero3.yaml --nodes 1 --gpus-per-node 8 [--gpu h100] [--gpu-mem-gb 79]

Prints one row per memory component, the largest micro-batch that fits, and — when the run does
not fit — the cheapest change that does (exit code 1). Bad combinations (a world size that does not
divide the global batch, bf16 on a GPU without bf16, ...) are config errors (exit code 2) that name
every offending key. Everything is computed from the config; nothing touches a GPU.

Model (bytes per GPU; Psi = parameter count, W = data-parallel world size = nodes * gpus_per_node)
--------------------------------------------------------------------------------------------------
Model states, the ZeRO paper's accounting (Rajbhandari et al. 2020), as DeepSpeed 0.19 allocates them:

    precision   params  grads  optimizer (master + Adam m, v)
    bf16/fp16     2       2     4 + 8 = 12          -> the "16 bytes/param" rule
    fp32          4       4     0 + 8 =  8 (stage 0) / 4 + 8 = 12 (stages 1-3: DeepSpeed's ZeRO
                                optimizers keep a separate fp32 master partition even in fp32; measured)

    stage 0: everything replicated; 1: optimizer /W; 2: + grads /W; 3: + params /W.
    offload_optimizer=cpu: optimizer states and the fp32 gradient partition live in host RAM.
    offload_params=cpu (ZeRO-3): the parameter partition lives in host RAM too.

Activations per transformer block (Korthikanti et al. 2022, "Reducing Activation Recomputation",
re-derived for this model: pre-RMSNorm, RoPE, GQA, flash attention (no s^2 term), SwiGLU, no
bias, no dropout). With s = seq_len, b = micro_batch, h = d_model, k = n_kv_heads * head_dim,
f = ffn_hidden, a = n_heads and e = bytes per activation element (2 for bf16/fp16, 4 for fp32):

    attention:  x (norm input) h + norm output h + q, k, v (after RoPE) h + 2k
                + attention output h + its contiguous copy for wo h           = (5h + 2k) s b e
    MLP:        x h + norm output h + w1 out f + w3 out f + silu(w1) f + product f
                                                                               = (2h + 4f) s b e
    small:      2 fp32 RMSNorm rstd (8 s b) + flash-attention log-sum-exp (4 a s b)
    per block:  s b [e (7h + 2k + 4f) + 8 + 4a]      (+ 2 s b h bytes of dropout masks if dropout > 0)
    eager attention adds the s^2 scores and probabilities: 2 e a s^2 b; eager RMSNorm (the CPU
    default) adds 8 h s b (fp32 input copy + normalised tensor, two norms). ``auto`` on a GPU
    selects the fused kernels this formula assumes.

    no checkpointing:  L * block + 1 block of activation gradients (backward working set)
    checkpointing:     L * s b h e (block inputs) + 1 recomputed block + 1 block of gradients
    plus the final norm (2 s b h e).

Sequence and tensor parallelism (megapt.train.parallel), sp x tp ranks sharing one batch, D =
W / (sp x tp) data-parallel replicas:

    sequence parallel (Ulysses): every per-token activation holds T / sp tokens; the attention
    core sees the whole T with n_heads / sp heads (same element count; eager scores 2 e a T^2 b /
    sp); weights whole on every rank; ZeRO partitions over D x sp ranks (DeepSpeed's sequence-
    data-parallel group).
    tensor parallel (AutoTP): wq/wk/wv/wo/w1/w2/w3 hold 1/tp of their elements, embeddings, norms
    and head stay whole (megapt.train.parallel.PARTITION_RULES); ZeRO partitions over D. Per block
    the norm inputs/outputs (4h per token) stay whole, q/k/v/attention output/SwiGLU tensors are
    sharded: s b [e (4h + (3h + 2k + 4f) / tp) + 8 + 4a / tp].

Loss: the eager backend materialises logits (s b V e) plus the fp32 copy CE works on and its fp32
gradient (8 s b V); chunked/triton/auto never materialise them: one chunk of LOSS_CHUNK_TOKENS
tokens of fp32 logits + gradient (8 c V) plus an fp32 gradient of the hidden states (4 s b h).

DeepSpeed buffers: stage 0-2 reduce bucket (reduce_bucket_size * grad bytes, x2 with overlap_comm),
stage 1-2 allgather bucket and the fp32 gradient partition during the step; ZeRO-3 gathered-param
working set (largest module + prefetch bucket), the full gradient of that module before
reduce-scatter, the reduce bucket, and parameters below stage3_param_persistence_threshold kept
whole on every rank. DeepSpeed allocates reduce buckets at their configured size whatever the model
size (measured); the allgather and prefetch buckets are capped at the model size.

Framework: CUDA context + cuBLAS/NCCL workspaces (OVERHEAD_GIB, outside the caching allocator) and a
fragmentation margin (FRAGMENTATION of the allocator peak). Peak = model states + max(forward/backward
transients, optimizer-step transients) + margin + overhead.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from megapt.config import Config, ConfigError, parallel_combination_problems
from megapt.hardware import GPUS
from megapt.model.gpt import ModelArgs, ParamInfo, param_table
from megapt.train import parallel
from megapt.train.engine import engine_stage

GIB = 1024**3
OVERHEAD_GIB = 1.0  # CUDA context (~0.5 GB on H100) + cuBLAS workspace + NCCL buffers
FRAGMENTATION = (
    0.08  # share of the allocator peak lost to fragmentation (measured 5-10% on LLM runs)
)
LOSS_CHUNK_TOKENS = 4096  # tokens per chunk of the chunked / fused linear-cross-entropy
HOST_PER_RANK_GIB = 3.0  # python + torch + DeepSpeed per process in host RAM
STAGE3_SUB_GROUP_SIZE = (
    1_000_000_000  # DeepSpeed default: the fp32 gradients of one sub-group at a time
)

# Relative step-time cost of each way to save memory (1.0 = the configuration as written); used to
# order suggestions. Stage 1 costs nothing over stage 0 (same all-reduce volume split into
# reduce-scatter + all-gather); stage 2 almost nothing; stage 3 moves 1.5x the bytes and gathers
# parameters in forward and backward (worse across nodes); full recomputation adds a forward pass
# (~ +33% of the FLOPs); CPU Adam + PCIe transfers; parameter offload streams all weights over PCIe.
COST_ZERO = {0: 0.0, 1: 0.0, 2: 0.02, 3: 0.12}
COST_ZERO3_MULTINODE = 0.15
COST_CKPT = 0.33
COST_OFFLOAD_OPT = 0.4
COST_OFFLOAD_PARAMS = 1.0
COST_HALVE_MICRO_BATCH = 0.06  # lower arithmetic intensity per halving of the micro-batch
# Per doubling of the group (inside a node). Ulysses: all-to-alls of q, k, v and the attention
# output, ~4 T h / sp elements per rank and layer in forward and again in backward, not
# overlapped with compute by DeepSpeed's DistributedAttention (comparable to ZeRO-3's parameter
# traffic for a 7b model). Tensor parallelism: two all-reduces of the full activations per layer
# in forward and two in backward, smaller matmuls, and the head + loss every rank repeats.
COST_SP = 0.12
COST_TP = 0.15


# --------------------------------------------------------------------------------------------
# Model shape
# --------------------------------------------------------------------------------------------


def model_args(cfg: Config) -> ModelArgs:
    """The run's ModelArgs (megapt.model.gpt), resolved from the preset + overrides."""
    vocab = cfg.model.vocab_size or cfg.tokenizer.vocab_size
    return ModelArgs.from_config(cfg.model, vocab, cfg.data.seq_len)


def param_list(args: ModelArgs) -> tuple[ParamInfo, ...]:
    """Every parameter tensor of the run's model (name, shape, kind), read off the real ``GPT``
    built on the meta device (``megapt.model.gpt.param_table``); cached per set of model args."""
    return _param_list(dataclasses.astuple(args))


@functools.lru_cache(maxsize=32)
def _param_list(key: tuple) -> tuple[ParamInfo, ...]:
    return tuple(param_table(ModelArgs(*key)))


def rank_param_numels(args: ModelArgs, tp: int = 1) -> list[int]:
    """Elements of every parameter one rank holds before ZeRO: tensor parallelism keeps 1/tp of
    each attention and MLP matrix (megapt.train.parallel.PARTITION_RULES), the rest whole."""
    return [
        p.numel // tp if tp > 1 and parallel.tp_sharded(p.name) else p.numel
        for p in param_list(args)
    ]


def check_shape(args: Any, seq_len: int) -> list[str]:
    e = []
    if args.d_model % args.n_heads:
        e.append(f"model.d_model: {args.d_model} is not divisible by n_heads {args.n_heads}")
    if args.n_heads % args.n_kv_heads:
        e.append(f"model.n_kv_heads: {args.n_kv_heads} does not divide n_heads {args.n_heads}")
    max_seq = getattr(args, "max_seq_len", seq_len) or seq_len
    if seq_len > max_seq:
        e.append(f"data.seq_len: {seq_len} exceeds model.max_seq_len {max_seq}")
    return e


# --------------------------------------------------------------------------------------------
# Model states (parameters, gradients, optimizer) per rank
# --------------------------------------------------------------------------------------------


def precision_bytes(precision: str) -> tuple[int, int]:
    """(bytes per parameter, bytes per gradient) of the training copy."""
    return (4, 4) if precision == "fp32" else (2, 2)


@dataclass
class ModelStates:
    """Bytes of persistent model state on one rank's GPU and in host RAM (per rank)."""

    params: float
    grads: float
    optimizer: float
    host: float  # offloaded states, per rank

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer


def model_states(
    n_params: int,
    *,
    precision: str,
    zero_stage: int,
    world: int,
    offload_optimizer: bool = False,
    offload_params: bool = False,
    persistent_params: int = 0,
    fp32_grad_accum: bool = False,
) -> ModelStates:
    """Per-rank model-state bytes for ``n_params`` parameters (see the module docstring table).

    ``zero_stage`` is the stage the engine runs (``megapt.train.engine.engine_stage``); ``persistent_params``:
    ZeRO-3 parameters below the persistence threshold, kept whole on every rank (on top of their
    partition, as DeepSpeed keeps both); ``fp32_grad_accum``: full fp32 gradient buffers.
    """
    pb, gb = precision_bytes(precision)
    if fp32_grad_accum:
        gb = 4 + pb  # BF16_Optimizer: fp32 accumulation buffers beside the bf16 .grad tensors
    mixed = precision != "fp32"
    master = 4 if (mixed or zero_stage >= 1) else 0
    moments = 8
    shard = n_params / world
    host = 0.0
    # parameters
    if zero_stage == 3:
        part = pb * n_params / world
        params = pb * persistent_params + (0.0 if offload_params else part)
        if offload_params:
            host += part
    else:
        params = pb * n_params
    # gradients
    if zero_stage <= 1:
        grads = gb * n_params
    else:
        grads = 0.0 if offload_optimizer else gb * shard
    # optimizer states (+ the fp32 gradient partition the offloaded CPU Adam reads)
    per = (master + moments) * (shard if zero_stage >= 1 else n_params)
    if offload_optimizer:
        optimizer = 0.0
        host += (
            per + 4 * shard + (pb * shard if zero_stage in (1, 2) else 0.0)
        )  # + pinned bit16 buffer
    else:
        optimizer = per
    return ModelStates(params=params, grads=grads, optimizer=optimizer, host=host)


# --------------------------------------------------------------------------------------------
# Activations and loss buffers
# --------------------------------------------------------------------------------------------


def activation_element_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def block_activation_bytes(
    args: Any,
    seq: int,
    micro_batch: int,
    precision: str,
    *,
    attention: str = "auto",
    dropout: float = 0.0,
    norm: str = "auto",
    sp: int = 1,
    tp: int = 1,
) -> float:
    """Bytes one transformer block saves for backward on one rank (formula in the module
    docstring); ``seq`` is the whole sequence, ``sp``/``tp`` the sequence/tensor-parallel sizes."""
    e = activation_element_bytes(precision)
    h, a, f = args.d_model, args.n_heads, args.ffn_hidden
    k = args.n_kv_heads * (h // a)
    sb = seq // sp * micro_batch  # tokens this rank holds
    total = sb * (e * (4 * h + (3 * h + 2 * k + 4 * f) / tp) + 8 + 4 * a / tp)
    if dropout > 0:
        total += 2 * sb * h
    if attention == "eager":  # whole sequences, this rank's heads
        total += 2 * e * a / (sp * tp) * seq * seq * micro_batch
    if norm == "eager":
        # eager RMSNorm saves its input upcast to fp32 and the normalised tensor before the weight
        # multiply (measured): 4h more bytes per token per norm, two norms per block
        total += 2 * 4 * h * sb
    return float(total)


def activation_bytes(
    args: Any,
    seq: int,
    micro_batch: int,
    precision: str,
    checkpointing: bool,
    *,
    attention: str = "auto",
    dropout: float = 0.0,
    norm: str = "auto",
    sp: int = 1,
    tp: int = 1,
) -> float:
    e = activation_element_bytes(precision)
    block = block_activation_bytes(
        args,
        seq,
        micro_batch,
        precision,
        attention=attention,
        dropout=dropout,
        norm=norm,
        sp=sp,
        tp=tp,
    )
    tokens = seq // sp * micro_batch
    final_norm = 2 * tokens * args.d_model * e
    if checkpointing:
        saved = args.n_layers * tokens * args.d_model * e
        return saved + 2 * block + final_norm
    return args.n_layers * block + block + final_norm


def loss_bytes(args: Any, seq: int, micro_batch: int, precision: str, loss_backend: str) -> float:
    e = activation_element_bytes(precision)
    n, v = seq * micro_batch, args.vocab_size
    if loss_backend == "eager":
        return float(n * v * e + 8 * n * v)
    return float(8 * min(n, LOSS_CHUNK_TOKENS) * v + 4 * n * args.d_model)


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------


@dataclass
class Hardware:
    nodes: int
    gpus_per_node: int
    gpu: str = "h100"
    gpu_mem_gib: float = 0.0  # 0 = from megapt.hardware.GPUS
    cpu_mem_gib: float = 0.0  # per node; 0 = from GPUS

    def __post_init__(self) -> None:
        name = self.gpu.lower()
        if name not in GPUS:
            raise ConfigError(
                f"plan.gpu: unknown GPU {self.gpu!r}; known: {', '.join(GPUS)} "
                "(or give --gpu-mem-gb)"
            )
        self.gpu = name
        if not self.gpu_mem_gib:
            self.gpu_mem_gib = GPUS[name].mem_gib or 0.0
        if not self.cpu_mem_gib:
            self.cpu_mem_gib = GPUS[name].host_gib or 0.0
        given = (("--gpu-mem-gb", self.gpu_mem_gib), ("--cpu-mem-gb", self.cpu_mem_gib))
        missing = [flag for flag, v in given if not v]
        if missing:
            raise ConfigError(
                f"plan.gpu: megapt.hardware has no memory figure for {name} "
                f"({GPUS[name].name}); give {' and '.join(missing)}"
            )

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @classmethod
    def from_config(cls, cfg: Config, **over: Any) -> Hardware:
        p = cfg.plan
        kw = dict(
            nodes=p.nodes,
            gpus_per_node=p.gpus_per_node,
            gpu=p.gpu,
            gpu_mem_gib=p.gpu_mem_gb,
            cpu_mem_gib=p.cpu_mem_gb,
        )
        kw.update({k: v for k, v in over.items() if v is not None})
        return cls(**kw)


@dataclass
class Setting:
    """The knobs the planner varies: a point of the search."""

    zero_stage: int
    activation_checkpointing: bool
    micro_batch: int
    grad_accum: int
    offload_optimizer: bool
    offload_params: bool
    sequence_parallel: int = 1
    tensor_parallel: int = 1

    @classmethod
    def from_config(cls, cfg: Config) -> Setting:
        ds, t = cfg.deepspeed, cfg.train
        return cls(
            ds.zero_stage,
            t.activation_checkpointing,
            t.micro_batch,
            t.grad_accum,
            ds.offload_optimizer == "cpu",
            ds.offload_params == "cpu",
            t.sequence_parallel,
            t.tensor_parallel,
        )

    @property
    def group(self) -> int:
        """Ranks sharing one batch (sequence x tensor parallel)."""
        return self.sequence_parallel * self.tensor_parallel

    def overrides(self, base: Setting) -> list[str]:
        """--section.key=value overrides turning ``base`` into this setting."""
        out = []
        pairs = [
            ("deepspeed.zero_stage", "zero_stage"),
            ("train.activation_checkpointing", "activation_checkpointing"),
            ("train.micro_batch", "micro_batch"),
            ("train.grad_accum", "grad_accum"),
            ("deepspeed.offload_optimizer", "offload_optimizer"),
            ("deepspeed.offload_params", "offload_params"),
            ("train.sequence_parallel", "sequence_parallel"),
            ("train.tensor_parallel", "tensor_parallel"),
        ]
        for key, attr in pairs:
            v, b = getattr(self, attr), getattr(base, attr)
            if v != b:
                if attr.startswith("offload"):
                    v = "cpu" if v else "none"
                elif isinstance(v, bool):
                    v = str(v).lower()
                out.append(f"--{key}={v}")
        return out


@dataclass
class Plan:
    setting: Setting
    hardware: Hardware
    n_params: int  # the whole model
    rows: list[tuple[str, float, str]]  # (component, bytes per GPU, note)
    peak: float  # bytes per GPU
    host_per_node: float  # bytes of host RAM per node
    warnings: list[str] = field(default_factory=list)
    rank_params: int = 0  # parameters one rank holds before ZeRO (fewer under tensor parallelism)

    @property
    def fits_gpu(self) -> bool:
        return self.peak <= self.hardware.gpu_mem_gib * GIB

    @property
    def fits_host(self) -> bool:
        return self.host_per_node <= self.hardware.cpu_mem_gib * GIB

    @property
    def fits(self) -> bool:
        return self.fits_gpu and self.fits_host

    def row(self, name: str) -> float:
        return sum(b for n, b, _ in self.rows if n == name)

    @property
    def allocator_peak(self) -> float:
        """What torch.cuda.max_memory_allocated should read: peak minus margin and CUDA context."""
        return self.peak - self.row("fragmentation margin") - self.row("CUDA context + workspaces")


def plan_memory(
    cfg: Config, hw: Hardware, setting: Setting | None = None, args: ModelArgs | None = None
) -> Plan:
    """Predict per-GPU peak memory (and host RAM per node) of ``cfg`` on ``hw``."""
    s = setting or Setting.from_config(cfg)
    args = args if args is not None else model_args(cfg)
    ds, prec = cfg.deepspeed, cfg.train.precision
    seq, mb = cfg.data.seq_len, s.micro_batch
    sp, tp = s.sequence_parallel, s.tensor_parallel
    # ZeRO partitions over the data x sequence ranks (DeepSpeed's sequence-data-parallel group);
    # under tensor parallelism over the data-parallel ranks, each holding its 1/tp shards
    world = hw.world // tp
    # bf16 at ZeRO-0 runs as stage 1 with fp32 gradient accumulation buffers (DeepSpeed's
    # BF16_Optimizer: 2 B params + 4 B grads + 12 B / W optimizer states)
    stage, fp32_accum = engine_stage(prec, s.zero_stage)
    total = sum(p.numel for p in param_list(args))
    numels = rank_param_numels(args, tp)
    n = sum(numels)  # parameters this rank holds before ZeRO
    pb, gb = precision_bytes(prec)
    gb = 4 + pb if fp32_accum else gb
    small = [x for x in numels if x < ds.stage3_param_persistence_threshold]
    persistent = sum(small) if stage == 3 else 0
    st = model_states(
        n,
        precision=prec,
        zero_stage=stage,
        world=world,
        offload_optimizer=s.offload_optimizer,
        offload_params=s.offload_params,
        persistent_params=persistent,
        fp32_grad_accum=fp32_accum,
    )
    shard = n / world
    rows: list[tuple[str, float, str]] = []
    pnote = {3: f"/{world} (ZeRO-3)" + (", partition on CPU" if s.offload_params else "")}.get(
        stage, "replicated"
    )
    rows.append(("parameters", st.params, f"{prec} {pb} B/param, {pnote}"))
    gnote = (
        "replicated"
        if stage <= 1
        else (f"/{world}" if not s.offload_optimizer else "partition on CPU")
    )
    if fp32_accum:
        gnote += ", fp32 accumulation (bf16 at ZeRO-0 runs as ZeRO-1)"
    rows.append(("gradients", st.grads, f"{gb} B/param, {gnote}"))
    master = 4 if (prec != "fp32" or stage >= 1) else 0
    onote = (
        f"{master}+8 B/param"
        + (f", /{world}" if stage >= 1 else ", replicated")
        + (", on CPU" if s.offload_optimizer else "")
    )
    rows.append(("optimizer states", st.optimizer, onote))

    # forward/backward transients
    attention = cfg.model.attention
    act = activation_bytes(
        args,
        seq,
        mb,
        prec,
        s.activation_checkpointing,
        attention=attention,
        dropout=cfg.model.dropout,
        norm=cfg.model.norm,
        sp=sp,
        tp=tp,
    )
    anote = (
        "block inputs + 1 recomputed block"
        if s.activation_checkpointing
        else f"{args.n_layers} blocks"
    )
    if sp > 1:
        anote += f", {seq // sp} tokens/rank (sequence parallel {sp})"
    if tp > 1:
        anote += f", attention/MLP tensors /{tp} (tensor parallel)"
    rows.append(("activations", act, f"mb={mb}, seq={seq}, {anote}"))
    loss = loss_bytes(args, seq // sp, mb, prec, cfg.model.loss)
    rows.append(
        (
            "logits / loss",
            loss,
            "full logits"
            if cfg.model.loss == "eager"
            else f"chunked CE ({LOSS_CHUNK_TOKENS} tokens/chunk)",
        )
    )
    buckets = 0.0
    bnote = ""
    bucket_gb = precision_bytes(prec)[1]
    if stage == 0:
        # plain data parallel: gradients are flattened into all-reduce buffers of at most the model size
        buckets = min(ds.reduce_bucket_size, n) * bucket_gb
        bnote = "all-reduce flatten buffer"
    elif stage <= 2:
        # ZeRO-1/2 allocate the whole bucket (reduce_bucket_size elements) whatever the model size
        reduce = ds.reduce_bucket_size * bucket_gb * (2 if ds.overlap_comm else 1)
        buckets = reduce
        bnote = f"reduce bucket{' x2 (overlap_comm)' if ds.overlap_comm else ''}"
    else:
        largest = max(numels)
        gathered = pb * (largest + min(ds.stage3_prefetch_bucket_size, n))
        reduce_elems = ds.reduce_bucket_size
        if sp > 1:  # megapt.train.parallel.finalize_ds_config: the bucket holds the largest param
            reduce_elems = parallel.sp_zero3_reduce_bucket(reduce_elems, largest)
        buckets = gathered + bucket_gb * largest + bucket_gb * reduce_elems
        bnote = "gathered largest module + prefetch bucket, its full grad, reduce bucket"
    rows.append(("ZeRO buffers (fwd/bwd)", buckets, bnote))
    fwd_bwd = act + loss + buckets

    # optimizer-step transients
    step = 0.0
    if not s.offload_optimizer:
        if stage == 0:
            step = 4 * n if prec != "fp32" else 0.0  # fp32 flat gradient for the master update
        elif stage in (1, 2):
            # fp32 copy of the gradient partition (none when accumulating in fp32) + allgather bucket
            step = (0.0 if fp32_accum else 4 * shard) + pb * min(ds.allgather_bucket_size, n)
        else:
            step = 4 * min(STAGE3_SUB_GROUP_SIZE, shard)
    rows.append(
        (
            "optimizer step (transient)",
            step,
            "fp32 grad partition + allgather bucket"
            if stage in (1, 2)
            else "fp32 gradients for the update",
        )
    )

    alloc = st.total + max(fwd_bwd, step)
    frag = FRAGMENTATION * alloc
    rows.append(("fragmentation margin", frag, f"{FRAGMENTATION:.0%} of the allocator peak"))
    rows.append(("CUDA context + workspaces", OVERHEAD_GIB * GIB, "outside the caching allocator"))
    peak = alloc + frag + OVERHEAD_GIB * GIB
    host = hw.gpus_per_node * (st.host + HOST_PER_RANK_GIB * GIB)
    warnings = []
    if fp32_accum:
        warnings.append(
            "bf16 at ZeRO-0 runs as ZeRO-1 with fp32 gradient accumulation (megapt.train.engine)"
        )
    elif stage >= 1 and world == 1:
        warnings.append(f"ZeRO stage {stage} on one GPU shards nothing (world size 1)")
    if tp > 1:
        warnings.append(
            f"tensor parallel {tp}: the embedding, norms and output head stay whole on "
            "every rank, and the head + loss run on every rank of a group"
        )
    if s.group > hw.gpus_per_node:
        warnings.append(
            f"sequence/tensor parallel group of {s.group} spans nodes: its all-to-alls "
            "/ all-reduces run at inter-node bandwidth"
        )
    return Plan(s, hw, total, rows, peak, host, warnings, rank_params=n)


def max_micro_batch(
    cfg: Config,
    hw: Hardware,
    setting: Setting | None = None,
    args: ModelArgs | None = None,
    limit: int = 4096,
) -> int:
    """Largest micro-batch that fits (0 when not even 1 does)."""
    s = setting or Setting.from_config(cfg)
    args = args if args is not None else model_args(cfg)

    def fits(mb: int) -> bool:
        return plan_memory(cfg, hw, dataclasses.replace(s, micro_batch=mb), args).fits

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


# --------------------------------------------------------------------------------------------
# Checks before launch and the search for the cheapest fitting setting
# --------------------------------------------------------------------------------------------


def data_parallel(cfg: Config, hw: Hardware, setting: Setting | None = None) -> int:
    """Data-parallel replicas: the world over the sequence x tensor-parallel group (at least 1)."""
    s = setting or Setting.from_config(cfg)
    return max(1, hw.world // s.group)


def global_batch(cfg: Config, hw: Hardware) -> int:
    dp = data_parallel(cfg, hw)
    return cfg.plan.global_batch or cfg.train.micro_batch * cfg.train.grad_accum * dp


def check_launch(cfg: Config, hw: Hardware, args: Any = None) -> list[str]:
    """Problems that make a launch on ``hw`` wrong regardless of memory; every one is listed."""
    e: list[str] = []
    if hw.nodes < 1:
        e.append(f"--nodes: must be >= 1, got {hw.nodes}")
    if hw.gpus_per_node < 1:
        e.append(f"--gpus-per-node: must be >= 1, got {hw.gpus_per_node}")
    if e:
        return e
    t, w = cfg.train, data_parallel(cfg, hw)
    layout = parallel.layout_problems(cfg, hw.world)
    e += layout
    dp_note = (
        ""
        if t.sequence_parallel * t.tensor_parallel == 1
        else (
            f" (data-parallel size: world {hw.world} / sequence {t.sequence_parallel} x tensor "
            f"{t.tensor_parallel})"
        )
    )
    gbs = cfg.plan.global_batch
    if gbs and not layout:
        if gbs % w:
            e.append(
                f"plan.global_batch: {gbs} sequences are not divisible by the world size "
                f"{w} ({hw.nodes} node(s) x {hw.gpus_per_node} GPU(s)){dp_note}; pick a "
                "world size dividing it"
            )
        elif (gbs // w) % t.micro_batch:
            e.append(
                f"train.micro_batch: {t.micro_batch} does not divide the per-rank batch "
                f"{gbs // w} (plan.global_batch {gbs} / world size {w}){dp_note}"
            )
        elif t.micro_batch * t.grad_accum * w != gbs:
            need = gbs // (w * t.micro_batch)
            got = t.micro_batch * t.grad_accum * w
            e.append(
                f"train.grad_accum: micro_batch {t.micro_batch} x grad_accum {t.grad_accum} "
                f"x world {w} = {got} != plan.global_batch {gbs}{dp_note}; "
                f"use --train.grad_accum={need}"
            )
    if t.precision == "bf16" and not GPUS[hw.gpu].bf16:
        e.append(f"train.precision: bf16 is not supported on {hw.gpu}; use fp16 or fp32")
    if cfg.deepspeed.offload_params == "cpu" and cfg.deepspeed.zero_stage != 3:
        e.append("deepspeed.offload_params: needs zero_stage 3")
    if args is not None:
        e += check_shape(args, cfg.data.seq_len)
        if not check_shape(args, cfg.data.seq_len):
            e += parallel.head_problems(args, t.sequence_parallel, t.tensor_parallel)
    return e


def speed_cost(s: Setting, base: Setting, nodes: int) -> float:
    c = (
        1.0
        + COST_ZERO[s.zero_stage]
        + (COST_ZERO3_MULTINODE if s.zero_stage == 3 and nodes > 1 else 0.0)
    )
    c += COST_SP * math.log2(s.sequence_parallel) + COST_TP * math.log2(s.tensor_parallel)
    c += COST_CKPT * s.activation_checkpointing
    c += COST_OFFLOAD_OPT * s.offload_optimizer + COST_OFFLOAD_PARAMS * s.offload_params
    if s.micro_batch < base.micro_batch:
        c += COST_HALVE_MICRO_BATCH * math.log2(base.micro_batch / s.micro_batch)
    # tie-breaks: fewer changes from the config as written, then the lower ZeRO stage
    changed = len(s.overrides(base))
    return c + 1e-3 * changed + 1e-4 * s.zero_stage


def parallel_options(cfg: Config, hw: Hardware, args: Any) -> list[tuple[int, int]]:
    """(sequence_parallel, tensor_parallel) pairs to try: the config's own, and one of the two
    over a power-of-two group of GPUs inside a node that the model's heads allow."""
    base = (cfg.train.sequence_parallel, cfg.train.tensor_parallel)
    out = [base]
    n = 2
    while n <= hw.gpus_per_node and hw.world % n == 0:
        for sp, tp in ((n, 1), (1, n)):
            if (
                (sp, tp) != base
                and not parallel.head_problems(args, sp, tp)
                and cfg.data.seq_len % sp == 0
            ):
                out.append((sp, tp))
        n *= 2
    return out


def candidates(cfg: Config, hw: Hardware, args: Any = None) -> Iterable[Setting]:
    base = Setting.from_config(cfg)
    args = args if args is not None else model_args(cfg)
    gbs = global_batch(cfg, hw)
    ds = cfg.deepspeed
    for sp, tp in parallel_options(cfg, hw, args):
        dp = max(1, hw.world // (sp * tp))
        per_rank = gbs // dp if gbs % dp == 0 else 0
        if per_rank:
            micro = [
                m
                for m in range(1, per_rank + 1)
                if per_rank % m == 0 and m <= max(base.micro_batch, 1) * 4
            ]
        else:
            micro = [base.micro_batch]
        for stage in (0, 1, 2, 3):
            for ckpt in (False, True):
                for off_opt, off_par in ((False, False), (True, False), (True, True)):
                    if off_par and stage != 3 or off_opt and stage == 0:
                        continue
                    if parallel_combination_problems(
                        sp,
                        tp,
                        stage,
                        off_opt,
                        off_par,
                        ds.zero_hpz_partition_size,
                        cfg.data.seq_len,
                    ):
                        continue
                    for m in micro:
                        accum = per_rank // m if per_rank else base.grad_accum
                        yield Setting(stage, ckpt, m, accum, off_opt, off_par, sp, tp)


def suggest(
    cfg: Config, hw: Hardware, args: ModelArgs | None = None, top: int = 3
) -> list[tuple[float, Plan]]:
    """The cheapest settings (by expected step time) that fit, cheapest first."""
    args = args if args is not None else model_args(cfg)
    base = Setting.from_config(cfg)
    ranked = sorted(candidates(cfg, hw, args), key=lambda s: speed_cost(s, base, hw.nodes))
    out = []
    for s in ranked:
        p = plan_memory(cfg, hw, s, args)
        if p.fits:
            out.append((speed_cost(s, base, hw.nodes), p))
            if len(out) >= top:
                break
    return out


# --------------------------------------------------------------------------------------------
# Report and CLI
# --------------------------------------------------------------------------------------------


def _gib(b: float) -> str:
    return f"{b / GIB:8.2f}"


def format_plan(cfg: Config, p: Plan, max_mb: int | None = None) -> str:
    hw, s = p.hardware, p.setting
    dp = max(1, hw.world // s.group)
    lines = [
        f"model {cfg.model.preset}: {p.n_params / 1e9:.3f} B parameters; precision {cfg.train.precision}; "
        f"seq {cfg.data.seq_len}",
        f"hardware: {hw.nodes} node(s) x {hw.gpus_per_node} {hw.gpu} ({hw.gpu_mem_gib:.1f} GiB) = world {hw.world}; "
        f"host RAM {hw.cpu_mem_gib:.0f} GiB/node",
        f"setting: ZeRO-{s.zero_stage}, activation checkpointing {'on' if s.activation_checkpointing else 'off'}, "
        f"micro_batch {s.micro_batch} x grad_accum {s.grad_accum} x data-parallel {dp} = "
        f"{s.micro_batch * s.grad_accum * dp} sequences/step, offload optimizer "
        f"{'cpu' if s.offload_optimizer else 'none'}, params {'cpu' if s.offload_params else 'none'}",
        f"parallel: data {dp} x sequence {s.sequence_parallel} x tensor {s.tensor_parallel}"
        + (
            f"; {p.rank_params / 1e9:.3f} B parameters per rank before ZeRO"
            if s.tensor_parallel > 1
            else ""
        ),
        "",
        f"{'component':<28}{'GiB/GPU':>8}  note",
        "-" * 78,
    ]
    for name, b, note in p.rows:
        lines.append(f"{name:<28}{_gib(b)}  {note}")
    lines.append("-" * 78)
    verdict = "fits" if p.fits_gpu else "DOES NOT FIT"
    lines.append(f"{'peak per GPU':<28}{_gib(p.peak)}  of {hw.gpu_mem_gib:.1f} GiB: {verdict}")
    hv = "fits" if p.fits_host else "DOES NOT FIT"
    lines.append(
        f"{'host RAM per node':<28}{_gib(p.host_per_node)}  of {hw.cpu_mem_gib:.0f} GiB: {hv} "
        f"(offloaded states + {HOST_PER_RANK_GIB:.0f} GiB/process)"
    )
    if max_mb is not None:
        lines.append(f"largest micro_batch that fits with this setting: {max_mb}")
    for w in p.warnings:
        lines.append(f"warning: {w}")
    return "\n".join(lines)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=int, default=None, help="nodes (default: plan.nodes)")
    p.add_argument(
        "--gpus-per-node",
        type=int,
        default=None,
        help="GPUs per node (default: plan.gpus_per_node)",
    )
    p.add_argument("--gpu", default=None, help=f"GPU model: {', '.join(GPUS)} (default: plan.gpu)")
    p.add_argument(
        "--gpu-mem-gb", type=float, default=None, help="usable GiB per GPU (default: the GPU's)"
    )
    p.add_argument("--cpu-mem-gb", type=float, default=None, help="host RAM GiB per node")
    p.add_argument(
        "--check-only",
        action="store_true",
        help="only the launch checks (world size vs batch, combos); no memory verdict",
    )


def cli_main(cfg: Config, args: argparse.Namespace) -> int:
    hw = Hardware.from_config(
        cfg,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        gpu=args.gpu,
        gpu_mem_gib=args.gpu_mem_gb,
        cpu_mem_gib=args.cpu_mem_gb,
    )
    margs = model_args(cfg)
    problems = check_launch(cfg, hw, margs)
    if problems:
        raise ConfigError(
            f"plan for {hw.world} rank(s): {len(problems)} problem(s):\n  " + "\n  ".join(problems)
        )
    if args.check_only:
        print(f"megapt plan: launch checks passed for world size {hw.world}")
        return 0
    plan = plan_memory(cfg, hw, args=margs)
    print(format_plan(cfg, plan, max_micro_batch(cfg, hw, args=margs)))
    if plan.fits:
        return 0
    print()
    found = suggest(cfg, hw, margs)
    if not found:
        print(
            f"nothing fits on {hw.world} x {hw.gpu}: no ZeRO stage / checkpointing / micro-batch / offload "
            "combination brings the peak under the GPU memory; add nodes or use bigger GPUs"
        )
        return 1
    print("cheapest settings that fit (expected step time relative to the config as written):")
    for cost, p in found:
        ov = " ".join(p.setting.overrides(plan.setting)) or "(as written)"
        print(f"  x{cost:.2f}  peak {p.peak / GIB:.1f} GiB  {ov}")
    return 1
