"""`megapt train`: the pretraining loop.

    trainer = Trainer(cfg)          # launcher env -> process group -> data (prepared if missing)
                                    # -> tokenizer -> model -> DeepSpeed engine -> resume
    trainer.fit()                   # train_step() x max_steps, evaluate(), checkpoints, sample

One ``train_step`` = ``train.grad_accum`` micro-steps of ``train.micro_batch`` sequences on every
rank, then one optimizer update. A step whose loss or gradient norm is not finite on any rank is
skipped on every rank (the optimizer sees the non-finite gradients and does not update; the LR
schedule does not advance); after ``train.max_bad_steps`` such steps in a row training stops and
the newest checkpoint is left as it was.

Outputs in ``<run.out_dir>/<run.name>/``: ``config.yaml`` (resolved config), ``metrics.jsonl``
(one line per step / evaluation), ``tb/`` (TensorBoard), ``checkpoints/step_XXXXXXX/``,
``sample.txt`` (text generated at the end).

Exit codes of `megapt train` (the table shared by every verb: megapt/errors.py):
    0   finished (max_steps reached)
    1   unexpected error (traceback printed)
    2   configuration error (message lists every offending key)
    3   stopped: train.max_bad_steps non-finite steps in a row
    4   checkpoint error: missing, corrupt or incompatible checkpoint
    5   data error: missing/corrupt shards or tokenizer
    75  pre-empted (SIGTERM/SIGUSR1): checkpoint saved (and $MEGAPT_PREEMPT_MARKER written, see
        megapt/train/preempt.py), requeue and resume with --resume
    130 interrupted (Ctrl-C)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from megapt.config import Config, save_config, to_dict
from megapt.errors import EXIT_NONFINITE, EXIT_OK, UserError
from megapt.hardware import peak_flops
from megapt.model.sampling import generate
from megapt.train import checkpoint as ckpt_lib
from megapt.train import dist, parallel, reshard
from megapt.train.metrics import Metrics, format_train_line, peak_memory_gb
from megapt.train.process import start_process

log = logging.getLogger("megapt.train")

# Test hook: make the loss NaN on these 1-based step attempts (comma list), on rank
# MEGAPT_FAULT_NAN_RANK (default: every rank). Used by the NaN-skip tests; never set it otherwise.
FAULT_NAN_STEPS = "MEGAPT_FAULT_NAN_STEPS"
FAULT_NAN_RANK = "MEGAPT_FAULT_NAN_RANK"


class Trainer:
    """Resumable pretraining loop over a DeepSpeed engine."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        # Installed first: a pre-emption warning during start-up (data preparation, engine set-up,
        # checkpoint loading) must still end in a checkpoint and exit 75, not the signal's default.
        from megapt.train.preempt import PreemptionHandler

        self.preempt = PreemptionHandler().install()
        try:
            self._start(cfg)
        except BaseException:
            self.preempt.uninstall()
            raise

    def _start(self, cfg: Config) -> None:
        proc = start_process(cfg)  # logging, device, process group, seeds (run.seed + rank)
        self.info, self.device = proc.info, proc.device
        self.rank, self.world_size = proc.rank, proc.world_size

        # ---- data and tokenizer ----
        self.shard_dir = self._prepare_data()
        from megapt.data.loader import build_loader
        from megapt.data.manifest import check_tokenizer, load_manifest
        from megapt.data.tokenizer import Tokenizer

        self._build_loader = build_loader
        self.tokenizer = Tokenizer.load(cfg.tokenizer_path)
        self.manifest = load_manifest(self.shard_dir, cfg.data.remote)
        check_tokenizer(self.manifest, self.tokenizer)  # sha (when recorded), vocab, eos
        self.val_samples = int(self.manifest["splits"].get("val", {}).get("samples", 0))
        if self.val_samples == 0:
            log.warning(
                "%s has no validation samples (data.val_fraction=%s): evaluation is skipped",
                self.manifest.path,
                cfg.data.val_fraction,
            )

        # ---- model and engine ----
        from megapt.model import ops
        from megapt.model.gpt import GPT, ModelArgs
        from megapt.train.engine import create_engine, engine_stage

        self.model_args = ModelArgs.from_config(
            cfg.model, self.tokenizer.vocab_size, cfg.data.seq_len
        )
        # sequence/tensor parallelism: groups of ranks share a batch; the data-parallel world is
        # world / (sp x tp), for the loader, the batch size and DeepSpeed
        self.layout = parallel.Layout.from_config(cfg, self.world_size, self.model_args)
        self.dp_rank, self.dp_world = self.layout.dp_rank(self.rank), self.layout.dp
        backends = ops.select_backends(cfg.model, self.device)
        args, seed, eos = self.model_args, cfg.run.seed, self.tokenizer.eos_id
        self.zero_stage, raised = engine_stage(cfg.train.precision, cfg.deepspeed.zero_stage)
        if raised:
            log.warning(
                "bf16 at ZeRO stage 0 keeps no fp32 master weights in DeepSpeed (training drifts): "
                "running ZeRO stage 1 with fp32 gradient accumulation instead"
            )
        bundle = create_engine(
            cfg,
            lambda: GPT(args, backends, seed=seed, doc_mask=cfg.model.doc_mask, eos_id=eos),
            world_size=self.dp_world,
            layout=self.layout,
            init_weights=lambda m, name, p: m.init_parameter(name, p, seed),
        )
        self.engine, self.scheduler, self.schedule = (
            bundle.engine,
            bundle.scheduler,
            bundle.schedule,
        )
        self.ds_config = bundle.ds_config
        n_params = args.num_params()
        log.info(
            "model: %s preset, %.2fM parameters (%s), backends %s, ZeRO stage %d, %s, "
            "world size %d (%s)",
            cfg.model.preset,
            n_params / 1e6,
            json.dumps(dataclasses.asdict(args)),
            dataclasses.asdict(backends),
            self.zero_stage,
            cfg.train.precision,
            self.world_size,
            self.layout.describe(),
        )

        # ---- loop state ----
        t = cfg.train
        self.step = 0  # optimizer updates applied
        self.attempt = 0  # steps attempted (applied + skipped)
        self.tokens_seen = 0
        self.skipped_total = 0
        self.bad_in_row = 0
        self.tokens_per_step = t.micro_batch * t.grad_accum * self.dp_world * cfg.data.seq_len
        self.flops_per_token = args.flops_per_token(cfg.data.seq_len)
        if cfg.model.doc_mask:
            attn_share = args.attention_flops_per_token(cfg.data.seq_len) / self.flops_per_token
            log.info(
                "MFU counts attention over the full %d-token window (PaLM's convention, %.1f%% of the model "
                "FLOPs per token); with model.doc_mask most of those score blocks are skipped, so MFU here "
                "overstates the attention work actually done",
                cfg.data.seq_len,
                100 * attn_share,
            )
        self.peak = peak_flops(t.precision) if self.device == "cuda" else None
        self.last_checkpoint: Path | None = None
        self.train_loader = self._build_loader(
            cfg.data,
            self.shard_dir,
            "train",
            rank=self.dp_rank,
            world_size=self.dp_world,
            micro_batch=t.micro_batch,
            seed=cfg.run.seed,
            infinite=True,
            tokenizer_sha256=self.tokenizer.sha256,
        )
        self._nan_steps, self._nan_rank = self._fault_injection()

        resume_from = ckpt_lib.resolve_checkpoint(cfg.checkpoint, cfg.checkpoint_dir)
        if resume_from is not None:
            self.load(resume_from)
        elif cfg.checkpoint.resume:
            log.info(
                "checkpoint.resume: no valid checkpoint in %s yet, starting from step 0",
                cfg.checkpoint_dir,
            )
        self._train_iter = iter(self.train_loader)
        self.metrics = Metrics(
            cfg.run_dir,
            enabled=self.rank == 0,
            tensorboard=cfg.logging.tensorboard,
            start_step=self.step,
        )
        self._bad_reported: set = set()  # (set, shard) of the loader's bad shards in metrics

    # ------------------------------------------------------------------------------------------

    def _prepare_data(self) -> Path | str:
        """Shards and tokenizer on every rank; rank 0 prepares them when missing while the others
        wait on a status file, not in a collective (megapt.data.prepare.ensure_data_for_ranks)."""
        from megapt.data.prepare import ensure_data_for_ranks

        return ensure_data_for_ranks(
            self.cfg,
            rank=self.rank,
            world_size=self.world_size,
            gather=dist.all_gather_object,
            log=log.info,
        )

    def _fault_injection(self) -> tuple[set, int | None]:
        steps = {int(s) for s in os.environ.get(FAULT_NAN_STEPS, "").split(",") if s.strip()}
        r = os.environ.get(FAULT_NAN_RANK, "")
        if steps:
            log.warning(
                "fault injection: NaN loss on step attempts %s (rank %s)", sorted(steps), r or "all"
            )
        return steps, (int(r) if r else None)

    # ------------------------------------------------------------------------------------------

    def _to_device(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        dev = self.engine.device
        return batch["input_ids"].to(dev, non_blocking=True), batch["labels"].to(
            dev, non_blocking=True
        )

    def train_step(self) -> dict:
        """One optimizer step (grad_accum micro-steps). Returns the step's numbers, agreed on all ranks."""
        eng = self.engine
        eng.train()
        self.attempt += 1
        lr = float(self.scheduler.get_last_lr()[0])
        inject = self.attempt in self._nan_steps and (
            self._nan_rank is None or self._nan_rank == self.rank
        )
        t0 = time.perf_counter()
        losses = []
        for _ in range(self.cfg.train.grad_accum):
            x, y = self._to_device(next(self._train_iter))
            loss = eng(x, labels=y).loss
            if inject:
                loss = loss * float("nan")
            eng.backward(loss)
            eng.step()
            losses.append(loss.detach().float())
        local = torch.stack(losses).mean()
        gn = eng.get_global_grad_norm()
        gn = float(gn) if gn is not None else None
        applied = bool(eng.was_step_applied())
        loss_bad = not math.isfinite(float(local))
        norm_bad = gn is not None and not math.isfinite(gn)
        # one collective: [sum of finite losses, any loss non-finite, any grad norm non-finite, any not applied]
        flags = torch.tensor(
            [
                0.0 if loss_bad else float(local),
                float(loss_bad),
                float(norm_bad),
                float(not applied),
            ],
            dtype=torch.float64,
            device=eng.device if self.device == "cuda" else "cpu",
        )
        if self.world_size > 1:
            torch.distributed.all_reduce(flags)
        any_loss_bad, any_norm_bad, any_not_applied = (flags[i].item() > 0 for i in (1, 2, 3))
        if self.cfg.train.precision == "fp16":
            # fp16: an overflowing step with a finite loss is the loss scaler at work (DeepSpeed skips
            # it and lowers the scale); only a non-finite loss counts as a bad step
            bad = any_loss_bad
            scaler_skip = any_not_applied and not bad
        else:
            bad = any_loss_bad or any_norm_bad or any_not_applied
            scaler_skip = False
        nonfinite = loss_bad or norm_bad
        dt = time.perf_counter() - t0
        mean_loss = self.layout.mean_loss(flags[0].item())
        out = {
            "loss": mean_loss if not bad else float("nan"),
            "lr": lr,
            "grad_norm": gn,
            "step_time_s": dt,
            "skipped": bad or scaler_skip,
        }
        if scaler_skip:
            self.skipped_total += 1
            log.info(
                "step attempt %d: fp16 gradient overflow, update skipped and loss scale lowered",
                self.attempt,
            )
        elif bad:
            self.skipped_total += 1
            self.bad_in_row += 1
            if (
                applied and nonfinite
            ):  # cannot happen with the optimizers we build; say so loudly if it does
                log.error(
                    "step attempt %d: non-finite loss/grad norm but the optimizer applied the update",
                    self.attempt,
                )
            log.warning(
                "step attempt %d (after step %d): non-finite loss or gradient norm on %s; update skipped on "
                "all ranks (%d in a row, stop at train.max_bad_steps=%d)",
                self.attempt,
                self.step,
                "this rank" if nonfinite else "another rank",
                self.bad_in_row,
                self.cfg.train.max_bad_steps,
            )
        else:
            self.step += 1
            self.bad_in_row = 0
            self.tokens_seen += self.tokens_per_step
        return out

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean validation loss and perplexity over min(train.eval_batches, one pass) batches of the
        held-out split; every rank runs the same number of batches (lock-step for ZeRO-3)."""
        cfg, eng = self.cfg, self.engine
        per_step = self.dp_world * cfg.train.micro_batch
        n = max(1, min(cfg.train.eval_batches, self.val_samples // per_step))
        loader = self._build_loader(
            cfg.data,
            self.shard_dir,
            "val",
            rank=self.dp_rank,
            world_size=self.dp_world,
            micro_batch=cfg.train.micro_batch,
            seed=cfg.run.seed,
            infinite=True,
            tokenizer_sha256=self.tokenizer.sha256,
        )
        was_training = eng.training
        eng.eval()
        total = torch.zeros(2, dtype=torch.float64)
        for i, batch in enumerate(loader):
            if i >= n:
                break
            x, y = self._to_device(batch)
            loss = eng(x, labels=y).loss
            # a sequence-parallel rank's loss is its share of the row's: weigh it by all the row's
            # tokens and count them once per group
            n_tok = y.numel()
            total += torch.tensor(
                [float(loss) * n_tok, n_tok / self.layout.sp], dtype=torch.float64
            )
        if was_training:
            eng.train()
        if self.world_size > 1:
            t = total.to(eng.device) if self.device == "cuda" else total
            torch.distributed.all_reduce(t)
            total = t.cpu()
        val_loss = float(total[0] / total[1])
        return {
            "val_loss": val_loss,
            "val_ppl": math.exp(min(val_loss, 50.0)),
            "val_tokens": int(total[1]),
        }

    # ------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Our client state (JSON): everything besides DeepSpeed's own model/optimizer/scheduler files."""
        return {
            "step": self.step,
            "attempt": self.attempt,
            "tokens_seen": self.tokens_seen,
            "skipped_total": self.skipped_total,
            "loader": self.train_loader.state_dict(),
            "world_size": self.world_size,
            "zero_stage": self.zero_stage,
            "precision": self.cfg.train.precision,
            "micro_batch": self.cfg.train.micro_batch,
            "grad_accum": self.cfg.train.grad_accum,
            "model_args": dataclasses.asdict(self.model_args),
            "tokenizer_sha256": self.tokenizer.sha256,
            "seed": self.cfg.run.seed,
            **parallel.layout_meta(self.layout),
            # what a universal load restores besides the tensors (groups, Adam steps, LR schedule)
            "optimizer": reshard.optimizer_meta(self.engine, self.scheduler),
        }

    def save(self) -> Path:
        cfg = self.cfg
        t0 = time.perf_counter()
        path = ckpt_lib.save_checkpoint(
            cfg.checkpoint_dir,
            self.step,
            self.engine,
            self.state_dict(),
            config_text=yaml.safe_dump(to_dict(cfg), sort_keys=False),
            tokenizer_path=cfg.tokenizer_path,
            keep_last=cfg.checkpoint.keep_last,
        )
        self.last_checkpoint = path
        log.info("checkpoint saved: %s (%.1fs)", path, time.perf_counter() - t0)
        return path

    def load(self, path: Path) -> None:
        cfg = self.cfg
        meta = ckpt_lib.read_meta(path)
        ckpt_lib.check_compatible(
            meta,
            model_args=dataclasses.asdict(self.model_args),
            world_size=self.world_size,
            zero_stage=self.zero_stage,
            universal=cfg.checkpoint.universal,
            ckpt=path,
        )
        parallel.check_resume(meta, self.layout, cfg.checkpoint.universal, path)
        if meta.get("tokenizer_sha256") and meta["tokenizer_sha256"] != self.tokenizer.sha256:
            raise ckpt_lib.CheckpointError(
                f"{path}: saved with tokenizer sha256 {meta['tokenizer_sha256'][:12]}..., this run's tokenizer "
                f"{cfg.tokenizer_path} is {self.tokenizer.sha256[:12]}...; use the checkpoint's tokenizer.model"
            )
        if cfg.checkpoint.universal:
            reshard.load_universal(self.engine, self.scheduler, path, meta)
        else:
            ckpt_lib.load_engine_state(self.engine, path)
        # the saved optimizer groups carry the LR of the saved schedule (e.g. an older max_steps
        # or train.lr); this run's config decides the LR of the next step
        self.scheduler.apply()  # DeepSpeed's load may have called it already (load_state_dict)
        changed = self.scheduler.changed_peaks
        if changed:
            log.info(
                "train.lr: the checkpoint's peak LR was %g, this run's is %g: the schedule goes "
                "on from step %d with the new peak",
                changed[0][0],
                changed[0][1],
                int(meta["step"]),
            )
        self.step, self.tokens_seen = int(meta["step"]), int(meta["tokens_seen"])
        self.attempt, self.skipped_total = (
            int(meta.get("attempt", meta["step"])),
            int(meta.get("skipped_total", 0)),
        )
        self.train_loader.load_state_dict(meta["loader"])
        ckpt_lib.load_rng(path, self.rank, self.world_size, cfg.run.seed, self.step)
        self.last_checkpoint = Path(path)
        log.info(
            "resumed from %s: step %d, %d tokens seen%s",
            path,
            self.step,
            self.tokens_seen,
            " (universal checkpoint)" if cfg.checkpoint.universal else "",
        )

    # ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, max_new_tokens: int, temperature: float = 0.8, top_k: int = 40) -> str:
        """Text from the trained model (all ranks run it in lock-step; rank 0's text is returned)."""
        cfg = self.cfg
        prompt = self.tokenizer.encode(cfg.train.sample_prompt) or [self.tokenizer.eos_id]
        prompt = prompt[-(self.model_args.max_seq_len - 1) :]
        new = max(1, min(max_new_tokens, self.model_args.max_seq_len - len(prompt)))
        out = generate(
            self.engine.module,
            [prompt],
            new,
            temperature=temperature,
            top_k=top_k,
            stop_ids=[self.tokenizer.eos_id],
            seed=cfg.run.seed,
        )
        return self.tokenizer.decode(prompt + out[0])

    def fit(self) -> int:
        cfg, t = self.cfg, self.cfg.train
        run_dir = cfg.run_dir
        if self.rank == 0:
            save_config(cfg, run_dir / "config.yaml")
            log.info(
                "run dir: %s | checkpoints: %s | TensorBoard: tensorboard --logdir %s",
                run_dir,
                cfg.checkpoint_dir,
                run_dir / "tb",
            )
        preempt = self.preempt
        bar = None
        if self.rank == 0 and cfg.logging.progress and sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(
                total=t.max_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True
            )
        win_tokens, win_time = 0, 0.0  # tokens/s over training time only (not eval/checkpoint)
        saved_at = self.step if self.last_checkpoint is not None else -1
        try:
            while self.step < t.max_steps:
                out = self.train_step()
                self._record_bad_shards(out)
                if out["skipped"]:
                    self.metrics.record(
                        "event",
                        self.step,
                        {"skipped_attempt": self.attempt, "bad_in_row": self.bad_in_row},
                    )
                    if self.bad_in_row and self.bad_in_row >= t.max_bad_steps:
                        where = self.last_checkpoint or "none saved yet"
                        log.error(
                            "stopping: %d steps in a row had a non-finite loss or gradient norm (train.max_bad_steps"
                            "=%d) after step %d. The last good checkpoint is kept: %s. Lower train.lr, raise "
                            "train.warmup_steps or check the data, then resume with --resume.",
                            self.bad_in_row,
                            t.max_bad_steps,
                            self.step,
                            where,
                        )
                        return EXIT_NONFINITE
                else:
                    win_tokens += self.tokens_per_step
                    win_time += out["step_time_s"]
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{out['loss']:.3f}")
                    row = {
                        "loss": out["loss"],
                        "lr": out["lr"],
                        "grad_norm": out["grad_norm"],
                        "tokens_seen": self.tokens_seen,
                        "step_time_s": round(out["step_time_s"], 4),
                    }
                    if self.step % t.log_every == 0 or self.step == t.max_steps:
                        tps = win_tokens / max(win_time, 1e-9)
                        seq = self.cfg.data.seq_len
                        mfu = self.model_args.mfu(tps / self.world_size, self.peak, seq)
                        row.update(
                            tokens_per_s=tps,
                            mfu=mfu,
                            peak_mem_gb=peak_memory_gb(),
                            skipped_total=self.skipped_total,
                            bad_shards=len(self.train_loader.bad_shards),
                        )
                        if t.precision == "fp16":
                            row["loss_scale"] = (
                                float(getattr(self.engine.optimizer, "cur_scale", 0.0)) or None
                            )
                        log.info(format_train_line(self.step, t.max_steps, row))
                        win_tokens, win_time = 0, 0.0
                    self.metrics.record(
                        "train", self.step, {k: v for k, v in row.items() if v is not None}
                    )
                    if t.eval_every and self.step % t.eval_every == 0 and self.step < t.max_steps:
                        self._eval_and_log()
                    if (
                        cfg.checkpoint.every
                        and self.step % cfg.checkpoint.every == 0
                        and self.step < t.max_steps
                    ):
                        self.save()
                        saved_at = self.step
                if t.stop_after and self.step >= t.stop_after and not out["skipped"]:
                    if saved_at != self.step:
                        self.save()
                    log.info(
                        "stopping at step %d (train.stop_after); continue with --resume", self.step
                    )
                    return EXIT_OK
                if preempt is not None and preempt.should_stop():
                    from megapt.train.preempt import PREEMPT_EXIT_CODE, mark_saved

                    log.warning(
                        "received %s: saving a checkpoint at step %d and exiting (%d) for requeue",
                        preempt.signal_name,
                        self.step,
                        PREEMPT_EXIT_CODE,
                    )
                    if saved_at != self.step:
                        self.save()
                    mark_saved(self.step, self.last_checkpoint)  # the Slurm scripts requeue on it
                    return PREEMPT_EXIT_CODE
            self._eval_and_log()
            if saved_at != self.step:
                self.save()
            if t.sample_tokens > 0 and self.layout.group > 1:
                log.info(
                    "no end-of-training sample under sequence/tensor parallelism "
                    "(generation runs on whole models): megapt generate --from %s",
                    cfg.checkpoint_dir,
                )
            elif t.sample_tokens > 0:
                text = self.sample(t.sample_tokens)
                if self.rank == 0:
                    (run_dir / "sample.txt").write_text(text + "\n", encoding="utf-8")
                    self.metrics.text(text, self.step)
                    log.info(
                        "sample (%d tokens, temperature 0.8, top-k 40) -> %s:\n%s",
                        t.sample_tokens,
                        run_dir / "sample.txt",
                        text,
                    )
            bad = sorted(self._bad_shards_all_ranks())
            which = f" ({', '.join(bad[:10])}{' ...' if len(bad) > 10 else ''})" if bad else ""
            log.info(
                "done: %d steps, %d tokens, %d skipped, %d bad shard(s) skipped%s. run dir "
                "%s | checkpoint %s | TensorBoard %s",
                self.step,
                self.tokens_seen,
                self.skipped_total,
                len(bad),
                which,
                run_dir,
                self.last_checkpoint,
                run_dir / "tb",
            )
            if bad:
                self.metrics.record(
                    "data", self.step, {"bad_shards_total": len(bad), "bad_shards": bad}
                )
            return EXIT_OK
        finally:
            if bar is not None:
                bar.close()
            if preempt is not None:
                preempt.uninstall()
            self.metrics.close()

    def _record_bad_shards(self, out: dict) -> None:
        """One ``data`` row per shard this rank's loader newly skipped (data.bad_shard_policy=skip),
        at the step whose batches met it (the loader also logs a warning)."""
        loader = self.train_loader
        new = [(k, why) for k, why in loader.bad_shards.items() if k not in self._bad_reported]
        step = self.step + (1 if out["skipped"] else 0)  # a skipped attempt was towards step + 1
        for (si, name), reason in new:
            self._bad_reported.add((si, name))
            self.metrics.record(
                "data",
                step,
                {
                    "bad_shard": name,
                    "shard_set": loader.plan.sets[si].path,
                    "reason": reason,
                    "bad_shards_total": len(self._bad_reported),
                },
            )

    def _bad_shards_all_ranks(self) -> set[str]:
        """Paths of the shards any rank skipped as bad (a collective: every rank calls it)."""
        sets = self.train_loader.plan.sets
        mine = {str(Path(sets[si].path) / name) for si, name in self.train_loader.bad_shards}
        return set().union(*dist.all_gather_object(sorted(mine)))

    def _eval_and_log(self) -> dict | None:
        if self.val_samples == 0:
            return None
        v = self.evaluate()
        log.info(
            "eval step %d: val_loss %.4f | val_ppl %.2f (%d tokens)",
            self.step,
            v["val_loss"],
            v["val_ppl"],
            v["val_tokens"],
        )
        self.metrics.record("val", self.step, v)
        return v


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def add_args(parser) -> None:
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest valid checkpoint (same as --checkpoint.resume=true)",
    )


def cli_main(cfg: Config, args: Any) -> int:
    """`megapt train [-c cfg.yaml] [--section.key=value ...] [--resume]` (exit codes: docstring).

    User errors (config, checkpoint, data: ``megapt.errors.UserError``) go up to ``megapt.cli``,
    which prints them as one line with their exit code; so does Ctrl-C (130)."""
    if getattr(args, "resume", False):
        cfg.checkpoint.resume = True
    from megapt.data.sources import DataError

    try:
        trainer = Trainer(cfg)
        return trainer.fit()
    except UserError:
        raise
    except FileNotFoundError as exc:  # a data, shard or tokenizer path that is not there
        raise DataError(str(exc)) from None
    finally:
        dist.destroy()
