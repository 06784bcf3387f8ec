"""`megapt bench`: one entry point for throughput, MFU/HFU, memory and comparisons.

    megapt bench train   -c configs/tiny.yaml [--runners engine,plain,hf] [--steps 5 --warmup 2]
    megapt bench sweep   -c configs/tiny.yaml --axis size=tiny,124m --axis seq=64,128 [--spec sweep.yaml]
    megapt bench compare OLD.json NEW.json [--threshold 0.05]     # exit 1 on a regression
    megapt bench data|loader|kernels [--script-args "..."]        # tokenize+shard, loader, kernels
    megapt bench planner --nproc 2 [--script-args "--mode states"] # the planner vs a real engine

``train`` is a one-point sweep of the given config. Every point runs in a fresh subprocess with a
timeout: the DeepSpeed engine (megapt.train.engine) beside two baselines measured in the same run,
a plain PyTorch loop of the same model and Hugging Face LlamaForCausalLM with the same shapes.
One JSON per run goes to --out (default benchmarks/results/<UTC timestamp>-<host>.json under the
current folder), a table to the terminal, PNG plots beside the JSON with the ``bench`` extra
(matplotlib). data, loader and kernels run ``megapt.bench.data`` / ``.loader`` / ``.kernels``
with the ``--script-args``; planner runs ``megapt.bench.planner`` under torchrun on ``--nproc``
processes. Every benchmark JSON carries ``megapt.bench.fingerprint.fingerprint()``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from megapt import hardware
from megapt.bench import report
from megapt.bench.fingerprint import fingerprint, hostname_tag
from megapt.bench.runners import RUNNERS
from megapt.bench.sweep import axis_key, load_spec, parse_axis_arg, run_sweep
from megapt.config import Config, ConfigError, load_config, save_config, to_dict
from megapt.train.process import resolve_device

ACTIONS = ("train", "sweep", "compare", "data", "loader", "kernels", "planner")
# `megapt bench <action>` -> the module whose main(argv) runs it; imported when the action runs
# (each pulls its own stack: sentencepiece, the loader, the kernels, DeepSpeed)
MODULES = {
    "data": "megapt.bench.data",
    "loader": "megapt.bench.loader",
    "kernels": "megapt.bench.kernels.run",
    "planner": "megapt.bench.planner",
}
SHORTCUT_AXES = {
    "sizes": "size",
    "seqs": "seq",
    "micro_batches": "micro_batch",
    "zero": "zero",
    "attention": "attention",
}


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "action", choices=ACTIONS, help="what to benchmark (compare: diff two JSON files)"
    )
    p.add_argument("files", nargs="*", help="compare: the baseline JSON and the new JSON")
    p.add_argument(
        "--out", default="", help="output JSON (default benchmarks/results/<timestamp>-<host>.json)"
    )
    p.add_argument("--runners", default="engine,plain,hf", help="comma list of engine, plain, hf")
    p.add_argument("--warmup", type=int, default=2, help="optimizer steps not measured (default 2)")
    p.add_argument(
        "--steps", type=int, default=5, help="measured optimizer steps per runner (default 5)"
    )
    p.add_argument(
        "--timeout", type=float, default=900.0, help="seconds per point before it is killed"
    )
    p.add_argument(
        "--data",
        choices=("synthetic", "loader"),
        default="synthetic",
        help="synthetic batches on the device (compute only) or the real shard loader",
    )
    p.add_argument(
        "--spec", default="", help="sweep spec YAML (configs, overrides, axes, runners, ...)"
    )
    p.add_argument(
        "--axis",
        action="append",
        default=[],
        metavar="NAME=v1,v2",
        help="sweep axis (size, seq, micro_batch, zero, attention, precision or a dotted config key)",
    )
    p.add_argument("--sizes", default="", help="shortcut for --axis size=...")
    p.add_argument("--seqs", default="", help="shortcut for --axis seq=...")
    p.add_argument(
        "--micro-batches",
        dest="micro_batches",
        default="",
        help="shortcut for --axis micro_batch=...",
    )
    p.add_argument("--zero", default="", help="shortcut for --axis zero=...")
    p.add_argument("--attention", default="", help="shortcut for --axis attention=...")
    p.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="devices per point: the engine runs under torchrun with this many "
        "processes (planner: processes of the torchrun job)",
    )
    p.add_argument(
        "--comm-timers",
        dest="comm_timers",
        choices=("auto", "on", "off"),
        default="auto",
        help="time DeepSpeed's gradient reduction (engine.allreduce_gradients) as comm_s (auto: on when nproc > 1)",
    )
    p.add_argument("--no-peak", action="store_true", help="skip the measured torch.mm peak")
    p.add_argument("--no-plots", action="store_true", help="skip PNG plots")
    p.add_argument("--logs", default="", help="keep each point's worker log in this folder")
    p.add_argument(
        "--threshold",
        type=float,
        default=0.05,
        help="compare: relative change counted as a regression",
    )
    p.add_argument(
        "--script-args",
        default="",
        help="data/loader/kernels/planner: arguments for that benchmark (see its --help)",
    )


def default_out_path(now: float | None = None) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    return Path("benchmarks") / "results" / f"{stamp}-{hostname_tag()}.json"


def _cli_overrides(cfg: Config, files: list[str]) -> list[str]:
    """The --section.key=value overrides that turned load_config(files) into cfg (cli.py keeps none)."""
    base, got = to_dict(load_config(files)), to_dict(cfg)
    out = []

    def walk(a, b, prefix):
        for k, v in b.items():
            if isinstance(v, dict) and isinstance(a.get(k), dict):
                walk(a[k], v, prefix + k + ".")
            elif a.get(k) != v:
                out.append(f"--{prefix}{k}={json.dumps(v)}")

    walk(base, got, "")
    return out


def _axes(args, spec: dict) -> dict:
    axes = {axis_key(k): v for k, v in (spec.get("axes") or {}).items()}
    for attr, name in SHORTCUT_AXES.items():
        if getattr(args, attr):
            key, values = parse_axis_arg(f"{name}={getattr(args, attr)}")
            axes[key] = values
    for text in args.axis:
        key, values = parse_axis_arg(text)
        axes[key] = values
    return axes


def _peaks(fp: dict, cfg: Config) -> dict:
    measured = {k: (v or {}).get("tflops") for k, v in (fp.get("measured_peak") or {}).items()}
    gpu = fp["gpu"]
    tf32 = bool(gpu.get("tf32_matmul"))
    on_gpu = fp["device"] == "cuda"
    return {
        "device": fp["device"],
        "gpu_name": gpu.get("name"),
        "spec_model": gpu.get("spec_model"),
        "spec_tflops": fp.get("spec_peak_tflops"),
        "measured_tflops": measured,
        "measured_detail": fp.get("measured_peak"),
        "used": hardware.select_peak(
            gpu.get("name") if on_gpu else None, cfg.train.precision, tf32, measured, is_cuda=on_gpu
        ),
        "table": hardware.table(),
    }


def run_train_or_sweep(cfg: Config, args, argv: list[str] | None = None) -> tuple[dict, Path]:
    """Resolve the sweep, run every point in a subprocess, write JSON + plots; returns (doc, path)."""
    spec = load_spec(args.spec) if args.spec else {}
    if spec.get("configs") or spec.get("overrides"):
        cfg = load_config(
            list(spec.get("configs") or []) + list(args.config),
            list(spec.get("overrides") or []) + _cli_overrides(cfg, list(args.config)),
        )
    axes = _axes(args, spec) if args.action == "sweep" else {}
    points = list(spec.get("points") or []) if args.action == "sweep" else []
    runners = list(spec.get("runners") or [r.strip() for r in args.runners.split(",") if r.strip()])
    bad = [r for r in runners if r not in RUNNERS]
    if bad or not runners:
        raise ConfigError(f"--runners: unknown {bad} (choose from {list(RUNNERS)})")
    warmup = int(spec.get("warmup", args.warmup))
    steps = int(spec.get("steps", args.steps))
    timeout_s = float(spec.get("timeout_s", args.timeout))
    data = spec.get("data", args.data)
    if steps < 1 or warmup < 0:
        raise ConfigError(f"--steps must be >= 1 and --warmup >= 0, got {steps} / {warmup}")

    precisions = (
        {cfg.train.precision}
        | set(axes.get("train.precision", []))
        | {pt.get("precision", pt.get("train.precision")) for pt in points} - {None}
    )
    keys = tuple(dict.fromkeys(["fp32"] + [p for p in ("bf16", "fp16") if p in precisions]))
    print(
        "[bench] fingerprint" + ("" if args.no_peak else " + measured matmul peak") + " ...",
        flush=True,
    )
    device = resolve_device(cfg.train.device)
    fp = fingerprint(
        measure=not args.no_peak, precisions=None if device == "cuda" else keys, device=device
    )
    peaks = _peaks(fp, cfg)
    print(
        f"[bench] device {fp['device']} {fp['gpu'].get('name') or fp['cpu']['model']}; MFU peak "
        f"{peaks['used'].get('tflops')} TFLOP/s ({peaks['used']['note']})",
        flush=True,
    )

    out = Path(args.out) if args.out else default_out_path()
    with tempfile.TemporaryDirectory(prefix="megapt-bench-") as tmp:
        base_yaml = Path(tmp) / "base_config.yaml"
        save_config(cfg, base_yaml)
        log_dir = Path(args.logs) if args.logs else Path(tmp) / "logs"
        comm = args.comm_timers == "on" or (args.comm_timers == "auto" and args.nproc > 1)
        points = run_sweep(
            [str(base_yaml)],
            [],
            axes,
            runners,
            warmup=warmup,
            steps=steps,
            data=data,
            measured=peaks["measured_tflops"],
            timeout_s=timeout_s,
            log_dir=log_dir,
            nproc=args.nproc,
            comm_timers=comm,
            points=points,
        )
    config = {
        "bench": {
            "action": args.action,
            "runners": runners,
            "warmup": warmup,
            "steps": steps,
            "timeout_s": timeout_s,
            "data": data,
            "spec": args.spec or None,
            "nproc": args.nproc,
            "comm_timers": comm,
        },
        "axes": axes,
        "points": points,
        "base": to_dict(cfg),
    }
    doc = report.build_document(
        args.action,
        argv=argv if argv is not None else sys.argv,
        config=config,
        fingerprint=fp,
        peaks=peaks,
        points=points,
    )
    if args.no_plots:
        doc["plots"], doc["plots_note"] = [], "--no-plots"
    else:
        doc["plots"], note = report.plot(points, out.with_suffix(""))
        if note:
            doc["plots_note"] = note
    report.write_json(out, doc)
    print(report.table(points))
    if doc.get("plots_note"):
        print(f"[bench] plots: {doc['plots_note']}")
    for p in doc["plots"]:
        print(f"[bench] plot {p}")
    print(f"[bench] wrote {out}")
    return doc, out


def run_compare(args) -> int:
    if len(args.files) != 2:
        raise ConfigError(
            "bench compare: give exactly two JSON files, the baseline then the new run"
        )
    a, b = report.load_json(args.files[0]), report.load_json(args.files[1])
    rows, warnings = report.compare(a, b, threshold=args.threshold)
    for w in warnings:
        print(f"[bench compare] warning: {w}")
    print(report.compare_table(rows))
    bad = [r for r in rows if r["regression"]]
    if not rows:
        print("[bench compare] no common (point, runner, metric) to compare")
        return 1
    if bad:
        print(
            f"[bench compare] {len(bad)} regression(s) beyond {args.threshold:.0%} "
            f"({args.files[1]} vs {args.files[0]})"
        )
        return 1
    print(f"[bench compare] no regression beyond {args.threshold:.0%} in {len(rows)} comparisons")
    return 0


def run_module(action: str, args) -> int:
    """data / loader / kernels in this process; planner under torchrun (``--nproc`` processes)."""
    argv = shlex.split(args.script_args) + (["--out", args.out] if args.out else [])
    if action == "planner":
        env = dict(os.environ)
        if not torch.cuda.is_available():
            env.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU accelerator, gloo
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={args.nproc}",
            "-m",
            MODULES[action],
            *argv,
        ]
        print(f"[bench] {' '.join(cmd)}", flush=True)
        return subprocess.call(cmd, env=env)
    module = importlib.import_module(MODULES[action])
    try:
        return int(module.main(argv) or 0)
    except SystemExit as exc:  # argparse errors, a GPU benchmark without a GPU
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1


def cli_main(cfg: Config, args) -> int:
    if args.action == "compare":
        return run_compare(args)
    if args.action in MODULES:
        return run_module(args.action, args)
    if args.files:
        raise ConfigError(f"bench {args.action}: unexpected arguments {args.files}")
    doc, _ = run_train_or_sweep(cfg, args)
    # a sweep records OOMs and failures as results; a single `train` point that failed is an error
    if args.action == "train" and any(p["status"] != "ok" for p in doc["results"]):
        return 1
    return 0
