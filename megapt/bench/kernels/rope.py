"""RoPE GB/s, forward and forward+backward: megapt fused q+k kernel (out of place and in place)
vs the PyTorch reference and Liger's liger_rotary_pos_emb when installed, same run.

    python -m megapt.bench.kernels.rope [--quick]

Bytes: q and k read and written once per pass. Shapes: (B=2, T, nh=32, hs=128), nkv=8.
"""

from __future__ import annotations

import sys

import torch

from megapt.bench.kernels import common as bc
from megapt.bench.kernels.common import MEGAPT, add_speedups, line_plot, measure

PROVIDERS = (MEGAPT, "megapt-inplace", "torch-eager", "liger")


def cases(quick: bool = False, dtype: str = "bf16", **_) -> list[dict]:
    seqs = (4096,) if quick else (1024, 2048, 4096, 8192, 16384)
    return [
        dict(op="rope", mode=mode, batch=2, seq=T, heads=32, kv_heads=8, head_dim=128, dtype=dtype)
        for mode in ("fwd", "fwd+bwd")
        for T in seqs
    ]


def _cos_sin(T: int, hs: int, dtype):
    inv = 1.0 / 10000 ** (torch.arange(0, hs, 2, device=bc.DEVICE, dtype=torch.float32) / hs)
    f = torch.outer(torch.arange(T, device=bc.DEVICE, dtype=torch.float32), inv)  # (T, hs // 2)
    return f.cos().to(dtype), f.sin().to(dtype)


def _provider_fn(name: str, cos, sin):
    if name == MEGAPT:
        from megapt.kernels.rope import apply_rope

        return lambda q, k: apply_rope(q, k, cos, sin)
    if name == "megapt-inplace":
        from megapt.kernels.rope import apply_rope_

        return lambda q, k: apply_rope_(
            q.detach(), k.detach(), cos, sin
        )  # forward only: rotates in place
    if name == "torch-eager":
        from megapt.kernels.rope import apply_rope_ref

        return lambda q, k: apply_rope_ref(q, k, cos, sin)
    if name == "liger":
        from liger_kernel.transformers import liger_rotary_pos_emb

        cos_full = torch.cat([cos, cos], -1)[None]  # (1, T, hs): HF layout
        sin_full = torch.cat([sin, sin], -1)[None]
        # Liger takes (B, nh, T, hs); hand it transposed views, as a (B, T, nh, hs) model would
        return lambda q, k: liger_rotary_pos_emb(
            q.transpose(1, 2), k.transpose(1, 2), cos_full, sin_full
        )
    raise ValueError(name)


def run(case_list: list[dict], quick: bool = False, providers=PROVIDERS) -> list[dict]:
    rows = []
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    for c in case_list:
        dtype = dtypes[c["dtype"]]
        B, T, nh, nkv, hs = c["batch"], c["seq"], c["heads"], c["kv_heads"], c["head_dim"]
        q = torch.randn(B, T, nh, hs, device=bc.DEVICE, dtype=dtype, requires_grad=True)
        k = torch.randn(B, T, nkv, hs, device=bc.DEVICE, dtype=dtype, requires_grad=True)
        cos, sin = _cos_sin(T, hs, dtype)
        dq, dk = torch.randn_like(q), torch.randn_like(k)
        nbytes = (
            2 * (q.numel() + k.numel()) * q.element_size() * (2 if c["mode"] == "fwd+bwd" else 1)
        )
        for name in providers:
            row = dict(c, provider=name)
            if name == "megapt-inplace" and c["mode"] != "fwd":
                rows.append(
                    dict(
                        row,
                        status="n/a: in-place is timed forward only (a leaf cannot be rotated in place)",
                    )
                )
                continue
            try:
                f = _provider_fn(name, cos, sin)
            except ImportError as exc:
                rows.append(dict(row, status=f"unavailable: {exc}"))
                continue
            if c["mode"] == "fwd":

                def fn(f=f):
                    with torch.no_grad():
                        return f(q, k)  # noqa: B023 - called by measure() in this iteration

                rows.append(measure(row, fn, work=nbytes / 1e9, unit="gbps", quick=quick))
            else:

                def fn(f=f):
                    torch.autograd.backward(f(q, k), (dq, dk))  # noqa: B023 - called by measure() in this iteration

                rows.append(
                    measure(
                        row, fn, work=nbytes / 1e9, unit="gbps", grad_to_none=[q, k], quick=quick
                    )
                )
            print(
                f"rope {c['mode']:8s} T={T:6d} {name:15s} {rows[-1].get('gbps', rows[-1]['status'])}",
                flush=True,
            )
    add_speedups(rows, ("mode", "seq", "dtype"))
    return rows


def plot(rows: list[dict], out_dir) -> list[str]:
    path = line_plot(
        rows,
        x="seq",
        y="gbps",
        panel_keys=("mode", "dtype"),
        title="RoPE GB/s",
        out=out_dir / "rope_gbps.png",
    )
    return [path] if path else []


if __name__ == "__main__":
    from megapt.bench.kernels.run import main

    raise SystemExit(main(["--only", "rope", *sys.argv[1:]]))
