"""Training-throughput runners for one benchmark point: DeepSpeed engine, plain PyTorch, HF Llama.

All three train the same shapes on the same batches (B = micro_batch, T = seq_len) for
``warmup`` + ``steps`` optimizer steps of ``grad_accum`` micro-steps each, and time every
measured step with a wall clock split into phases:

    data_wait  next(batches) (+ host-to-device copy with the real loader)
    forward    model(input_ids, labels) -> loss
    backward   engine.backward(loss) / loss.backward()  (includes DeepSpeed's gradient reduction)
    optimizer  engine.step() / clip + AdamW.step() + zero_grad()

On CUDA each phase ends with ``torch.cuda.synchronize()`` so the split is honest (costs a few
microseconds per phase). Communication inside backward is reported separately (``comm_s``) with
comm timers on: the time inside DeepSpeed's ``engine.allreduce_gradients``; otherwise null, said so.

Runners:
    engine  megapt.train.engine.create_engine around megapt's GPT (ZeRO stage, precision as configured)
    plain   the same GPT, no DeepSpeed: torch.optim.AdamW, torch.autocast for bf16/fp16
    hf      transformers LlamaForCausalLM with the same shapes, attn_implementation="sdpa",
            config built locally (no download), torch.optim.AdamW, torch.autocast
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from megapt.hardware import select_peak
from megapt.model.gpt import ModelArgs
from megapt.planner import model_args
from megapt.train.optim import ScheduledLR, adamw_impl, lr_schedule, param_groups
from megapt.train.process import resolve_device, start_process

RUNNERS = ("engine", "plain", "hf")
IGNORE_INDEX = -100

BASELINES = {
    "plain": (
        "the same megapt GPT (same kernels/backends), no DeepSpeed: torch.optim.AdamW (fused where "
        "torch has it) over the engine's parameter groups (no decay on norms, biases, embeddings) "
        "with the trainer's LR schedule, torch.autocast for bf16/fp16 with fp32 weights, same grad clip "
        "and accumulation"
    ),
    "hf": (
        "transformers LlamaForCausalLM with the same shapes (layers, d_model, heads, kv heads, ffn, vocab, "
        "rope theta, tie), attn_implementation='sdpa', config built locally, the same AdamW loop as plain"
    ),
}


def summarize(values: Iterable[float]) -> dict:
    """median, quartiles (IQR), min, max, mean, n of a sample; empty sample -> n=0 and Nones."""
    xs = sorted(float(v) for v in values)
    if not xs:
        return {
            "n": 0,
            "median": None,
            "q1": None,
            "q3": None,
            "iqr": None,
            "min": None,
            "max": None,
            "mean": None,
        }
    if len(xs) >= 2:
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    else:
        q1 = q3 = xs[0]
    return {
        "n": len(xs),
        "median": statistics.median(xs),
        "q1": q1,
        "q3": q3,
        "iqr": q3 - q1,
        "min": xs[0],
        "max": xs[-1],
        "mean": statistics.fmean(xs),
    }


# ---------------------------------------------------------------------------------------------
# Timing and memory
# ---------------------------------------------------------------------------------------------


class PhaseClock:
    """Accumulates wall time per phase; syncs CUDA at each phase end so the split is real."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.totals: dict[str, float] = {}

    def _sync(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    @contextlib.contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - t0

    def take(self) -> dict[str, float]:
        out, self.totals = self.totals, {}
        return out


class MemoryMeter:
    """Peak memory over a window: CUDA allocator peaks on GPU, sampled process RSS on CPU."""

    def __init__(self, cuda: bool, interval_s: float = 0.005):
        self.cuda = cuda
        self.interval_s = interval_s
        self._peak_rss = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self):
        import torch

        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self._start_alloc = torch.cuda.memory_allocated()
        import psutil

        self._proc = psutil.Process()
        self._start_rss = self._peak_rss = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(self.interval_s):
            try:
                self._peak_rss = max(self._peak_rss, self._proc.memory_info().rss)
            except Exception:  # noqa: BLE001  # pragma: no cover - process going away
                return

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread:
            self._thread.join()
        self._peak_rss = max(self._peak_rss, self._proc.memory_info().rss)

    def result(self) -> dict:
        """CUDA: ``peak_bytes`` is what the runner added, its allocator peak minus what was allocated when
        it started (an earlier runner's leftovers), so runners of one process compare. CPU: the peak
        RSS itself (freed memory is reused, not returned, so an RSS difference would under-count)."""
        import torch

        if self.cuda:
            peak = torch.cuda.max_memory_allocated()
            return {
                "kind": "cuda",
                "peak_bytes": peak - self._start_alloc,
                "peak_allocated_bytes": peak,
                "peak_reserved_bytes": torch.cuda.max_memory_reserved(),
                "allocated_at_start_bytes": self._start_alloc,
                "peak_rss_bytes": self._peak_rss,
                "note": (
                    "peak_bytes = torch.cuda.max_memory_allocated over the runner minus what was "
                    "allocated when it started (device 0); reserved beside it"
                ),
            }
        return {
            "kind": "rss",
            "peak_bytes": self._peak_rss,
            "peak_rss_bytes": self._peak_rss,
            "rss_at_start_bytes": self._start_rss,
            "note": (
                "CPU: peak process RSS, sampled every 5 ms over the runner; includes the interpreter, "
                "torch and what earlier runners of the process still hold"
            ),
        }


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------


