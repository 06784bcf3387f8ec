"""Flash attention forward and backward in Triton, with grouped-query attention (GQA).

    q (B, nh, T, hs), k/v (B, nkv, T, hs), nh % nkv == 0 -> o (B, nh, T, hs)

Query head ``h`` reads kv head ``h // (nh // nkv)`` directly: repeated K/V are never built.
Forward: online softmax over kv blocks (exp2, fp32 accumulators), saving the per-row
log-sum-exp (base 2, fp32) for the backward. Backward, atomic-free:

1. preprocess: ``delta = rowsum(dO * O)``                          grid (T / BLOCK_M, B * nh)
2. dK/dV: one program owns a kv block of one kv head and loops over every query head of its
   group and every query block, so dK/dV are summed over the group in registers
                                                                   grid (T / BLOCK_N, B * nkv)
3. dQ: one program owns a query block and loops over kv blocks    grid (T / BLOCK_M, B * nh)

Causal blocks split into an unmasked part and the diagonal (masked) part; sequence lengths
that are not a multiple of the block are handled with masks on the last block. Autotune
configs differ per GPU family (Hopper sm90 vs Ampere sm80/sm86/sm89); the chosen config is
logged once per shape bucket. Under TRITON_INTERPRET=1 a single 16x16 config is used.
"""
from __future__ import annotations

import logging
import math

import torch

from ._common import HAS_TRITON, check_device, next_power_of_2, require_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

log = logging.getLogger(__name__)

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def flash_attention_ref(q, k, v, causal: bool = True, sm_scale: float | None = None) -> torch.Tensor:
    """Plain attention in fp32 (fp64 for fp64 inputs) with explicit GQA repeat; output in q.dtype."""
    B, nh, T, hs = q.shape
    group = nh // k.shape[1]
    scale = 1.0 / math.sqrt(hs) if sm_scale is None else sm_scale
    acc = torch.promote_types(q.dtype, torch.float32)
    qf = q.to(acc)
    kf = k.to(acc).repeat_interleave(group, dim=1)  # (B, nh, T, hs)
    vf = v.to(acc).repeat_interleave(group, dim=1)
    att = (qf @ kf.transpose(-2, -1)) * scale  # (B, nh, T, T)
    if causal:
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        att = att.masked_fill(~mask, float("-inf"))
    return (att.softmax(-1) @ vf).to(q.dtype)


