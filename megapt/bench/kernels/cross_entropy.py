"""Linear + cross-entropy, forward+backward time and peak memory: megapt fused (Triton CE per
chunk) and chunked (pure PyTorch) vs full-logits PyTorch and Liger's fused linear CE when
installed, same run.

    python -m megapt.bench.kernels.cross_entropy [--quick]

TFLOP/s counts the three GEMMs (logits, d hidden, d weight): 6*N*C*V. N = 8192 tokens, C = 4096.
"""

from __future__ import annotations

import sys

import torch

from megapt.bench.kernels import common as bc
from megapt.bench.kernels.common import MEGAPT, add_speedups, line_plot, measure

PROVIDERS = (MEGAPT, "megapt-chunked", "torch-full-logits", "liger")


def cases(quick: bool = False, dtype: str = "bf16", **_) -> list[dict]:
    vocabs = (32000,) if quick else (32000, 50304, 128256)
    return [
        dict(
            op="linear_cross_entropy",
            mode="fwd+bwd",
            tokens=8192,
            hidden=4096,
            vocab=V,
            dtype=dtype,
        )
        for V in vocabs
    ]


def _provider_fn(name: str):
    if name == MEGAPT:
        from megapt.kernels.cross_entropy import fused_linear_cross_entropy

        return fused_linear_cross_entropy
    if name == "megapt-chunked":
        from megapt.kernels.cross_entropy import chunked_linear_cross_entropy

        return chunked_linear_cross_entropy
    if name == "torch-full-logits":
        from megapt.kernels.cross_entropy import fused_linear_cross_entropy_ref

        return fused_linear_cross_entropy_ref
    if name == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss_fn = LigerFusedLinearCrossEntropyLoss()

        def liger(h, w, y):
            out = loss_fn(w, h, y)
            return out[0] if isinstance(out, tuple) else out

        return liger
    raise ValueError(name)


def run(case_list: list[dict], quick: bool = False, providers=PROVIDERS) -> list[dict]:
    rows = []
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    for c in case_list:
        dtype = dtypes[c["dtype"]]
        N, C, V = c["tokens"], c["hidden"], c["vocab"]
        h = (torch.randn(N, C, device=bc.DEVICE) / 4).to(dtype).requires_grad_(True)
        w = (torch.randn(V, C, device=bc.DEVICE) / C**0.5).to(dtype).requires_grad_(True)
        y = torch.randint(0, V, (N,), device=bc.DEVICE)
        y[::10] = -100
        flops = 6.0 * N * C * V
        for name in providers:
            row = dict(c, provider=name)
            try:
                f = _provider_fn(name)
            except ImportError as exc:
                rows.append(dict(row, status=f"unavailable: {exc}"))
                continue

            def fn(f=f):
                f(h, w, y).backward()  # noqa: B023, F821 - called by measure() in this iteration

            rows.append(
                measure(
                    row,
                    fn,
                    work=flops / 1e12,
                    unit="tflops",
                    grad_to_none=[h, w],
                    quick=quick,
                    memory=True,
                )
            )
            r = rows[-1]
            print(
                f"linear_ce V={V:6d} {name:18s} {r.get('tflops', r['status'])} TFLOP/s "
                f"peak {r.get('peak_mem_mb', '-')} MiB",
                flush=True,
            )
        del h, w, y
        bc.empty_cache()
    add_speedups(rows, ("tokens", "hidden", "vocab", "dtype"))
    return rows


def plot(rows: list[dict], out_dir) -> list[str]:
    paths = [
        line_plot(
            rows,
            x="vocab",
            y=y,
            panel_keys=("dtype",),
            title=f"linear+CE {y}",
            out=out_dir / f"linear_ce_{y}.png",
        )
        for y in ("tflops", "peak_mem_mb")
    ]
    return [p for p in paths if p]


if __name__ == "__main__":
    from megapt.bench.kernels.run import main

    raise SystemExit(main(["--only", "cross_entropy", *sys.argv[1:]]))