def synthetic_batches(
    vocab: int, micro_batch: int, seq_len: int, device: str, seed: int, pool: int = 4
) -> Iterator[dict]:
    """Cycle over a few random batches already on the device (data wait ~ 0: measures compute)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(pool):
        x = torch.randint(0, vocab, (micro_batch, seq_len + 1), generator=g)
        batches.append(
            {
                "input_ids": x[:, :-1].contiguous().to(device),
                "labels": x[:, 1:].contiguous().to(device),
            }
        )
    i = 0
    while True:
        yield batches[i % pool]
        i += 1


def loader_batches(cfg, device: str, rank: int, world_size: int) -> Iterator[dict]:
    """Real shards through megapt.data.loader: cfg.shard_dir when it has a manifest, else
    ``prepare_data`` builds them first (clean + tokenizer + shards; minutes on the stdlib corpus)."""
    from megapt.data.loader import build_loader
    from megapt.data.manifest import MANIFEST
    from megapt.data.remote import open_store

    shard_dir = cfg.shard_dir  # a folder or a URL
    if not open_store(shard_dir, cfg.data.remote).exists(MANIFEST):
        from megapt.data.prepare import prepare_data

        shard_dir = prepare_data(cfg)
    loader = build_loader(
        cfg.data,
        shard_dir,
        "train",
        rank=rank,
        world_size=world_size,
        micro_batch=cfg.train.micro_batch,
        seed=cfg.run.seed,
        infinite=True,
    )
    for batch in loader:
        yield {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def make_batches(cfg, data: str, device: str, rank: int = 0, world_size: int = 1) -> Iterator[dict]:
    if data == "loader":
        return loader_batches(cfg, device, rank, world_size)
    return synthetic_batches(
        model_args(cfg).vocab_size,
        cfg.train.micro_batch,
        cfg.data.seq_len,
        device,
        cfg.run.seed + rank,
    )


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def build_gpt(cfg, args, device: str):
    """megapt's GPT with the configured kernel backends (resolved once, as the trainer does)."""
    from megapt.model import ops
    from megapt.model.gpt import GPT

    backends = ops.select_backends(cfg.model, device)
    return GPT(args, backends, seed=cfg.run.seed).to(device), backends


