"""Attention TFLOP/s, forward and forward+backward: megapt Triton flash attention vs PyTorch SDPA
(FLASH_ATTENTION and CUDNN_ATTENTION backends, chosen with torch.nn.attention.sdpa_kernel) and
the flash-attn package when installed, all measured in the same run.

    python -m megapt.bench.kernels.attention [--quick] [--gqa 4] [--dtype bf16]

FLOPs: forward 4*B*nh*T^2*hs (halved when causal); forward+backward 3.5x the forward (the
backward's five matmuls vs two). B*T = 16k tokens per case, nh*hs = 2048.

Document-masked cases (``doc_len`` set: packed rows of documents with random lengths, mean
``doc_len``): ours with ``doc_start`` (no mask tensor) vs SDPA with the explicit (B, 1, T, T) bool
mask ("sdpa-mask", built outside the timed region) and FlexAttention with a document BlockMask
("flex-attention", compiled; mask built outside the timed region; CUDA only). FLOPs count only
the visible (query, key) pairs: 4*nh*hs*sum_i(i - doc_start[i] + 1) forward. Peak memory is
recorded for these cases. Providers that cannot take a document mask (or that only serve it)
get status "n/a" rows.
"""

from __future__ import annotations

import argparse
import sys

import torch

from megapt.bench.kernels import common as bc
from megapt.bench.kernels.common import MEGAPT, add_speedups, line_plot, measure

