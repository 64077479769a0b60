"""Fused attention backward (FlashAttention-2 style): a pre-pass, a dK/dV kernel and a dQ kernel that
recompute the probabilities from the forward's log-sum-exp with the same per-row scale.

In the exp2 domain the forward's logit is s_ij = rs_i (q_i . k_j) + log2(e) bias_ij with the row scale
rs_i = t_i * c * log2(e) [* 1/||q_i|| under CosScale]; in natural units z_ij = a_i (q_i . k_j) + bias_ij,
a_i = rs_i / log2(e). With P = softmax(z), dP = dO V^T and delta_i = rowsum(dO * O):
dZ = P * (dP - delta_i), dV = P^T dO, dK_j = sum_i a_i dZ_ij q_i, dQ_i = a_i sum_j dZ_ij k_j, and for a
tensor temperature dt_i = (a_i / t_i) sum_j dZ_ij (q_i . k_j). Under CosScale K is the forward's unit K
and the epilogues apply the gradient of the L2 normalisation, dx = (dx_hat - x_hat (x_hat . dx_hat)) / ||x||.

Dropout (DROPOUT) with the 0/1 keep mask G (primitives.dropout_keep, the forward's bits) and
r = 1/(1 - p_drop): O = (P * G r) V, so dV = (P * G r)^T dO and dZ = P * (dP * G r - delta_i), where
delta_i = rowsum(dO * O) still holds with the dropped O that the forward returned.

The row pre-pass (attention_rows.py) stores delta_i and rs_i per row, so the two main kernels never
evaluate the temperature or the q norms inside their loops. Tiles wholly inside the causal triangle skip
the masking work; rows past Lq need none (their log-sum-exp reads as +inf, so p = 0), keys past Lk
neither (TMA reads them as zeros, so they add nothing to dQ, and their own dK/dV rows are not stored).
"""

import triton
import triton.language as tl

from .primitives import (
    INV_LOG2E,
    LOG2E,
    MASK_ADD,
    MASK_NONE,
    batch_extent,
    cast,
    dot,
    dropout_keep,
    key_blocks,
    key_validity,
    query_blocks,
    visible_keys,
)


@triton.jit
def _probs(qk, rs, lse, logl, offs_m, offs_n, lo, hi, lq, lk, mask_ptr, stride_mm, stride_mn,
           MASK_MODE: tl.constexpr, MASKED: tl.constexpr):
    """The forward's probabilities of a tile, recomputed from its row scale and log-sum-exp (under an
    additive mask the log-sum-exp comes in two parts, the row max ``lse`` and ``logl`` = log2 of the
    row sum)."""
    s = qk * rs[:, None]
    if MASKED:
        valid, bias = key_validity(offs_m, offs_n, lo, hi, lq, lk, mask_ptr, stride_mm, stride_mn, MASK_MODE)
        if MASK_MODE == MASK_ADD:
            p = tl.math.exp2((s + bias * LOG2E - lse[:, None]) - logl[:, None])
        else:
            p = tl.math.exp2(s - lse[:, None])
        p = tl.where(valid, p, 0.0)
    else:
        p = tl.math.exp2(s - lse[:, None])
    return p


