"""Benchmark JSON, terminal table, PNG plots and run-to-run comparison.

JSON (schema "megapt-bench", version 1), one per run:
    schema, version, kind, created_utc, argv
    config       bench options, the base megapt config (resolved), sweep axes
    fingerprint  hardware / software identity (megapt.bench.fingerprint)
    peaks        spec table row for this GPU, measured torch.mm peaks, the peak MFU used and why
    formulas     MFU, HFU, tokens, memory, ratio definitions
    baselines    what each baseline runner is
    results      one record per point: params, status, planner, results.engine, baselines.{plain,hf}, ratios
    ratios       flat list: {point, metric, numerator, denominator, numerator_value, denominator_value, ratio}
    plots        PNG paths (or a note that matplotlib is missing)
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from megapt.bench.runners import BASELINES
from megapt.config import ConfigError
from megapt.model.gpt import HFU_FORMULA, MFU_FORMULA

SCHEMA = "megapt-bench"
VERSION = 1

# metric name -> (path into a runner result, higher is better)
METRICS = {
    "tokens_per_s_total": (("tokens_per_s_total", "median"), True),
    "tokens_per_s_per_device": (("tokens_per_s_per_device", "median"), True),
    "step_time_s": (("step_time_s", "median"), False),
    "mfu": (("mfu", "median"), True),
    "peak_memory_bytes": (("memory", "peak_bytes"), False),
}
RATIO_METRICS = (
    "tokens_per_s_total",
    "tokens_per_s_per_device",
    "step_time_s",
    "peak_memory_bytes",
)
RATIO_PAIRS = (("engine", "plain"), ("engine", "hf"), ("plain", "hf"))
TOKENS_FORMULA = (
    "tokens/s = real tokens (label != -100) in an optimizer step (micro_batch x grad_accum "
    "x seq_len per rank when nothing is padded) / step wall time; total = sum over ranks"
)
RATIO_FORMULA = (
    "ratio = numerator / denominator of the recorded medians (memory: peak bytes); "
    "tokens_per_s_total > 1 means the numerator is faster"
)
MEMORY_FORMULA = (
    "CUDA: peak_bytes = torch.cuda.max_memory_allocated over a runner minus what was allocated "
    "when it started (device 0; raw allocated/reserved peaks beside it). CPU (kind=rss): peak "
    "process RSS sampled every 5 ms, including what earlier runners of the process hold"
)


def metric(res: dict | None, name: str) -> float | None:
    if not res or res.get("status") != "ok":
        return None
    node = res
    for k in METRICS[name][0]:
        if not isinstance(node, dict) or node.get(k) is None:
            return None
        node = node[k]
    return float(node)


def runner_results(point: dict) -> dict:
    out = dict(point.get("baselines") or {})
    out.update(point.get("results") or {})
    return out


def point_ratios(point: dict) -> dict:
    """{"engine/plain": {metric: ratio}, ...} for the pairs where both sides are ok."""
    res = runner_results(point)
    out = {}
    for num, den in RATIO_PAIRS:
        if num not in res or den not in res:
            continue
        row = {}
        for m in RATIO_METRICS:
            a, b = metric(res[num], m), metric(res[den], m)
            if a is not None and b:
                row[m] = a / b
        if row:
            out[f"{num}/{den}"] = row
    return out


def flat_ratios(points: list[dict]) -> list[dict]:
    rows = []
    for p in points:
        res = runner_results(p)
        for pair, row in (p.get("ratios") or {}).items():
            num, den = pair.split("/")
            for m, r in row.items():
                rows.append(
                    {
                        "point": p["id"],
                        "metric": m,
                        "numerator": num,
                        "denominator": den,
                        "numerator_value": metric(res[num], m),
                        "denominator_value": metric(res[den], m),
                        "ratio": r,
                    }
                )
    return rows


def build_document(
    kind: str,
    *,
    argv: list[str],
    config: dict,
    fingerprint: dict,
    peaks: dict,
    points: list[dict],
    extra: dict | None = None,
) -> dict:
    doc = {
        "schema": SCHEMA,
        "version": VERSION,
        "kind": kind,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "argv": argv,
        "config": config,
        "fingerprint": fingerprint,
        "peaks": peaks,
        "formulas": {
            "mfu": MFU_FORMULA,
            "hfu": HFU_FORMULA,
            "tokens": TOKENS_FORMULA,
            "memory": MEMORY_FORMULA,
            "ratio": RATIO_FORMULA,
            "spread": "median over measured steps (warm-up excluded); q1/q3/iqr/min/max beside it",
        },
        "baselines": dict(BASELINES),
        "results": points,
        "ratios": flat_ratios(points),
    }
    if extra:
        doc.update(extra)
    return doc


def write_json(path: Path, doc: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def load_json(path: str) -> dict:
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read benchmark JSON: {exc}") from None
    if doc.get("schema") != SCHEMA:
        raise ConfigError(f"{p}: not a megapt benchmark JSON (schema={doc.get('schema')!r})")
    return doc


# ---------------------------------------------------------------------------------------------
# Terminal table
# ---------------------------------------------------------------------------------------------


def _fmt_bytes(b) -> str:
    if b is None:
        return "-"
    return f"{b / 2**30:.2f}G" if b >= 2**30 else f"{b / 2**20:.0f}M"


def _fmt(x, spec=".0f", scale=1.0) -> str:
    return "-" if x is None else format(x * scale, spec)


def table(points: list[dict]) -> str:
    head = [
        "point",
        "params",
        "runner",
        "status",
        "tok/s total",
        "IQR",
        "step ms",
        "data/fwd/bwd/opt ms",
        "comm ms",
        "MFU%",
        "HFU%",
        "peak mem",
        "planner",
        "vs engine",
    ]
    rows = []
    for p in points:
        res = runner_results(p)
        params = " ".join(f"{k.split('.')[-1]}={v}" for k, v in p["params"].items()) or "-"
        planner = p.get("planner") or {}
        for name in ("engine", "plain", "hf"):
            r = res.get(name)
            if r is None:
                continue
            # the planner predicts GPU memory: shown beside CUDA measurements only (and OOMs)
            on_gpu = (r.get("memory") or {}).get("kind") == "cuda" or r.get("status") == "oom"
            planned = planner.get("peak_bytes") if on_gpu else None
            if r.get("status") != "ok":
                rows.append(
                    [
                        p["id"],
                        params,
                        name,
                        r.get("status", "?"),
                        "-",
                        "-",
                        "-",
                        "-",
                        "-",
                        "-",
                        "-",
                        _fmt_bytes((r.get("memory") or {}).get("peak_bytes")),
                        _fmt_bytes(planned),
                        "-",
                    ]
                )
                continue
            ph = r.get("phases_s", {})
            split = "/".join(
                _fmt((ph.get(k) or {}).get("median"), ".0f", 1e3)
                for k in ("data_wait", "forward", "backward", "optimizer")
            )
            ratio = "-"
            if name != "engine" and f"engine/{name}" in (p.get("ratios") or {}):
                ratio = (
                    f"{p['ratios'][f'engine/{name}'].get('tokens_per_s_total', float('nan')):.2f}x"
                )
            mem = r.get("memory") or {}
            rows.append(
                [
                    p["id"],
                    params,
                    name + (" (reused)" if r.get("reused_from") else ""),
                    "ok",
                    _fmt(r["tokens_per_s_total"]["median"]),
                    _fmt(r["tokens_per_s_total"]["iqr"]),
                    _fmt(r["step_time_s"]["median"], ".0f", 1e3),
                    split,
                    _fmt((r.get("comm_s") or {}).get("median"), ".0f", 1e3),
                    _fmt((r.get("mfu") or {}).get("median"), ".2f", 100),
                    _fmt((r.get("hfu") or {}).get("median"), ".2f", 100),
                    _fmt_bytes(mem.get("peak_bytes"))
                    + (" rss" if mem.get("kind") == "rss" else ""),
                    _fmt_bytes(planned),
                    ratio,
                ]
            )
    widths = (
        [max(len(str(x)) for x in col) for col in zip(head, *rows)]
        if rows
        else [len(h) for h in head]
    )
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    out = [line(head), line(["-" * w for w in widths])] + [line(r) for r in rows]
    out.append(
        "vs engine = engine tokens/s / baseline tokens/s (>1: the DeepSpeed engine is faster)"
    )
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


RUNNER_ORDER = ("engine", "plain", "hf")
# numbers that name a choice rather than measure a quantity: drawn as categories
CATEGORICAL_AXES = ("deepspeed.zero_stage",)


def plot_style(axis: str, values: list) -> str:
    """ "bars" (grouped, one group per value) for categories: presets, ZeRO stages, backends,
    precisions; "lines" for quantities: sequence length, micro-batch, grad accumulation."""
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    return "lines" if numeric and axis not in CATEGORICAL_AXES else "bars"


def axis_values(points: list[dict]) -> dict[str, list]:
    """Every axis of the points with its values in first-seen order."""
    axes: dict[str, list] = {}
    for p in points:
        for k, v in p["params"].items():
            axes.setdefault(k, [])
            if v not in axes[k]:
                axes[k].append(v)
    return axes


def figure(points: list[dict], axis: str):
    """tokens/s and peak memory against ``axis``: one series per runner and setting of the other
    axes; grouped bars or lines by ``plot_style``. Returns (fig, (tokens_ax, memory_ax))."""
    import matplotlib.pyplot as plt  # optional (the bench extra): imported when a plot is drawn

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    xs = axis_values(points)[axis]
    style = plot_style(axis, xs)
    series: dict[str, dict] = {}
    for p in points:
        if axis not in p["params"]:  # explicit points need not all name the same keys
            continue
        others = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in p["params"].items() if k != axis)
        res = runner_results(p)
        for name in sorted(res, key=lambda n: (RUNNER_ORDER + (n,)).index(n)):  # engine first
            r = res[name]
            s = series.setdefault(f"{name} {others}".strip(), {"tps": {}, "mem": {}})
            s["tps"][p["params"][axis]] = metric(r, "tokens_per_s_total")
            s["mem"][p["params"][axis]] = metric(r, "peak_memory_bytes")
    pos = {x: i for i, x in enumerate(xs)}
    width = 0.8 / max(1, len(series))
    for i, (label, s) in enumerate(series.items()):
        for ax, key, scale in ((ax1, "tps", 1.0), (ax2, "mem", 1 / 2**30)):
            pts = sorted((pos[x], y * scale) for x, y in s[key].items() if y is not None)
            if not pts:
                continue
            if style == "bars":
                offset = (i - (len(series) - 1) / 2) * width
                ax.bar([x + offset for x, _ in pts], [y for _, y in pts], width, label=label)
            else:
                ax.plot(*zip(*pts), marker="o", label=label)
    kinds = {
        (r.get("memory") or {}).get("kind") for p in points for r in runner_results(p).values()
    }
    values = [y for s in series.values() for y in s["tps"].values() if y]
    if values and max(values) / min(values) > 20:
        ax1.set_yscale("log")
    mem_title = (
        "peak memory (GiB, process RSS)"
        if kinds == {"rss"}
        else "peak memory (GiB, CUDA allocated)"
    )
    for ax, title in ((ax1, "tokens/s (total)"), (ax2, mem_title)):
        ax.set_xticks(range(len(xs)))
        ax.set_xticklabels([str(x) for x in xs])
        ax.set_xlabel(axis)
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="y" if style == "bars" else "both")
    ax1.legend(fontsize=7)
    fig.tight_layout()
    return fig, (ax1, ax2)


def plot(points: list[dict], out_stem: Path) -> tuple[list[str], str | None]:
    """A PNG per axis that varies (``figure``); returns (png paths, note)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        return [], 'matplotlib is not installed: plots skipped (pip install "megapt[bench]")'
    varying = [k for k, vs in axis_values(points).items() if len(vs) > 1]
    if not varying:
        return [], "no axis varies: nothing to plot"
    paths = []
    for axis in varying:
        fig, _ = figure(points, axis)
        path = out_stem.with_name(f"{out_stem.name}-{axis.replace('.', '_')}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(str(path))
    return paths, None


# ---------------------------------------------------------------------------------------------
# Compare
# ---------------------------------------------------------------------------------------------


def _point_key(p: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(p["params"].items())) or "base"


def compare(a: dict, b: dict, threshold: float = 0.05) -> tuple[list[dict], list[str]]:
    """Rows for every (point, runner, metric) in both runs; flags B worse than A beyond threshold.

    Returns (rows, warnings). A row's ``regression`` is True when B is worse than A by more than
    ``threshold`` (relative), or when a runner that was ok in A failed in B.
    """
    warnings = []
    fa, fb = a.get("fingerprint", {}), b.get("fingerprint", {})
    for label, get in (
        ("GPU", lambda f: (f.get("gpu") or {}).get("name")),
        ("CPU", lambda f: (f.get("cpu") or {}).get("model")),
        ("torch", lambda f: (f.get("software") or {}).get("torch")),
    ):
        if get(fa) != get(fb):
            warnings.append(
                f"{label} differs: {get(fa)!r} vs {get(fb)!r} - numbers may not be comparable"
            )
    diff = _dict_diff(
        (a.get("config") or {}).get("base") or {}, (b.get("config") or {}).get("base") or {}
    )
    if diff:
        warnings.append(
            f"base configs differ: {', '.join(diff[:8])}{' ...' if len(diff) > 8 else ''}"
        )
    pa = {_point_key(p): p for p in a.get("results", [])}
    pb = {_point_key(p): p for p in b.get("results", [])}
    only = sorted(set(pa) ^ set(pb))
    if only:
        warnings.append(f"points in only one run (ignored): {only}")
    rows = []
    for key in [k for k in pa if k in pb]:
        ra, rb = runner_results(pa[key]), runner_results(pb[key])
        for runner in [r for r in ra if r in rb]:
            sa, sb = ra[runner].get("status"), rb[runner].get("status")
            if sa == "ok" and sb != "ok":
                rows.append(
                    {
                        "point": key,
                        "runner": runner,
                        "metric": "status",
                        "a": sa,
                        "b": sb,
                        "change": None,
                        "regression": True,
                    }
                )
                continue
            for m, (_, higher_better) in METRICS.items():
                va, vb = metric(ra[runner], m), metric(rb[runner], m)
                if va is None or vb is None or va == 0:
                    continue
                change = (vb - va) / abs(va)
                worse = -change if higher_better else change
                rows.append(
                    {
                        "point": key,
                        "runner": runner,
                        "metric": m,
                        "a": va,
                        "b": vb,
                        "change": change,
                        "regression": worse > threshold,
                    }
                )
    return rows, warnings


def _dict_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _dict_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return out


def compare_table(rows: list[dict]) -> str:
    head = ["point", "runner", "metric", "A", "B", "change", ""]
    body = []
    for r in rows:
        fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
        change = (
            "-" if r["change"] is None or math.isnan(r["change"]) else f"{r['change'] * 100:+.1f}%"
        )
        body.append(
            [
                r["point"],
                r["runner"],
                r["metric"],
                fmt(r["a"]),
                fmt(r["b"]),
                change,
                "REGRESSION" if r["regression"] else "",
            ]
        )
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in body])
