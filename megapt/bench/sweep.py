"""Sweeps: model size x seq len x micro-batch x ZeRO stage x attention backend (any config key).

Each point runs in a fresh subprocess (``megapt.bench.worker``) with a timeout, so an OOM,
a crash or a hang costs that point only: it is recorded (OOM with the planner's prediction) and
the sweep goes on. Baselines that do not depend on an axis (plain PyTorch ignores the ZeRO stage,
HF also ignores megapt's kernel backends) are measured once and reused by the points that share
their shapes, marked ``reused_from``.

Spec YAML (every key optional):

    configs: [configs/tiny.yaml]          # base config files
    overrides: ["--train.precision=bf16"]
    axes:                                 # alias or dotted config key -> values
      size: [tiny, 124m]                  # model.preset
      seq: [128, 512]                     # data.seq_len
      micro_batch: [4, 8]                 # train.micro_batch
      zero: [0, 1, 2, 3]                  # deepspeed.zero_stage
      attention: [sdpa, triton]           # model.attention
    points:                               # explicit points (each combined with the axes product);
      - {size: 124m, seq: 1024}           # for goals that are not a product, e.g. 124m at seq
      - {size: 1b, seq: 2048, zero: 3}    # 1024 and 1b at ZeRO-3 in one run
    runners: [engine, plain, hf]
    warmup: 2
    steps: 5
    timeout_s: 900
    data: synthetic                       # or loader (real shards)
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from megapt.bench.report import point_ratios
from megapt.bench.runners import RUNNERS
from megapt.config import ConfigError

AXIS_ALIASES = {
    "size": "model.preset",
    "seq": "data.seq_len",
    "seq_len": "data.seq_len",
    "micro_batch": "train.micro_batch",
    "mb": "train.micro_batch",
    "zero": "deepspeed.zero_stage",
    "zero_stage": "deepspeed.zero_stage",
    "attention": "model.attention",
    "precision": "train.precision",
    "grad_accum": "train.grad_accum",
}
SPEC_KEYS = {
    "configs",
    "overrides",
    "axes",
    "points",
    "runners",
    "warmup",
    "steps",
    "timeout_s",
    "data",
}
# config keys a baseline ignores: it is reused across points differing only there
BASELINE_IGNORES = {
    "plain": ("deepspeed.",),
    "hf": ("deepspeed.", "model.attention", "model.norm", "model.rope", "model.loss"),
}


def axis_key(name: str) -> str:
    key = AXIS_ALIASES.get(name, name)
    if "." not in key:
        raise ConfigError(
            f"sweep axis {name!r}: use one of {sorted(AXIS_ALIASES)} or a dotted config key"
        )
    return key


def load_spec(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: sweep spec not found")
    data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a sweep spec is a mapping, got {type(data).__name__}")
    bad = sorted(set(data) - SPEC_KEYS)
    problems = [f"{p}: unknown key {k!r} (allowed: {sorted(SPEC_KEYS)})" for k in bad]
    axes = data.get("axes") or {}
    if not isinstance(axes, dict):
        problems.append(f"{p}: axes must map an axis to a list of values")
        axes = {}
    for k, v in axes.items():
        if not isinstance(v, list) or not v:
            problems.append(f"{p}: axes.{k} must be a non-empty list, got {v!r}")
    points = data.get("points")
    if points is not None:
        if not isinstance(points, list) or not points:
            problems.append(f"{p}: points must be a non-empty list of mappings (axis -> value)")
        else:
            for i, pt in enumerate(points):
                if not isinstance(pt, dict) or not pt:
                    problems.append(
                        f"{p}: points[{i}] must be a non-empty mapping (axis -> value), got {pt!r}"
                    )
                    continue
                for k, v in pt.items():
                    if isinstance(v, (list, dict)):
                        problems.append(f"{p}: points[{i}].{k} must be one value, got {v!r}")
                    try:
                        axis_key(str(k))
                    except ConfigError as e:
                        problems.append(f"{p}: points[{i}]: {e}")
    for r in data.get("runners") or []:
        if r not in RUNNERS:
            problems.append(f"{p}: runners: unknown runner {r!r} (choose from {list(RUNNERS)})")
    if problems:
        raise ConfigError("\n  ".join(problems))
    return data


def parse_axis_arg(text: str) -> tuple[str, list]:
    """``size=tiny,124m`` -> ("model.preset", ["tiny", "124m"]); values parsed as YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"--axis {text!r}: expected NAME=v1,v2,...")
    name, values = text.split("=", 1)
    return axis_key(name.strip()), [yaml.safe_load(v) for v in values.split(",") if v != ""]