@triton.jit
def _dkdv_tiles(
    dk, dv, k, v, q_desc, do_desc, lse_ptr, logl_ptr, delta_ptr, rs_ptr, mask_ptr, stride_mm, stride_mn,
    n0, offs_n, lo_m, hi_m, lq, lk, shift, kv_lo, kv_hi, win_left, win_right,
    seed, bh, dropout_p, dropout_scale,
    IS_CAUSAL: tl.constexpr, WINDOW: tl.constexpr, MASK_MODE: tl.constexpr, MASKED: tl.constexpr,
    DOT_PREC: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Accumulate one key block's dK, dV over the query blocks [lo_m, hi_m) of one head. (Computing in
    the transposed orientation, keys as rows, measured 5-20% slower on the H100: benchmarks/NOTES.md.)"""
    for m0 in range(lo_m, hi_m, BLOCK_M):
        m0 = tl.multiple_of(m0, BLOCK_M)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_ok = offs_m < lq
        q = q_desc.load([m0, 0])
        rs = tl.load(rs_ptr + offs_m, mask=row_ok, other=0.0)
        lse = tl.load(lse_ptr + offs_m, mask=row_ok, other=float("inf"))
        logl = lse
        if MASK_MODE == MASK_ADD:
            logl = tl.load(logl_ptr + offs_m, mask=row_ok, other=0.0)
        delta = tl.load(delta_ptr + offs_m, mask=row_ok, other=0.0)
        qk = dot(q, k.T, None, DOT_PREC)  # (BLOCK_M, BLOCK_N)
        lo = offs_m
        hi = offs_m
        if MASKED:
            lo, hi = visible_keys(offs_m, shift, kv_lo, kv_hi, win_left, win_right, IS_CAUSAL, WINDOW)
        p = _probs(qk, rs, lse, logl, offs_m, offs_n, lo, hi, lq, lk, mask_ptr, stride_mm, stride_mn,
                   MASK_MODE, MASKED)
        do = do_desc.load([m0, 0])
        if DROPOUT:
            # the forward's bits; dV's 1 / (1 - p) comes once, in the epilogue
            keep = dropout_keep(seed, bh, offs_m, n0, dropout_p, BLOCK_N)
            dv = dot(cast(tl.where(keep, p, 0.0).T, do.dtype), do, dv, DOT_PREC)
        else:
            dv = dot(cast(p.T, do.dtype), do, dv, DOT_PREC)
        dp = dot(do, v.T, None, DOT_PREC)
        if DROPOUT:
            dp = tl.where(keep, dp * dropout_scale, 0.0)
        ds = p * (dp - delta[:, None]) * (rs * INV_LOG2E)[:, None]
        dk = dot(cast(ds.T, q.dtype), q, dk, DOT_PREC)
    return dk, dv


@triton.jit(do_not_specialize=["Lq", "Lk", "win_left", "win_right"])
def attention_bwd_dkdv_kernel(
    Q, K, V, DOut, Lse, LogL, Delta, RowScale, DK, DV, KInv, Mask, Seed, CuQ, CuK, KvRange,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom, stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn, stride_mb, stride_mh, stride_mm, stride_mn,
    Hq, Lq, Lk, GROUP, dropout_p, dropout_scale, win_left, win_right,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, COS: tl.constexpr, MASK_MODE: tl.constexpr, DOT_PREC: tl.constexpr,
    DROPOUT: tl.constexpr, VARLEN: tl.constexpr, HAS_KV_RANGE: tl.constexpr, WINDOW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per (key block, kv head, batch): dK and dV summed over every query head of the
    group (GQA) and every query block that sees the keys, in a fixed order: no atomics, and the same
    bits on every run."""
    n0 = tl.program_id(0) * BLOCK_N
    hk = tl.program_id(1)
    hk64 = hk.to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    bq, q_start, lq, k_start, lk, kv_lo, kv_hi = batch_extent(tl.program_id(2), Lq, Lk, CuQ, CuK, KvRange,
                                                              VARLEN, HAS_KV_RANGE)
    q_rows = q_start.to(tl.int64)
    k_rows = k_start.to(tl.int64)
    shift = lk - lq
    offs_n = n0 + tl.arange(0, BLOCK_N)
    k_desc = tl.make_tensor_descriptor(K + bq * stride_kb + hk64 * stride_kh + k_rows * stride_kn,
                                       shape=[tl.maximum(lk, 1), HEAD_D], strides=[stride_kn, 1],
                                       block_shape=[BLOCK_N, BLOCK_D])
    v_desc = tl.make_tensor_descriptor(V + bq * stride_vb + hk64 * stride_vh + k_rows * stride_vn,
                                       shape=[tl.maximum(lk, 1), HEAD_DV], strides=[stride_vn, 1],
                                       block_shape=[BLOCK_N, BLOCK_DV])
    k = k_desc.load([n0, 0])
    v = v_desc.load([n0, 0])
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    # query tiles [start, full_lo) and [full_hi, end) are masked, [full_lo, full_hi) see every key here
    start, full_lo, full_hi, end = query_blocks(n0, lq, lk, shift, kv_lo, kv_hi, win_left, win_right,
                                                IS_CAUSAL, WINDOW, MASK_MODE != MASK_NONE, BLOCK_M, BLOCK_N)
    seed = 0
    if DROPOUT:
        seed = tl.load(Seed)
    for g in range(0, GROUP):
        h64 = (hk * GROUP + g).to(tl.int64)
        q_desc = tl.make_tensor_descriptor(Q + bq * stride_qb + h64 * stride_qh + q_rows * stride_qm,
                                           shape=[tl.maximum(lq, 1), HEAD_D], strides=[stride_qm, 1],
                                           block_shape=[BLOCK_M, BLOCK_D])
        do_desc = tl.make_tensor_descriptor(DOut + bq * stride_dob + h64 * stride_doh + q_rows * stride_dom,
                                            shape=[tl.maximum(lq, 1), HEAD_DV], strides=[stride_dom, 1],
                                            block_shape=[BLOCK_M, BLOCK_DV])
        row = (bq * Hq + h64) * Lq + q_rows
        mask_ptr = Mask + bq * stride_mb + h64 * stride_mh
        bh = b * Hq + h64
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_desc, do_desc, Lse + row, LogL + row, Delta + row,
                             RowScale + row, mask_ptr, stride_mm, stride_mn, n0, offs_n, start, full_lo,
                             lq, lk, shift, kv_lo, kv_hi, win_left, win_right,
                             seed, bh, dropout_p, dropout_scale,
                             IS_CAUSAL, WINDOW, MASK_MODE, True, DOT_PREC, DROPOUT, BLOCK_M, BLOCK_N)
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_desc, do_desc, Lse + row, LogL + row, Delta + row,
                             RowScale + row, mask_ptr, stride_mm, stride_mn, n0, offs_n, full_lo, full_hi,
                             lq, lk, shift, kv_lo, kv_hi, win_left, win_right,
                             seed, bh, dropout_p, dropout_scale,
                             IS_CAUSAL, WINDOW, MASK_MODE, False, DOT_PREC, DROPOUT, BLOCK_M, BLOCK_N)
        if WINDOW:
            # only a window hides a key block from the last rows
            dk, dv = _dkdv_tiles(dk, dv, k, v, q_desc, do_desc, Lse + row, LogL + row, Delta + row,
                                 RowScale + row, mask_ptr, stride_mm, stride_mn, n0, offs_n, full_hi, end,
                                 lq, lk, shift, kv_lo, kv_hi, win_left, win_right,
                                 seed, bh, dropout_p, dropout_scale,
                                 IS_CAUSAL, WINDOW, MASK_MODE, True, DOT_PREC, DROPOUT, BLOCK_M, BLOCK_N)
    if DROPOUT:
        dv = dv * dropout_scale
    if COS:
        # K was the unit K: chain through k_hat = k / ||k||
        kinv = tl.load(KInv + (bq * (Hq // GROUP) + hk64) * Lk + k_rows + offs_n, mask=offs_n < lk, other=0.0)
        kf = k.to(tl.float32)
        dk = (dk - kf * tl.sum(kf * dk, 1)[:, None]) * kinv[:, None]
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows = k_rows + offs_n[:, None].to(tl.int64)
    tl.store(DK + bq * stride_dkb + hk64 * stride_dkh + rows * stride_dkn + offs_d[None, :],
             cast(dk, DK.dtype.element_ty), mask=(offs_n[:, None] < lk) & (offs_d[None, :] < HEAD_D))
    tl.store(DV + bq * stride_dvb + hk64 * stride_dvh + rows * stride_dvn + offs_dv[None, :],
             cast(dv, DV.dtype.element_ty), mask=(offs_n[:, None] < lk) & (offs_dv[None, :] < HEAD_DV))


@triton.jit
def _dq_tiles(
    g, dt, q, do, rs, lse, logl, delta, k_desc, v_desc, mask_ptr, stride_mm, stride_mn, offs_m, lo, hi,
    start, end, lq, lk, seed, bh, dropout_p, dropout_scale,
    MASK_MODE: tl.constexpr, MASKED: tl.constexpr, DOT_PREC: tl.constexpr,
    TEMP_GRAD: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Accumulate dQ (before the row scale) and the temperature's row sums over key tiles [start, end)."""
    for n0 in range(start, end, BLOCK_N):
        n0 = tl.multiple_of(n0, BLOCK_N)
        k = k_desc.load([n0, 0])
        v = v_desc.load([n0, 0])
        qk = dot(q, k.T, None, DOT_PREC)
        p = _probs(qk, rs, lse, logl, offs_m, n0 + tl.arange(0, BLOCK_N), lo, hi, lq, lk, mask_ptr,
                   stride_mm, stride_mn, MASK_MODE, MASKED)
        dp = dot(do, v.T, None, DOT_PREC)
        if DROPOUT:
            keep = dropout_keep(seed, bh, offs_m, n0, dropout_p, BLOCK_N)
            dp = tl.where(keep, dp * dropout_scale, 0.0)
        ds = p * (dp - delta[:, None])
        g = dot(cast(ds, k.dtype), k, g, DOT_PREC)
        if TEMP_GRAD:
            dt += tl.sum(ds * qk, 1)
    return g, dt


@triton.jit(do_not_specialize=["Lq", "Lk", "win_left", "win_right"])
def attention_bwd_dq_kernel(
    Q, K, V, DOut, Lse, LogL, Delta, RowScale, DQ, DT, Mask, Seed, CuQ, CuK, KvRange,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom, stride_dqb, stride_dqh, stride_dqm,
    stride_mb, stride_mh, stride_mm, stride_mn,
    Hq, Lq, Lk, GROUP, scale, dropout_p, dropout_scale, win_left, win_right,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, COS: tl.constexpr, MASK_MODE: tl.constexpr, DOT_PREC: tl.constexpr,
    TEMP_GRAD: tl.constexpr, DROPOUT: tl.constexpr, VARLEN: tl.constexpr, HAS_KV_RANGE: tl.constexpr,
    WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per (query block, query head, batch): dQ and, with TEMP_GRAD, dL/dt_i."""
    pid_m = tl.program_id(0)
    if IS_CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m  # longest rows first
    h64 = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    hk64 = (tl.program_id(1) // GROUP).to(tl.int64)
    bq, q_start, lq, k_start, lk, kv_lo, kv_hi = batch_extent(tl.program_id(2), Lq, Lk, CuQ, CuK, KvRange,
                                                              VARLEN, HAS_KV_RANGE)
    if VARLEN and IS_CAUSAL:
        # the grid covers the longest sequence: count from this one's last block (the rest idle)
        pid_m = pid_m - (tl.num_programs(0) - tl.cdiv(lq, BLOCK_M))
        pid_m = tl.where(pid_m < 0, tl.cdiv(lq, BLOCK_M), pid_m)
    m0 = pid_m * BLOCK_M
    q_rows = q_start.to(tl.int64)
    k_rows = k_start.to(tl.int64)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    row_ok = offs_m < lq
    q_desc = tl.make_tensor_descriptor(Q + bq * stride_qb + h64 * stride_qh + q_rows * stride_qm,
                                       shape=[tl.maximum(lq, 1), HEAD_D], strides=[stride_qm, 1],
                                       block_shape=[BLOCK_M, BLOCK_D])
    do_desc = tl.make_tensor_descriptor(DOut + bq * stride_dob + h64 * stride_doh + q_rows * stride_dom,
                                        shape=[tl.maximum(lq, 1), HEAD_DV], strides=[stride_dom, 1],
                                        block_shape=[BLOCK_M, BLOCK_DV])
    k_desc = tl.make_tensor_descriptor(K + bq * stride_kb + hk64 * stride_kh + k_rows * stride_kn,
                                       shape=[tl.maximum(lk, 1), HEAD_D], strides=[stride_kn, 1],
                                       block_shape=[BLOCK_N, BLOCK_D])
    v_desc = tl.make_tensor_descriptor(V + bq * stride_vb + hk64 * stride_vh + k_rows * stride_vn,
                                       shape=[tl.maximum(lk, 1), HEAD_DV], strides=[stride_vn, 1],
                                       block_shape=[BLOCK_N, BLOCK_DV])
    q = q_desc.load([m0, 0])
    do = do_desc.load([m0, 0])
    row = (bq * Hq + h64) * Lq + q_rows
    rs = tl.load(RowScale + row + offs_m, mask=row_ok, other=0.0)
    lse = tl.load(Lse + row + offs_m, mask=row_ok, other=float("inf"))
    logl = lse
    if MASK_MODE == MASK_ADD:
        logl = tl.load(LogL + row + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(Delta + row + offs_m, mask=row_ok, other=0.0)
    mask_ptr = Mask + bq * stride_mb + h64 * stride_mh
    shift = lk - lq
    lo, hi = visible_keys(offs_m, shift, kv_lo, kv_hi, win_left, win_right, IS_CAUSAL, WINDOW)
    # key tiles [start, full_lo) and [full_hi, end) are masked, [full_lo, full_hi) visible to every row
    start, full_lo, full_hi, end = key_blocks(m0, lq, shift, kv_lo, kv_hi, win_left, win_right, IS_CAUSAL,
                                              WINDOW, MASK_MODE != MASK_NONE, BLOCK_M, BLOCK_N)
    seed = 0
    if DROPOUT:
        seed = tl.load(Seed)
    bh = b * Hq + h64
    g = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dt = tl.zeros([BLOCK_M], dtype=tl.float32)
    if WINDOW or HAS_KV_RANGE:
        g, dt = _dq_tiles(g, dt, q, do, rs, lse, logl, delta, k_desc, v_desc, mask_ptr, stride_mm, stride_mn,
                          offs_m, lo, hi, start, full_lo, lq, lk, seed, bh, dropout_p, dropout_scale,
                          MASK_MODE, True, DOT_PREC, TEMP_GRAD, DROPOUT, BLOCK_N)
    g, dt = _dq_tiles(g, dt, q, do, rs, lse, logl, delta, k_desc, v_desc, mask_ptr, stride_mm, stride_mn,
                      offs_m, lo, hi, full_lo, full_hi, lq, lk, seed, bh, dropout_p, dropout_scale,
                      MASK_MODE, False, DOT_PREC, TEMP_GRAD, DROPOUT, BLOCK_N)
    g, dt = _dq_tiles(g, dt, q, do, rs, lse, logl, delta, k_desc, v_desc, mask_ptr, stride_mm, stride_mn,
                      offs_m, lo, hi, full_hi, end, lq, lk, seed, bh, dropout_p, dropout_scale,
                      MASK_MODE, True, DOT_PREC, TEMP_GRAD, DROPOUT, BLOCK_N)
    a = rs * INV_LOG2E
    base = tl.zeros([BLOCK_M], dtype=tl.float32) + scale  # a_i / t_i
    if COS:
        # chain through q_hat = q / ||q||: dq = a (g - q (q . g) / ||q||^2)
        qf = q.to(tl.float32)
        sq = tl.sum(qf * qf, 1)
        qinv = tl.where(sq > 0, 1.0 / tl.sqrt(tl.maximum(sq, 1e-30)), 0.0)
        dq = a[:, None] * (g - qf * (tl.sum(qf * g, 1) * qinv * qinv)[:, None])
        base = base * qinv
    else:
        dq = a[:, None] * g
    offs_d = tl.arange(0, BLOCK_D)
    rows = q_rows + offs_m[:, None].to(tl.int64)
    tl.store(DQ + bq * stride_dqb + h64 * stride_dqh + rows * stride_dqm + offs_d[None, :],
             cast(dq, DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_D))
    if TEMP_GRAD:
        tl.store(DT + row + offs_m, dt * base, mask=row_ok)


def bwd_config(block_d: int, block_dv: int, elsize: int, interpret: bool) -> tuple[dict, dict]:
    """(dK/dV config, dQ config): BLOCK_N is the dK/dV kernel's resident key block and BLOCK_M the
    query block it streams; the dQ kernel the other way round."""
    if interpret:
        small = dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1)
        return small, small
    # measured on the H100 at 16k tokens and swept again on the H200 at 1k-16k, bf16 (benchmarks/NOTES.md,
    # backward v3 and "H200 config sweep": the same leaders at D <= 128)
    width = max(block_d, block_dv)
    if width <= 64:
        dkdv = dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=2)
        dq = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)
    elif width <= 128:
        dkdv = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)
        dq = dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
    else:
        # D = 256: 8 warps share the dK and dV accumulators (4 warps and one stage ran 3.7x slower)
        dkdv = dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=2)
        dq = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)
    if elsize == 4:
        # float32 tiles are twice the bytes: smaller streamed blocks fit shared memory (H100, untimed here)
        dkdv = dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=1)
        dq = dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=1)
    return dkdv, dq
