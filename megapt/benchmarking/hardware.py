"""Hardware fingerprint, spec-sheet peak table and a measured matmul peak.

Every benchmark JSON carries ``fingerprint()`` so two runs can be told apart (and compared only
when they ran on the same kind of machine). MFU needs a peak: we take the vendor's dense
(no-sparsity) tensor-core number for the precision in use when the GPU model is in
``PEAK_TFLOPS``; for an unknown GPU, and always on CPU, we fall back to the matmul peak measured
here (``torch.mm`` of large square matrices: median of repeats on a GPU, best repeat over ~1 s on a
shared CPU) and say so in the JSON.

    from megapt.bench import fingerprint
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
from typing import Optional

# Dense TFLOP/s (no 2:4 sparsity) per GPU. Keys: bf16 / fp16 (tensor cores, fp32 accumulate),
# tf32 (tensor cores on fp32 inputs), fp32 (CUDA cores, no tensor cores). None = not supported.
# Spec sheets quote "with sparsity" numbers for Ampere and later; we halve those.
PEAK_TFLOPS: dict[str, dict] = {
    # NVIDIA H100 Tensor Core GPU datasheet (2023): SXM5 BF16/FP16 1,979* -> 989.4 dense,
    # TF32 989* -> 494.7, FP32 67; PCIe BF16/FP16 1,513* -> 756.5, TF32 756* -> 378, FP32 51;
    # NVL BF16/FP16 1,671* -> 835.5, TF32 835* -> 417.5, FP32 60. (*with sparsity)
    "H100 SXM": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100 PCIe": {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2},
    "H100 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    # NVIDIA H200 Tensor Core GPU datasheet (2024): H200 SXM same compute as H100 SXM
    # (BF16 1,979*, TF32 989*, FP32 67); H200 NVL BF16 1,671*, TF32 835*, FP32 60.
    "H200 SXM": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H200 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    # NVIDIA A100 Tensor Core GPU datasheet (2021): 40 GB and 80 GB, SXM4 and PCIe alike:
    # BF16/FP16 312 dense (624*), TF32 156 (312*), FP32 19.5.
    "A100 SXM": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "A100 PCIe": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    # NVIDIA L40S datasheet (2023): BF16/FP16 733* -> 362.05 dense, TF32 366* -> 183, FP32 91.6.
    "L40S": {"bf16": 362.05, "fp16": 362.05, "tf32": 183.0, "fp32": 91.6},
    # A10G (AWS g5) has no NVIDIA datasheet of its own; we use the NVIDIA A10 datasheet (2021):
    # BF16/FP16 250* -> 125 dense, TF32 125* -> 62.5, FP32 31.2. Treat A10G MFU as approximate.
    "A10G": {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2},
    "A10": {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2},
    # NVIDIA L4 datasheet (2023): BF16/FP16 242* -> 121 dense, TF32 120* -> 60, FP32 30.3.
    "L4": {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3},
    # NVIDIA Ada Lovelace architecture whitepaper v1.1, RTX 4090: FP16/BF16 tensor with FP32
    # accumulate 165.2 dense (330.3*), TF32 82.6 dense, FP32 82.6 (non-tensor).
    "RTX 4090": {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6},
    # NVIDIA Ampere GA102 GPU architecture whitepaper v2, RTX 3090: FP16/BF16 tensor with FP32
    # accumulate 71 dense (142*), TF32 35.6 dense (71*), FP32 35.6.
    "RTX 3090": {"bf16": 71.0, "fp16": 71.0, "tf32": 35.6, "fp32": 35.6},
    # NVIDIA V100 datasheet (2020): SXM2 tensor (fp16) 125, FP32 15.7; PCIe 112 / 14;
    # V100S PCIe 130 / 16.4. Volta has no BF16 and no TF32.
    "V100 SXM": {"bf16": None, "fp16": 125.0, "tf32": None, "fp32": 15.7},
    "V100 PCIe": {"bf16": None, "fp16": 112.0, "tf32": None, "fp32": 14.0},
    "V100S PCIe": {"bf16": None, "fp16": 130.0, "tf32": None, "fp32": 16.4},
}

# torch.cuda.get_device_name() -> table key; first match wins, so the narrower pattern comes first.
# Real names: "NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200",
# "NVIDIA A100-SXM4-80GB", "NVIDIA A100-PCIE-40GB", "NVIDIA A100 80GB PCIe", "NVIDIA L40S",
# "NVIDIA A10G", "NVIDIA L4", "NVIDIA GeForce RTX 4090", "Tesla V100-SXM2-16GB".
_NAME_PATTERNS: list[tuple[str, str]] = [
    (r"H100.*NVL", "H100 NVL"),
    (r"H100.*PCI", "H100 PCIe"),
    (r"H100", "H100 SXM"),
    (r"H200.*NVL", "H200 NVL"),
    (r"H200", "H200 SXM"),
    (r"A100.*PCI", "A100 PCIe"),
    (r"A100", "A100 SXM"),
    (r"L40S", "L40S"),
    (r"\bA10G\b", "A10G"),
    (r"\bA10\b", "A10"),
    (r"\bL4\b", "L4"),
    (r"RTX 4090", "RTX 4090"),
    (r"RTX 3090", "RTX 3090"),
    (r"V100S", "V100S PCIe"),
    (r"V100.*PCI", "V100 PCIe"),
    (r"V100", "V100 SXM"),
]

PRECISION_KEYS = ("bf16", "fp16", "tf32", "fp32")


def match_gpu(name: Optional[str]) -> Optional[str]:
    """Table key for a device name, or None when the model is not in ``PEAK_TFLOPS``."""
    if not name:
        return None
    for pattern, key in _NAME_PATTERNS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return key
    return None


def precision_key(precision: str, tf32_enabled: bool) -> str:
    """Which peak applies: training precision bf16/fp16 -> that; fp32 -> tf32 when TF32 matmuls are on."""
    if precision in ("bf16", "fp16"):
        return precision
    return "tf32" if tf32_enabled else "fp32"


def select_peak(device_name: Optional[str], precision: str, tf32_enabled: bool,
                measured: dict[str, Optional[float]], is_cuda: bool = True) -> dict:
    """The peak used for MFU, with where it came from.

    Spec peak when the GPU is in the table and supports the precision; otherwise the measured
    matmul peak (``measured[key]`` in TFLOP/s) and a note that says so.
    """
    key = precision_key(precision, tf32_enabled)
    table_key = match_gpu(device_name) if is_cuda else None
    spec = PEAK_TFLOPS[table_key][key] if table_key else None
    meas = measured.get(key)
    out = {"precision_key": key, "gpu_model": table_key, "spec_tflops": spec, "measured_tflops": meas}
    if spec is not None:
        out.update(tflops=spec, source="spec", note=f"{table_key} spec sheet, dense {key}")
    elif meas is not None:
        if not is_cuda:
            why = "CPU: no spec table; using the measured torch.mm peak"
        elif table_key is None:
            why = f"unknown GPU model {device_name!r}: not in the spec table; using the measured torch.mm peak"
        else:
            why = f"{table_key} has no {key} in its spec sheet; using the measured torch.mm peak"
        out.update(tflops=meas, source="measured", note=why)
    else:
        what = "CPU: no spec table" if not is_cuda else f"no {key} spec peak for {device_name!r}"
        out.update(tflops=None, source="none", note=f"{what} and no measured {key} peak: MFU not computed")
    return out


# ---------------------------------------------------------------------------------------------
# Measured peak
# ---------------------------------------------------------------------------------------------


def measure_matmul_tflops(device: str = "cpu", key: str = "fp32", n: Optional[int] = None,
                          repeats: Optional[int] = None, warmup: int = 2, min_time_s: Optional[float] = None) -> dict:
    """TFLOP/s of ``torch.mm`` on (n, n) x (n, n) matrices: 2 n^3 flops per call.

    ``tflops`` (the peak MFU is measured against) is the median over the repeats on a GPU (the
    device is ours alone), and the best repeat on a CPU: a shared CPU only ever runs slower than
    it can, and a median taken while another process runs understates the peak, which overstates
    MFU (a 5 x 512^3 median on the shared 2-core VM gave 55-75 GFLOP/s between runs, and MFU over
    100 %). On CPU the repeats go on until ``min_time_s`` (default 1 s) has been spent."""
    import torch

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "tf32": torch.float32, "fp32": torch.float32}[key]
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
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
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
    return {"key": key, "n": n, "repeats": len(times), "median_s": med, "median_tflops": median_tflops,
            "tflops": median_tflops if cuda else max_tflops, "max_tflops": max_tflops,
            "statistic": "median" if cuda else "best repeat (shared CPU)"}


@functools.lru_cache(maxsize=8)
def measured_peaks(device: str, keys: tuple[str, ...]) -> dict:
    return {k: measure_matmul_tflops(device, k) for k in keys}


# ---------------------------------------------------------------------------------------------
# Fingerprint
# ---------------------------------------------------------------------------------------------


def _version(pkg: str) -> Optional[str]:
    # importlib.metadata: no import of the package itself (only megapt/train/ imports deepspeed)
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def _run(cmd: list[str], cwd: Optional[str] = None) -> Optional[str]:
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


def _nccl_version() -> Optional[str]:
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


def fingerprint(measure: bool = True, precisions: Optional[tuple[str, ...]] = None,
                device: Optional[str] = None) -> dict:
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
        "cpu": {"model": _cpu_model(), "logical_cores": os.cpu_count(), "physical_cores": physical,
                "affinity_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                "torch_threads": torch.get_num_threads(), "memory_gb": mem_gb,
                # other processes competing for the cores make CPU numbers noisy: say how busy it was
                "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None},
        "software": {"python": platform.python_version(), "torch": torch.__version__,
                     "triton": _version("triton"), "deepspeed": _version("deepspeed"),
                     "transformers": _version("transformers"), "megapt": _version("megapt"),
                     "numpy": _version("numpy")},
        "os": platform.platform(),
        "git": _git(repo),
        "hostname_sha256": hashlib.sha256(socket.gethostname().encode()).hexdigest()[:12],
        "env": {k: os.environ[k] for k in ("DS_ACCELERATOR", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES",
                                            "TRITON_INTERPRET") if k in os.environ},
    }
    spec_key = gpu.get("spec_model")
    fp["spec_peak_tflops"] = dict(PEAK_TFLOPS[spec_key]) if spec_key else None
    if gpu["available"] and spec_key is None:
        fp["spec_peak_note"] = f"unknown GPU model {gpu['name']!r}: MFU falls back to the measured matmul peak"
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