def expand(axes: dict, points: list[dict] | None = None) -> list[dict]:
    """Cartesian product in the order given: the last axis varies fastest.

    ``points`` (explicit axis -> value mappings): each is combined with every product point, the
    axes winning where both name a key; duplicates are dropped."""
    keys = [axis_key(k) for k in axes]
    product = (
        [dict(zip(keys, combo)) for combo in itertools.product(*axes.values())] if keys else [{}]
    )
    if not points:
        return product
    out: list[dict] = []
    for pt in points:
        base = {axis_key(str(k)): v for k, v in pt.items()}
        for combo in product:
            params = {**base, **combo}
            if params not in out:
                out.append(params)
    return out


def point_overrides(params: dict) -> list[str]:
    return [f"--{k}={v}" for k, v in params.items()]


def baseline_key(runner: str, params: dict) -> tuple | None:
    ignores = BASELINE_IGNORES.get(runner)
    if ignores is None:
        return None
    return tuple(
        sorted((k, str(v)) for k, v in params.items() if not any(k.startswith(i) for i in ignores))
    )


# ---------------------------------------------------------------------------------------------
# Subprocess per point
# ---------------------------------------------------------------------------------------------


def _classify_failure(rc: int | None, log_tail: str, timed_out: bool) -> tuple[str, str]:
    if timed_out:
        return "timeout", "point exceeded its timeout and was killed"
    low = log_tail.lower()
    if "out of memory" in low or "outofmemoryerror" in low:
        return "oom", "out of memory (see log tail)"
    if rc is not None and rc < 0 and -rc == signal.SIGKILL:
        return "oom", "killed by SIGKILL: most likely the host OOM killer"
    return "error", f"worker exited with code {rc}"


def worker_command(spec_path: Path, out_path: Path, nproc: int = 1) -> list[str]:
    if nproc > 1:  # one process per GPU, as the deepspeed/torchrun launchers do
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "megapt.bench.worker",
            str(spec_path),
            str(out_path),
        ]
    return [sys.executable, "-m", "megapt.bench.worker", str(spec_path), str(out_path)]


