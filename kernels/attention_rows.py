"""The row pre-pass of the fused passes: each row's scale rs_i (and for the backward delta_i), so that
the main kernels never evaluate the temperature or the q norms inside their loops."""

import triton
import triton.language as tl

from .primitives import TEMP_NONE, batch_extent, row_temperature, visible_keys


@triton.jit(do_not_specialize=["Lq", "Lk", "win_left", "win_right"])
def attention_rows_kernel(
    Out, DOut, Q, Delta, RowScale, Temp, Count, CuQ, CuK, KvRange,
    stride_ob, stride_oh, stride_om, stride_db, stride_dh, stride_dm, stride_qb, stride_qh, stride_qm,
    stride_tb, stride_th, stride_tm, stride_cb, stride_ch, stride_cm,
    Hq, Lq, Lk, scale_log2, temp_a, temp_b, win_left, win_right,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, TEMP_MODE: tl.constexpr, CLIP: tl.constexpr, HAS_COUNT: tl.constexpr,
    COS: tl.constexpr, VARLEN: tl.constexpr, HAS_KV_RANGE: tl.constexpr, WINDOW: tl.constexpr,
    DELTA: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """RowScale[b, h, i] = rs_i, computed exactly as attention_fwd_kernel computes it (same operations
    in the same order, so the backward's p matches the saved log-sum-exp), and with DELTA also
    Delta[b, h, i] = sum_d dO * O (float32)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    h = tl.program_id(1).to(tl.int64)
    bq, q_start, lq, k_start, lk, kv_lo, kv_hi = batch_extent(tl.program_id(2), Lq, Lk, CuQ, CuK, KvRange,
                                                              VARLEN, HAS_KV_RANGE)
    q_rows = q_start.to(tl.int64)
    row_ok = offs_m < lq
    rows = q_rows + offs_m[:, None].to(tl.int64)
    rs = tl.zeros([BLOCK_M], dtype=tl.float32) + scale_log2
    if TEMP_MODE != TEMP_NONE:
        lo, hi = visible_keys(offs_m, lk - lq, kv_lo, kv_hi, win_left, win_right, IS_CAUSAL, WINDOW)
        rs = rs * row_temperature(offs_m, tl.maximum(hi - lo, 0), lq,
                                  Temp + bq * stride_tb + h * stride_th + q_rows * stride_tm, stride_tm,
                                  Count + bq * stride_cb + h * stride_ch + q_rows * stride_cm, stride_cm,
                                  temp_a, temp_b, TEMP_MODE, CLIP, HAS_COUNT)
    if COS:
        offs_d = tl.arange(0, BLOCK_D)
        q = tl.load(Q + bq * stride_qb + h * stride_qh + rows * stride_qm + offs_d[None, :],
                    mask=row_ok[:, None] & (offs_d[None, :] < HEAD_D), other=0.0)
        qf = q.to(tl.float32)
        sq = tl.sum(qf * qf, 1)
        rs = rs * tl.where(sq > 0, 1.0 / tl.sqrt(tl.maximum(sq, 1e-30)), 0.0)
    row = (bq * Hq + h) * Lq + q_rows + offs_m
    tl.store(RowScale + row, rs, mask=row_ok)
    if DELTA:
        offs_dv = tl.arange(0, BLOCK_DV)
        ok = row_ok[:, None] & (offs_dv[None, :] < HEAD_DV)
        o = tl.load(Out + bq * stride_ob + h * stride_oh + rows * stride_om + offs_dv[None, :], mask=ok,
                    other=0.0)
        do = tl.load(DOut + bq * stride_db + h * stride_dh + rows * stride_dm + offs_dv[None, :], mask=ok,
                     other=0.0)
        tl.store(Delta + row, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=row_ok)
