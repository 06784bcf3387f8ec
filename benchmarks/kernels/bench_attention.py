"""Attention TFLOP/s, forward and forward+backward: megapt Triton flash attention vs PyTorch SDPA
(FLASH_ATTENTION and CUDNN_ATTENTION backends, chosen with torch.nn.attention.sdpa_kernel) and
the flash-attn package when installed, all measured in the same run.

    python benchmarks/kernels/bench_attention.py [--quick] [--gqa 4] [--dtype bf16]

FLOPs: forward 4*B*nh*T^2*hs (halved when causal); forward+backward 3.5x the forward (the
backward's five matmuls vs two). B*T = 16k tokens per case, nh*hs = 2048.
"""
from __future__ import annotations

import argparse
import sys

import torch

import bench_common as bc
from bench_common import MEGAPT, add_speedups, line_plot, measure

PROVIDERS = (MEGAPT, "sdpa-flash", "sdpa-cudnn", "flash-attn")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cases(quick: bool = False, gqa: int = 1, dtype: str = "bf16") -> list[dict]:
    seqs = (1024, 4096) if quick else (1024, 2048, 4096, 8192, 16384)
    dims = (128,) if quick else (64, 128)
    out = []
    for hs in dims:
        for causal in (True, False):
            for mode in ("fwd", "fwd+bwd"):
                for T in seqs:
                    nh = 2048 // hs
                    out.append(dict(op="attention", mode=mode, causal=causal, head_dim=hs, seq=T,
                                    batch=max(1, 16384 // T), heads=nh, kv_heads=nh // gqa, dtype=dtype))
    return out


def _provider_fn(name: str, causal: bool, group: int):
    import torch.nn.functional as F

    if name == MEGAPT:
        from megapt.kernels.flash_attn import flash_attention

        return lambda q, k, v: flash_attention(q, k, v, causal=causal)
    if name in ("sdpa-flash", "sdpa-cudnn"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = SDPBackend.FLASH_ATTENTION if name == "sdpa-flash" else SDPBackend.CUDNN_ATTENTION

        def sdpa(q, k, v):
            with sdpa_kernel(backend):
                if group > 1:
                    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        return sdpa
    if name == "flash-attn":
        from flash_attn import flash_attn_func  # optional package; ImportError -> "unavailable"

        # flash-attn takes (B, T, nh, hs): transposed views, as a model holding that layout would pass
        return lambda q, k, v: flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               causal=causal).transpose(1, 2)
    raise ValueError(name)


def run(case_list: list[dict], quick: bool = False, providers=PROVIDERS) -> list[dict]:
    rows = []
    for c in case_list:
        B, nh, nkv, T, hs = c["batch"], c["heads"], c["kv_heads"], c["seq"], c["head_dim"]
        dtype = DTYPES[c["dtype"]]
        q = torch.randn(B, nh, T, hs, device=bc.DEVICE, dtype=dtype, requires_grad=True)
        k = torch.randn(B, nkv, T, hs, device=bc.DEVICE, dtype=dtype, requires_grad=True)
        v = torch.randn(B, nkv, T, hs, device=bc.DEVICE, dtype=dtype, requires_grad=True)
        do = torch.randn_like(q)
        flops = 4.0 * B * nh * T * T * hs * (0.5 if c["causal"] else 1.0)
        if c["mode"] == "fwd+bwd":
            flops *= 3.5
        for name in providers:
            row = dict(c, provider=name)
            try:
                attn = _provider_fn(name, c["causal"], nh // nkv)
            except ImportError as exc:
                rows.append(dict(row, status=f"unavailable: {exc}"))
                continue
            if c["mode"] == "fwd":
                def fn(attn=attn):
                    with torch.no_grad():
                        return attn(q, k, v)
                rows.append(measure(row, fn, work=flops / 1e12, unit="tflops", quick=quick))
            else:
                def fn(attn=attn):
                    attn(q, k, v).backward(do)
                rows.append(measure(row, fn, work=flops / 1e12, unit="tflops", grad_to_none=[q, k, v],
                                    quick=quick))
            print(f"attention {c['mode']:8s} T={T:6d} hs={hs} causal={c['causal']!s:5s} {name:11s} "
                  f"{rows[-1].get('tflops', rows[-1]['status'])}", flush=True)
        del q, k, v, do
        bc.empty_cache()
    add_speedups(rows, ("mode", "causal", "head_dim", "seq", "kv_heads", "dtype"))
    return rows


def plot(rows: list[dict], out_dir) -> list[str]:
    path = line_plot(rows, x="seq", y="tflops", panel_keys=("mode", "causal", "head_dim"),
                     title="attention TFLOP/s", out=out_dir / "attention_tflops.png")
    return [path] if path else []


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gqa", type=int, default=1, help="query heads per kv head (1 = MHA)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")


if __name__ == "__main__":
    from run_all import main

    raise SystemExit(main(["--only", "attention", *sys.argv[1:]]))
