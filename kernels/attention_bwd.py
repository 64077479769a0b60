"""Fused attention backward (FlashAttention-2 style): a delta pre-pass, a dK/dV kernel and a dQ kernel
that recompute the probabilities from the forward's log-sum-exp with the same per-row scale.

Natural-unit logit z_ij = a_i (q_i . k_j) + bias_ij with a_i = rs_i / log2(e) (rs_i: the forward's row
scale, t_i * c [* 1/||q_i||]); P = softmax(z); dZ = P * (dP - delta_i), dP = dO V^T,
delta_i = rowsum(dO * O). Then dV = P^T dO, dK_j = sum_i a_i dZ_ij q_i, dQ_i = a_i sum_j dZ_ij k_j and
dt_i = (a_i / t_i) sum_j dZ_ij (q_i . k_j). Under CosScale K is the unit K of the forward's pre-pass and
the epilogues apply the gradient of the L2 normalisation, dx = (dx_hat - x_hat (x_hat . dx_hat)) / ||x||.

Status: checked against autograd of the float64 reference through the Triton interpreter only; not
yet compiled or timed on a GPU, and not yet wired into the public function (see benchmarks/NOTES.md).
Every tile is masked (no diagonal/off-diagonal split yet): correctness first.
"""

import triton
import triton.language as tl