def build_hf_llama(args, device: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(
        vocab_size=args.vocab_size,
        hidden_size=args.d_model,
        intermediate_size=args.ffn_hidden,
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_kv_heads or args.n_heads,
        max_position_embeddings=args.max_seq_len,
        rms_norm_eps=args.norm_eps,
        tie_word_embeddings=bool(args.tie_embeddings),
        initializer_range=getattr(args, "init_std", 0.02),
        attention_dropout=0.0,
        use_cache=False,
        rope_theta=args.rope_theta,
    )
    hcfg = LlamaConfig(**kw)
    hcfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(hcfg)
    assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
    return model.to(device)


def _adamw(model, train_cfg, cuda: bool):
    """AdamW over the engine's parameter groups (``megapt.train.optim.param_groups``: no decay on
    norms, biases and embeddings) with the engine's fused/foreach choice."""
    import torch

    groups = param_groups(model, train_cfg.weight_decay)
    return torch.optim.AdamW(
        groups,
        lr=train_cfg.lr,
        betas=(train_cfg.beta1, train_cfg.beta2),
        eps=train_cfg.eps,
        **adamw_impl(groups),
    )


def _autocast(device: str, precision: str):
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(
        device_type=device, dtype=torch.bfloat16 if precision == "bf16" else torch.float16
    )


# ---------------------------------------------------------------------------------------------
# The timed loop
# ---------------------------------------------------------------------------------------------


def timed_loop(
    batches: Iterator[dict],
    forward: Callable[[dict], Any],
    backward: Callable[[Any], None],
    optimizer_step: Callable[[bool], None],
    *,
    grad_accum: int,
    warmup: int,
    steps: int,
    cuda: bool,
    comm_timer: Callable[[], float | None] | None = None,
) -> dict:
    """Run warmup + steps optimizer steps; per measured step: wall time, phases, real tokens, loss."""
    import torch

    clock = PhaseClock(cuda)
    records = []
    losses = []
    for step in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize()
        if comm_timer:
            comm_timer()  # reset DeepSpeed's accumulated comm time
        t0 = time.perf_counter()
        tokens = 0
        loss_sum = 0.0
        for micro in range(grad_accum):
            with clock.phase("data_wait"):
                batch = next(batches)
            with clock.phase("forward"):
                loss = forward(batch)
            with clock.phase("backward"):
                backward(loss)
            with clock.phase("optimizer"):
                optimizer_step(micro == grad_accum - 1)
            tokens += int((batch["labels"] != IGNORE_INDEX).sum())
            loss_sum += float(loss.detach())
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        phases = clock.take()
        comm = comm_timer() if comm_timer else None
        losses.append(loss_sum / grad_accum)
        if step >= warmup:
            records.append(
                {
                    "step_time_s": dt,
                    "tokens": tokens,
                    "phases": phases,
                    "comm_s": comm,
                    "all_tokens": grad_accum * batch["labels"].numel(),
                }
            )
    return {"records": records, "losses": losses}


def summarize_records(
    out: dict, *, world_size: int, args: ModelArgs, seq_len: int, recompute: bool, peak: dict
) -> dict:
    """Statistics of a timed loop; MFU / HFU are ``args.mfu`` / ``args.hfu`` of each step's
    tokens/s per device against ``peak`` (``megapt.hardware.select_peak``, TFLOP/s)."""
    recs = out["records"]
    tps = [r["tokens"] / r["step_time_s"] for r in recs]
    phase_names = sorted({k for r in recs for k in r["phases"]})
    comm = [r["comm_s"] for r in recs if r["comm_s"] is not None]
    peak_flops = peak["tflops"] * 1e12 if peak.get("tflops") else None
    mfu = [args.mfu(x, peak_flops, seq_len) for x in tps] if peak_flops else []
    hfu = [args.hfu(x, peak_flops, seq_len, recompute) for x in tps] if peak_flops else []
    real = sum(r["tokens"] for r in recs)
    total = sum(r["all_tokens"] for r in recs)
    return {
        "status": "ok",
        "world_size": world_size,
        "tokens_per_step_per_device": recs[0]["tokens"] if recs else None,
        "real_token_fraction": real / total if total else None,
        "tokens_per_s_per_device": summarize(tps),
        "tokens_per_s_total": summarize([x * world_size for x in tps]),
        "step_time_s": summarize(r["step_time_s"] for r in recs),
        "phases_s": {
            name: summarize(r["phases"].get(name, 0.0) for r in recs) for name in phase_names
        },
        "comm_s": summarize(comm) if comm else None,
        "comm_note": (
            "time in DeepSpeed's engine.allreduce_gradients after backward's compute (CUDA synchronised "
            "before and after): the gradient reduction not overlapped with backward; it is part of the "
            "backward phase"
            if comm
            else "communication is inside backward (and step with ZeRO); measured separately only with "
            "--comm-timers (on by default with --nproc > 1)"
        ),
        "mfu": summarize(mfu) if peak_flops else None,
        "hfu": summarize(hfu) if peak_flops else None,
        "flops": flops_record(args, seq_len, recompute),
        "peak": peak,
        "loss_first": out["losses"][0] if out["losses"] else None,
        "loss_last": out["losses"][-1] if out["losses"] else None,
        "steps": len(recs),
    }


# ---------------------------------------------------------------------------------------------
# Runners
# ---------------------------------------------------------------------------------------------


def _peak_for(cfg, device: str, measured: dict) -> dict:
    import torch

    cuda = device == "cuda"
    name = torch.cuda.get_device_name(0) if cuda else None
    tf32 = bool(cuda and torch.backends.cuda.matmul.allow_tf32)
    return select_peak(name, cfg.train.precision, tf32, measured, is_cuda=cuda)


def _shape(cfg, args: ModelArgs) -> dict:
    # HF's Llama has the same shapes (a unit test holds its parameter count to ours): same FLOPs
    recompute = cfg.train.activation_checkpointing
    return {"args": args, "seq_len": cfg.data.seq_len, "recompute": recompute}


def flops_record(args: ModelArgs, seq_len: int, recompute: bool) -> dict:
    """The FLOPs per token behind a record's MFU / HFU (``ModelArgs.flops_per_token`` and
    ``hardware_flops_per_token``) and the counts they are made of."""
    return {
        "N": args.num_params(exclude_embeddings=True),
        "L": args.n_layers,
        "H": args.n_heads,
        "Q": args.head_dim,
        "T": seq_len,
        "recompute": recompute,
        "model_flops_per_token": args.flops_per_token(seq_len),
        "hardware_flops_per_token": args.hardware_flops_per_token(seq_len, recompute),
    }


def _engine_comm_timer(engine, cuda: bool) -> Callable[[], float | None]:
    """Time DeepSpeed's gradient reduction: wraps ``engine.allreduce_gradients`` (what its
    ``bwd_allreduce`` timer covers; the engine calls it at the end of every backward). CUDA is
    synchronised before and after, so this is the reduction left after backward's compute (the part
    not overlapped). Returns a reader: seconds since the last read.

    (DeepSpeed's own wall_clock_breakdown timers also work now that ModelOutput is a dict, but they
    print instead of returning values, and cover more than the reduction.)"""
    import torch

    orig = engine.allreduce_gradients
    acc = [0.0]

    def timed(*args, **kwargs):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            return orig(*args, **kwargs)
        finally:
            if cuda:
                torch.cuda.synchronize()
            acc[0] += time.perf_counter() - t0

    engine.allreduce_gradients = timed

    def read() -> float:
        value, acc[0] = acc[0], 0.0
        return value

    return read


def run_engine(
    cfg,
    *,
    device: str,
    warmup: int,
    steps: int,
    data: str,
    measured: dict,
    comm_timers: bool = False,
) -> dict:
    """The trainer's engine set-up (megapt.train.process.start_process + create_engine), timed by our loop.

    comm_timers: time DeepSpeed's gradient reduction (``_engine_comm_timer``) and report it as comm_s."""
    from megapt.model import ops
    from megapt.model.gpt import GPT
    from megapt.train import parallel
    from megapt.train.engine import create_engine, engine_stage

    proc = start_process(cfg)  # as the trainer: logging, device, process group, seeds
    rank, world = proc.rank, proc.world_size
    args = model_args(cfg)
    backends = ops.select_backends(cfg.model, device)
    seed = cfg.run.seed
    # sequence/tensor parallelism: a group of ranks shares each batch (as in the trainer)
    layout = parallel.Layout.from_config(cfg, world, args)
    bundle = create_engine(
        cfg,
        lambda: GPT(args, backends, seed=seed),
        world_size=layout.dp,
        init_weights=lambda m, name, p: m.init_parameter(name, p, seed),
        layout=layout,
    )
    engine = bundle.engine
    ga = int(engine.gradient_accumulation_steps())
    batch_device = str(engine.device) if device == "cuda" else "cpu"
    batches = make_batches(cfg, data, batch_device, layout.dp_rank(rank), layout.dp)

    def forward(batch):
        return engine(batch["input_ids"], labels=batch["labels"]).loss

    out = timed_loop(
        batches,
        forward,
        engine.backward,
        lambda boundary: engine.step(),
        grad_accum=ga,
        warmup=warmup,
        steps=steps,
        cuda=device == "cuda",
        comm_timer=_engine_comm_timer(engine, device == "cuda") if comm_timers else None,
    )
    for r in out["records"]:  # a group's ranks see the same tokens: count each token once
        r["tokens"] /= layout.group
        r["all_tokens"] /= layout.group
    peak = _peak_for(cfg, device, measured)
    res = summarize_records(out, world_size=world, peak=peak, **_shape(cfg, args))
    res["parallel"] = {"data": layout.dp, "sequence": layout.sp, "tensor": layout.tp}
    res["zero_stage"] = engine_stage(cfg.train.precision, cfg.deepspeed.zero_stage)[0]
    res["zero_stage_requested"] = cfg.deepspeed.zero_stage
    res["ds_config"] = bundle.ds_config
    res["backends"] = _describe_backends(backends)
    del bundle  # the engine goes with this frame (the closures above hold it until then)
    return res


def _describe_backends(backends) -> dict | None:
    if backends is None:
        return None
    import dataclasses

    if dataclasses.is_dataclass(backends):
        return {k: str(v) for k, v in dataclasses.asdict(backends).items()}
    return {"repr": repr(backends)}


def _torch_loop(model, cfg, *, device: str, warmup: int, steps: int, data: str, forward_fn) -> dict:
    import torch

    cuda = device == "cuda"
    precision = cfg.train.precision
    opt = _adamw(model, cfg.train, cuda)
    sched = ScheduledLR(opt, lr_schedule(cfg))  # the trainer's warmup + decay
    scaler = torch.amp.GradScaler(device) if precision == "fp16" else None
    ga = cfg.train.grad_accum
    batches = make_batches(cfg, data, device)

    def forward(batch):
        with _autocast(device, precision):
            return forward_fn(batch)

    def backward(loss):
        loss = loss / ga
        (scaler.scale(loss) if scaler else loss).backward()

    def optimizer_step(boundary: bool):
        if not boundary:
            return
        if scaler:
            scaler.unscale_(opt)
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

    return timed_loop(
        batches,
        forward,
        backward,
        optimizer_step,
        grad_accum=ga,
        warmup=warmup,
        steps=steps,
        cuda=cuda,
    )


def run_plain(cfg, *, device: str, warmup: int, steps: int, data: str, measured: dict, **_) -> dict:
    import torch

    args = model_args(cfg)
    model, backends = build_gpt(cfg, args, device)
    model.gradient_checkpointing = cfg.train.activation_checkpointing  # GPT recomputes each block
    model.train()
    call = torch.compile(model) if cfg.train.compile else model
    out = _torch_loop(
        model,
        cfg,
        device=device,
        warmup=warmup,
        steps=steps,
        data=data,
        forward_fn=lambda b: call(b["input_ids"], labels=b["labels"]).loss,
    )
    peak = _peak_for(cfg, device, measured)
    res = summarize_records(out, world_size=1, peak=peak, **_shape(cfg, args))
    res["backends"] = _describe_backends(backends)
    return res


def run_hf(cfg, *, device: str, warmup: int, steps: int, data: str, measured: dict, **_) -> dict:
    import torch

    args = model_args(cfg)
    model = build_hf_llama(args, device)
    if cfg.train.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    call = torch.compile(model) if cfg.train.compile else model
    # HF shifts labels inside the loss: pass the inputs as labels (same shapes, same work).
    out = _torch_loop(
        model,
        cfg,
        device=device,
        warmup=warmup,
        steps=steps,
        data=data,
        forward_fn=lambda b: call(input_ids=b["input_ids"], labels=b["input_ids"]).loss,
    )
    peak = _peak_for(cfg, device, measured)
    res = summarize_records(out, world_size=1, peak=peak, **_shape(cfg, args))
    res["attn_implementation"] = model.config._attn_implementation
    res["transformers_params"] = sum(p.numel() for p in model.parameters())
    return res


RUNNER_FNS = {"engine": run_engine, "plain": run_plain, "hf": run_hf}


def is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc)
    return "out of memory" in text.lower() or "CUDA_ERROR_OUT_OF_MEMORY" in text


def run_one(
    name: str, cfg, *, warmup: int, steps: int, data: str, measured: dict, comm_timers: bool = False
) -> dict:
    """One runner, its memory window and its failure (OOM or error) caught and recorded."""
    import torch

    device = resolve_device(cfg.train.device)
    cuda = device == "cuda"
    t0 = time.perf_counter()
    meter = MemoryMeter(cuda)
    try:
        with meter:
            res = RUNNER_FNS[name](
                cfg,
                device=device,
                warmup=warmup,
                steps=steps,
                data=data,
                measured=measured,
                comm_timers=comm_timers,
            )
    except ImportError as exc:
        res = {"status": "unavailable", "error": f"{type(exc).__name__}: {exc}"}
    except BaseException as exc:  # a sweep must survive any failure of one runner
        if isinstance(exc, KeyboardInterrupt):
            raise
        res = {
            "status": "oom" if is_oom(exc) else "error",
            "error": f"{type(exc).__name__}: {exc}"[:2000],
            "traceback": traceback.format_exc()[-4000:],
        }
    finally:
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    res["memory"] = meter.result()
    res["device"] = device
    res["precision"] = cfg.train.precision
    res["wall_s"] = time.perf_counter() - t0
    return res
