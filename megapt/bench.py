"""`megapt bench`: one entry point for throughput, MFU/HFU, memory and comparisons.

    megapt bench train   -c configs/tiny.yaml [--runners engine,plain,hf] [--steps 5 --warmup 2]
    megapt bench sweep   -c configs/tiny.yaml --axis size=tiny,124m --axis seq=64,128 [--spec sweep.yaml]
    megapt bench compare OLD.json NEW.json [--threshold 0.05]     # exit 1 on a regression
    megapt bench data|loader|kernels [--script-args "..."]        # the other workstreams' scripts

``train`` is a one-point sweep of the given config. Every point runs in a fresh subprocess with a
timeout: the DeepSpeed engine (megapt.train.engine) beside two baselines measured in the same run,
a plain PyTorch loop of the same model and Hugging Face LlamaForCausalLM with the same shapes.
One JSON per run goes to --out (default benchmarks/results/<UTC timestamp>-<host>.json), a table
to the terminal, PNG plots beside the JSON when matplotlib is installed.

Other benchmark scripts get the shared hardware fingerprint from here:

    from megapt.bench import fingerprint
    record["fingerprint"] = fingerprint()
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from megapt.benchmarking.hardware import PEAK_TFLOPS, fingerprint, hostname_tag, match_gpu, select_peak  # noqa: F401
from megapt.config import Config, ConfigError, load_config, save_config, to_dict

ACTIONS = ("train", "sweep", "compare", "data", "loader", "kernels")
REPO = Path(__file__).resolve().parents[1]
# `megapt bench <action>` -> the script another workstream owns (run as a subprocess)
SCRIPTS = {
    "data": REPO / "benchmarks" / "bench_data.py",
    "loader": REPO / "benchmarks" / "bench_loader.py",
    "kernels": REPO / "benchmarks" / "kernels" / "run_all.py",
}
SHORTCUT_AXES = {"sizes": "size", "seqs": "seq", "micro_batches": "micro_batch", "zero": "zero", "attention": "attention"}

__all__ = ["fingerprint", "PEAK_TFLOPS", "select_peak", "match_gpu", "add_args", "cli_main", "default_out_path"]


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=ACTIONS, help="what to benchmark (compare: diff two JSON files)")
    p.add_argument("files", nargs="*", help="compare: the baseline JSON and the new JSON")
    p.add_argument("--out", default="", help="output JSON (default benchmarks/results/<timestamp>-<host>.json)")
    p.add_argument("--runners", default="engine,plain,hf", help="comma list of engine, plain, hf")
    p.add_argument("--warmup", type=int, default=2, help="optimizer steps not measured (default 2)")
    p.add_argument("--steps", type=int, default=5, help="measured optimizer steps per runner (default 5)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per point before it is killed")
    p.add_argument("--data", choices=("synthetic", "loader"), default="synthetic",
                   help="synthetic batches on the device (compute only) or the real shard loader")
    p.add_argument("--spec", default="", help="sweep spec YAML (configs, overrides, axes, runners, ...)")
    p.add_argument("--axis", action="append", default=[], metavar="NAME=v1,v2",
                   help="sweep axis (size, seq, micro_batch, zero, attention, precision or a dotted config key)")
    p.add_argument("--sizes", default="", help="shortcut for --axis size=...")
    p.add_argument("--seqs", default="", help="shortcut for --axis seq=...")
    p.add_argument("--micro-batches", dest="micro_batches", default="", help="shortcut for --axis micro_batch=...")
    p.add_argument("--zero", default="", help="shortcut for --axis zero=...")
    p.add_argument("--attention", default="", help="shortcut for --axis attention=...")
    p.add_argument("--nproc", type=int, default=1,
                   help="devices per point: the engine runs under torchrun with this many processes")
    p.add_argument("--comm-timers", dest="comm_timers", choices=("auto", "on", "off"), default="auto",
                   help="time DeepSpeed's gradient reduction (engine.allreduce_gradients) as comm_s (auto: on when nproc > 1)")
    p.add_argument("--no-peak", action="store_true", help="skip the measured torch.mm peak")
    p.add_argument("--no-plots", action="store_true", help="skip PNG plots")
    p.add_argument("--logs", default="", help="keep each point's worker log in this folder")
    p.add_argument("--threshold", type=float, default=0.05, help="compare: relative change counted as a regression")
    p.add_argument("--script-args", default="", help="data/loader/kernels: arguments passed to the script")


def default_out_path(now: Optional[float] = None) -> Path:
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
    from megapt.benchmarking.sweep import axis_key, parse_axis_arg

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
    return {"device": fp["device"], "gpu_name": gpu.get("name"), "spec_model": gpu.get("spec_model"),
            "spec_tflops": fp.get("spec_peak_tflops"), "measured_tflops": measured,
            "measured_detail": fp.get("measured_peak"),
            "used": select_peak(gpu.get("name") if on_gpu else None, cfg.train.precision, tf32, measured,
                                is_cuda=on_gpu),
            "table": PEAK_TFLOPS}


def run_train_or_sweep(cfg: Config, args, argv: Optional[list[str]] = None) -> tuple[dict, Path]:
    """Resolve the sweep, run every point in a subprocess, write JSON + plots; returns (doc, path)."""
    from megapt.benchmarking import report
    from megapt.benchmarking.runners import RUNNERS, resolve_device
    from megapt.benchmarking.sweep import load_spec, run_sweep

    spec = load_spec(args.spec) if args.spec else {}
    if spec.get("configs") or spec.get("overrides"):
        cfg = load_config(list(spec.get("configs") or []) + list(args.config),
                          list(spec.get("overrides") or []) + _cli_overrides(cfg, list(args.config)))
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

    precisions = ({cfg.train.precision} | set(axes.get("train.precision", []))
                  | {pt.get("precision", pt.get("train.precision")) for pt in points} - {None})
    keys = tuple(dict.fromkeys(["fp32"] + [p for p in ("bf16", "fp16") if p in precisions]))
    print("[bench] fingerprint" + ("" if args.no_peak else " + measured matmul peak") + " ...", flush=True)
    device = resolve_device(cfg.train)
    fp = fingerprint(measure=not args.no_peak, precisions=None if device == "cuda" else keys, device=device)
    peaks = _peaks(fp, cfg)
    print(f"[bench] device {fp['device']} {fp['gpu'].get('name') or fp['cpu']['model']}; MFU peak "
          f"{peaks['used'].get('tflops')} TFLOP/s ({peaks['used']['note']})", flush=True)

    out = Path(args.out) if args.out else default_out_path()
    with tempfile.TemporaryDirectory(prefix="megapt-bench-") as tmp:
        base_yaml = Path(tmp) / "base_config.yaml"
        save_config(cfg, base_yaml)
        log_dir = Path(args.logs) if args.logs else Path(tmp) / "logs"
        comm = args.comm_timers == "on" or (args.comm_timers == "auto" and args.nproc > 1)
        points = run_sweep([str(base_yaml)], [], axes, runners, warmup=warmup, steps=steps, data=data,
                           measured=peaks["measured_tflops"], timeout_s=timeout_s, log_dir=log_dir,
                           nproc=args.nproc, comm_timers=comm, points=points)
    config = {"bench": {"action": args.action, "runners": runners, "warmup": warmup, "steps": steps,
                        "timeout_s": timeout_s, "data": data, "spec": args.spec or None, "nproc": args.nproc,
                        "comm_timers": comm},
              "axes": axes, "points": points, "base": to_dict(cfg)}
    doc = report.build_document(args.action, argv=argv if argv is not None else sys.argv, config=config,
                                fingerprint=fp, peaks=peaks, points=points)
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
    from megapt.benchmarking import report

    if len(args.files) != 2:
        raise ConfigError("bench compare: give exactly two JSON files, the baseline then the new run")
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
        print(f"[bench compare] {len(bad)} regression(s) beyond {args.threshold:.0%} "
              f"({args.files[1]} vs {args.files[0]})")
        return 1
    print(f"[bench compare] no regression beyond {args.threshold:.0%} in {len(rows)} comparisons")
    return 0


def run_script(action: str, args) -> int:
    """Run another workstream's benchmark script (it writes its own JSON with our fingerprint)."""
    script = SCRIPTS[action]
    if not script.is_file():
        print(f"megapt bench {action}: {script} not found (it comes with a source checkout "
              f"and belongs to the {action} workstream)", file=sys.stderr)
        return 2
    results_dir = REPO / "benchmarks" / "results"
    before = {p: p.stat().st_mtime for p in results_dir.rglob("*.json")} if results_dir.is_dir() else {}
    cmd = [sys.executable, str(script)] + shlex.split(args.script_args) + (["--out", args.out] if args.out else [])
    print(f"[bench] {' '.join(cmd)}", flush=True)
    rc = subprocess.call(cmd, cwd=str(REPO))
    written = [p for p in ([Path(args.out)] if args.out else results_dir.rglob("*.json"))
               if p.is_file() and before.get(p) != p.stat().st_mtime]
    for p in written:
        print(f"[bench] {action} wrote {p}")
    if rc == 0 and not written:
        print(f"[bench] warning: {script.name} exited 0 but wrote no JSON under {results_dir}", file=sys.stderr)
    return rc


def cli_main(cfg: Config, args) -> int:
    if args.action == "compare":
        return run_compare(args)
    if args.action in SCRIPTS:
        return run_script(args.action, args)
    if args.files:
        raise ConfigError(f"bench {args.action}: unexpected arguments {args.files}")
    doc, _ = run_train_or_sweep(cfg, args)
    # a sweep records OOMs and failures as results; a single `train` point that failed is an error
    if args.action == "train" and any(p["status"] != "ok" for p in doc["results"]):
        return 1
    return 0