from .primitives import MASK_NONE, TEMP_NONE, key_validity, row_temperature

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def attention_bwd_delta_kernel(
    Out, DOut, Delta, stride_ob, stride_oh, stride_om, stride_db, stride_dh, stride_dm, Hq, Lq,
    HEAD_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Delta[b, h, i] = sum_d dO[b, h, i, d] * O[b, h, i, d] in float32."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_DV)
    ok = (offs_m[:, None] < Lq) & (offs_d[None, :] < HEAD_DV)
    rows = offs_m[:, None].to(tl.int64)
    o = tl.load(Out + b * stride_ob + h * stride_oh + rows * stride_om + offs_d[None, :], mask=ok, other=0.0)
    do = tl.load(DOut + b * stride_db + h * stride_dh + rows * stride_dm + offs_d[None, :], mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + (b * Hq + h) * Lq + offs_m, delta, mask=offs_m < Lq)


@triton.jit
def _row_scales(q, offs_m, Lq, Lk, temp_ptr, stride_tm, count_ptr, stride_cm, scale, temp_a, temp_b,
                IS_CAUSAL: tl.constexpr, TEMP_MODE: tl.constexpr, CLIP: tl.constexpr,
                HAS_COUNT: tl.constexpr, COS: tl.constexpr, BLOCK_M: tl.constexpr):
    """(t_i, base_i, qinv_i) with the forward's natural row multiplier a_i = t_i * base_i."""
    t = tl.zeros([BLOCK_M], dtype=tl.float32) + 1.0
    if TEMP_MODE != TEMP_NONE:
        t = row_temperature(offs_m, Lq, Lk, temp_ptr, stride_tm, count_ptr, stride_cm, temp_a, temp_b,
                            IS_CAUSAL, TEMP_MODE, CLIP, HAS_COUNT)
    base = tl.zeros([BLOCK_M], dtype=tl.float32) + scale
    qinv = tl.zeros([BLOCK_M], dtype=tl.float32)
    if COS:
        qf = q.to(tl.float32)
        sq = tl.sum(qf * qf, 1)
        qinv = tl.where(sq > 0, 1.0 / tl.sqrt(tl.maximum(sq, 1e-30)), 0.0)
        base = base * qinv
    return t, base, qinv


@triton.jit
def attention_bwd_dkdv_kernel(
    Q, K, V, DOut, Lse, Delta, DK, DV, KInv, Temp, Count, Mask,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom, stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_tb, stride_th, stride_tm, stride_cb, stride_ch, stride_cm,
    stride_mb, stride_mh, stride_mm, stride_mn,
    Hq, Lq, Lk, GROUP, scale, temp_a, temp_b,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, TEMP_MODE: tl.constexpr, CLIP: tl.constexpr, HAS_COUNT: tl.constexpr,
    COS: tl.constexpr, MASK_MODE: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per (key block, kv head, batch): dK and dV summed over every query head of the
    group (GQA) and every query block that sees the keys, so no atomics and a fixed order."""
    n0 = tl.program_id(0) * BLOCK_N
    hk = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    hk64 = hk.to(tl.int64)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    k_desc = tl.make_tensor_descriptor(K + b * stride_kb + hk64 * stride_kh, shape=[Lk, HEAD_D],
                                       strides=[stride_kn, 1], block_shape=[BLOCK_N, BLOCK_D])
    v_desc = tl.make_tensor_descriptor(V + b * stride_vb + hk64 * stride_vh, shape=[Lk, HEAD_DV],
                                       strides=[stride_vn, 1], block_shape=[BLOCK_N, BLOCK_DV])
    k = k_desc.load([n0, 0])
    v = v_desc.load([n0, 0])
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    # causal: the first query row that sees key n0 is n0 - (Lk - Lq)
    m_lo = 0
    if IS_CAUSAL:
        m_lo = tl.maximum(n0 - (Lk - Lq), 0) // BLOCK_M * BLOCK_M
    for g in range(0, GROUP):
        h64 = (hk * GROUP + g).to(tl.int64)
        q_desc = tl.make_tensor_descriptor(Q + b * stride_qb + h64 * stride_qh, shape=[Lq, HEAD_D],
                                           strides=[stride_qm, 1], block_shape=[BLOCK_M, BLOCK_D])
        do_desc = tl.make_tensor_descriptor(DOut + b * stride_dob + h64 * stride_doh, shape=[Lq, HEAD_DV],
                                            strides=[stride_dom, 1], block_shape=[BLOCK_M, BLOCK_DV])
        row = (b * Hq + h64) * Lq
        for m0 in range(m_lo, Lq, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            q = q_desc.load([m0, 0])
            t, base, qinv = _row_scales(q, offs_m, Lq, Lk, Temp + b * stride_tb + h64 * stride_th, stride_tm,
                                        Count + b * stride_cb + h64 * stride_ch, stride_cm, scale, temp_a,
                                        temp_b, IS_CAUSAL, TEMP_MODE, CLIP, HAS_COUNT, COS, BLOCK_M)
            a = t * base
            lse = tl.load(Lse + row + offs_m, mask=offs_m < Lq, other=float("inf"))
            delta = tl.load(Delta + row + offs_m, mask=offs_m < Lq, other=0.0)
            valid, bias = key_validity(offs_m, offs_n, Lq, Lk, Mask + b * stride_mb + h64 * stride_mh,
                                       stride_mm, stride_mn, IS_CAUSAL, MASK_MODE)
            qk = tl.dot(q, k.T, input_precision=DOT_PREC)  # (BLOCK_M, BLOCK_N)
            s = qk * (a * LOG2E)[:, None]
            if MASK_MODE != MASK_NONE:
                s = s + bias * LOG2E
            p = tl.where(valid & (offs_m[:, None] < Lq), tl.math.exp2(s - lse[:, None]), 0.0)
            do = do_desc.load([m0, 0])
            dv = tl.dot(p.T.to(do.dtype), do, dv, input_precision=DOT_PREC)
            dp = tl.dot(do, v.T, input_precision=DOT_PREC)
            ds = p * (dp - delta[:, None]) * a[:, None]
            dk = tl.dot(ds.T.to(q.dtype), q, dk, input_precision=DOT_PREC)
    if COS:
        # K was the unit K: chain through k_hat = k / ||k||
        kinv = tl.load(KInv + (b * (Hq // GROUP) + hk64) * Lk + offs_n, mask=offs_n < Lk, other=0.0)
        kf = k.to(tl.float32)
        dk = (dk - kf * tl.sum(kf * dk, 1)[:, None]) * kinv[:, None]
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows = offs_n[:, None].to(tl.int64)
    tl.store(DK + b * stride_dkb + hk64 * stride_dkh + rows * stride_dkn + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=(offs_n[:, None] < Lk) & (offs_d[None, :] < HEAD_D))
    tl.store(DV + b * stride_dvb + hk64 * stride_dvh + rows * stride_dvn + offs_dv[None, :],
             dv.to(DV.dtype.element_ty), mask=(offs_n[:, None] < Lk) & (offs_dv[None, :] < HEAD_DV))


@triton.jit
def attention_bwd_dq_kernel(
    Q, K, V, DOut, Lse, Delta, DQ, DT, Temp, Count, Mask,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom, stride_dqb, stride_dqh, stride_dqm,
    stride_tb, stride_th, stride_tm, stride_cb, stride_ch, stride_cm,
    stride_mb, stride_mh, stride_mm, stride_mn,
    Hq, Lq, Lk, GROUP, scale, temp_a, temp_b,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, TEMP_MODE: tl.constexpr, CLIP: tl.constexpr, HAS_COUNT: tl.constexpr,
    COS: tl.constexpr, MASK_MODE: tl.constexpr, DOT_PREC: tl.constexpr, TEMP_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per (query block, query head, batch): dQ and, with TEMP_GRAD, dL/dt_i."""
    m0 = tl.program_id(0) * BLOCK_M
    h64 = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    hk64 = (tl.program_id(1) // GROUP).to(tl.int64)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    q_desc = tl.make_tensor_descriptor(Q + b * stride_qb + h64 * stride_qh, shape=[Lq, HEAD_D],
                                       strides=[stride_qm, 1], block_shape=[BLOCK_M, BLOCK_D])
    do_desc = tl.make_tensor_descriptor(DOut + b * stride_dob + h64 * stride_doh, shape=[Lq, HEAD_DV],
                                        strides=[stride_dom, 1], block_shape=[BLOCK_M, BLOCK_DV])
    k_desc = tl.make_tensor_descriptor(K + b * stride_kb + hk64 * stride_kh, shape=[Lk, HEAD_D],
                                       strides=[stride_kn, 1], block_shape=[BLOCK_N, BLOCK_D])
    v_desc = tl.make_tensor_descriptor(V + b * stride_vb + hk64 * stride_vh, shape=[Lk, HEAD_DV],
                                       strides=[stride_vn, 1], block_shape=[BLOCK_N, BLOCK_DV])
    q = q_desc.load([m0, 0])
    do = do_desc.load([m0, 0])
    t, base, qinv = _row_scales(q, offs_m, Lq, Lk, Temp + b * stride_tb + h64 * stride_th, stride_tm,
                                Count + b * stride_cb + h64 * stride_ch, stride_cm, scale, temp_a, temp_b,
                                IS_CAUSAL, TEMP_MODE, CLIP, HAS_COUNT, COS, BLOCK_M)
    a = t * base
    row = (b * Hq + h64) * Lq
    lse = tl.load(Lse + row + offs_m, mask=offs_m < Lq, other=float("inf"))
    delta = tl.load(Delta + row + offs_m, mask=offs_m < Lq, other=0.0)
    mask_ptr = Mask + b * stride_mb + h64 * stride_mh
    hi = Lk
    if IS_CAUSAL:
        hi = tl.maximum(tl.minimum(Lk, m0 + BLOCK_M + Lk - Lq), 0)
    g = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dt = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in range(0, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = k_desc.load([n0, 0])
        v = v_desc.load([n0, 0])
        valid, bias = key_validity(offs_m, offs_n, Lq, Lk, mask_ptr, stride_mm, stride_mn, IS_CAUSAL, MASK_MODE)
        qk = tl.dot(q, k.T, input_precision=DOT_PREC)
        s = qk * (a * LOG2E)[:, None]
        if MASK_MODE != MASK_NONE:
            s = s + bias * LOG2E
        p = tl.where(valid, tl.math.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, v.T, input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        g = tl.dot(ds.to(k.dtype), k, g, input_precision=DOT_PREC)
        if TEMP_GRAD:
            dt += tl.sum(ds * qk, 1)
    if COS:
        # chain through q_hat = q / ||q||: dq = a (g - q (q . g) / ||q||^2)
        qf = q.to(tl.float32)
        dq = a[:, None] * (g - qf * (tl.sum(qf * g, 1) * qinv * qinv)[:, None])
    else:
        dq = a[:, None] * g
    offs_d = tl.arange(0, BLOCK_D)
    rows = offs_m[:, None].to(tl.int64)
    tl.store(DQ + b * stride_dqb + h64 * stride_dqh + rows * stride_dqm + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=(offs_m[:, None] < Lq) & (offs_d[None, :] < HEAD_D))
    if TEMP_GRAD:
        tl.store(DT + row + offs_m, dt * base, mask=offs_m < Lq)
