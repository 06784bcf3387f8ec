"""RMSNorm GB/s, forward and forward+backward: megapt Triton and CUDA-extension kernels vs the
PyTorch reference (fp32 math, eager) and Liger's LigerRMSNorm when installed, same run.

    python -m megapt.bench.kernels.rms_norm [--quick]

Bytes moved (the op is memory bound): forward reads x and writes y; backward reads dy and x
and writes dx (weight and rstd traffic ignored). 16k rows per case.
"""

from __future__ import annotations

import sys

import torch

from megapt.bench.kernels import common as bc
from megapt.bench.kernels.common import MEGAPT, add_speedups, line_plot, measure

PROVIDERS = (MEGAPT, "megapt-cuda", "torch-eager", "liger")
TOKENS = 16384


def cases(quick: bool = False, dtype: str = "bf16", **_) -> list[dict]:
    hidden = (4096,) if quick else (1024, 2048, 4096, 5120, 8192)
    return [
        dict(op="rms_norm", mode=mode, rows=TOKENS, hidden=h, dtype=dtype)
        for mode in ("fwd", "fwd+bwd")
        for h in hidden
    ]


def _provider_fn(name: str, hidden: int, dtype):
    if name == MEGAPT:
        from megapt.kernels.rms_norm import rms_norm

        return rms_norm
    if name == "megapt-cuda":
        from megapt.kernels.cuda_ext import load_extension, rms_norm

        load_extension()  # build outside the timed region (first run: about a minute)
        return rms_norm
    if name == "torch-eager":
        from megapt.kernels.rms_norm import rms_norm_ref

        return rms_norm_ref
    if name == "liger":
        from liger_kernel.transformers import LigerRMSNorm

        mod = LigerRMSNorm(hidden, eps=1e-5).to(device=bc.DEVICE, dtype=dtype)
        return lambda x, w, eps: mod(x)  # Liger's own weight (ones), same shape as w
    raise ValueError(name)


def run(case_list: list[dict], quick: bool = False, providers=PROVIDERS) -> list[dict]:
    rows = []
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    for c in case_list:
        dtype = dtypes[c["dtype"]]
        x = torch.randn(c["rows"], c["hidden"], device=bc.DEVICE, dtype=dtype, requires_grad=True)
        w = torch.ones(c["hidden"], device=bc.DEVICE, dtype=dtype, requires_grad=True)
        dy = torch.randn_like(x)
        es = x.element_size()
        nbytes = 2 * x.numel() * es + (3 * x.numel() * es if c["mode"] == "fwd+bwd" else 0)
        for name in providers:
            row = dict(c, provider=name)
            try:
                f = _provider_fn(name, c["hidden"], dtype)
            except (ImportError, RuntimeError) as exc:
                rows.append(dict(row, status=f"unavailable: {exc}"))
                continue
            if c["mode"] == "fwd":

                def fn(f=f):
                    with torch.no_grad():
                        return f(x, w, 1e-5)  # noqa: B023 - called by measure() in this iteration

                rows.append(measure(row, fn, work=nbytes / 1e9, unit="gbps", quick=quick))
            else:

                def fn(f=f):
                    f(x, w, 1e-5).backward(dy)  # noqa: B023 - called by measure() in this iteration

                rows.append(
                    measure(
                        row, fn, work=nbytes / 1e9, unit="gbps", grad_to_none=[x, w], quick=quick
                    )
                )
            print(
                f"rms_norm {c['mode']:8s} C={c['hidden']:5d} {name:12s} {rows[-1].get('gbps', rows[-1]['status'])}",
                flush=True,
            )
    add_speedups(rows, ("mode", "rows", "hidden", "dtype"))
    return rows


def plot(rows: list[dict], out_dir) -> list[str]:
    path = line_plot(
        rows,
        x="hidden",
        y="gbps",
        panel_keys=("mode", "dtype"),
        title="RMSNorm GB/s",
        out=out_dir / "rms_norm_gbps.png",
    )
    return [path] if path else []


if __name__ == "__main__":
    from megapt.bench.kernels.run import main

    raise SystemExit(main(["--only", "rms_norm", *sys.argv[1:]]))
