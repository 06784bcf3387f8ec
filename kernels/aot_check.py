"""Compile the Triton kernels ahead of time for a GPU architecture, on a machine without a GPU.

The CPU interpreter checks the math but not the compiler: types in loops, layouts, shared
memory. This runs the real Triton pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin with the
bundled ptxas) for sm_80 / sm_90 and reports each config's shared memory against the limit of
that architecture, so a config that can never launch or a kernel that no longer compiles shows
up in CI. It needs triton but no CUDA device and must run without TRITON_INTERPRET=1.

    python -m megapt.kernels.aot_check                    # one config per kernel, sm_80 + sm_90
    python -m megapt.kernels.aot_check --all-configs      # every autotune config x head dim (slow)
    python -m megapt.kernels.aot_check --quick --arch 90  # the CI subset (~40 s CPU)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# Max dynamic shared memory per block (bytes): A100 163 KB, sm_86/sm_89 99 KB, H100 227 KB.
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
FAMILY = {80: "sm80", 86: "sm80", 89: "sm80", 90: "sm90"}


def _signature(fn, pointers: dict, floats: tuple, consts: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def compile_one(
    fn,
    pointers: dict,
    consts: dict,
    arch: int,
    num_warps: int,
    num_stages: int,
    floats: tuple = ("sm_scale", "eps"),
):
    """Compile ``fn`` (a JITFunction) for sm_<arch>; returns the compiled kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn, _signature(fn, pointers, floats, consts), constexprs=consts)
    return triton.compile(
        src,
        target=GPUTarget("cuda", arch, 32),
        options=dict(num_warps=num_warps, num_stages=num_stages),
    )


