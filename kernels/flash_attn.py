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
that are not a multiple of the block are handled with masks on the last block.

Document masking (packed rows, ``doc_start`` (B, T) int32): query i sees key j iff
``doc_start[b, i] <= j <= i``. doc_start is non-decreasing in i, so a query block starts its key
loop at the doc_start of its first row (rounded down to BLOCK_N: whole blocks before it are never
loaded), masks per element only in the blocks that straddle a document start of one of its rows,
and runs the blocks between that and the diagonal unmasked. dK/dV of a key block visit query rows
up to ``doc_end`` of its last key (one past the end of that document; computed from doc_start
with searchsorted, O(B*T log T)), unmasked up to the end of the document of its first key.

Autotune configs differ per GPU family (Hopper sm90 vs Ampere sm80/sm86/sm89); the chosen config
is logged once per shape bucket. Under TRITON_INTERPRET=1 fixed small blocks are used.
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


def doc_start_from_ids(input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B, T) token ids of packed rows -> doc_start (B, T) int32: index of the first token of the
    document holding each token. A document ends with (and includes) its EOS token; O(B*T)."""
    B, T = input_ids.shape
    idx = torch.arange(T, device=input_ids.device).expand(B, T)
    starts = torch.zeros(B, T, dtype=torch.long, device=input_ids.device)
    starts[:, 1:] = (input_ids[:, :-1] == eos_id).long() * idx[:, 1:]  # first token after an EOS
    return torch.cummax(starts, dim=1).values.to(torch.int32)


def doc_mask_ref(doc_start: torch.Tensor) -> torch.Tensor:
    """doc_start (B, T) -> (B, 1, T, T) bool, True where query i may see key j (doc_start[i] <= j <= i)."""
    T = doc_start.shape[1]
    j = torch.arange(T, device=doc_start.device)
    return ((j[None, None, :] >= doc_start[:, :, None]) & (j[None, None, :] <= j[None, :, None]))[
        :, None
    ]


def flash_attention_ref(
    q,
    k,
    v,
    causal: bool = True,
    sm_scale: float | None = None,
    doc_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain attention in fp32 (fp64 for fp64 inputs) with explicit GQA repeat; output in q.dtype.

    ``doc_start`` (B, T): the explicit (B, 1, T, T) document mask of ``doc_mask_ref`` (needs causal)."""
    B, nh, T, hs = q.shape
    group = nh // k.shape[1]
    scale = 1.0 / math.sqrt(hs) if sm_scale is None else sm_scale
    acc = torch.promote_types(q.dtype, torch.float32)
    qf = q.to(acc)
    kf = k.to(acc).repeat_interleave(group, dim=1)  # (B, nh, T, hs)
    vf = v.to(acc).repeat_interleave(group, dim=1)
    att = (qf @ kf.transpose(-2, -1)) * scale  # (B, nh, T, T)
    if doc_start is not None:
        att = att.masked_fill(~doc_mask_ref(doc_start), float("-inf"))
    elif causal:
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        att = att.masked_fill(~mask, float("-inf"))
    return (att.softmax(-1) @ vf).to(q.dtype)