def run_point_subprocess(
    config_files: list[str],
    overrides: list[str],
    runners: list[str],
    *,
    warmup: int,
    steps: int,
    data: str,
    measured: dict,
    timeout_s: float,
    workdir: Path,
    name: str,
    nproc: int = 1,
    comm_timers: bool = False,
) -> dict:
    """Run the worker for one point; always returns a dict (with whatever the worker wrote)."""
    spec = {
        "config_files": config_files,
        "overrides": overrides,
        "runners": runners,
        "warmup": warmup,
        "steps": steps,
        "data": data,
        "measured": measured,
        "comm_timers": comm_timers,
    }
    spec_path, out_path, log_path = (
        workdir / f"{name}.spec.json",
        workdir / f"{name}.out.json",
        workdir / f"{name}.log",
    )
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    t0 = time.perf_counter()
    timed_out = False
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            worker_command(spec_path, out_path, nproc),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=os.environ.copy(),
        )
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
    wall = time.perf_counter() - t0
    log_tail = log_path.read_text(encoding="utf-8", errors="replace")[-4000:]
    try:
        out = json.loads(out_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        out = {"runners": {}, "planner": None}
    res = {
        "returncode": rc,
        "wall_s": wall,
        "planner": out.get("planner"),
        "runners": out.get("runners", {}),
    }
    missing = [r for r in runners if r not in res["runners"]]
    if rc != 0 or timed_out or missing:
        status, why = _classify_failure(rc, log_tail, timed_out)
        res["failure"] = {"status": status, "reason": why, "log_tail": log_tail}
        for r in missing:  # the runner that was running when the process died, and those after it
            res["runners"][r] = {"status": status, "error": why, "memory": None}
            status, why = "not_run", f"not run: the worker died during an earlier runner ({why})"
    return res


def point_status(results: dict, requested: list[str]) -> str:
    statuses = [results.get(r, {}).get("status") for r in requested]
    if all(s == "ok" for s in statuses):
        return "ok"
    first = results.get(requested[0], {}).get("status") if requested else None
    if first in ("oom", "timeout", "error", "unavailable"):
        return first
    return "partial"


def run_sweep(
    config_files: list[str],
    base_overrides: list[str],
    axes: dict,
    runners: list[str],
    *,
    warmup: int,
    steps: int,
    data: str,
    measured: dict,
    timeout_s: float,
    log_dir: Path | None = None,
    progress=print,
    nproc: int = 1,
    comm_timers: bool = False,
    points: list[dict] | None = None,
) -> list[dict]:
    """Every point of the product in its own subprocess; returns the point records.

    nproc > 1: the engine runs under torchrun on nproc devices; the baselines (single-device loops)
    run in a separate one-process worker for the same point."""
    points = expand(axes, points)
    tmp = None
    if log_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="megapt-bench-")
        log_dir = Path(tmp.name)
    log_dir.mkdir(parents=True, exist_ok=True)
    done_baselines: dict[tuple, tuple[str, dict]] = {}
    records = []
    try:
        for i, params in enumerate(points):
            pid = f"p{i:03d}"
            todo, reused = [], {}
            for r in runners:
                key = baseline_key(r, params)
                if key is not None and (r, key) in done_baselines:
                    src, res = done_baselines[(r, key)]
                    reused[r] = dict(res, reused_from=src)
                else:
                    todo.append(r)
            label = ", ".join(f"{k}={v}" for k, v in params.items()) or "base config"
            progress(
                f"[bench] {pid} ({i + 1}/{len(points)}) {label}: running {todo or 'nothing'}"
                + (f", reusing {sorted(reused)}" if reused else "")
            )
            overrides = base_overrides + point_overrides(params)
            common = dict(
                warmup=warmup,
                steps=steps,
                data=data,
                measured=measured,
                timeout_s=timeout_s,
                workdir=log_dir,
                comm_timers=comm_timers,
            )
            groups = (
                [(todo, 1)]
                if nproc <= 1
                else [
                    (["engine"] if "engine" in todo else [], nproc),
                    ([r for r in todo if r != "engine"], 1),
                ]
            )
            sub = {"runners": {}, "planner": None, "returncode": 0, "wall_s": 0.0}
            for j, (group, n) in enumerate(g for g in groups if g[0]):
                part = run_point_subprocess(
                    config_files,
                    overrides,
                    group,
                    name=pid if j == 0 else f"{pid}-{j}",
                    nproc=n,
                    **common,
                )
                sub["runners"].update(part["runners"])
                sub["planner"] = sub["planner"] or part.get("planner")
                sub["returncode"] = sub["returncode"] or part.get("returncode")
                sub["wall_s"] += part.get("wall_s") or 0.0
                if "failure" in part and "failure" not in sub:
                    sub["failure"] = part["failure"]
            results = dict(sub["runners"])
            results.update(reused)
            for r in todo:
                key = baseline_key(r, params)
                if key is not None and results.get(r, {}).get("status") == "ok":
                    done_baselines[(r, key)] = (pid, results[r])
            engine = results.get("engine")
            rec = {
                "id": pid,
                "params": params,
                "overrides": overrides,
                "nproc": nproc,
                "status": point_status(results, runners),
                "planner": sub.get("planner"),
                "results": {"engine": engine} if engine is not None else {},
                "baselines": {r: results[r] for r in runners if r != "engine" and r in results},
                "returncode": sub.get("returncode"),
                "wall_s": sub.get("wall_s"),
            }
            if "failure" in sub:
                rec["failure"] = sub["failure"]
            rec["ratios"] = point_ratios(rec)
            records.append(rec)
            progress(
                f"[bench] {pid}: {rec['status']}  "
                + "  ".join(f"{r}={_short(res)}" for r, res in results.items())
            )
    finally:
        if tmp is not None:
            tmp.cleanup()
    return records


def _short(res: dict) -> str:
    if res.get("status") != "ok":
        return res.get("status", "?")
    return f"{res['tokens_per_s_total']['median']:.0f} tok/s"
