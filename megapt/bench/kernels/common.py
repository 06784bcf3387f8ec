"""Shared pieces of the kernel benchmarks: timing, fingerprint, JSON and plots.

Every number is measured in the same process as its baselines; each row records the provider,
the shape, the median time and a throughput (TFLOP/s for attention, GB/s for the memory-bound
ops), and ``speedup_vs`` holds megapt's time ratio against every baseline of the same case.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from megapt.bench.fingerprint import fingerprint as full_fingerprint
from megapt.bench.fingerprint import hostname_tag

RESULTS_DIR = Path("benchmarks") / "results"  # under the current folder
MEGAPT = "megapt"  # provider name of our kernels in every table
# Where the benchmarks allocate. Always "cuda" for real numbers; the unit tests set "cpu" (with
# TRITON_INTERPRET=1 and tiny cases) to exercise the code paths without a GPU.
DEVICE = "cuda"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def fingerprint() -> dict:
    """The shared megapt fingerprint (GPU, driver, versions, CPU), no matmul peak measured."""
    return full_fingerprint(measure=False)


def time_ms(fn: Callable[[], object], grad_to_none=None, warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of ``fn`` on the current CUDA device (L2 flushed between runs)."""
    if DEVICE != "cuda":  # smoke tests only: wall clock of a few calls
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return sorted(times)[0]
    try:
        from triton.testing import do_bench

        return float(
            do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median")
        )
    except ImportError:  # plain CUDA events
        for _ in range(3):
            fn()
        times = []
        for _ in range(max(5, rep // 10)):
            if grad_to_none:
                for t in grad_to_none:
                    t.grad = None
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[len(times) // 2]


def peak_mem_mb(fn: Callable[[], object]) -> float:
    """Extra peak CUDA memory (MiB) of one call of ``fn`` above what was allocated before."""
    if DEVICE != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def measure(
    row: dict,
    fn: Callable[[], object],
    *,
    work: float,
    unit: str,
    grad_to_none=None,
    quick: bool = False,
    memory: bool = False,
) -> dict:
    """Fill ``row`` with ms and throughput (work per second in ``unit``); errors are recorded, not raised."""
    try:
        fn()  # compile / autotune / build graphs outside the timed region
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        sync()
        if memory:
            row["peak_mem_mb"] = round(peak_mem_mb(fn), 1)
        ms = time_ms(
            fn, grad_to_none=grad_to_none, warmup=5 if quick else 25, rep=20 if quick else 100
        )
        row.update(status="ok", ms=float(f"{ms:.5g}"), **{unit: float(f"{work / (ms * 1e-3):.4g}")})
    except torch.cuda.OutOfMemoryError:
        row.update(status="oom")
        empty_cache()
    except Exception as exc:  # noqa: BLE001 - a failing baseline must not hide the others
        row.update(status=f"error: {type(exc).__name__}: {str(exc)[:300]}")
    return row


def empty_cache() -> None:
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def add_speedups(rows: list[dict], case_keys: tuple[str, ...]) -> None:
    """For each case, megapt's speedup over every other provider: t_baseline / t_megapt."""
    by_case: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        by_case.setdefault(tuple(r.get(k) for k in case_keys), {})[r["provider"]] = r
    for providers in by_case.values():
        ours = providers.get(MEGAPT)
        if not ours or ours.get("status") != "ok":
            continue
        ours["speedup_vs"] = {
            name: round(r["ms"] / ours["ms"], 3)
            for name, r in providers.items()
            if name != MEGAPT and r.get("status") == "ok"
        }


def default_out() -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return RESULTS_DIR / f"kernels-{stamp}-{hostname_tag()}.json"


def write_json(path: Path, doc: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def line_plot(
    rows: list[dict], *, x: str, y: str, panel_keys: tuple[str, ...], title: str, out: Path
) -> str | None:
    """One panel per distinct value of ``panel_keys``, one line per provider. None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ok = [r for r in rows if r.get("status") == "ok" and y in r]
    panels = sorted({tuple(r[k] for k in panel_keys) for r in ok}, key=str)
    if not panels:
        return None
    cols = min(4, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        sub = [r for r in ok if tuple(r[k] for k in panel_keys) == panel]
        for prov in sorted({r["provider"] for r in sub}):
            pts = sorted((r[x], r[y]) for r in sub if r["provider"] == prov)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=prov)
        ax.set_title(", ".join(f"{k}={v}" for k, v in zip(panel_keys, panel)), fontsize=9)
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        if (
            isinstance(sub[0][x], (int, float))
            and max(r[x] for r in sub) / max(1, min(r[x] for r in sub)) > 8
        ):
            ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return str(out)


def require_cuda(what: str) -> None:
    if not torch.cuda.is_available():
        print(
            f"{what}: needs a CUDA GPU (torch sees none). `--dry-run` lists the cases and writes the "
            "fingerprint without running anything.",
            file=sys.stderr,
        )
        raise SystemExit(2)