def kernel_specs(
    arch: int,
    head_dims=(64, 128),
    dtype: str = "bf16",
    all_configs: bool = False,
    quick: bool = False,
):
    """(label, jit fn, pointer types, constexprs, num_warps, num_stages) for every kernel to build.

    quick: one head dim and one causal flag per attention kernel, chosen so that every masking
    variant of the inner loops is compiled at least once (fwd non-causal: none/end; dkdv causal:
    diagonal/none/end; dq causal: none/diagonal), plus the document-masked (DOC) variant of each
    attention kernel (document / document+diagonal masks).
    """
    import importlib

    # (``from . import rms_norm`` would give the function of that name, see __init__.py)
    cross_entropy, flash_attn, rms_norm, rope = (
        importlib.import_module(f"{__package__}.{m}")
        for m in ("cross_entropy", "flash_attn", "rms_norm", "rope")
    )

    t = f"*{dtype}"
    family = FAMILY[arch]
    specs = []
    attn_ptrs = {
        "fwd": {"Q": t, "K": t, "V": t, "O": t, "LSE": "*fp32", "DOC_START": "*i32"},
        "dkdv": {
            "Q": t,
            "K": t,
            "V": t,
            "DO": t,
            "DK": t,
            "DV": t,
            "LSE": "*fp32",
            "DELTA": "*fp32",
            "DOC_START": "*i32",
            "DOC_END": "*i32",
        },
        "dq": {
            "Q": t,
            "K": t,
            "V": t,
            "DO": t,
            "DQ": t,
            "LSE": "*fp32",
            "DELTA": "*fp32",
            "DOC_START": "*i32",
        },
    }
    fns = {
        "fwd": flash_attn._attn_fwd_kernel,
        "dkdv": flash_attn._attn_bwd_dkdv_kernel,
        "dq": flash_attn._attn_bwd_dq_kernel,
    }
    for name in ("fwd", "dkdv", "dq"):
        for hs in head_dims:
            configs = [c for c in flash_attn._CONFIGS[name][family] if hs in c[4]]
            if not all_configs:
                configs = configs[:1]
            # (causal, doc) variants; doc needs causal
            variants = (
                ((True, False), (True, True))
                if all_configs
                else ((True, False), (False, False), (True, True))
            )
            if quick:
                if hs != head_dims[0]:
                    continue
                variants = ((name != "fwd", False), (True, True))
            for causal, doc in variants:
                for bm, bn, warps, stages, _ in configs:
                    consts = dict(
                        HEAD_DIM=hs,
                        CAUSAL=causal,
                        DOC=doc,
                        BLOCK_M=bm,
                        BLOCK_N=bn,
                        DOT_PREC="tf32x3" if dtype == "fp32" else "tf32",
                    )
                    label = f"attn_{name} hs={hs} causal={causal}{' doc' if doc else ''} {bm}x{bn} w{warps} s{stages}"
                    specs.append((label, fns[name], attn_ptrs[name], consts, warps, stages))
    if not all_configs:
        specs.append(
            (
                "attn_preprocess hs=128",
                flash_attn._attn_bwd_preprocess_kernel,
                {"O": t, "DO": t, "DELTA": "*fp32"},
                dict(HEAD_DIM=128, BLOCK_M=64),
                4,
                1,
            )
        )
        specs.append(
            (
                "rms_norm_fwd C<=4096",
                rms_norm._rms_norm_fwd_kernel,
                {"X": t, "W": t, "Y": t, "RSTD": "*fp32"},
                dict(BLOCK_SIZE=4096),
                8,
                1,
            )
        )
        specs.append(
            (
                "rms_norm_bwd C<=4096",
                rms_norm._rms_norm_bwd_kernel,
                {"DY": t, "X": t, "W": t, "RSTD": "*fp32", "DX": t, "DW_PARTIAL": "*fp32"},
                dict(BLOCK_SIZE=4096),
                8,
                1,
            )
        )
        specs.append(
            (
                "rope fwd nh=32 nkv=8 hs=128",
                rope._rope_kernel,
                {"Q": t, "K": t, "QO": t, "KO": t, "COS": t, "SIN": t},
                dict(HALF=64, BLOCK_H=32, BLOCK_KV=8, BLOCK_D=64, BACKWARD=False),
                8,
                1,
            )
        )
        specs.append(
            (
                "cross_entropy V-block 32768",
                cross_entropy._ce_loss_grad_kernel,
                {"LOGITS": t, "LABELS": "*i64", "LOSS": "*fp32", "SCALE": "*fp32"},
                dict(BLOCK_SIZE=32768, COMPUTE_GRAD=True),
                32,
                1,
            )
        )
    return specs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description="Compile megapt's Triton kernels for GPUs without a GPU."
    )
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SMEM_LIMIT))
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--all-configs", action="store_true", help="every autotune config (slow)")
    p.add_argument(
        "--quick", action="store_true", help="fewest compiles covering every code path (CI)"
    )
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print(
            "aot_check: unset TRITON_INTERPRET (the interpreter does not compile)", file=sys.stderr
        )
        return 2
    failures: list = []
    fitting: dict = {}
    for arch in args.arch:
        for label, fn, ptrs, consts, warps, stages in kernel_specs(
            arch, tuple(args.head_dims), args.dtype, args.all_configs, args.quick
        ):
            t0 = time.time()
            try:
                k = compile_one(fn, ptrs, consts, arch, warps, stages)
            except Exception as exc:  # noqa: BLE001 - report every failing kernel, then fail
                failures.append(f"sm_{arch} {label}: {type(exc).__name__}: {str(exc)[:500]}")
                print(f"sm_{arch} {label:48s} FAILED {type(exc).__name__}", flush=True)
                continue
            smem = k.metadata.shared
            fits = smem <= SMEM_LIMIT[arch]
            group = (arch, label.split(" ")[0], label.split(" ")[1])  # (arch, kernel, hs=..)
            fitting[group] = fitting.get(group, False) or fits
            print(
                f"sm_{arch} {label:48s} smem {smem / 1024:6.1f} KiB {'ok' if fits else 'TOO BIG'} "
                f"({time.time() - t0:.1f}s)",
                flush=True,
            )
    for (arch, kernel, hs), ok in sorted(fitting.items()):
        if not ok and kernel.startswith("attn_"):
            failures.append(f"sm_{arch} {kernel} {hs}: no config fits in shared memory")
    if failures:
        print("\n".join(["FAILED:"] + failures), file=sys.stderr)
        return 1
    print("all kernels compiled")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
