"""Hardware fingerprint and a measured matmul peak.

Every benchmark JSON carries ``fingerprint()`` so two runs can be told apart (and compared only
when they ran on the same kind of machine). MFU needs a peak: the vendor's dense (no-sparsity)
number for the precision in use when the GPU model is in ``megapt.hardware.GPUS``; for an unknown
GPU, and always on CPU, ``megapt.hardware.select_peak`` falls back to the matmul peak measured here
(``torch.mm`` of large square matrices: median of repeats on a GPU, best repeat over ~1 s on a
shared CPU) and says so in the JSON.

    from megapt.bench.fingerprint import fingerprint
    fp = fingerprint()            # measures the matmul peak once per process (seconds on a GPU)
    fp = fingerprint(measure=False)
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from megapt.hardware import GPUS, PRECISION_KEYS, match_gpu

# ---------------------------------------------------------------------------------------------
# Measured peak
# ---------------------------------------------------------------------------------------------


def measure_matmul_tflops(
    device: str = "cpu",
    key: str = "fp32",
    n: int | None = None,
    repeats: int | None = None,
    warmup: int = 2,
    min_time_s: float | None = None,
) -> dict:
    """TFLOP/s of ``torch.mm`` on (n, n) x (n, n) matrices: 2 n^3 flops per call.

    ``tflops`` (the peak MFU is measured against) is the median over the repeats on a GPU (the
    device is ours alone), and the best repeat on a CPU: a shared CPU only ever runs slower than
    it can, and a median taken while another process runs understates the peak, which overstates
    MFU (a 5 x 512^3 median on the shared 2-core VM gave 55-75 GFLOP/s between runs, and MFU over
    100 %). On CPU the repeats go on until ``min_time_s`` (default 1 s) has been spent."""
    import torch

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    dtype = {
        "bf16": torch.bfloat16,
        "fp16": torch.float16,
        "tf32": torch.float32,
        "fp32": torch.float32,
    }[key]
    if n is None:
        n = (8192 if key in ("bf16", "fp16", "tf32") else 4096) if cuda else 1024
    repeats = repeats or (20 if cuda else 5)
    min_time_s = (0.0 if cuda else 1.0) if min_time_s is None else min_time_s
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32 if cuda else None
    try:
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = key == "tf32"
        a = torch.randn(n, n, device=dev, dtype=dtype)
        b = torch.randn(n, n, device=dev, dtype=dtype)
        times: list[float] = []
        i = 0
        while i < warmup + repeats or sum(times) < min_time_s:
            if cuda:
                start, end = (
                    torch.cuda.Event(enable_timing=True),
                    torch.cuda.Event(enable_timing=True),
                )
                start.record()
                torch.mm(a, b)
                end.record()
                end.synchronize()
                dt = start.elapsed_time(end) / 1e3
            else:
                t0 = time.perf_counter()
                torch.mm(a, b)
                dt = time.perf_counter() - t0
            if i >= warmup:
                times.append(dt)
            i += 1
        del a, b
    except (RuntimeError, TypeError) as exc:  # dtype unsupported on this device
        return {"key": key, "n": n, "tflops": None, "error": str(exc).splitlines()[0][:200]}
    finally:
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = prev_tf32
            torch.cuda.empty_cache()
    med = statistics.median(times)
    median_tflops, max_tflops = 2 * n**3 / med / 1e12, 2 * n**3 / min(times) / 1e12
    return {
        "key": key,
        "n": n,
        "repeats": len(times),
        "median_s": med,
        "median_tflops": median_tflops,
        "tflops": median_tflops if cuda else max_tflops,
        "max_tflops": max_tflops,
        "statistic": "median" if cuda else "best repeat (shared CPU)",
    }


@functools.lru_cache(maxsize=8)
def measured_peaks(device: str, keys: tuple[str, ...]) -> dict:
    return {k: measure_matmul_tflops(device, k) for k in keys}


# ---------------------------------------------------------------------------------------------
# Fingerprint
# ---------------------------------------------------------------------------------------------


def _version(pkg: str) -> str | None:
    # importlib.metadata: no import of the package itself (only megapt/train/ imports deepspeed)
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def _run(cmd: list[str], cwd: str | None = None) -> str | None:
    try:
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(repo: Path) -> dict:
    commit = _run(["git", "rev-parse", "HEAD"], cwd=str(repo))
    if commit is None:
        return {"commit": None, "dirty": None}
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=str(repo))
    return {"commit": commit, "dirty": bool(status)}


def _nccl_version() -> str | None:
    import torch

    try:
        v = torch.cuda.nccl.version()  # a tuple in recent torch, an int in older ones
    except Exception:  # noqa: BLE001 - informational only; never let it break a fingerprint
        return None
    return ".".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)


def gpu_info() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"available": False, "name": None, "count": 0}
    count = torch.cuda.device_count()
    props = torch.cuda.get_device_properties(0)
    driver = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    names = sorted({torch.cuda.get_device_name(i) for i in range(count)})
    return {
        "available": True,
        "name": torch.cuda.get_device_name(0),
        "names": names,
        "count": count,
        "memory_gb": round(props.total_memory / 2**30, 2),
        "capability": f"{props.major}.{props.minor}",
        "driver": driver.splitlines()[0] if driver else None,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "nccl": _nccl_version(),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "spec_model": match_gpu(torch.cuda.get_device_name(0)),
    }


def fingerprint(
    measure: bool = True, precisions: tuple[str, ...] | None = None, device: str | None = None
) -> dict:
    """Hardware + software identity of this run (JSON-ready).

    measure: also time ``torch.mm`` to report the device's measured matmul peak beside the spec
    peak (cached per process). precisions: which of bf16/fp16/tf32/fp32 to measure (default: all
    four on a GPU, fp32 on CPU). device: where to measure ("cuda" when available, else "cpu").
    """
    import torch

    repo = Path(__file__).resolve().parents[2]
    gpu = gpu_info()
    device = device or ("cuda" if gpu["available"] else "cpu")
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
        mem_gb = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:  # pragma: no cover - psutil ships with our deps' deps, but be safe
        physical, mem_gb = None, None
    fp = {
        "device": device,
        "gpu": gpu,
        "cpu": {
            "model": _cpu_model(),
            "logical_cores": os.cpu_count(),
            "physical_cores": physical,
            "affinity_cores": len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else None,
            "torch_threads": torch.get_num_threads(),
            "memory_gb": mem_gb,
            # other processes competing for the cores make CPU numbers noisy: say how busy it was
            "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        },
        "software": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "triton": _version("triton"),
            "deepspeed": _version("deepspeed"),
            "transformers": _version("transformers"),
            "megapt": _version("megapt"),
            "numpy": _version("numpy"),
        },
        "os": platform.platform(),
        "git": _git(repo),
        "hostname_sha256": hashlib.sha256(socket.gethostname().encode()).hexdigest()[:12],
        "env": {
            k: os.environ[k]
            for k in (
                "DS_ACCELERATOR",
                "OMP_NUM_THREADS",
                "CUDA_VISIBLE_DEVICES",
                "TRITON_INTERPRET",
            )
            if k in os.environ
        },
    }
    spec_key = gpu.get("spec_model")
    fp["spec_peak_tflops"] = dict(GPUS[spec_key].peak_tflops) if spec_key else None
    if gpu["available"] and spec_key is None:
        fp["spec_peak_note"] = (
            f"unknown GPU model {gpu['name']!r}: MFU falls back to the measured matmul peak"
        )
    if measure:
        keys = precisions or (PRECISION_KEYS if device == "cuda" else ("fp32",))
        fp["measured_peak"] = measured_peaks(device, tuple(keys))
    return fp


def hostname_tag() -> str:
    """Short host label for file names (the raw hostname stays out of the JSON)."""
    host = re.sub(r"[^A-Za-z0-9_-]", "", socket.gethostname().split(".")[0])[:24] or "host"
    return host


if __name__ == "__main__":  # pragma: no cover
    import json

    json.dump(fingerprint(), sys.stdout, indent=1)