PROVIDERS = (MEGAPT, "sdpa-flash", "sdpa-cudnn", "flash-attn", "sdpa-mask", "flex-attention")
DOC_ONLY = ("sdpa-mask", "flex-attention")  # baselines of the document-masked cases only
NO_DOC = ("sdpa-flash", "sdpa-cudnn", "flash-attn")  # take no per-row document mask
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
                    out.append(
                        dict(
                            op="attention",
                            mode=mode,
                            causal=causal,
                            head_dim=hs,
                            seq=T,
                            batch=max(1, 16384 // T),
                            heads=nh,
                            kv_heads=nh // gqa,
                            dtype=dtype,
                        )
                    )
    for hs in dims:  # packed documents, mean length 512
        for mode in ("fwd", "fwd+bwd"):
            for T in (4096,) if quick else (4096, 8192):
                nh = 2048 // hs
                out.append(
                    dict(
                        op="attention",
                        mode=mode,
                        causal=True,
                        head_dim=hs,
                        seq=T,
                        batch=max(1, 16384 // T),
                        heads=nh,
                        kv_heads=nh // gqa,
                        dtype=dtype,
                        doc_len=512,
                    )
                )
    return out


def doc_start_for(B: int, T: int, mean_len: int, seed: int = 0) -> torch.Tensor:
    """doc_start (B, T) int32 of rows packed with documents of uniform random length in
    [1, 2 * mean_len - 1] (mean ``mean_len``), different per row; deterministic."""
    g = torch.Generator().manual_seed(seed)
    ds = torch.empty(B, T, dtype=torch.int32)
    for b in range(B):
        i = 0
        while i < T:
            n = int(torch.randint(1, 2 * mean_len, (1,), generator=g))
            ds[b, i : i + n] = i
            i += n
    return ds


def doc_flops(doc_start: torch.Tensor, heads: int, head_dim: int) -> float:
    """Forward FLOPs of document-masked attention: 4*nh*hs per visible (query, key) pair."""
    T = doc_start.shape[1]
    visible = (torch.arange(T) - doc_start.long() + 1).sum().item()
    return 4.0 * heads * head_dim * visible


def _doc_provider_fn(name: str, doc_start: torch.Tensor, group: int, shape: tuple):
    """Document-masked attention of one provider; its mask (if any) is built here, untimed."""
    import torch.nn.functional as F

    if name == MEGAPT:
        from megapt.kernels.flash_attn import flash_attention

        return lambda q, k, v: flash_attention(q, k, v, causal=True, doc_start=doc_start)
    if name == "sdpa-mask":
        from megapt.kernels.flash_attn import doc_mask_ref

        mask = doc_mask_ref(doc_start)  # (B, 1, T, T) bool

        def sdpa_mask(q, k, v):
            if group > 1:  # the kernels that take a mask take no enable_gqa: repeat kv heads
                k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

        return sdpa_mask
    if name == "flex-attention":
        if bc.DEVICE != "cuda":
            raise ImportError("flex-attention is benchmarked on CUDA only (torch.compile)")
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        B, _, T, _ = shape
        ds = doc_start.long()

        def doc_causal(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (kv_idx >= ds[b, q_idx])

        block_mask = create_block_mask(doc_causal, B, None, T, T, device=doc_start.device)
        flex = torch.compile(flex_attention)
        return lambda q, k, v: flex(q, k, v, block_mask=block_mask, enable_gqa=group > 1)
    raise ValueError(name)


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
                    return F.scaled_dot_product_attention(
                        q, k, v, is_causal=causal, enable_gqa=True
                    )
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        return sdpa
    if name == "flash-attn":
        from flash_attn import flash_attn_func  # optional package; ImportError -> "unavailable"

        # flash-attn takes (B, T, nh, hs): transposed views, as a model holding that layout would pass
        return lambda q, k, v: flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal
        ).transpose(1, 2)
    raise ValueError(name)


def run(case_list: list[dict], quick: bool = False, providers=PROVIDERS) -> list[dict]:
    rows = []
    for c in case_list:
        B, nh, nkv, T, hs = c["batch"], c["heads"], c["kv_heads"], c["seq"], c["head_dim"]
        dtype = DTYPES[c["dtype"]]
        doc_len = c.get("doc_len")
        q = torch.randn(B, nh, T, hs, device=bc.DEVICE, dtype=dtype, requires_grad=True)
        k = torch.randn(B, nkv, T, hs, device=bc.DEVICE, dtype=dtype, requires_grad=True)
        v = torch.randn(B, nkv, T, hs, device=bc.DEVICE, dtype=dtype, requires_grad=True)
        do = torch.randn_like(q)
        if doc_len:
            doc_start = doc_start_for(B, T, doc_len).to(bc.DEVICE)
            flops = doc_flops(doc_start.cpu(), nh, hs)
        else:
            flops = 4.0 * B * nh * T * T * hs * (0.5 if c["causal"] else 1.0)
        if c["mode"] == "fwd+bwd":
            flops *= 3.5
        for name in providers:
            row = dict(c, provider=name)
            if doc_len and name == "sdpa-mask":
                row["mask_mb"] = float(
                    f"{B * T * T / 2**20:.4g}"
                )  # the bool mask, allocated before timing
            if name in (NO_DOC if doc_len else DOC_ONLY):
                rows.append(
                    dict(
                        row,
                        status="n/a: "
                        + (
                            "takes no document mask"
                            if doc_len
                            else "baseline of the document-masked cases"
                        ),
                    )
                )
                continue
            try:
                if doc_len:
                    attn = _doc_provider_fn(name, doc_start, nh // nkv, tuple(q.shape))
                else:
                    attn = _provider_fn(name, c["causal"], nh // nkv)
            except ImportError as exc:
                rows.append(dict(row, status=f"unavailable: {exc}"))
                continue
            except Exception as exc:  # noqa: BLE001 - e.g. the mask does not fit: record, go on
                rows.append(dict(row, status=f"error: {type(exc).__name__}: {str(exc)[:300]}"))
                bc.empty_cache()
                continue
            if c["mode"] == "fwd":

                def fn(attn=attn):
                    with torch.no_grad():
                        return attn(q, k, v)  # noqa: B023, F821 - called by measure() in this iteration

                rows.append(
                    measure(
                        row, fn, work=flops / 1e12, unit="tflops", quick=quick, memory=bool(doc_len)
                    )
                )
            else:

                def fn(attn=attn):
                    attn(q, k, v).backward(do)  # noqa: B023, F821 - called by measure() in this iteration

                rows.append(
                    measure(
                        row,
                        fn,
                        work=flops / 1e12,
                        unit="tflops",
                        grad_to_none=[q, k, v],
                        quick=quick,
                        memory=bool(doc_len),
                    )
                )
            del attn
            print(
                f"attention {c['mode']:8s} T={T:6d} hs={hs} causal={c['causal']!s:5s} "
                f"{f'doc_len={doc_len} ' if doc_len else ''}{name:14s} "
                f"{rows[-1].get('tflops', rows[-1]['status'])}",
                flush=True,
            )
        del q, k, v, do
        bc.empty_cache()
    add_speedups(rows, ("mode", "causal", "head_dim", "seq", "kv_heads", "dtype", "doc_len"))
    return rows


def plot(rows: list[dict], out_dir) -> list[str]:
    path = line_plot(
        [r for r in rows if not r.get("doc_len")],
        x="seq",
        y="tflops",
        panel_keys=("mode", "causal", "head_dim"),
        title="attention TFLOP/s",
        out=out_dir / "attention_tflops.png",
    )
    return [path] if path else []


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gqa", type=int, default=1, help="query heads per kv head (1 = MHA)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")


if __name__ == "__main__":
    from megapt.bench.kernels.run import main

    raise SystemExit(main(["--only", "attention", *sys.argv[1:]]))