# ----------------------------------------------------------------------------- jit kernels
# MASK modes of the inner loops (constexpr: each mode compiles to its own loop):
#   0 none (full blocks)   1 sequence end   2 causal diagonal + sequence end
#   3 document + sequence end               4 document + causal diagonal + sequence end
# "document": key j is visible to query i only if j >= doc_start[i] (same document).
if HAS_TRITON:

    @triton.jit
    def _fwd_inner(
        acc,
        l_i,
        m_i,
        q,
        K_base,
        V_base,
        stride_kt,
        stride_vt,
        offs_m,
        offs_n,
        offs_d,
        ds,
        lo,
        hi,
        T,
        qk_scale,
        BLOCK_N: tl.constexpr,
        MASK: tl.constexpr,
        DOT_PREC: tl.constexpr,
    ):
        # ds: (BLOCK_M,) doc_start of each query row (used by MASK 3/4 only)
        for start_n in range(lo, hi, BLOCK_N):
            cols = start_n + offs_n
            if MASK == 0:
                kT = tl.load(
                    K_base + cols[None, :] * stride_kt + offs_d[:, None]
                )  # (HEAD_DIM, BLOCK_N)
                v = tl.load(
                    V_base + cols[:, None] * stride_vt + offs_d[None, :]
                )  # (BLOCK_N, HEAD_DIM)
            else:
                col_ok = cols < T
                kT = tl.load(
                    K_base + cols[None, :] * stride_kt + offs_d[:, None],
                    mask=col_ok[None, :],
                    other=0.0,
                )
                v = tl.load(
                    V_base + cols[:, None] * stride_vt + offs_d[None, :],
                    mask=col_ok[:, None],
                    other=0.0,
                )
            qk = (
                tl.dot(q, kT, input_precision=DOT_PREC) * qk_scale
            )  # (BLOCK_M, BLOCK_N), log2 units
            if MASK == 1:
                qk = tl.where(col_ok[None, :], qk, float("-inf"))
            if MASK == 2:
                qk = tl.where(
                    col_ok[None, :] & (offs_m[:, None] >= cols[None, :]), qk, float("-inf")
                )
            if MASK == 3:
                qk = tl.where(col_ok[None, :] & (cols[None, :] >= ds[:, None]), qk, float("-inf"))
            if MASK == 4:
                qk = tl.where(
                    col_ok[None, :]
                    & (offs_m[:, None] >= cols[None, :])
                    & (cols[None, :] >= ds[:, None]),
                    qk,
                    float("-inf"),
                )
            m_ij = tl.maximum(m_i, tl.max(qk, 1))
            if MASK >= 3:
                # a row whose document starts after every key seen so far has m = -inf: subtract 0
                # instead (p and alpha become 0, not NaN); m_i stays -inf until a key is visible
                m_sub = tl.where(m_ij == float("-inf"), 0.0, m_ij)
            else:
                m_sub = m_ij
            p = tl.math.exp2(qk - m_sub[:, None])
            alpha = tl.math.exp2(m_i - m_sub)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
            m_i = m_ij
        return acc, l_i, m_i

    @triton.jit
    def _doc_key_range(DOC_START, row_base, offs_m, row_ok, diag, T, BLOCK_N: tl.constexpr):
        """Key blocks of a query block under the document mask: [lo, mid) masked, [mid, diag) full.

        Returns (ds, lo, mid) with ds the (BLOCK_M,) doc_start of each row. Bounds are clamped
        to [0, diag] so a malformed doc_start cannot address memory outside K/V."""
        ds = tl.load(DOC_START + row_base + offs_m, mask=row_ok, other=0)
        first = tl.minimum(tl.maximum(tl.min(tl.where(row_ok, ds, T), 0), 0), diag)
        last = tl.max(ds, 0)
        lo = (first // BLOCK_N) * BLOCK_N
        mid = tl.maximum(tl.minimum(((last + BLOCK_N - 1) // BLOCK_N) * BLOCK_N, diag), lo)
        return ds, lo, mid

    @triton.jit
    def _attn_fwd_kernel(
        Q,
        K,
        V,
        O,
        LSE,
        DOC_START,
        sm_scale,
        sq_b,
        sq_h,
        sq_t,
        sk_b,
        sk_h,
        sk_t,
        sv_b,
        sv_h,
        sv_t,
        so_b,
        so_h,
        so_t,
        NH,
        T,
        GROUP,
        T_BUCKET,
        HEAD_DIM: tl.constexpr,
        CAUSAL: tl.constexpr,
        DOC: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        DOT_PREC: tl.constexpr,
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
        q = tl.load(
            Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_t + offs_d[None, :],
            mask=row_ok[:, None],
            other=0.0,
        )
        K_base = K + b * sk_b + kvh * sk_h
        V_base = V + b * sv_b + kvh * sv_h
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        qk_scale = sm_scale * 1.4426950408889634
        if CAUSAL:
            diag = start_m * BLOCK_M
            if DOC:  # (the launcher allows DOC only with CAUSAL)
                ds, lo, mid = _doc_key_range(DOC_START, b * T, offs_m, row_ok, diag, T, BLOCK_N)
                acc, l_i, m_i = _fwd_inner(
                    acc,
                    l_i,
                    m_i,
                    q,
                    K_base,
                    V_base,
                    sk_t,
                    sv_t,
                    offs_m,
                    offs_n,
                    offs_d,
                    ds,
                    lo,
                    mid,
                    T,
                    qk_scale,
                    BLOCK_N,
                    3,
                    DOT_PREC,
                )
                diag_mask: tl.constexpr = 4
            else:
                ds, mid = offs_m, 0
                diag_mask: tl.constexpr = 2
            acc, l_i, m_i = _fwd_inner(
                acc,
                l_i,
                m_i,
                q,
                K_base,
                V_base,
                sk_t,
                sv_t,
                offs_m,
                offs_n,
                offs_d,
                ds,
                mid,
                diag,
                T,
                qk_scale,
                BLOCK_N,
                0,
                DOT_PREC,
            )
            acc, l_i, m_i = _fwd_inner(
                acc,
                l_i,
                m_i,
                q,
                K_base,
                V_base,
                sk_t,
                sv_t,
                offs_m,
                offs_n,
                offs_d,
                ds,
                diag,
                tl.minimum(diag + BLOCK_M, T),
                T,
                qk_scale,
                BLOCK_N,
                diag_mask,
                DOT_PREC,
            )
        else:
            full = (T // BLOCK_N) * BLOCK_N
            acc, l_i, m_i = _fwd_inner(
                acc,
                l_i,
                m_i,
                q,
                K_base,
                V_base,
                sk_t,
                sv_t,
                offs_m,
                offs_n,
                offs_d,
                offs_m,
                0,
                full,
                T,
                qk_scale,
                BLOCK_N,
                0,
                DOT_PREC,
            )
            acc, l_i, m_i = _fwd_inner(
                acc,
                l_i,
                m_i,
                q,
                K_base,
                V_base,
                sk_t,
                sv_t,
                offs_m,
                offs_n,
                offs_d,
                offs_m,
                full,
                T,
                T,
                qk_scale,
                BLOCK_N,
                1,
                DOT_PREC,
            )
        acc = acc / l_i[:, None]
        tl.store(LSE + off_bh * T + offs_m, m_i + tl.math.log2(l_i), mask=row_ok)
        tl.store(
            O + b * so_b + h * so_h + offs_m[:, None] * so_t + offs_d[None, :],
            acc.to(O.dtype.element_ty),
            mask=row_ok[:, None],
        )

    @triton.jit
    def _attn_bwd_preprocess_kernel(
        O,
        DO,
        DELTA,
        so_b,
        so_h,
        so_t,
        sdo_b,
        sdo_h,
        sdo_t,
        NH,
        T,
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
    ):
        off_bh = tl.cast(tl.program_id(1), tl.int64)
        b = off_bh // NH
        h = off_bh % NH
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        row_ok = offs_m < T
        o = tl.load(
            O + b * so_b + h * so_h + offs_m[:, None] * so_t + offs_d[None, :],
            mask=row_ok[:, None],
            other=0.0,
        ).to(tl.float32)
        do = tl.load(
            DO + b * sdo_b + h * sdo_h + offs_m[:, None] * sdo_t + offs_d[None, :],
            mask=row_ok[:, None],
            other=0.0,
        ).to(tl.float32)
        tl.store(DELTA + off_bh * T + offs_m, tl.sum(o * do, axis=1), mask=row_ok)

    @triton.jit
    def _bwd_dkdv_inner(
        dk,
        dv,
        k,
        v,
        Q_base,
        DO_base,
        LSE_base,
        DELTA_base,
        DS_base,
        sq_t,
        sdo_t,
        offs_n,
        offs_d,
        lo,
        hi,
        T,
        qk_scale,
        BLOCK_M: tl.constexpr,
        MASK: tl.constexpr,
        DOT_PREC: tl.constexpr,
    ):
        # k, v: (BLOCK_N, HEAD_DIM) of one kv block; walks query blocks [lo, hi).
        # DS_base: doc_start of this batch row (read by MASK 3/4 only)
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            if MASK == 0:
                qT = tl.load(
                    Q_base + offs_m[None, :] * sq_t + offs_d[:, None]
                )  # (HEAD_DIM, BLOCK_M)
                do = tl.load(
                    DO_base + offs_m[:, None] * sdo_t + offs_d[None, :]
                )  # (BLOCK_M, HEAD_DIM)
                lse = tl.load(LSE_base + offs_m)
                delta = tl.load(DELTA_base + offs_m)
            else:
                row_ok = offs_m < T
                qT = tl.load(
                    Q_base + offs_m[None, :] * sq_t + offs_d[:, None],
                    mask=row_ok[None, :],
                    other=0.0,
                )
                do = tl.load(
                    DO_base + offs_m[:, None] * sdo_t + offs_d[None, :],
                    mask=row_ok[:, None],
                    other=0.0,
                )
                lse = tl.load(LSE_base + offs_m, mask=row_ok, other=0.0)
                delta = tl.load(DELTA_base + offs_m, mask=row_ok, other=0.0)
            qkT = tl.dot(k, qT, input_precision=DOT_PREC) * qk_scale  # (BLOCK_N, BLOCK_M)
            pT = tl.math.exp2(qkT - lse[None, :])
            if MASK == 1:
                pT = tl.where(row_ok[None, :], pT, 0.0)
            if MASK == 2:
                pT = tl.where(row_ok[None, :] & (offs_m[None, :] >= offs_n[:, None]), pT, 0.0)
            if MASK >= 3:
                ds = tl.load(DS_base + offs_m, mask=row_ok, other=0)
                if MASK == 3:
                    pT = tl.where(row_ok[None, :] & (ds[None, :] <= offs_n[:, None]), pT, 0.0)
                else:
                    pT = tl.where(
                        row_ok[None, :]
                        & (offs_m[None, :] >= offs_n[:, None])
                        & (ds[None, :] <= offs_n[:, None]),
                        pT,
                        0.0,
                    )
            dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PREC)
            dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)  # (BLOCK_N, BLOCK_M)
            dsT = pT * (dpT - delta[None, :])
            dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT), input_precision=DOT_PREC)
        return dk, dv

    @triton.jit
    def _attn_bwd_dkdv_kernel(
        Q,
        K,
        V,
        DO,
        DK,
        DV,
        LSE,
        DELTA,
        DOC_START,
        DOC_END,
        sm_scale,
        sq_b,
        sq_h,
        sq_t,
        sk_b,
        sk_h,
        sk_t,
        sv_b,
        sv_h,
        sv_t,
        sdo_b,
        sdo_h,
        sdo_t,
        sdk_b,
        sdk_h,
        sdk_t,
        sdv_b,
        sdv_h,
        sdv_t,
        NH,
        NKV,
        T,
        GROUP,
        T_BUCKET,
        HEAD_DIM: tl.constexpr,
        CAUSAL: tl.constexpr,
        DOC: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        DOT_PREC: tl.constexpr,
    ):
        start_n = tl.program_id(0) * BLOCK_N
        off_bkv = tl.cast(tl.program_id(1), tl.int64)
        b = off_bkv // NKV
        kvh = off_bkv % NKV
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        col_ok = offs_n < T
        k = tl.load(
            K + b * sk_b + kvh * sk_h + offs_n[:, None] * sk_t + offs_d[None, :],
            mask=col_ok[:, None],
            other=0.0,
        )
        v = tl.load(
            V + b * sv_b + kvh * sv_h + offs_n[:, None] * sv_t + offs_d[None, :],
            mask=col_ok[:, None],
            other=0.0,
        )
        dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        qk_scale = sm_scale * 1.4426950408889634
        DS_base = DOC_START + b * T
        # query rows [start_n, below) hold the causal diagonal; rows below it need no causal mask
        below = tl.minimum(start_n + BLOCK_N, T)
        if DOC:
            # rows < doc_end[first key] see every key of the block; rows >= doc_end[last key] see none
            sees_all = tl.minimum(tl.maximum(tl.load(DOC_END + b * T + start_n), below), T)
            full = below + ((sees_all - below) // BLOCK_M) * BLOCK_M
            hi = tl.minimum(tl.maximum(tl.load(DOC_END + b * T + below - 1), full), T)
            diag_mask: tl.constexpr = 4
            tail_mask: tl.constexpr = 3
        else:
            full = below + ((T - below) // BLOCK_M) * BLOCK_M
            hi = T
            diag_mask: tl.constexpr = 2
            tail_mask: tl.constexpr = 1
        for g in range(0, GROUP):
            h = kvh * GROUP + g
            Q_base = Q + b * sq_b + h * sq_h
            DO_base = DO + b * sdo_b + h * sdo_h
            LSE_base = LSE + (b * NH + h) * T
            DELTA_base = DELTA + (b * NH + h) * T
            if CAUSAL:
                dk, dv = _bwd_dkdv_inner(
                    dk,
                    dv,
                    k,
                    v,
                    Q_base,
                    DO_base,
                    LSE_base,
                    DELTA_base,
                    DS_base,
                    sq_t,
                    sdo_t,
                    offs_n,
                    offs_d,
                    start_n,
                    below,
                    T,
                    qk_scale,
                    BLOCK_M,
                    diag_mask,
                    DOT_PREC,
                )
                dk, dv = _bwd_dkdv_inner(
                    dk,
                    dv,
                    k,
                    v,
                    Q_base,
                    DO_base,
                    LSE_base,
                    DELTA_base,
                    DS_base,
                    sq_t,
                    sdo_t,
                    offs_n,
                    offs_d,
                    below,
                    full,
                    T,
                    qk_scale,
                    BLOCK_M,
                    0,
                    DOT_PREC,
                )
                dk, dv = _bwd_dkdv_inner(
                    dk,
                    dv,
                    k,
                    v,
                    Q_base,
                    DO_base,
                    LSE_base,
                    DELTA_base,
                    DS_base,
                    sq_t,
                    sdo_t,
                    offs_n,
                    offs_d,
                    full,
                    hi,
                    T,
                    qk_scale,
                    BLOCK_M,
                    tail_mask,
                    DOT_PREC,
                )
            else:
                full_nc = (T // BLOCK_M) * BLOCK_M
                dk, dv = _bwd_dkdv_inner(
                    dk,
                    dv,
                    k,
                    v,
                    Q_base,
                    DO_base,
                    LSE_base,
                    DELTA_base,
                    DS_base,
                    sq_t,
                    sdo_t,
                    offs_n,
                    offs_d,
                    0,
                    full_nc,
                    T,
                    qk_scale,
                    BLOCK_M,
                    0,
                    DOT_PREC,
                )
                dk, dv = _bwd_dkdv_inner(
                    dk,
                    dv,
                    k,
                    v,
                    Q_base,
                    DO_base,
                    LSE_base,
                    DELTA_base,
                    DS_base,
                    sq_t,
                    sdo_t,
                    offs_n,
                    offs_d,
                    full_nc,
                    T,
                    T,
                    qk_scale,
                    BLOCK_M,
                    1,
                    DOT_PREC,
                )
        dk = dk * sm_scale
        tl.store(
            DK + b * sdk_b + kvh * sdk_h + offs_n[:, None] * sdk_t + offs_d[None, :],
            dk.to(DK.dtype.element_ty),
            mask=col_ok[:, None],
        )
        tl.store(
            DV + b * sdv_b + kvh * sdv_h + offs_n[:, None] * sdv_t + offs_d[None, :],
            dv.to(DV.dtype.element_ty),
            mask=col_ok[:, None],
        )

    @triton.jit
    def _bwd_dq_inner(
        dq,
        q,
        do,
        lse,
        delta,
        K_base,
        V_base,
        sk_t,
        sv_t,
        offs_m,
        offs_d,
        ds,
        lo,
        hi,
        T,
        qk_scale,
        BLOCK_N: tl.constexpr,
        MASK: tl.constexpr,
        DOT_PREC: tl.constexpr,
    ):
        for start_n in range(lo, hi, BLOCK_N):
            cols = start_n + tl.arange(0, BLOCK_N)
            if MASK == 0:
                kT = tl.load(K_base + cols[None, :] * sk_t + offs_d[:, None])  # (HEAD_DIM, BLOCK_N)
                vT = tl.load(V_base + cols[None, :] * sv_t + offs_d[:, None])
            else:
                col_ok = cols < T
                kT = tl.load(
                    K_base + cols[None, :] * sk_t + offs_d[:, None], mask=col_ok[None, :], other=0.0
                )
                vT = tl.load(
                    V_base + cols[None, :] * sv_t + offs_d[:, None], mask=col_ok[None, :], other=0.0
                )
            qk = tl.dot(q, kT, input_precision=DOT_PREC) * qk_scale  # (BLOCK_M, BLOCK_N)
            p = tl.math.exp2(qk - lse[:, None])
            if MASK == 1:
                p = tl.where(col_ok[None, :], p, 0.0)
            if MASK == 2:
                p = tl.where(col_ok[None, :] & (offs_m[:, None] >= cols[None, :]), p, 0.0)
            if MASK == 3:
                p = tl.where(col_ok[None, :] & (cols[None, :] >= ds[:, None]), p, 0.0)
            if MASK == 4:
                p = tl.where(
                    col_ok[None, :]
                    & (offs_m[:, None] >= cols[None, :])
                    & (cols[None, :] >= ds[:, None]),
                    p,
                    0.0,
                )
            dp = tl.dot(do, vT, input_precision=DOT_PREC)
            ds_ = p * (dp - delta[:, None])
            dq += tl.dot(ds_.to(kT.dtype), tl.trans(kT), input_precision=DOT_PREC)
        return dq

    @triton.jit
    def _attn_bwd_dq_kernel(
        Q,
        K,
        V,
        DO,
        DQ,
        LSE,
        DELTA,
        DOC_START,
        sm_scale,
        sq_b,
        sq_h,
        sq_t,
        sk_b,
        sk_h,
        sk_t,
        sv_b,
        sv_h,
        sv_t,
        sdo_b,
        sdo_h,
        sdo_t,
        sdq_b,
        sdq_h,
        sdq_t,
        NH,
        T,
        GROUP,
        T_BUCKET,
        HEAD_DIM: tl.constexpr,
        CAUSAL: tl.constexpr,
        DOC: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        DOT_PREC: tl.constexpr,
    ):
        start_m = tl.program_id(0)
        off_bh = tl.cast(tl.program_id(1), tl.int64)
        b = off_bh // NH
        h = off_bh % NH
        kvh = h // GROUP
        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        row_ok = offs_m < T
        q = tl.load(
            Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_t + offs_d[None, :],
            mask=row_ok[:, None],
            other=0.0,
        )
        do = tl.load(
            DO + b * sdo_b + h * sdo_h + offs_m[:, None] * sdo_t + offs_d[None, :],
            mask=row_ok[:, None],
            other=0.0,
        )
        lse = tl.load(LSE + off_bh * T + offs_m, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + off_bh * T + offs_m, mask=row_ok, other=0.0)
        K_base = K + b * sk_b + kvh * sk_h
        V_base = V + b * sv_b + kvh * sv_h
        dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        qk_scale = sm_scale * 1.4426950408889634
        if CAUSAL:
            diag = start_m * BLOCK_M
            if DOC:
                ds, lo, mid = _doc_key_range(DOC_START, b * T, offs_m, row_ok, diag, T, BLOCK_N)
                dq = _bwd_dq_inner(
                    dq,
                    q,
                    do,
                    lse,
                    delta,
                    K_base,
                    V_base,
                    sk_t,
                    sv_t,
                    offs_m,
                    offs_d,
                    ds,
                    lo,
                    mid,
                    T,
                    qk_scale,
                    BLOCK_N,
                    3,
                    DOT_PREC,
                )
                diag_mask: tl.constexpr = 4
            else:
                ds, mid = offs_m, 0
                diag_mask: tl.constexpr = 2
            dq = _bwd_dq_inner(
                dq,
                q,
                do,
                lse,
                delta,
                K_base,
                V_base,
                sk_t,
                sv_t,
                offs_m,
                offs_d,
                ds,
                mid,
                diag,
                T,
                qk_scale,
                BLOCK_N,
                0,
                DOT_PREC,
            )
            dq = _bwd_dq_inner(
                dq,
                q,
                do,
                lse,
                delta,
                K_base,
                V_base,
                sk_t,
                sv_t,
                offs_m,
                offs_d,
                ds,
                diag,
                tl.minimum(diag + BLOCK_M, T),
                T,
                qk_scale,
                BLOCK_N,
                diag_mask,
                DOT_PREC,
            )
        else:
            full = (T // BLOCK_N) * BLOCK_N
            dq = _bwd_dq_inner(
                dq,
                q,
                do,
                lse,
                delta,
                K_base,
                V_base,
                sk_t,
                sv_t,
                offs_m,
                offs_d,
                offs_m,
                0,
                full,
                T,
                qk_scale,
                BLOCK_N,
                0,
                DOT_PREC,
            )
            dq = _bwd_dq_inner(
                dq,
                q,
                do,
                lse,
                delta,
                K_base,
                V_base,
                sk_t,
                sv_t,
                offs_m,
                offs_d,
                offs_m,
                full,
                T,
                T,
                qk_scale,
                BLOCK_N,
                1,
                DOT_PREC,
            )
        dq = dq * sm_scale
        tl.store(
            DQ + b * sdq_b + h * sdq_h + offs_m[:, None] * sdq_t + offs_d[None, :],
            dq.to(DQ.dtype.element_ty),
            mask=row_ok[:, None],
        )


# ----------------------------------------------------------------------------- autotune configs
# (BLOCK_M, BLOCK_N, num_warps, num_stages, head dims the config is tried for).
# fwd and dq need BLOCK_M % BLOCK_N == 0; dkdv needs BLOCK_N % BLOCK_M == 0.
_SMALL = (16, 32, 64)
_MID = (16, 32, 64, 128)
_ALL = SUPPORTED_HEAD_DIMS
_CONFIGS = {
    "fwd": {
        "sm90": [
            (128, 128, 8, 3, _MID),
            (128, 64, 8, 3, _MID),
            (128, 64, 4, 4, _MID),
            (64, 64, 4, 4, _ALL),
            (128, 32, 4, 3, _ALL),
            (64, 32, 4, 3, _ALL),
        ],
        "sm80": [
            (128, 64, 4, 3, _MID),
            (128, 64, 8, 3, _MID),
            (128, 32, 4, 4, _MID),
            (64, 64, 4, 3, _ALL),
            (64, 32, 4, 3, _ALL),
            (64, 32, 4, 2, _ALL),
        ],
    },
    "dkdv": {
        "sm90": [
            (32, 128, 8, 3, _MID),
            (64, 128, 8, 2, _MID),
            (32, 64, 4, 3, _ALL),
            (64, 64, 8, 2, _ALL),
            (16, 64, 4, 2, _ALL),
            (16, 32, 4, 1, _ALL),
        ],
        "sm80": [
            (32, 128, 8, 2, _MID),
            (32, 64, 4, 3, _MID),
            (64, 64, 8, 2, _SMALL),
            (32, 64, 4, 2, _ALL),
            (16, 64, 4, 2, _ALL),
            (16, 32, 4, 1, _ALL),
        ],
    },
    "dq": {
        "sm90": [
            (128, 32, 8, 3, _MID),
            (128, 64, 8, 2, _MID),
            (64, 32, 4, 3, _ALL),
            (64, 64, 8, 2, _ALL),
            (64, 16, 4, 2, _ALL),
            (32, 16, 4, 1, _ALL),
        ],
        "sm80": [
            (128, 32, 8, 2, _MID),
            (64, 32, 4, 3, _MID),
            (64, 64, 8, 2, _SMALL),
            (64, 32, 4, 2, _ALL),
            (64, 16, 4, 2, _ALL),
            (32, 16, 4, 1, _ALL),
        ],
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
        jit_fn = {
            "fwd": _attn_fwd_kernel,
            "dkdv": _attn_bwd_dkdv_kernel,
            "dq": _attn_bwd_dq_kernel,
        }[name]
        head_dims = {}  # config -> head dims it is tried for
        for bm, bn, w, s, dims in _CONFIGS[name][family]:
            head_dims[triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)] = (
                dims
            )

        def prune(configs, named_args, **kwargs):
            return [c for c in configs if kwargs["HEAD_DIM"] in head_dims[c]] or configs[-1:]

        _tuned[key] = triton.autotune(
            configs=list(head_dims),
            key=["T_BUCKET", "HEAD_DIM", "CAUSAL", "DOC", "GROUP"],
            prune_configs_by={"early_config_prune": prune},
        )(jit_fn)
    return _tuned[key]


def _launch(name: str, jit_fn, grid_dim0, grid_dim1, args, head_dim, causal, T, group, doc=False):
    """Run ``jit_fn`` with autotuning on GPU, or the fixed interpreter blocks on CPU."""
    if args[0].device.type == "cuda":
        _launch_autotuned(
            name,
            gpu_family(args[0].device),
            grid_dim0,
            grid_dim1,
            args,
            head_dim,
            causal,
            T,
            group,
            doc,
        )
        return
    bm, bn = _INTERPRETER_BLOCKS[name]
    jit_fn[(grid_dim0(bm, bn), grid_dim1)](
        *args,
        T_BUCKET=next_power_of_2(T),
        HEAD_DIM=head_dim,
        CAUSAL=causal,
        DOC=doc,
        BLOCK_M=bm,
        BLOCK_N=bn,
        DOT_PREC=_dot_precision(args[0].dtype),
    )


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs (tests, debugging) get 3xTF32 dots, accurate to ~fp32; halves use the tensor cores as is
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _launch_autotuned(
    name, family, grid_dim0, grid_dim1, args, head_dim, causal, T, group, doc=False
):
    t_bucket = next_power_of_2(T)
    dot_prec = _dot_precision(args[0].dtype)
    kernel = _tuned_kernel(name, family)

    def grid(meta):
        return (grid_dim0(meta["BLOCK_M"], meta["BLOCK_N"]), grid_dim1)

    kernel[grid](
        *args, T_BUCKET=t_bucket, HEAD_DIM=head_dim, CAUSAL=causal, DOC=doc, DOT_PREC=dot_prec
    )
    log_key = (name, family, t_bucket, head_dim, causal, doc, group, str(args[0].dtype))
    if log_key not in _logged:
        _logged.add(log_key)
        c = kernel.best_config
        log.info(
            "flash_attention %s %s T<=%d hs=%d causal=%s group=%d doc_mask=%s %s: "
            "BLOCK_M=%d BLOCK_N=%d warps=%d stages=%d",
            name,
            family,
            t_bucket,
            head_dim,
            causal,
            group,
            doc,
            args[0].dtype,
            c.kwargs["BLOCK_M"],
            c.kwargs["BLOCK_N"],
            c.num_warps,
            c.num_stages,
        )


def _strides(x):
    return x.stride(0), x.stride(1), x.stride(2)


# ----------------------------------------------------------------------------- launchers
def check_inputs(q, k, v, causal=True, sm_scale=None, doc_start=None) -> None:
    """Raise ValueError for anything the kernels do not support, before any launch.

    ``doc_start`` (B, T) int32/int64 on q's device, needs ``causal=True``. Its values (0 <=
    doc_start[b, i] <= i, non-decreasing in i) are checked for CPU tensors only: on CUDA the check
    would cost a host sync per call. A malformed doc_start on CUDA gives wrong attention but never
    reads outside K/V (the kernels clamp their loop bounds)."""
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
        raise ValueError(
            f"megapt.kernels.flash_attention: k {tuple(k.shape)} and v {tuple(v.shape)} differ"
        )
    if k.shape[0] != B or k.shape[3] != hs:
        raise ValueError(
            f"megapt.kernels.flash_attention: k/v {tuple(k.shape)} must share batch and head size "
            f"with q {tuple(q.shape)}"
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
    if doc_start is not None:
        _check_doc_start(doc_start, B, T, causal)
        check_device("flash_attention", _attn_fwd_kernel, q, k, v, doc_start)
    else:
        check_device("flash_attention", _attn_fwd_kernel, q, k, v)


def _check_doc_start(doc_start, B, T, causal) -> None:
    where = "megapt.kernels.flash_attention: doc_start"
    if not isinstance(doc_start, torch.Tensor):
        raise ValueError(f"{where} must be a (B, T) integer tensor, got {type(doc_start).__name__}")
    if not causal:
        raise ValueError(
            f"{where} needs causal=True (the document mask is causal within each document)"
        )
    if doc_start.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"{where} has dtype {doc_start.dtype}; need int32 or int64 "
            "(first token index of each token's document, see doc_start_from_ids)"
        )
    if tuple(doc_start.shape) != (B, T):
        raise ValueError(f"{where} must have shape (B, T) = {(B, T)}, got {tuple(doc_start.shape)}")
    if T >= 2**31:
        raise ValueError(f"{where}: T={T} does not fit int32 indices")
    if doc_start.device.type == "cpu" and doc_start.numel():
        pos = torch.arange(T, device=doc_start.device)
        bad = (doc_start < 0) | (doc_start > pos)
        bad[:, 1:] |= doc_start[:, 1:] < doc_start[:, :-1]
        if bad.any():
            b, i = (int(x) for x in bad.nonzero()[0])
            raise ValueError(
                f"{where}[{b}, {i}] = {int(doc_start[b, i])} is invalid: need 0 <= doc_start[b, i] <= i "
                "and doc_start non-decreasing along T"
            )


def _unit_last(x):
    return x if x.stride(-1) == 1 else x.contiguous()


_NO_DOC: dict = {}  # device -> 1-element int32 tensor passed as DOC_START/DOC_END when DOC=False


def _no_doc(device: torch.device) -> torch.Tensor:
    if device not in _NO_DOC:
        _NO_DOC[device] = torch.zeros(1, dtype=torch.int32, device=device)
    return _NO_DOC[device]


def doc_end_from_start(doc_start: torch.Tensor) -> torch.Tensor:
    """doc_start (B, T) int32 -> doc_end (B, T) int32: one past the last query that can see key j,
    i.e. the number of rows i with doc_start[i] <= j (doc_start is sorted: a searchsorted)."""
    B, T = doc_start.shape
    keys = torch.arange(T, device=doc_start.device, dtype=doc_start.dtype).expand(B, T).contiguous()
    return torch.searchsorted(doc_start, keys, right=True, out_int32=True)


def flash_attention_forward(q, k, v, causal: bool, sm_scale: float, doc_start=None):
    """-> o (like q), lse (B, nh, T) fp32 in log2 units. doc_start: None or (B, T) int32 contiguous."""
    B, nh, T, hs = q.shape
    nkv = k.shape[1]
    group = nh // nkv
    o = torch.empty_like(q)  # keeps q's layout, e.g. a (B, T, nh, hs) buffer seen as (B, nh, T, hs)
    lse = torch.empty((B, nh, T), dtype=torch.float32, device=q.device)
    if B * nh * T == 0:
        return o, lse
    doc = doc_start is not None
    ds = doc_start if doc else _no_doc(q.device)
    args = (
        q,
        k,
        v,
        o,
        lse,
        ds,
        sm_scale,
        *_strides(q),
        *_strides(k),
        *_strides(v),
        *_strides(o),
        nh,
        T,
        group,
    )
    _launch(
        "fwd",
        _attn_fwd_kernel,
        lambda bm, bn: triton.cdiv(T, bm),
        B * nh,
        args,
        hs,
        causal,
        T,
        group,
        doc,
    )
    return o, lse


def flash_attention_backward(do, q, k, v, o, lse, causal: bool, sm_scale: float, doc_start=None):
    """-> dq, dk, dv (dk/dv summed over the query heads of each kv group)."""
    B, nh, T, hs = q.shape
    nkv = k.shape[1]
    group = nh // nkv
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if B * nh * T == 0:
        return dq, dk.zero_(), dv.zero_()
    delta = torch.empty_like(lse)
    _attn_bwd_preprocess_kernel[(triton.cdiv(T, _PREPROCESS_BLOCK_M), B * nh)](
        o,
        do,
        delta,
        *_strides(o),
        *_strides(do),
        nh,
        T,
        HEAD_DIM=hs,
        BLOCK_M=_PREPROCESS_BLOCK_M,
    )
    doc = doc_start is not None
    ds = doc_start if doc else _no_doc(q.device)
    de = doc_end_from_start(doc_start) if doc else ds
    args = (
        q,
        k,
        v,
        do,
        dk,
        dv,
        lse,
        delta,
        ds,
        de,
        sm_scale,
        *_strides(q),
        *_strides(k),
        *_strides(v),
        *_strides(do),
        *_strides(dk),
        *_strides(dv),
        nh,
        nkv,
        T,
        group,
    )
    _launch(
        "dkdv",
        _attn_bwd_dkdv_kernel,
        lambda bm, bn: triton.cdiv(T, bn),
        B * nkv,
        args,
        hs,
        causal,
        T,
        group,
        doc,
    )
    args = (
        q,
        k,
        v,
        do,
        dq,
        lse,
        delta,
        ds,
        sm_scale,
        *_strides(q),
        *_strides(k),
        *_strides(v),
        *_strides(do),
        *_strides(dq),
        nh,
        T,
        group,
    )
    _launch(
        "dq",
        _attn_bwd_dq_kernel,
        lambda bm, bn: triton.cdiv(T, bm),
        B * nh,
        args,
        hs,
        causal,
        T,
        group,
        doc,
    )
    return dq, dk, dv


class FlashAttentionFunction(torch.autograd.Function):
    """q (B, nh, T, hs), k/v (B, nkv, T, hs) -> o (B, nh, T, hs).

    Saves q, k, v, o, lse (B, nh, T) fp32 and doc_start (B, T) int32 when given; backward
    returns dq, dk, dv in the input dtype.
    """

    @staticmethod
    def forward(ctx, q, k, v, causal, sm_scale, doc_start=None):
        q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
        o, lse = flash_attention_forward(q, k, v, causal, sm_scale, doc_start)
        ctx.save_for_backward(q, k, v, o, lse, doc_start)
        ctx.causal, ctx.sm_scale = causal, sm_scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, doc_start = ctx.saved_tensors
        dq, dk, dv = flash_attention_backward(
            _unit_last(do), q, k, v, o, lse, ctx.causal, ctx.sm_scale, doc_start
        )
        return dq, dk, dv, None, None, None


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    sm_scale: float | None = None,
    doc_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Flash attention with GQA. q (B, nh, T, hs), k/v (B, nkv, T, hs); hs in 16/32/64/128/256.

    fp16/bf16 (fp32 also accepted, with 3xTF32 dots: accurate, slower) on CUDA, or CPU under TRITON_INTERPRET=1. Any T.
    sm_scale defaults to 1/sqrt(hs). Returns o (B, nh, T, hs) in q.dtype.

    doc_start (B, T) int32/int64, optional, needs causal=True: packed documents. Query i sees key j
    iff doc_start[b, i] <= j <= i, where doc_start[b, i] is the index of the first token of the
    document holding token i (``doc_start_from_ids``). No (T, T) mask is built; key blocks
    before a query block's documents are skipped.
    """
    check_inputs(q, k, v, causal, sm_scale, doc_start)
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    if doc_start is not None:
        doc_start = doc_start.to(torch.int32).contiguous()
    return FlashAttentionFunction.apply(q, k, v, bool(causal), scale, doc_start)