# ----------------------------------------------------------------------------- jit kernels
if HAS_TRITON:

    @triton.jit
    def _fwd_inner(acc, l_i, m_i, q, K_base, V_base, stride_kt, stride_vt,
                   offs_m, offs_n, offs_d, lo, hi, T, qk_scale,
                   BLOCK_N: tl.constexpr, MASK: tl.constexpr, DOT_PREC: tl.constexpr):
        # MASK: 0 = none (full blocks), 1 = sequence end, 2 = causal diagonal + sequence end
        for start_n in range(lo, hi, BLOCK_N):
            cols = start_n + offs_n
            if MASK == 0:
                kT = tl.load(K_base + cols[None, :] * stride_kt + offs_d[:, None])  # (HEAD_DIM, BLOCK_N)
                v = tl.load(V_base + cols[:, None] * stride_vt + offs_d[None, :])  # (BLOCK_N, HEAD_DIM)
            else:
                col_ok = cols < T
                kT = tl.load(K_base + cols[None, :] * stride_kt + offs_d[:, None], mask=col_ok[None, :], other=0.0)
                v = tl.load(V_base + cols[:, None] * stride_vt + offs_d[None, :], mask=col_ok[:, None], other=0.0)
            qk = tl.dot(q, kT, input_precision=DOT_PREC) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
            if MASK == 1:
                qk = tl.where(col_ok[None, :], qk, float("-inf"))
            if MASK == 2:
                qk = tl.where(col_ok[None, :] & (offs_m[:, None] >= cols[None, :]), qk, float("-inf"))
            m_ij = tl.maximum(m_i, tl.max(qk, 1))
            p = tl.math.exp2(qk - m_ij[:, None])
            alpha = tl.math.exp2(m_i - m_ij)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
            m_i = m_ij
        return acc, l_i, m_i

    @triton.jit
    def _attn_fwd_kernel(
        Q, K, V, O, LSE, sm_scale,
        sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, so_b, so_h, so_t,
        NH, T, GROUP, T_BUCKET,
        HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
    ):
        start_m = tl.program_id(0)
        off_bh = tl.cast(tl.program_id(1), tl.int64)
        b = off_bh // NH
        h = off_bh % NH
        kvh = h // GROUP
        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        row_ok = offs_m < T
        q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_t + offs_d[None, :],
                    mask=row_ok[:, None], other=0.0)
        K_base = K + b * sk_b + kvh * sk_h
        V_base = V + b * sv_b + kvh * sv_h
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        qk_scale = sm_scale * 1.4426950408889634
        if CAUSAL:
            diag = start_m * BLOCK_M
            acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K_base, V_base, sk_t, sv_t, offs_m, offs_n, offs_d,
                                       0, diag, T, qk_scale, BLOCK_N, 0, DOT_PREC)
            acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K_base, V_base, sk_t, sv_t, offs_m, offs_n, offs_d,
                                       diag, tl.minimum(diag + BLOCK_M, T), T, qk_scale, BLOCK_N, 2, DOT_PREC)
        else:
            full = (T // BLOCK_N) * BLOCK_N
            acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K_base, V_base, sk_t, sv_t, offs_m, offs_n, offs_d,
                                       0, full, T, qk_scale, BLOCK_N, 0, DOT_PREC)
            acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K_base, V_base, sk_t, sv_t, offs_m, offs_n, offs_d,
                                       full, T, T, qk_scale, BLOCK_N, 1, DOT_PREC)
        acc = acc / l_i[:, None]
        tl.store(LSE + off_bh * T + offs_m, m_i + tl.math.log2(l_i), mask=row_ok)
        tl.store(O + b * so_b + h * so_h + offs_m[:, None] * so_t + offs_d[None, :],
                 acc.to(O.dtype.element_ty), mask=row_ok[:, None])

    @triton.jit
    def _attn_bwd_preprocess_kernel(
        O, DO, DELTA,
        so_b, so_h, so_t, sdo_b, sdo_h, sdo_t,
        NH, T,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
    ):
        off_bh = tl.cast(tl.program_id(1), tl.int64)
        b = off_bh // NH
        h = off_bh % NH
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        row_ok = offs_m < T
        o = tl.load(O + b * so_b + h * so_h + offs_m[:, None] * so_t + offs_d[None, :],
                    mask=row_ok[:, None], other=0.0).to(tl.float32)
        do = tl.load(DO + b * sdo_b + h * sdo_h + offs_m[:, None] * sdo_t + offs_d[None, :],
                     mask=row_ok[:, None], other=0.0).to(tl.float32)
        tl.store(DELTA + off_bh * T + offs_m, tl.sum(o * do, axis=1), mask=row_ok)

    @triton.jit
    def _bwd_dkdv_inner(dk, dv, k, v, Q_base, DO_base, LSE_base, DELTA_base, sq_t, sdo_t,
                        offs_n, offs_d, lo, hi, T, qk_scale,
                        BLOCK_M: tl.constexpr, MASK: tl.constexpr, DOT_PREC: tl.constexpr):
        # k, v: (BLOCK_N, HEAD_DIM) of one kv block; walks query blocks [lo, hi).
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            if MASK == 0:
                qT = tl.load(Q_base + offs_m[None, :] * sq_t + offs_d[:, None])  # (HEAD_DIM, BLOCK_M)
                do = tl.load(DO_base + offs_m[:, None] * sdo_t + offs_d[None, :])  # (BLOCK_M, HEAD_DIM)
                lse = tl.load(LSE_base + offs_m)
                delta = tl.load(DELTA_base + offs_m)
            else:
                row_ok = offs_m < T
                qT = tl.load(Q_base + offs_m[None, :] * sq_t + offs_d[:, None], mask=row_ok[None, :], other=0.0)
                do = tl.load(DO_base + offs_m[:, None] * sdo_t + offs_d[None, :], mask=row_ok[:, None], other=0.0)
                lse = tl.load(LSE_base + offs_m, mask=row_ok, other=0.0)
                delta = tl.load(DELTA_base + offs_m, mask=row_ok, other=0.0)
            qkT = tl.dot(k, qT, input_precision=DOT_PREC) * qk_scale  # (BLOCK_N, BLOCK_M)
            pT = tl.math.exp2(qkT - lse[None, :])
            if MASK == 1:
                pT = tl.where(row_ok[None, :], pT, 0.0)
            if MASK == 2:
                pT = tl.where(row_ok[None, :] & (offs_m[None, :] >= offs_n[:, None]), pT, 0.0)
            dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PREC)
            dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)  # (BLOCK_N, BLOCK_M)
            dsT = pT * (dpT - delta[None, :])
            dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT), input_precision=DOT_PREC)
        return dk, dv

    @triton.jit
    def _attn_bwd_dkdv_kernel(
        Q, K, V, DO, DK, DV, LSE, DELTA, sm_scale,
        sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t,
        sdo_b, sdo_h, sdo_t, sdk_b, sdk_h, sdk_t, sdv_b, sdv_h, sdv_t,
        NH, NKV, T, GROUP, T_BUCKET,
        HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
    ):
        start_n = tl.program_id(0) * BLOCK_N
        off_bkv = tl.cast(tl.program_id(1), tl.int64)
        b = off_bkv // NKV
        kvh = off_bkv % NKV
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        col_ok = offs_n < T
        k = tl.load(K + b * sk_b + kvh * sk_h + offs_n[:, None] * sk_t + offs_d[None, :],
                    mask=col_ok[:, None], other=0.0)
        v = tl.load(V + b * sv_b + kvh * sv_h + offs_n[:, None] * sv_t + offs_d[None, :],
                    mask=col_ok[:, None], other=0.0)
        dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        qk_scale = sm_scale * 1.4426950408889634
        for g in range(0, GROUP):
            h = kvh * GROUP + g
            Q_base = Q + b * sq_b + h * sq_h
            DO_base = DO + b * sdo_b + h * sdo_h
            LSE_base = LSE + (b * NH + h) * T
            DELTA_base = DELTA + (b * NH + h) * T
            if CAUSAL:
                # rows of the diagonal square need the causal mask; rows below it do not
                below = tl.minimum(start_n + BLOCK_N, T)
                dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q_base, DO_base, LSE_base, DELTA_base, sq_t, sdo_t,
                                         offs_n, offs_d, start_n, below, T, qk_scale, BLOCK_M, 2, DOT_PREC)
                lo = below
            else:
                lo = 0
            full = lo + ((T - lo) // BLOCK_M) * BLOCK_M
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q_base, DO_base, LSE_base, DELTA_base, sq_t, sdo_t,
                                     offs_n, offs_d, lo, full, T, qk_scale, BLOCK_M, 0, DOT_PREC)
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q_base, DO_base, LSE_base, DELTA_base, sq_t, sdo_t,
                                     offs_n, offs_d, full, T, T, qk_scale, BLOCK_M, 1, DOT_PREC)
        dk = dk * sm_scale
        tl.store(DK + b * sdk_b + kvh * sdk_h + offs_n[:, None] * sdk_t + offs_d[None, :],
                 dk.to(DK.dtype.element_ty), mask=col_ok[:, None])
        tl.store(DV + b * sdv_b + kvh * sdv_h + offs_n[:, None] * sdv_t + offs_d[None, :],
                 dv.to(DV.dtype.element_ty), mask=col_ok[:, None])

    @triton.jit
    def _bwd_dq_inner(dq, q, do, lse, delta, K_base, V_base, sk_t, sv_t,
                      offs_m, offs_d, lo, hi, T, qk_scale,
                      BLOCK_N: tl.constexpr, MASK: tl.constexpr, DOT_PREC: tl.constexpr):
        for start_n in range(lo, hi, BLOCK_N):
            cols = start_n + tl.arange(0, BLOCK_N)
            if MASK == 0:
                kT = tl.load(K_base + cols[None, :] * sk_t + offs_d[:, None])  # (HEAD_DIM, BLOCK_N)
                vT = tl.load(V_base + cols[None, :] * sv_t + offs_d[:, None])
            else:
                col_ok = cols < T
                kT = tl.load(K_base + cols[None, :] * sk_t + offs_d[:, None], mask=col_ok[None, :], other=0.0)
                vT = tl.load(V_base + cols[None, :] * sv_t + offs_d[:, None], mask=col_ok[None, :], other=0.0)
            qk = tl.dot(q, kT, input_precision=DOT_PREC) * qk_scale  # (BLOCK_M, BLOCK_N)
            p = tl.math.exp2(qk - lse[:, None])
            if MASK == 1:
                p = tl.where(col_ok[None, :], p, 0.0)
            if MASK == 2:
                p = tl.where(col_ok[None, :] & (offs_m[:, None] >= cols[None, :]), p, 0.0)
            dp = tl.dot(do, vT, input_precision=DOT_PREC)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision=DOT_PREC)
        return dq

    @triton.jit
    def _attn_bwd_dq_kernel(
        Q, K, V, DO, DQ, LSE, DELTA, sm_scale,
        sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t,
        sdo_b, sdo_h, sdo_t, sdq_b, sdq_h, sdq_t,
        NH, T, GROUP, T_BUCKET,
        HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
    ):
        start_m = tl.program_id(0)
        off_bh = tl.cast(tl.program_id(1), tl.int64)
        b = off_bh // NH
        h = off_bh % NH
        kvh = h // GROUP
        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        row_ok = offs_m < T
        q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_t + offs_d[None, :],
                    mask=row_ok[:, None], other=0.0)
        do = tl.load(DO + b * sdo_b + h * sdo_h + offs_m[:, None] * sdo_t + offs_d[None, :],
                     mask=row_ok[:, None], other=0.0)
        lse = tl.load(LSE + off_bh * T + offs_m, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + off_bh * T + offs_m, mask=row_ok, other=0.0)
        K_base = K + b * sk_b + kvh * sk_h
        V_base = V + b * sv_b + kvh * sv_h
        dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        qk_scale = sm_scale * 1.4426950408889634
        if CAUSAL:
            diag = start_m * BLOCK_M
            dq = _bwd_dq_inner(dq, q, do, lse, delta, K_base, V_base, sk_t, sv_t, offs_m, offs_d,
                               0, diag, T, qk_scale, BLOCK_N, 0, DOT_PREC)
            dq = _bwd_dq_inner(dq, q, do, lse, delta, K_base, V_base, sk_t, sv_t, offs_m, offs_d,
                               diag, tl.minimum(diag + BLOCK_M, T), T, qk_scale, BLOCK_N, 2, DOT_PREC)
        else:
            full = (T // BLOCK_N) * BLOCK_N
            dq = _bwd_dq_inner(dq, q, do, lse, delta, K_base, V_base, sk_t, sv_t, offs_m, offs_d,
                               0, full, T, qk_scale, BLOCK_N, 0, DOT_PREC)
            dq = _bwd_dq_inner(dq, q, do, lse, delta, K_base, V_base, sk_t, sv_t, offs_m, offs_d,
                               full, T, T, qk_scale, BLOCK_N, 1, DOT_PREC)
        dq = dq * sm_scale
        tl.store(DQ + b * sdq_b + h * sdq_h + offs_m[:, None] * sdq_t + offs_d[None, :],
                 dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


# ----------------------------------------------------------------------------- autotune configs
# (BLOCK_M, BLOCK_N, num_warps, num_stages, head dims the config is tried for).
# fwd and dq need BLOCK_M % BLOCK_N == 0; dkdv needs BLOCK_N % BLOCK_M == 0.
_SMALL = (16, 32, 64)
_MID = (16, 32, 64, 128)
_ALL = SUPPORTED_HEAD_DIMS
_CONFIGS = {
    "fwd": {
        "sm90": [(128, 128, 8, 3, _MID), (128, 64, 8, 3, _MID), (128, 64, 4, 4, _MID), (64, 64, 4, 4, _ALL),
                 (128, 32, 4, 3, _ALL), (64, 32, 4, 3, _ALL)],
        "sm80": [(128, 64, 4, 3, _MID), (128, 64, 8, 3, _MID), (128, 32, 4, 4, _MID), (64, 64, 4, 3, _ALL),
                 (64, 32, 4, 3, _ALL), (64, 32, 4, 2, _ALL)],
    },
    "dkdv": {
        "sm90": [(32, 128, 8, 3, _MID), (64, 128, 8, 2, _MID), (32, 64, 4, 3, _ALL), (64, 64, 8, 2, _ALL),
                 (16, 64, 4, 2, _ALL), (16, 32, 4, 1, _ALL)],
        "sm80": [(32, 128, 8, 2, _MID), (32, 64, 4, 3, _MID), (64, 64, 8, 2, _SMALL), (32, 64, 4, 2, _ALL),
                 (16, 64, 4, 2, _ALL), (16, 32, 4, 1, _ALL)],
    },
    "dq": {
        "sm90": [(128, 32, 8, 3, _MID), (128, 64, 8, 2, _MID), (64, 32, 4, 3, _ALL), (64, 64, 8, 2, _ALL),
                 (64, 16, 4, 2, _ALL), (32, 16, 4, 1, _ALL)],
        "sm80": [(128, 32, 8, 2, _MID), (64, 32, 4, 3, _MID), (64, 64, 8, 2, _SMALL), (64, 32, 4, 2, _ALL),
                 (64, 16, 4, 2, _ALL), (32, 16, 4, 1, _ALL)],
    },
}
_INTERPRETER_BLOCKS = {"fwd": (16, 16), "dkdv": (16, 32), "dq": (32, 16)}
_PREPROCESS_BLOCK_M = 64
_tuned: dict = {}
_logged: set = set()


def gpu_family(device: torch.device) -> str:
    major, _ = torch.cuda.get_device_capability(device)
    return "sm90" if major >= 9 else "sm80"


def _tuned_kernel(name: str, family: str):
    """The autotuned ``name`` kernel for a GPU family; configs are pruned by head dim first."""
    key = (name, family)
    if key not in _tuned:
        jit_fn = {"fwd": _attn_fwd_kernel, "dkdv": _attn_bwd_dkdv_kernel, "dq": _attn_bwd_dq_kernel}[name]
        head_dims = {}  # config -> head dims it is tried for
        for bm, bn, w, s, dims in _CONFIGS[name][family]:
            head_dims[triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)] = dims

        def prune(configs, named_args, **kwargs):
            return [c for c in configs if kwargs["HEAD_DIM"] in head_dims[c]] or configs[-1:]

        _tuned[key] = triton.autotune(
            configs=list(head_dims), key=["T_BUCKET", "HEAD_DIM", "CAUSAL", "GROUP"],
            prune_configs_by={"early_config_prune": prune},
        )(jit_fn)
    return _tuned[key]


def _launch(name: str, jit_fn, grid_dim0, grid_dim1, args, head_dim, causal, T, group):
    """Run ``jit_fn`` with autotuning on GPU, or the fixed interpreter blocks on CPU."""
    if args[0].device.type == "cuda":
        _launch_autotuned(name, gpu_family(args[0].device), grid_dim0, grid_dim1, args, head_dim, causal, T, group)
        return
    bm, bn = _INTERPRETER_BLOCKS[name]
    jit_fn[(grid_dim0(bm, bn), grid_dim1)](
        *args, T_BUCKET=next_power_of_2(T), HEAD_DIM=head_dim, CAUSAL=causal, BLOCK_M=bm, BLOCK_N=bn,
        DOT_PREC=_dot_precision(args[0].dtype))


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs (tests, debugging) get 3xTF32 dots, accurate to ~fp32; halves use the tensor cores as is
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _launch_autotuned(name, family, grid_dim0, grid_dim1, args, head_dim, causal, T, group):
    t_bucket = next_power_of_2(T)
    dot_prec = _dot_precision(args[0].dtype)
    kernel = _tuned_kernel(name, family)

    def grid(meta):
        return (grid_dim0(meta["BLOCK_M"], meta["BLOCK_N"]), grid_dim1)

    kernel[grid](*args, T_BUCKET=t_bucket, HEAD_DIM=head_dim, CAUSAL=causal, DOT_PREC=dot_prec)
    log_key = (name, family, t_bucket, head_dim, causal, group, str(args[0].dtype))
    if log_key not in _logged:
        _logged.add(log_key)
        c = kernel.best_config
        log.info("flash_attention %s %s T<=%d hs=%d causal=%s group=%d %s: BLOCK_M=%d BLOCK_N=%d warps=%d stages=%d",
                 name, family, t_bucket, head_dim, causal, group, args[0].dtype,
                 c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)


def _strides(x):
    return x.stride(0), x.stride(1), x.stride(2)


# ----------------------------------------------------------------------------- launchers
def check_inputs(q, k, v, causal=True, sm_scale=None) -> None:
    """Raise ValueError for anything the kernels do not support, before any launch."""
    require_triton("flash_attention")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            "megapt.kernels.flash_attention: q, k, v must be 4-D (B, heads, T, hs), got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _DTYPES:
        raise ValueError(
            f"megapt.kernels.flash_attention: q/k/v dtypes {q.dtype}, {k.dtype}, {v.dtype}; need one of "
            "float16, bfloat16, float32 for all three"
        )
    B, nh, T, hs = q.shape
    if k.shape != v.shape:
        raise ValueError(f"megapt.kernels.flash_attention: k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    if k.shape[0] != B or k.shape[3] != hs:
        raise ValueError(
            f"megapt.kernels.flash_attention: k/v {tuple(k.shape)} must share batch and head size with q {tuple(q.shape)}"
        )
    if k.shape[2] != T:
        raise ValueError(
            f"megapt.kernels.flash_attention: q has T={T} but k/v have T={k.shape[2]}; only self-attention "
            "with equal lengths is supported (use the sdpa backend for kv-cache decoding)"
        )
    nkv = k.shape[1]
    if nkv == 0 or nh % nkv:
        raise ValueError(
            f"megapt.kernels.flash_attention: {nkv} kv heads do not divide {nh} query heads (GQA needs nh % nkv == 0)"
        )
    if hs not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"megapt.kernels.flash_attention: head_dim {hs} unsupported; supported: {SUPPORTED_HEAD_DIMS}"
        )
    if sm_scale is not None and not (sm_scale > 0):
        raise ValueError(f"megapt.kernels.flash_attention: sm_scale must be > 0, got {sm_scale}")
    check_device("flash_attention", _attn_fwd_kernel, q, k, v)


def _unit_last(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def flash_attention_forward(q, k, v, causal: bool, sm_scale: float):
    """-> o (like q), lse (B, nh, T) fp32 in log2 units."""
    B, nh, T, hs = q.shape
    nkv = k.shape[1]
    group = nh // nkv
    o = torch.empty_like(q)  # keeps q's layout, e.g. a (B, T, nh, hs) buffer seen as (B, nh, T, hs)
    lse = torch.empty((B, nh, T), dtype=torch.float32, device=q.device)
    if B * nh * T == 0:
        return o, lse
    args = (q, k, v, o, lse, sm_scale, *_strides(q), *_strides(k), *_strides(v), *_strides(o), nh, T, group)
    _launch("fwd", _attn_fwd_kernel, lambda bm, bn: triton.cdiv(T, bm), B * nh, args, hs, causal, T, group)
    return o, lse


def flash_attention_backward(do, q, k, v, o, lse, causal: bool, sm_scale: float):
    """-> dq, dk, dv (dk/dv summed over the query heads of each kv group)."""
    B, nh, T, hs = q.shape
    nkv = k.shape[1]
    group = nh // nkv
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if B * nh * T == 0:
        return dq, dk.zero_(), dv.zero_()
    delta = torch.empty_like(lse)
    _attn_bwd_preprocess_kernel[(triton.cdiv(T, _PREPROCESS_BLOCK_M), B * nh)](
        o, do, delta, *_strides(o), *_strides(do), nh, T, HEAD_DIM=hs, BLOCK_M=_PREPROCESS_BLOCK_M,
    )
    args = (q, k, v, do, dk, dv, lse, delta, sm_scale, *_strides(q), *_strides(k), *_strides(v),
            *_strides(do), *_strides(dk), *_strides(dv), nh, nkv, T, group)
    _launch("dkdv", _attn_bwd_dkdv_kernel, lambda bm, bn: triton.cdiv(T, bn), B * nkv, args, hs, causal, T, group)
    args = (q, k, v, do, dq, lse, delta, sm_scale, *_strides(q), *_strides(k), *_strides(v),
            *_strides(do), *_strides(dq), nh, T, group)
    _launch("dq", _attn_bwd_dq_kernel, lambda bm, bn: triton.cdiv(T, bm), B * nh, args, hs, causal, T, group)
    return dq, dk, dv


class FlashAttentionFunction(torch.autograd.Function):
    """q (B, nh, T, hs), k/v (B, nkv, T, hs) -> o (B, nh, T, hs).

    Saves q, k, v, o and lse (B, nh, T) fp32; backward returns dq, dk, dv in the input dtype.
    """

    @staticmethod
    def forward(ctx, q, k, v, causal, sm_scale):
        q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
        o, lse = flash_attention_forward(q, k, v, causal, sm_scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.sm_scale = causal, sm_scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = flash_attention_backward(_unit_last(do), q, k, v, o, lse, ctx.causal, ctx.sm_scale)
        return dq, dk, dv, None, None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    sm_scale: float | None = None) -> torch.Tensor:
    """Flash attention with GQA. q (B, nh, T, hs), k/v (B, nkv, T, hs); hs in 16/32/64/128/256.

    fp16/bf16 (fp32 also accepted, with 3xTF32 dots: accurate, slower) on CUDA, or CPU under TRITON_INTERPRET=1. Any T.
    sm_scale defaults to 1/sqrt(hs). Returns o (B, nh, T, hs) in q.dtype.
    """
    check_inputs(q, k, v, causal, sm_scale)
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    return FlashAttentionFunction.apply(q, k, v, bool(causal), scale)
