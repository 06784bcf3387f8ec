"""The GPU table: peak TFLOP/s per precision, memory and device-name patterns, in one place.

Every user reads it from here: the trainer's MFU (``peak_flops``), the benchmarks (``select_peak``,
the fingerprint's spec row) and the memory planner (``GPUS[key].mem_gib`` / ``bf16``). It imports
nothing from megapt, so any layer may use it.

    from megapt.hardware import GPUS, match_gpu, select_peak
    match_gpu("NVIDIA H100 80GB HBM3")                      # -> "h100"
    GPUS["h100"].peak_tflops["bf16"]                        # -> 989.4 (dense)
    select_peak("NVIDIA A100-SXM4-40GB", "fp32", True, {})  # tf32 peak, with where it came from

Peaks are the vendor's dense (no 2:4 sparsity) tensor-core numbers: bf16 / fp16 (fp32 accumulate),
tf32 (tensor cores on fp32 inputs) and fp32 (CUDA cores); None = the GPU does not support it. Spec
sheets quote "with sparsity" numbers for Ampere and later; we halve those. Memory is the usable GiB
``torch.cuda.get_device_properties().total_memory`` reports; host RAM is a typical node's. Rows
without a memory figure need ``--gpu-mem-gb`` / ``--cpu-mem-gb`` in ``megapt plan``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

log = logging.getLogger("megapt")

PRECISION_KEYS = ("bf16", "fp16", "tf32", "fp32")


@dataclass(frozen=True)
class GPU:
    name: str  # the spec sheet's name
    pattern: str  # regex on torch.cuda.get_device_name(); GPUS order decides (first match wins)
    peak_tflops: Mapping[str, float | None]  # dense TFLOP/s per PRECISION_KEYS entry
    mem_gib: float | None = None  # usable GiB per GPU as torch.cuda reports it
    host_gib: float | None = None  # typical host RAM GiB per node

    @property
    def bf16(self) -> bool:
        return self.peak_tflops.get("bf16") is not None


def _peaks(bf16: float | None, fp16: float | None, tf32: float | None, fp32: float) -> dict:
    return {"bf16": bf16, "fp16": fp16, "tf32": tf32, "fp32": fp32}


# key (plan.gpu / --gpu) -> row. Order matters: the narrower name pattern comes first.
# Real names: "NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200",
# "NVIDIA A100-SXM4-80GB", "NVIDIA A100-PCIE-40GB", "NVIDIA A100 80GB PCIe", "NVIDIA L40S",
# "NVIDIA A10G", "NVIDIA L4", "NVIDIA GeForce RTX 4090", "Tesla V100-SXM2-16GB", "Tesla T4".
GPUS: dict[str, GPU] = {
    # NVIDIA H100 Tensor Core GPU datasheet (2023): SXM5 BF16/FP16 1,979* -> 989.4 dense,
    # TF32 989* -> 494.7, FP32 67; PCIe BF16/FP16 1,513* -> 756.5, TF32 756* -> 378, FP32 51;
    # NVL BF16/FP16 1,671* -> 835.5, TF32 835* -> 417.5, FP32 60. (*with sparsity)
    "h100-nvl": GPU("H100 NVL", r"H100.*NVL", _peaks(835.5, 835.5, 417.5, 60.0)),
    "h100-pcie": GPU("H100 PCIe", r"H100.*PCI", _peaks(756.5, 756.5, 378.0, 51.2)),
    "h100": GPU("H100 SXM", r"H100", _peaks(989.4, 989.4, 494.7, 66.9), 79.1, 2048.0),
    # NVIDIA H200 Tensor Core GPU datasheet (2024): H200 SXM same compute as H100 SXM
    # (BF16 1,979*, TF32 989*, FP32 67); H200 NVL BF16 1,671*, TF32 835*, FP32 60.
    "h200-nvl": GPU("H200 NVL", r"H200.*NVL", _peaks(835.5, 835.5, 417.5, 60.0)),
    "h200": GPU("H200 SXM", r"H200", _peaks(989.4, 989.4, 494.7, 66.9), 139.8, 2048.0),
    # NVIDIA A100 Tensor Core GPU datasheet (2021): 40 GB and 80 GB, SXM4 and PCIe alike:
    # BF16/FP16 312 dense (624*), TF32 156 (312*), FP32 19.5.
    "a100-40": GPU("A100 40GB", r"A100.*40GB", _peaks(312.0, 312.0, 156.0, 19.5), 39.4, 1024.0),
    "a100": GPU("A100 80GB", r"A100", _peaks(312.0, 312.0, 156.0, 19.5), 79.2, 1024.0),
    # NVIDIA L40S datasheet (2023): BF16/FP16 733* -> 362.05 dense, TF32 366* -> 183, FP32 91.6.
    "l40s": GPU("L40S", r"L40S", _peaks(362.05, 362.05, 183.0, 91.6), 44.4, 512.0),
    # A10G (AWS g5) has no NVIDIA datasheet of its own; we use the NVIDIA A10 datasheet (2021):
    # BF16/FP16 250* -> 125 dense, TF32 125* -> 62.5, FP32 31.2. Treat A10G MFU as approximate.
    "a10g": GPU("A10G", r"\bA10G\b", _peaks(125.0, 125.0, 62.5, 31.2), 22.0, 256.0),
    "a10": GPU("A10", r"\bA10\b", _peaks(125.0, 125.0, 62.5, 31.2)),
    # NVIDIA L4 datasheet (2023): BF16/FP16 242* -> 121 dense, TF32 120* -> 60, FP32 30.3.
    "l4": GPU("L4", r"\bL4\b", _peaks(121.0, 121.0, 60.0, 30.3)),
    # NVIDIA Ada Lovelace architecture whitepaper v1.1, RTX 4090: FP16/BF16 tensor with FP32
    # accumulate 165.2 dense (330.3*), TF32 82.6 dense, FP32 82.6 (non-tensor).
    "rtx4090": GPU("RTX 4090", r"RTX 4090", _peaks(165.2, 165.2, 82.6, 82.6), 23.6, 128.0),
    # NVIDIA Ampere GA102 GPU architecture whitepaper v2, RTX 3090: FP16/BF16 tensor with FP32
    # accumulate 71 dense (142*), TF32 35.6 dense (71*), FP32 35.6.
    "rtx3090": GPU("RTX 3090", r"RTX 3090", _peaks(71.0, 71.0, 35.6, 35.6)),
    # NVIDIA V100 datasheet (2020): SXM2 tensor (fp16) 125, FP32 15.7; PCIe 112 / 14;
    # V100S PCIe 130 / 16.4. Volta has no BF16 and no TF32. "v100" is the 32 GB SXM2 board.
    "v100s": GPU("V100S PCIe", r"V100S", _peaks(None, 130.0, None, 16.4)),
    "v100-pcie": GPU("V100 PCIe", r"V100.*PCI", _peaks(None, 112.0, None, 14.0)),
    "v100": GPU("V100 SXM2", r"V100", _peaks(None, 125.0, None, 15.7), 31.7, 512.0),
    # NVIDIA T4 datasheet (2019): mixed-precision (FP16/FP32) 65 TFLOPS, FP32 8.1; Turing has no
    # BF16, no TF32 and no structured sparsity.
    "t4": GPU("T4", r"\bT4\b", _peaks(None, 65.0, None, 8.1), 14.6, 128.0),
}


def match_gpu(device_name: str | None) -> str | None:
    """The GPUS key for a ``torch.cuda.get_device_name()`` string, or None when not in the table."""
    if not device_name:
        return None
    for key, gpu in GPUS.items():
        if re.search(gpu.pattern, device_name, flags=re.IGNORECASE):
            return key
    return None


def precision_key(precision: str, tf32_enabled: bool) -> str:
    """Which peak applies: bf16/fp16 training -> that; fp32 -> tf32 when TF32 matmuls are on."""
    if precision in ("bf16", "fp16"):
        return precision
    return "tf32" if tf32_enabled else "fp32"


def select_peak(
    device_name: str | None,
    precision: str,
    tf32_enabled: bool,
    measured: Mapping[str, float | None],
    is_cuda: bool = True,
) -> dict:
    """The peak MFU is measured against, with where it came from.

    The spec peak when the GPU is in the table and supports the precision; otherwise the
    measured matmul peak (``measured[key]`` in TFLOP/s) and a note that says so; else None.
    """
    key = precision_key(precision, tf32_enabled)
    table_key = match_gpu(device_name) if is_cuda else None
    spec = GPUS[table_key].peak_tflops[key] if table_key else None
    meas = measured.get(key)
    out = {
        "precision_key": key,
        "gpu_model": table_key,
        "spec_tflops": spec,
        "measured_tflops": meas,
    }
    if spec is not None:
        out.update(
            tflops=spec, source="spec", note=f"{GPUS[table_key].name} spec sheet, dense {key}"
        )
    elif meas is not None:
        if not is_cuda:
            why = "CPU: no spec table; using the measured torch.mm peak"
        elif table_key is None:
            why = (
                f"unknown GPU model {device_name!r}: not in the spec table; "
                "using the measured torch.mm peak"
            )
        else:
            why = f"{table_key} has no {key} in its spec sheet; using the measured torch.mm peak"
        out.update(tflops=meas, source="measured", note=why)
    else:
        what = "CPU: no spec table" if not is_cuda else f"no {key} spec peak for {device_name!r}"
        out.update(
            tflops=None, source="none", note=f"{what} and no measured {key} peak: MFU not computed"
        )
    return out


def peak_flops(precision: str, device_name: str | None = None) -> float | None:
    """Dense spec peak FLOP/s of this process's CUDA device for the training precision, or None
    (CPU, or a GPU not in the table: logged). fp32 counts against the TF32 peak only when torch
    runs fp32 matmuls on TF32. The trainer's MFU uses it; the benchmarks add a measured fallback."""
    if device_name is None:
        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    tf32 = bool(torch.backends.cuda.matmul.allow_tf32)
    sel = select_peak(device_name, precision, tf32, measured={}, is_cuda=True)
    if sel["tflops"] is None:
        log.info("MFU: %s", sel["note"])
        return None
    return sel["tflops"] * 1e12


def table() -> dict:
    """The table as JSON (benchmark records carry it beside the peak they used)."""
    return {
        k: {
            "name": g.name,
            "pattern": g.pattern,
            "peak_tflops": dict(g.peak_tflops),
            "mem_gib": g.mem_gib,
            "host_gib": g.host_gib,
        }
        for k, g in GPUS.items()
    }
