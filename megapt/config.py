"""One dataclass tree for the whole run.

YAML files in configs/ fill it (several files merge left to right, ``base:`` includes another
file), then ``--section.key=value`` overrides from the command line. Unknown keys, values of the
wrong type and values out of range (``RANGES``: every numeric key has one) are one error that
lists every offender at once. Components that need one section get only that one (the
tokenizer trainer ``cfg.tokenizer``, ``ModelArgs.from_config(cfg.model, ...)``, the cleaner
``cfg.data.clean``); the run-level entry points (trainer, engine, fine-tuning, evaluation, the
benchmark) take the whole tree, since their settings span sections (``train.*`` with
``deepspeed.*``, ``finetune.*`` with ``train.*``...).

    cfg = load_config(["configs/tiny.yaml"], ["--train.lr=3e-4", "--deepspeed.zero_stage=2"])
    save_config(cfg, run_dir / "config.yaml")
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from megapt.errors import EXIT_USAGE, UserError
from megapt.urls import location, location_problem


class ConfigError(UserError, ValueError):
    """A config problem; the message lists every offending key/file (exit 2)."""

    exit_code = EXIT_USAGE
    kind = "config error"


def _f(default: Any = dataclasses.MISSING, help: str = "", **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        kw["default_factory"] = lambda d=default: type(d)(d)
        return field(metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class RunConfig:
    name: str = _f("tiny", "run name; the run directory is <out_dir>/<name>")
    out_dir: str = _f("runs", "root folder for run directories")
    seed: int = _f(1234, "global seed (model init, data shuffle, dropout)")
    work_dir: str = _f(".megapt_cache", "where cleaned text, tokenizer and shards go by default")


@dataclass
class SourceConfig:
    path: str = _f("", "file, directory, glob, or 'stdlib' for the built-in corpus")
    format: Literal["auto", "text", "jsonl", "parquet", "hf", "python"] = _f(
        "auto", "input format; auto guesses from the extension"
    )
    text_field: str = _f("text", "field holding the text in jsonl/parquet/HF datasets")
    weight: float = _f(1.0, "mixing weight of this source")
    split: str = _f("train", "split name for HF datasets saved to disk")


@dataclass
class CleanConfig:
    nfkc: bool = _f(True, "Unicode NFKC normalisation")
    strip_control: bool = _f(True, "drop control characters (keeps \\n and \\t)")
    normalize_whitespace: bool = _f(True, "strip trailing spaces, collapse >2 blank lines")
    min_chars: int = _f(64, "drop documents shorter than this (after cleaning)")
    max_chars: int = _f(1_000_000, "drop documents longer than this")
    max_non_alnum_frac: float = _f(
        0.6, "drop docs whose non-alphanumeric, non-space share exceeds this"
    )
    min_alpha_frac: float = _f(0.2, "drop docs with fewer letters than this fraction")
    dedup: bool = _f(True, "drop exact duplicates (hash of the cleaned text)")


@dataclass
class TokenizerConfig:
    path: str = _f("", "sentencepiece .model file; empty: <work_dir>/tokenizer/spm.model")
    model_type: Literal["bpe", "unigram"] = _f("bpe", "sentencepiece algorithm")
    vocab_size: int = _f(4096, "vocabulary size")
    byte_fallback: bool = _f(True, "unknown characters fall back to bytes (no <unk> in practice)")
    special_tokens: list[str] = _f(["<|endoftext|>", "<|pad|>"], "user-defined special tokens")
    eos_token: str = _f("<|endoftext|>", "document separator; must be a special token")
    pad_token: str = _f("<|pad|>", "padding token; must be a special token")
    input_sentence_size: int = _f(
        500_000, "max text pieces (<= max_sentence_length/4 chars) sampled for training"
    )
    max_sentence_length: int = _f(
        8192, "bytes; documents are cut at line ends into pieces of <= this/4 chars"
    )
    character_coverage: float = _f(0.9995, "sentencepiece character coverage")
    num_threads: int = _f(0, "trainer threads; 0 = all cores")


@dataclass
class RemoteConfig:
    """Shard sets at a URL (megapt.data.remote): the local cache, prefetch, retries, endpoint."""

    cache_dir: str = _f(
        "",
        "local folder for downloaded shards (node-local disk is best); empty: "
        "<tmp>/megapt-shard-cache-<user>",
    )
    cache_gb: float = _f(
        20.0,
        "size cap of the shard cache in GB; least recently used shards not needed soon are evicted",
    )
    prefetch: int = _f(
        0,
        "shards fetched ahead of the reader in the background; 0 = auto (the "
        "shards one shuffle window spans + 2)",
    )
    retries: int = _f(
        5, "retries of a failed download/upload (transient errors) before the error naming the URL"
    )
    retry_wait_s: float = _f(1.0, "wait before the first retry; doubles each retry (max 60 s)")
    timeout_s: float = _f(60.0, "connect / read timeout of one request")
    s3_endpoint_url: str = _f(
        "",
        "S3-compatible endpoint (MinIO, Ceph); empty: "
        "AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, else AWS",
    )


@dataclass
class DataConfig:
    sources: list[SourceConfig] = _f([], "input sources; empty = the built-in stdlib corpus")
    clean: CleanConfig = _f(default_factory=CleanConfig, help="cleaning rules")
    shard_dir: str = _f(
        "", "shard folder or URL (s3://, gs://, https://); empty: <work_dir>/shards/<seq_len>"
    )
    seq_len: int = _f(256, "tokens per training sample (the sample stores seq_len + 1)")
    shard_samples: int = _f(2048, "samples per shard .tar")
    val_fraction: float = _f(0.02, "fraction of documents (by hash) held out for validation")
    num_proc: int = _f(0, "tokenizer processes; 0 = all cores")
    num_shards: int = _f(1, "split the input into this many ranges (Slurm array / many nodes)")
    shard_index: int = _f(0, "which input range this job tokenizes")
    loader_workers: int = _f(0, "DataLoader workers per rank")
    shuffle: bool = _f(True, "shuffle shard order and samples (seeded)")
    shuffle_buffer: int = _f(
        16384,
        "window shuffle size (samples); spans many shards, so early batches are not one region of the corpus",
    )
    verify_checksums: bool = _f(True, "sha256 each shard before reading it")
    bad_shard_policy: Literal["raise", "skip"] = _f(
        "raise", "corrupt shard: stop, or skip and count"
    )
    max_bad_fraction: float = _f(0.05, "with policy skip: stop once this fraction of shards is bad")
    mix: list[dict] = _f(
        [], "weighted shard sets: [{path: dir or URL, weight: w}]; empty = shard_dir"
    )
    remote: RemoteConfig = _f(
        default_factory=RemoteConfig, help="shard sets at a URL: cache, prefetch, retries, endpoint"
    )


@dataclass
class ModelConfig:
    preset: str = _f("tiny", "named size: tiny, 124m, 350m, 1b, 3b, 7b, 13b, 70b")
    n_layers: int | None = _f(None, "override the preset's layer count")
    d_model: int | None = _f(None, "override hidden size")
    n_heads: int | None = _f(None, "override attention heads")
    n_kv_heads: int | None = _f(None, "override key/value heads (GQA)")
    ffn_hidden: int | None = _f(None, "override SwiGLU hidden size")
    vocab_size: int | None = _f(None, "override vocab size (default: the tokenizer's)")
    max_seq_len: int | None = _f(None, "override max sequence length (default: data.seq_len)")
    rope_theta: float | None = _f(None, "override RoPE base")
    norm_eps: float | None = _f(None, "override RMSNorm epsilon")
    tie_embeddings: bool | None = _f(None, "share input embedding and output head")
    init_std: float | None = _f(
        None, "override init std (residual projections scaled by 1/sqrt(2L))"
    )
    dropout: float = _f(0.0, "dropout on attention output and MLP output")
    attention: Literal["auto", "triton", "cuda", "sdpa", "eager"] = _f("auto", "attention backend")
    norm: Literal["auto", "triton", "cuda", "eager"] = _f("auto", "RMSNorm backend")
    rope: Literal["auto", "triton", "eager"] = _f("auto", "RoPE backend")
    loss: Literal["auto", "triton", "chunked", "eager"] = _f("auto", "cross-entropy backend")
    doc_mask: bool = _f(False, "block attention across document boundaries (EOS)")


@dataclass
class TrainConfig:
    device: Literal["auto", "cpu", "cuda"] = _f("auto", "auto: cuda when available")
    precision: Literal["fp32", "bf16", "fp16"] = _f("fp32", "training precision")
    micro_batch: int = _f(8, "sequences per rank per micro-step")
    grad_accum: int = _f(1, "micro-steps per optimizer step")
    max_steps: int = _f(300, "optimizer steps")
    lr: float = _f(3e-3, "peak learning rate")
    min_lr: float = _f(3e-4, "final learning rate (cosine/linear)")
    warmup_steps: int = _f(30, "linear warmup steps")
    schedule: Literal["cosine", "linear", "constant"] = _f("cosine", "decay after warmup")
    weight_decay: float = _f(0.1, "AdamW weight decay (not on norms, biases, embeddings)")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.95, "AdamW beta2")
    eps: float = _f(1e-8, "AdamW epsilon")
    grad_clip: float = _f(1.0, "clip global grad norm; 0 = off")
    activation_checkpointing: bool = _f(False, "recompute block activations in backward")
    compile: bool = _f(False, "torch.compile the model")
    eval_every: int = _f(100, "validate every N steps; 0 = only at the end")
    eval_batches: int = _f(20, "validation batches per evaluation")
    log_every: int = _f(10, "log/TensorBoard every N steps")
    max_bad_steps: int = _f(5, "stop after this many NaN/inf steps in a row")
    sample_tokens: int = _f(64, "tokens of text generated at the end of training; 0 = none")
    sample_prompt: str = _f("def ", "prompt for the end-of-training sample")
    collective_timeout_s: int = _f(600, "fail (naming the op) when a collective stalls this long")
    stop_after: int = _f(
        0,
        "end this invocation after this optimizer step (checkpoint saved, schedule "
        "unchanged) to continue later with --resume; 0 = run to max_steps",
    )
    sequence_parallel: int = _f(
        1,
        "Ulysses sequence parallelism: split every sequence over this "
        "many consecutive ranks (DeepSpeed all-to-all around "
        "attention); 1 = off",
    )
    tensor_parallel: int = _f(
        1,
        "tensor parallelism (DeepSpeed AutoTP training): shard the "
        "attention and MLP weights over this many consecutive ranks; "
        "1 = off",
    )


@dataclass
class DeepSpeedConfig:
    zero_stage: int = _f(0, "ZeRO stage 0, 1, 2 or 3")
    offload_optimizer: Literal["none", "cpu"] = _f("none", "optimizer state offload")
    offload_params: Literal["none", "cpu"] = _f("none", "parameter offload (ZeRO-3)")
    overlap_comm: bool = _f(True, "overlap gradient reduction with backward")
    contiguous_gradients: bool = _f(True, "ZeRO contiguous gradient buffer")
    reduce_bucket_size: int = _f(50_000_000, "elements per reduce bucket")
    allgather_bucket_size: int = _f(50_000_000, "elements per allgather bucket (ZeRO 1/2)")
    stage3_prefetch_bucket_size: int = _f(50_000_000, "ZeRO-3 prefetch elements")
    stage3_param_persistence_threshold: int = _f(
        100_000, "ZeRO-3 params smaller than this stay whole"
    )
    config_file: str = _f("", "user ds_config JSON; validated against this config")
    zero_hpz_partition_size: int = _f(
        1,
        "ZeRO++ hpZ (ZeRO-3 only): a secondary copy of the "
        "parameters partitioned within groups of this many "
        "ranks (GPUs per node), so forward/backward "
        "all-gathers stay inside a node; 1 = off",
    )


@dataclass
class CheckpointConfig:
    dir: str = _f("", "checkpoint folder; empty: <run_dir>/checkpoints")
    every: int = _f(100, "save every N steps; 0 = only at the end")
    keep_last: int = _f(3, "keep this many newest checkpoints")
    resume: bool = _f(False, "continue from the newest valid checkpoint")
    load: str = _f("", "start from this checkpoint (weights + state) instead of the latest")
    universal: bool = _f(
        False,
        "load at any world size / ZeRO stage 0-3 (ZeRO 1-3: after megapt ckpt "
        "universal; ZeRO-0: as is)",
    )


@dataclass
class LoggingConfig:
    tensorboard: bool = _f(True, "write TensorBoard events to <run_dir>/tb")
    all_ranks: bool = _f(False, "print from every rank, not only rank 0")
    progress: bool = _f(True, "tqdm progress bar on a terminal")


@dataclass
class FinetuneConfig:
    task: Literal["none", "lm", "classify", "regress", "sft"] = _f("none", "fine-tuning task")
    init_from: str = _f("", "megapt checkpoint dir or Hugging Face model dir to start from")
    train_file: str = _f("", "jsonl/csv/HF dataset dir with training rows")
    val_file: str = _f("", "validation rows; empty: split from train_file")
    test_file: str = _f("", "test rows")
    text_field: str = _f("text", "text column (classification)")
    label_field: str = _f("label", "label column (classification/regression)")
    prompt_field: str = _f("prompt", "prompt column (SFT)")
    response_field: str = _f("response", "response column (SFT)")
    num_classes: int = _f(0, "classes; 0 = inferred from the training labels")
    pooling: Literal["last", "mean"] = _f("last", "sequence pooling for the head")
    head_dropout: float = _f(0.1, "dropout before the head")
    freeze_embeddings: bool = _f(False, "freeze token embeddings")
    freeze_layers: int = _f(0, "freeze the first k blocks")
    freeze_pattern: str = _f("", "regex of parameter names to freeze")
    train_head_only: bool = _f(False, "train only the new head")
    layer_lr_decay: float = _f(1.0, "layer-wise LR decay (1.0 = off)")
    head_lr_mult: float = _f(1.0, "LR multiplier for the new head")
    early_stopping_patience: int = _f(0, "stop after N evals without improvement; 0 = off")
    lora_rank: int = _f(0, "LoRA rank; 0 = off")
    lora_alpha: float = _f(16.0, "LoRA alpha")
    lora_targets: list[str] = _f(["wq", "wk", "wv", "wo"], "module names that get LoRA adapters")
    distill_from: str = _f("", "teacher checkpoint for KL distillation")
    distill_alpha: float = _f(0.5, "weight of the KL term")
    distill_temperature: float = _f(2.0, "distillation temperature")
    train_top_layers: int = _f(0, "train only the head, final norm and the top N blocks; 0 = off")
    lr: float = _f(3e-4, "peak fine-tuning learning rate (head gets head_lr_mult x)")
    weight_decay: float = _f(0.01, "AdamW weight decay (not on norms, biases, embeddings)")
    warmup_frac: float = _f(0.06, "fraction of steps with linear warmup, then linear decay to 0")
    epochs: int = _f(3, "passes over the training rows")
    max_steps: int = _f(0, "stop after this many optimizer steps; 0 = epochs decide")
    batch_size: int = _f(16, "rows per optimizer step")
    max_len: int = _f(0, "truncate rows to this many tokens; 0 = data.seq_len")
    eval_every: int = _f(0, "validate every N steps; 0 = once per epoch")
    val_fraction: float = _f(0.1, "share of train_file held out when val_file is empty")
    lora_dropout: float = _f(0.0, "dropout on the LoRA input")
    merge_lora: bool = _f(True, "fold LoRA adapters into the weights when saving the best model")
    out_dir: str = _f("", "where the best model goes; empty: <run_dir>/finetune")


@dataclass
class PlanConfig:
    nodes: int = _f(
        1, "intended node count (`megapt plan` and launch pre-flight; CLI --nodes wins)"
    )
    gpus_per_node: int = _f(8, "intended GPUs per node (CLI --gpus-per-node wins)")
    gpu: str = _f(
        "h100", "GPU model for the memory plan: a key of megapt.hardware.GPUS (megapt plan --help)"
    )
    gpu_mem_gb: float = _f(0.0, "usable GPU memory in GiB; 0 = the GPU model's capacity")
    cpu_mem_gb: float = _f(
        0.0, "host RAM per node in GiB (offload check); 0 = typical for the GPU model"
    )
    global_batch: int = _f(
        0,
        "sequences per optimizer step; 0 = not fixed. When set, it must equal "
        "micro_batch * grad_accum * world_size (checked before launch)",
    )


@dataclass
class Config:
    run: RunConfig = _f(default_factory=RunConfig, help="run identity and folders")
    data: DataConfig = _f(default_factory=DataConfig, help="data path")
    tokenizer: TokenizerConfig = _f(default_factory=TokenizerConfig, help="sentencepiece tokenizer")
    model: ModelConfig = _f(default_factory=ModelConfig, help="model shape and kernel backends")
    train: TrainConfig = _f(default_factory=TrainConfig, help="optimisation")
    deepspeed: DeepSpeedConfig = _f(default_factory=DeepSpeedConfig, help="DeepSpeed engine")
    checkpoint: CheckpointConfig = _f(default_factory=CheckpointConfig, help="checkpoints")
    logging: LoggingConfig = _f(default_factory=LoggingConfig, help="logs and TensorBoard")
    finetune: FinetuneConfig = _f(default_factory=FinetuneConfig, help="fine-tuning")
    plan: PlanConfig = _f(default_factory=PlanConfig, help="intended hardware for `megapt plan`")

    # ---- derived paths (not config keys) ----
    @property
    def run_dir(self) -> Path:
        return Path(self.run.out_dir) / self.run.name

    @property
    def tokenizer_path(self) -> Path:
        return (
            Path(self.tokenizer.path)
            if self.tokenizer.path
            else Path(self.run.work_dir) / "tokenizer" / "spm.model"
        )

    @property
    def shard_dir(self) -> Path | str:
        """A local folder (Path) or a URL (str, megapt.urls.location)."""
        if self.data.shard_dir:
            return location(self.data.shard_dir)
        return Path(self.run.work_dir) / "shards" / f"seq{self.data.seq_len}"

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else self.run_dir / "checkpoints"


# --------------------------------------------------------------------------------------------
# Validation: build dataclasses from plain dicts, collecting every problem
# --------------------------------------------------------------------------------------------

_HINTS: dict[type, dict[str, Any]] = {}
# Optional[X] / Union[X, Y] and X | None / X | Y: typing.Union and types.UnionType until Python 3.14
_UNIONS = (Union, types.UnionType)


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in _UNIONS:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: str, errors: list[str]) -> Any:
    """Check/convert ``value`` to ``tp``; append a message to ``errors`` on mismatch."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            errors.append(
                f"{where}: expected a mapping (section {tp.__name__}), got {type(value).__name__} {value!r}"
            )
            return tp()
        return _build(tp, value, where, errors)
    if origin in _UNIONS:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        sub: list[str] = []
        out = _convert(value, inner[0], where, sub)
        if sub:
            errors.append(
                f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}"
            )
        return out
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            errors.append(f"{where}: expected {_type_name(tp)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            errors.append(f"{where}: expected a list, got {type(value).__name__} {value!r}")
            return []
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, f"{where}[{i}]", errors) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            errors.append(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
            return {}
        return value
    if tp is bool:
        if not isinstance(value, bool):
            errors.append(
                f"{where}: expected bool (true/false), got {type(value).__name__} {value!r}"
            )
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            errors.append(f"{where}: expected int, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `3e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.append(f"{where}: expected float, got {type(value).__name__} {value!r}")
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            errors.append(f"{where}: expected str, got {type(value).__name__} {value!r}")
        return value
    return value


def _build(cls: type, data: dict, where: str, errors: list[str]) -> Any:
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            close = [n for n in names if n.startswith(str(key)[:3])]
            hint = f" (did you mean {', '.join(sorted(close))}?)" if close else ""
            errors.append(f"{path}: unknown key{hint}")
            continue
        kwargs[key] = _convert(value, hints[key], path, errors)
    return cls(**kwargs)


# The allowed values of every numeric key ("section.key"; list items such as data.sources[i].weight
# are listed without the index). Optional keys left unset (None) are not checked. A test checks
# that every int/float key of the tree is listed here.
RANGES: dict[str, str] = {
    "run.seed": ">= 0",
    "data.sources.weight": "> 0",
    "data.clean.min_chars": ">= 0",
    "data.clean.max_chars": ">= 1",
    "data.clean.max_non_alnum_frac": "[0, 1]",
    "data.clean.min_alpha_frac": "[0, 1]",
    "data.seq_len": ">= 2",
    "data.shard_samples": ">= 1",
    "data.val_fraction": "[0, 1)",
    "data.num_proc": ">= 0",
    "data.num_shards": ">= 1",
    "data.shard_index": ">= 0",
    "data.loader_workers": ">= 0",
    "data.shuffle_buffer": ">= 0",
    "data.max_bad_fraction": "[0, 1]",
    "data.remote.cache_gb": "> 0",
    "data.remote.prefetch": ">= 0",
    "data.remote.retries": ">= 0",
    "data.remote.retry_wait_s": ">= 0",
    "data.remote.timeout_s": "> 0",
    "tokenizer.vocab_size": ">= 64",
    "tokenizer.input_sentence_size": ">= 0",
    "tokenizer.max_sentence_length": ">= 64",
    "tokenizer.character_coverage": "(0, 1]",
    "tokenizer.num_threads": ">= 0",
    "model.n_layers": ">= 1",
    "model.d_model": ">= 1",
    "model.n_heads": ">= 1",
    "model.n_kv_heads": ">= 1",
    "model.ffn_hidden": ">= 1",
    "model.vocab_size": ">= 1",
    "model.max_seq_len": ">= 1",
    "model.rope_theta": "> 0",
    "model.norm_eps": "> 0",
    "model.init_std": "> 0",
    "model.dropout": "[0, 1)",
    "train.micro_batch": ">= 1",
    "train.grad_accum": ">= 1",
    "train.max_steps": ">= 1",
    "train.lr": "> 0",
    "train.min_lr": ">= 0",
    "train.warmup_steps": ">= 0",
    "train.weight_decay": ">= 0",
    "train.beta1": "[0, 1)",
    "train.beta2": "[0, 1)",
    "train.eps": "> 0",
    "train.grad_clip": ">= 0",
    "train.eval_every": ">= 0",
    "train.eval_batches": ">= 1",
    "train.log_every": ">= 1",
    "train.max_bad_steps": ">= 1",
    "train.sample_tokens": ">= 0",
    "train.collective_timeout_s": ">= 1",
    "train.stop_after": ">= 0",
    "train.sequence_parallel": ">= 1",
    "train.tensor_parallel": ">= 1",
    "deepspeed.zero_stage": "[0, 3]",
    "deepspeed.reduce_bucket_size": ">= 1",
    "deepspeed.allgather_bucket_size": ">= 1",
    "deepspeed.stage3_prefetch_bucket_size": ">= 0",
    "deepspeed.stage3_param_persistence_threshold": ">= 0",
    "deepspeed.zero_hpz_partition_size": ">= 1",
    "checkpoint.every": ">= 0",
    "checkpoint.keep_last": ">= 1",
    "finetune.num_classes": ">= 0",
    "finetune.head_dropout": "[0, 1)",
    "finetune.freeze_layers": ">= 0",
    "finetune.layer_lr_decay": "(0, 1]",
    "finetune.head_lr_mult": "> 0",
    "finetune.early_stopping_patience": ">= 0",
    "finetune.lora_rank": ">= 0",
    "finetune.lora_alpha": "> 0",
    "finetune.distill_alpha": "[0, 1]",
    "finetune.distill_temperature": "> 0",
    "finetune.train_top_layers": ">= 0",
    "finetune.lr": "> 0",
    "finetune.weight_decay": ">= 0",
    "finetune.warmup_frac": "[0, 1)",
    "finetune.epochs": ">= 1",
    "finetune.max_steps": ">= 0",
    "finetune.batch_size": ">= 1",
    "finetune.max_len": ">= 0",
    "finetune.eval_every": ">= 0",
    "finetune.val_fraction": "[0, 1)",
    "finetune.lora_dropout": "[0, 1)",
    "plan.nodes": ">= 1",
    "plan.gpus_per_node": ">= 1",
    "plan.gpu_mem_gb": ">= 0",
    "plan.cpu_mem_gb": ">= 0",
    "plan.global_batch": ">= 0",
}


def in_range(value: float, spec: str) -> bool:
    """``value`` satisfies a RANGES spec: ``>= a``, ``> a`` or an interval ``[a, b)`` etc."""
    if spec[0] in "<>":
        op, bound = spec.split()
        b = float(bound)
        return {">=": value >= b, ">": value > b, "<=": value <= b, "<": value < b}[op]
    lo, hi = (float(x) for x in spec[1:-1].split(","))
    above = value >= lo if spec[0] == "[" else value > lo
    return above and (value <= hi if spec[-1] == "]" else value < hi)


def _range_errors(obj: Any, prefix: str, skip: set[str], e: list[str]) -> None:
    """Append ``key: must be <range>, got v`` for every numeric field of ``obj`` out of RANGES."""
    for f in dataclasses.fields(obj):
        value, path = getattr(obj, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _range_errors(value, path + ".", skip, e)
            continue
        if isinstance(value, list) and value and all(dataclasses.is_dataclass(v) for v in value):
            for i, v in enumerate(value):
                _range_errors(v, f"{path}[{i}].", skip, e)
            continue
        key = re.sub(r"\[\d+\]", "", path)
        spec = RANGES.get(key)
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if spec is None or path in skip or not numeric:
            continue
        if not in_range(value, spec):
            e.append(f"{path}: must be {'in ' if spec[0] in '[(' else ''}{spec}, got {value}")


def _check_values(cfg: Config, skip: set[str] = frozenset()) -> list[str]:
    """Range checks (RANGES) and cross-field checks; every problem is reported. Keys in ``skip``
    (they already failed the type check) are left out."""
    e: list[str] = []
    _range_errors(cfg, "", set(skip), e)

    def ok(*keys: str, ranged: bool = True) -> bool:  # these keys hold values of the right type
        return not any(k in skip or ranged and any(x.startswith(k + ":") for x in e) for k in keys)

    d, t, m, ds, tok = cfg.data, cfg.train, cfg.model, cfg.deepspeed, cfg.tokenizer
    if ok("data.num_shards", "data.shard_index") and d.shard_index >= d.num_shards:
        e.append(
            f"data.shard_index/num_shards: need 0 <= shard_index < num_shards, got "
            f"{d.shard_index}/{d.num_shards}"
        )
    c = d.clean
    if ok("data.clean.min_chars", "data.clean.max_chars") and c.max_chars < c.min_chars:
        e.append(
            f"data.clean.max_chars: must be >= data.clean.min_chars={c.min_chars}, "
            f"got {c.max_chars}"
        )
    for i, s in enumerate(d.sources):
        if ok(f"data.sources[{i}].path") and not s.path:
            e.append(f"data.sources[{i}].path: empty")
    for i, mx in enumerate(d.mix):
        if not ok(f"data.mix[{i}]", "data.mix"):
            continue
        bad = set(mx) - {"path", "weight"}
        if bad or "path" not in mx:
            e.append(f"data.mix[{i}]: needs keys path (and optional weight), got {sorted(mx)}")
        elif not isinstance(mx.get("weight", 1.0), (int, float)) or mx.get("weight", 1.0) <= 0:
            e.append(f"data.mix[{i}].weight: must be a positive number, got {mx.get('weight')!r}")
        elif not isinstance(mx["path"], str):
            e.append(f"data.mix[{i}].path: expected a folder or URL string, got {mx['path']!r}")
        elif location_problem(mx["path"]):
            e.append(f"data.mix[{i}].path: {location_problem(mx['path'])}")
    if ok("data.shard_dir", ranged=False) and location_problem(d.shard_dir):
        e.append(f"data.shard_dir: {location_problem(d.shard_dir)}")
    cache = d.remote.cache_dir
    if (
        ok("data.remote.cache_dir", ranged=False)
        and cache
        and (location_problem(cache) or isinstance(location(cache), str))
    ):
        e.append(f"data.remote.cache_dir: must be a local folder, got {cache!r}")
    for name in ("eos_token", "pad_token"):
        if (
            ok(f"tokenizer.{name}", "tokenizer.special_tokens")
            and getattr(tok, name) not in tok.special_tokens
        ):
            e.append(f"tokenizer.{name}: {getattr(tok, name)!r} is not in tokenizer.special_tokens")
    if ok("train.lr", "train.min_lr") and t.min_lr > t.lr:
        e.append(f"train.min_lr: must be in [0, lr={t.lr}], got {t.min_lr}")
    stage_typed = ok("deepspeed.zero_stage", ranged=False)
    if (
        stage_typed
        and ok("deepspeed.offload_params")
        and ds.offload_params != "none"
        and ds.zero_stage != 3
    ):
        e.append(
            f"deepspeed.offload_params: parameter offload needs zero_stage 3, "
            f"got stage {ds.zero_stage}"
        )
    if (
        stage_typed
        and ok("deepspeed.offload_optimizer")
        and ds.offload_optimizer != "none"
        and ds.zero_stage == 0
    ):
        e.append("deepspeed.offload_optimizer: optimizer offload needs zero_stage >= 1")
    if ok(
        "train.sequence_parallel",
        "train.tensor_parallel",
        "deepspeed.zero_hpz_partition_size",
        "deepspeed.zero_stage",
        "data.seq_len",
        "deepspeed.offload_optimizer",
        "deepspeed.offload_params",
    ):
        e += _parallel_problems(cfg)
    heads = ok("model.n_heads", "model.n_kv_heads") and None not in (m.n_heads, m.n_kv_heads)
    if heads and m.n_heads % m.n_kv_heads:
        e.append(f"model.n_kv_heads: {m.n_kv_heads} must divide n_heads {m.n_heads}")
    return e


def _parallel_problems(cfg: Config) -> list[str]:
    t, ds = cfg.train, cfg.deepspeed
    return parallel_combination_problems(
        t.sequence_parallel,
        t.tensor_parallel,
        ds.zero_stage,
        ds.offload_optimizer != "none",
        ds.offload_params != "none",
        ds.zero_hpz_partition_size,
        cfg.data.seq_len,
    )


def parallel_combination_problems(
    sp: int,
    tp: int,
    zero_stage: int,
    offload_optimizer: bool,
    offload_params: bool,
    hpz: int,
    seq_len: int,
) -> list[str]:
    """Sequence/tensor parallelism and hpZ combinations that cannot run, each naming the keys
    (the config check and the planner's search both use it; world size and head counts are
    checked at start-up and by the planner: megapt.train.parallel)."""
    e: list[str] = []
    for key, v in (
        ("train.sequence_parallel", sp),
        ("train.tensor_parallel", tp),
        ("deepspeed.zero_hpz_partition_size", hpz),
    ):
        if v < 1:
            e.append(f"{key}: must be >= 1, got {v}")
    if e:
        return e
    if sp > 1 and tp > 1:
        e.append(
            f"train.sequence_parallel={sp} with train.tensor_parallel={tp}: not supported "
            "together (DeepSpeed's Ulysses and AutoTP each install their own process-group "
            "layout); use one"
        )
    if sp > 1 and seq_len % sp:
        e.append(f"train.sequence_parallel: {sp} must divide data.seq_len {seq_len}")
    if tp > 1 and zero_stage == 0:
        e.append(
            f"train.tensor_parallel={tp} with deepspeed.zero_stage=0: not supported (stage 0 "
            "clips and reports the grad norm over this rank's shards only); use zero_stage "
            "1, 2 or 3 (stage 1 costs no more communication)"
        )
    if (sp > 1 or tp > 1) and (offload_optimizer or offload_params):
        which = "train.sequence_parallel" if sp > 1 else "train.tensor_parallel"
        e.append(
            f"{which} with deepspeed.offload_optimizer/offload_params: not supported "
            "(untested combination); offload without sequence/tensor parallelism"
        )
    if hpz > 1:
        if zero_stage != 3:
            e.append(
                f"deepspeed.zero_hpz_partition_size={hpz}: hpZ partitions ZeRO-3 parameters; "
                f"needs zero_stage 3, got {zero_stage}"
            )
        if sp > 1 or tp > 1:
            e.append(
                f"deepspeed.zero_hpz_partition_size={hpz} with sequence/tensor parallelism: "
                "not supported (hpZ groups assume plain data parallelism)"
            )
        if offload_params:
            e.append(
                f"deepspeed.zero_hpz_partition_size={hpz} with offload_params: not supported "
                "(hpZ keeps its secondary partition on the GPU)"
            )
    return e


def config_from_dict(data: dict, source: str = "config") -> Config:
    errors: list[str] = []
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: top level must be a mapping of sections, got {type(data).__name__}"
        )
    cfg = _build(Config, data, "", errors)
    # the keys that failed the type checks are left out of the value checks; the rest are checked
    # too, so one run lists every kind of problem at once
    errors += _check_values(cfg, {err.split(": ", 1)[0] for err in errors})
    if errors:
        raise ConfigError(f"{source}: {len(errors)} problem(s):\n  " + "\n  ".join(errors))
    return cfg


# --------------------------------------------------------------------------------------------
# YAML files and command-line overrides
# --------------------------------------------------------------------------------------------


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | os.PathLike, _seen: tuple = ()) -> dict:
    """Read a YAML config (safe_load), following ``base: other.yaml`` (relative to the file)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: 'base' include cycle: {' -> '.join(str(p) for p in _seen)}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: top level must be a mapping of sections, got {type(data).__name__}"
        )
    base = data.pop("base", None)
    if base:
        parent = read_yaml(path.parent / base, _seen + (path.resolve(),))
        data = _deep_merge(parent, data)
    return data


def parse_overrides(overrides: list[str]) -> dict:
    """``--train.lr=3e-4`` / ``train.lr=3e-4`` -> nested dict, values parsed as YAML scalars."""
    out: dict = {}
    errors = []
    for item in overrides:
        raw = item[2:] if item.startswith("--") else item
        if "=" not in raw:
            errors.append(f"{item}: expected --section.key=value")
            continue
        key, value = raw.split("=", 1)
        parts = key.split(".")
        if len(parts) < 2 or not all(parts):
            errors.append(f"{item}: expected --section.key=value")
            continue
        try:
            parsed = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            parsed = value
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                errors.append(f"{item}: {p} is set both as a value and as a section")
                break
        else:
            node[parts[-1]] = parsed
    if errors:
        raise ConfigError("command-line overrides: " + "; ".join(errors))
    return out


def load_config(paths: list[str] | None = None, overrides: list[str] | None = None) -> Config:
    data: dict = {}
    names = []
    for p in paths or []:
        data = _deep_merge(data, read_yaml(p))
        names.append(str(p))
    if overrides:
        data = _deep_merge(data, parse_overrides(overrides))
        names.append("overrides")
    return config_from_dict(data, " + ".join(names) or "defaults")


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config (atomically) so a run can be rebuilt from its outputs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
    os.replace(tmp, path)


def describe(cls: type = Config, prefix: str = "") -> list[str]:
    """One line per key with its default and help (``megapt config --describe``)."""
    lines = []
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            lines.append(f"[{key}] {f.metadata.get('help', '')}")
            lines += describe(tp, key + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        spec = RANGES.get(re.sub(r"\[\d+\]", "", key))
        kind = _type_name(tp) + (f", {spec}" if spec else "")
        lines.append(f"  {key} = {default!r}  ({kind}) {f.metadata.get('help', '')}")
    return lines
