"""Checkpoints that are either complete or absent.

Layout of ``<checkpoint_dir>/step_0000300/``::

    ds/                       DeepSpeed's save_checkpoint (model, optimizer partitions, LR scheduler)
    ds_universal/             optional: `megapt ckpt universal` output (ZeRO 1-3; reshardable)
    megapt.json               our client state: step, tokens seen, loader state, world size, ZeRO
                              stage, precision, model args, tokenizer sha256, optimizer groups
                              (hyperparameters, Adam step) and LR schedule state
    rng.json                  RNG states of every rank (python, numpy, torch cpu, cuda)
    config.yaml               the resolved config of the run
    tokenizer.model           copy of the tokenizer
    model_config.json         ModelArgs (rebuilds the model alone)
    MANIFEST.json             sha256 and size of every file above (written last)

Save: every rank writes into ``step_0000300.tmp``; after a barrier rank 0 hashes every file, writes
the manifest and renames the folder atomically. A crash at any point leaves the previous checkpoints
intact and at most a ``.tmp`` folder, which is never loaded and is removed by the next save.
Rotation keeps the newest ``keep_last`` valid checkpoints and never deletes the only valid one.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megapt.errors import EXIT_CHECKPOINT, UserError
from megapt.train import dist
from megapt.train.process import seed_everything

log = logging.getLogger("megapt.train")

STEP_RE = re.compile(r"^step_(\d{7,})$")
MANIFEST = "MANIFEST.json"
META = "megapt.json"
DS_TAG = "ds"
UNIVERSAL_TAG = "ds_universal"
FORMAT = "megapt-checkpoint"
VERSION = 1

# ModelArgs fields that do not change the shape/maths of the weights
_NON_SHAPE_ARGS = {"dropout", "init_std"}


class CheckpointError(UserError, RuntimeError):
    """Missing, corrupt or incompatible checkpoint; the message says which and what to do."""

    exit_code = EXIT_CHECKPOINT
    kind = "checkpoint error"


class CheckpointWriteError(CheckpointError, OSError):
    """A save failed (disk full, I/O error) before the rename: earlier checkpoints are intact.
    Also an OSError carrying the original errno (ENOSPC for a full disk)."""


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


# --------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_manifest(ckpt: Path) -> dict:
    files = {}
    for p in sorted(ckpt.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            rel = p.relative_to(ckpt).as_posix()
            files[rel] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    manifest = {"format": FORMAT, "version": VERSION, "files": files, "created": time.time()}
    _atomic_write_text(ckpt / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def verify_checkpoint(ckpt: Path, hashes: bool = True) -> list[str]:
    """Problems with ``ckpt`` (empty list = valid): missing manifest, missing/extra-size/mismatching files."""
    ckpt = Path(ckpt)
    mpath = ckpt / MANIFEST
    if not mpath.is_file():
        return [f"{mpath}: missing (the save did not finish)"]
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        return [f"{mpath}: unreadable manifest ({exc})"]
    problems = []
    for rel, entry in files.items():
        p = ckpt / rel
        if not p.is_file():
            problems.append(f"{p}: listed in the manifest but missing")
        elif p.stat().st_size != entry["bytes"]:
            problems.append(f"{p}: {p.stat().st_size} bytes, manifest says {entry['bytes']}")
        elif hashes and sha256_file(p) != entry["sha256"]:
            problems.append(f"{p}: sha256 mismatch (file changed or corrupt)")
    return problems


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Finished (renamed) checkpoint folders under ``root``, oldest first (validity not checked)."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = STEP_RE.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def find_latest_valid(root: Path, hashes: bool = True) -> Path | None:
    for _step, p in reversed(list_checkpoints(root)):
        problems = verify_checkpoint(p, hashes=hashes)
        if not problems:
            return p
        log.warning(
            "checkpoint %s is not valid, trying an older one: %s", p, "; ".join(problems[:3])
        )
    return None


def rotate(root: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` valid checkpoints (invalid ones older than the newest
    valid one go too); never delete the newest valid checkpoint. Returns deleted paths."""
    ckpts = list_checkpoints(root)
    valid = [
        (s, p)
        for s, p in ckpts
        if (p / MANIFEST).is_file() and not verify_checkpoint(p, hashes=False)
    ]
    if not valid:
        return []
    keep = {p for _, p in valid[-max(1, keep_last) :]}
    newest_valid_step = valid[-1][0]
    deleted = []
    for s, p in ckpts:
        if p in keep or s > newest_valid_step:
            continue
        shutil.rmtree(p, ignore_errors=True)
        deleted.append(p)
    for stale in Path(root).glob("step_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    return deleted


# --------------------------------------------------------------------------------------------
# RNG state (JSON)
# --------------------------------------------------------------------------------------------


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def rng_state() -> dict:
    py = random.getstate()
    npst: Any = np.random.get_state()  # legacy form: (name, keys, pos, has_gauss, gauss)
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [npst[0], npst[1].tolist(), int(npst[2]), int(npst[3]), float(npst[4])],
        "torch": _b64(torch.get_rng_state()),
        "cuda": [_b64(s) for s in torch.cuda.get_rng_state_all()]
        if torch.cuda.is_available()
        else [],
    }
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(_unb64(state["torch"]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


# --------------------------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------------------------


def save_checkpoint(
    root: Path,
    step: int,
    engine: Any,
    meta: dict,
    *,
    config_text: str,
    tokenizer_path: Path | None,
    keep_last: int,
) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint path."""
    root = Path(root)
    final = root / step_dir_name(step)
    tmp = root / (step_dir_name(step) + ".tmp")
    if dist.rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        # every unfinished save (ours from a failed/killed attempt, any step): never loaded, and on
        # a full disk it holds the space this save needs
        for stale in root.glob("step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    try:
        _write_checkpoint(
            root,
            tmp,
            final,
            step,
            engine,
            meta,
            config_text=config_text,
            tokenizer_path=tokenizer_path,
            keep_last=keep_last,
        )
    except (OSError, RuntimeError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise _write_error(root, tmp, exc) from exc
    return final


def _write_error(root: Path, tmp: Path, exc: BaseException) -> CheckpointWriteError:
    try:
        free = f"{shutil.disk_usage(root).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    code = getattr(exc, "errno", None)
    why = "no space left on the device" if code == errno.ENOSPC else f"{type(exc).__name__}: {exc}"
    if code is None and "unexpected pos" in str(exc):  # torch's zip writer on a full disk
        why = f"write failed ({exc}); the disk is probably full"
    try:
        prev = find_latest_valid(root)
    except Exception:  # noqa: BLE001 - the message must still be produced
        prev = None
    keep = (
        f"the previous checkpoint {prev} is intact"
        if prev
        else "no earlier valid checkpoint exists"
    )
    err = CheckpointWriteError(
        f"saving checkpoint into {tmp} failed: {why} ({free} on {root}); "
        f"{keep}. Free space (or point checkpoint.dir elsewhere) and --resume."
    )
    err.errno = code
    return err


def _write_checkpoint(
    root: Path,
    tmp: Path,
    final: Path,
    step: int,
    engine: Any,
    meta: dict,
    *,
    config_text: str,
    tokenizer_path: Path | None,
    keep_last: int,
) -> None:
    rngs = dist.all_gather_object(rng_state())
    # universal_checkpoint_info (no tensor/pipeline parallelism: nothing to describe but the version)
    # is what `megapt ckpt universal` (ds_to_universal) needs to reshard this checkpoint later
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    client = {
        UNIVERSAL_CHECKPOINT_INFO: {
            UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE
        }
    }
    if getattr(getattr(engine, "module", None), UNIVERSAL_CHECKPOINT_INFO, None) is not None:
        client = {}  # tensor parallelism: DeepSpeed's AutoTP writes its own (shard layout included)
    engine.save_checkpoint(str(tmp), tag=DS_TAG, client_state=client, save_latest=False)
    dist.barrier()
    if dist.rank() == 0:
        meta = dict(meta, format=FORMAT, version=VERSION, step=step, ds_tag=DS_TAG)
        _atomic_write_text(tmp / META, json.dumps(meta, indent=1, sort_keys=True))
        _atomic_write_text(tmp / "rng.json", json.dumps({"ranks": rngs}))
        _atomic_write_text(tmp / "config.yaml", config_text)
        if meta.get("model_args") is not None:
            _atomic_write_text(tmp / "model_config.json", json.dumps(meta["model_args"], indent=1))
        if tokenizer_path is not None and Path(tokenizer_path).is_file():
            shutil.copy2(tokenizer_path, tmp / "tokenizer.model")
        write_manifest(tmp)
        if final.exists():  # a previous run's checkpoint at the same step: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        deleted = rotate(root, keep_last)
        if deleted:
            log.info("removed old checkpoints: %s", ", ".join(p.name for p in deleted))
    dist.barrier()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def read_meta(ckpt: Path) -> dict:
    p = Path(ckpt) / META
    if not p.is_file():
        raise CheckpointError(f"{p}: missing; {ckpt} is not a megapt checkpoint")
    return json.loads(p.read_text(encoding="utf-8"))


def resolve_checkpoint(cfg_ckpt: Any, root: Path) -> Path | None:
    """The checkpoint to start from: ``checkpoint.load`` if set (must be valid), else the newest valid
    one under ``root`` when ``checkpoint.resume`` (None if there is none yet), else None.
    Rank 0 decides (hashing every file) and broadcasts the choice."""
    choice: Any = None
    path: Path | None
    if dist.rank() == 0:
        try:
            if cfg_ckpt.load:
                path = Path(cfg_ckpt.load)
                if not path.is_dir():
                    raise CheckpointError(f"checkpoint.load: {path} does not exist")
                problems = verify_checkpoint(path)
                if problems:
                    raise CheckpointError(
                        f"checkpoint.load: {path} is not a valid checkpoint:\n  "
                        + "\n  ".join(problems[:10])
                    )
                choice = str(path)
            elif cfg_ckpt.resume:
                path = find_latest_valid(root)
                choice = str(path) if path else None
        except CheckpointError as exc:
            choice = exc
    choice = dist.broadcast_object(choice)
    if isinstance(choice, Exception):
        raise CheckpointError(str(choice))
    return Path(choice) if choice else None


def check_compatible(
    meta: dict, *, model_args: dict, world_size: int, zero_stage: int, universal: bool, ckpt: Path
) -> None:
    """Raise CheckpointError naming every mismatch between a checkpoint and this run."""
    problems = []
    saved_args = meta.get("model_args") or {}
    for key in sorted(set(saved_args) | set(model_args)):
        if key in _NON_SHAPE_ARGS:
            continue
        if saved_args.get(key) != model_args.get(key):
            problems.append(
                f"model.{key}: checkpoint has {saved_args.get(key)!r}, this run has {model_args.get(key)!r}"
            )
    if problems:
        raise CheckpointError(
            f"{ckpt}: the checkpoint was saved for a different model:\n  "
            + "\n  ".join(problems)
            + "\nuse the same model settings (see the checkpoint's config.yaml) or start a new run "
            "(another run.name or checkpoint.dir)"
        )
    s_world, s_stage = meta.get("world_size"), int(meta.get("zero_stage") or 0)
    if universal:
        if s_stage and not (Path(ckpt) / UNIVERSAL_TAG).is_dir():
            raise CheckpointError(
                f"{ckpt}: checkpoint.universal=true but this ZeRO-{s_stage} checkpoint has no "
                f"{UNIVERSAL_TAG}/ yet; convert it once (megapt ckpt universal {ckpt}), then "
                "resume again"
            )
        return
    if s_stage == zero_stage and (s_stage == 0 or s_world == world_size):
        return  # ZeRO-0 holds the whole optimizer state in one file: any world size loads it
    how = (
        "it needs no conversion: resume with --checkpoint.universal=true"
        if s_stage == 0
        else f"convert it once (megapt ckpt universal {ckpt}), then resume with "
        "--checkpoint.universal=true"
    )
    raise CheckpointError(
        f"{ckpt}: saved with ZeRO stage {s_stage} at world size {s_world}; this run has stage "
        f"{zero_stage} at world size {world_size}. A plain resume needs the same stage (and, for "
        f"ZeRO 1-3, the same world size); {how} to load it at any stage 0-3 and any world size."
    )


def _deepspeed_safe_globals() -> list:
    """The plain DeepSpeed types its checkpoints pickle (besides tensors and builtins)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only_loads(ckpt: Path):
    """Every ``torch.load`` inside runs torch's weights-only unpickler, DeepSpeed's own included
    (it passes weights_only=False): a crafted checkpoint cannot run code. Only DeepSpeed's plain
    state types are allowlisted; anything else is refused as a CheckpointError naming ckpt."""
    import pickle

    old = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            yield
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()
        why = next(
            (line.strip() for line in first if "GLOBAL" in line or "Unsupported" in line),
            first[0] if first else "",
        )
        raise CheckpointError(
            f"{ckpt}: refused to load: it pickles something other than tensors and "
            f"DeepSpeed's state types ({why}). Only load checkpoints you trust."
        ) from None
    finally:
        if old is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old


def load_engine_state(engine: Any, ckpt: Path) -> None:
    """A plain resume: DeepSpeed loads its own files (same ZeRO stage; for ZeRO 1-3 the same world
    size). Universal checkpoints go through megapt.train.reshard instead."""
    with weights_only_loads(ckpt):
        path, _ = engine.load_checkpoint(
            str(ckpt), tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
        )
    if path is None:
        raise CheckpointError(f"{ckpt}/{DS_TAG}: DeepSpeed found no checkpoint to load")


def load_rng(ckpt: Path, rank: int, world_size: int, seed: int, step: int) -> None:
    data = json.loads((Path(ckpt) / "rng.json").read_text(encoding="utf-8"))["ranks"]
    if len(data) == world_size:
        set_rng_state(data[rank])
    else:  # resharded resume: exact RNG continuation is impossible; reseed deterministically
        seed_everything((seed * 1_000_003 + step * 101 + rank) % (2**31))
        log.warning(
            "checkpoint had %d ranks, this run has %d: RNG states reseeded", len(data), world_size
        )
