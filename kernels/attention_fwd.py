"""Fused attention forward: FlashAttention-2 online softmax with the per-row temperature and the
CosScale normalisation folded into one row scale.

Logit of row i, key j, in the exp2 domain:
    s_ij = rs_i * (q_i . k_j) + log2(e) * bias_ij
    rs_i = t_i * c * log2(e) [* 1/||q_i|| under CosScale]
Under CosScale K arrives as unit rows from a pre-pass (kernels/norms.py); the q norms come from the q
tile each program loads anyway. Every option is a tl.constexpr so that the branches that are off
compile away.

Dropout (DROPOUT): the probabilities that feed P @ V are zeroed where primitives.dropout_keep says so
(the backward regenerates the same bits) and the output is scaled by 1 / (1 - dropout_p); the row sum
and the log-sum-exp stay those of the undropped probabilities, as in FlashAttention.
"""

import triton
import triton.language as tl

from .primitives import (
    INV_LOG2E,
    LOG2E,
    MASK_ADD,
    MASK_NONE,
    TEMP_NONE,
    batch_extent,
    cast,
    dot,
    dropout_keep,
    key_blocks,
    key_validity,
    row_temperature,
    visible_keys,
)


@triton.jit
def _fwd_tiles(
    acc, l_i, m_i, u_i, q, rs, k_desc, v_desc, mask_ptr, stride_mm, stride_mn,
    offs_m, lo, hi, start, end, lq, lk, seed, bh, dropout_p,
    MASK_MODE: tl.constexpr, SIGNED: tl.constexpr, DROPOUT: tl.constexpr, ENTROPY: tl.constexpr,
    MASKED: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_N: tl.constexpr, WARP_SPEC: tl.constexpr,
):
    """Online-softmax update over the key tiles [start, end). MASKED tiles check each row's visible
    keys [lo_i, hi_i) and attn_mask; the others (wholly visible to every row) skip that work. With
    ENTROPY, u_i = sum_j 2^(s_ij - m_i) (s_ij - m_i) rides along (rescaled with the max like l_i)."""
    for start_n in tl.range(start, end, BLOCK_N, warp_specialize=WARP_SPEC):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = k_desc.load([start_n, 0])
        qk = dot(q, k.T, None, DOT_PREC)
        if MASKED:
            valid, bias = key_validity(offs_m, offs_n, lo, hi, lq, lk, mask_ptr, stride_mm, stride_mn,
                                       MASK_MODE)
            s = qk * rs[:, None]
            if MASK_MODE != MASK_NONE:
                s = s + bias * LOG2E
            s = tl.where(valid, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # rows with no visible key yet keep m = -inf; subtract 0 instead so that exp2 gives 0, not NaN
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_sub[:, None])
        else:
            if SIGNED:
                # a negative row scale (tensor temperature, scale < 0): max(qk) * rs is not the row max
                s = qk * rs[:, None]
                m_new = tl.maximum(m_i, tl.max(s, 1))
                p = tl.math.exp2(s - m_new[:, None])
            else:
                m_new = tl.maximum(m_i, tl.max(qk, 1) * rs)
                p = tl.math.exp2(qk * rs[:, None] - m_new[:, None])
            m_sub = m_new
        alpha = tl.math.exp2(m_i - m_sub)
        if ENTROPY:
            # u relative to the new max: alpha (u + l (m_old - m_new)). A difference that can be -inf is
            # zeroed before its product, never after (0 * -inf is NaN): m_old - m_new where alpha = 0
            # (m_old = -inf before the first key, or underflow), s - m where p = 0 (hidden keys)
            shift = l_i * tl.where(alpha > 0, m_i - m_sub, 0.0)
            if MASKED:
                term = p * tl.where(p > 0, s - m_sub[:, None], 0.0)
            else:
                term = p * (qk * rs[:, None] - m_sub[:, None])
            u_i = alpha * (u_i + shift) + tl.sum(term, 1)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if DROPOUT:
            # after the row sum: l_i normalises the undropped p (1 / (1 - dropout_p) comes in the epilogue)
            p = tl.where(dropout_keep(seed, bh, offs_m, start_n, dropout_p, BLOCK_N), p, 0.0)
        v = v_desc.load([start_n, 0])
        acc = dot(cast(p, v.dtype), v, acc, DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i, u_i


# Lengths are not specialised: Triton would compile Lk == 1 as a constant, and that variant (a loop of
# constant trip count 1) read an illegal address on the H100 at D=64, Dv=32, fp16; it also saves a
# compile per length class.
@triton.jit(do_not_specialize=["Lq", "Lk", "win_left", "win_right"])
def attention_fwd_kernel(
    Q, K, V, Out, Lse, LogL, Temp, Count, Mask, Seed, CuQ, CuK, KvRange, Entropy, MaxProb,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_tb, stride_th, stride_tm,
    stride_cb, stride_ch, stride_cm,
    stride_mb, stride_mh, stride_mm, stride_mn,
    Hq, Lq, Lk, GROUP, scale_log2, temp_a, temp_b, dropout_p, dropout_scale, win_left, win_right,
    LQ_KEY, LK_KEY,  # length buckets, read by the autotuner only
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    TEMP_MODE: tl.constexpr,  # none / infoscale / logn / tensor (primitives.TEMP_*)
    CLIP: tl.constexpr,  # max(1, t)
    HAS_COUNT: tl.constexpr,  # n_i read from Count (attn_mask given) instead of derived from position
    COS: tl.constexpr,  # CosScale: 1/||q_i|| folded into the row scale (K comes as unit rows)
    MASK_MODE: tl.constexpr,  # none / bool / additive attn_mask
    DOT_PREC: tl.constexpr,  # "ieee" or "tf32" for float32 inputs
    SIGNED: tl.constexpr,  # the row scale may be negative (tensor temperature or scale < 0)
    DROPOUT: tl.constexpr,  # dropout_p > 0: Seed holds the call's Philox key (int64)
    VARLEN: tl.constexpr,  # packed sequences: program_id(2) is the sequence, CuQ/CuK its offsets
    HAS_KV_RANGE: tl.constexpr,  # per-batch key padding: KvRange[b] = (first, end) of the valid keys
    WINDOW: tl.constexpr,  # sliding window (win_left, win_right keys around the diagonal)
    ENTROPY: tl.constexpr,  # also store each row's attention entropy (nats) and largest probability
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WARP_SPEC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    if IS_CAUSAL:
        # the longest rows (most key tiles) first, so the tail of the grid is short work
        pid_m = tl.num_programs(0) - 1 - pid_m
    h = tl.program_id(1)
    h64 = h.to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    hk = h // GROUP
    bq, q_start, lq, k_start, lk, kv_lo, kv_hi = batch_extent(tl.program_id(2), Lq, Lk, CuQ, CuK, KvRange,
                                                              VARLEN, HAS_KV_RANGE)
    if VARLEN and IS_CAUSAL:
        # the grid covers the longest sequence: count from this one's last block (the rest idle)
        pid_m = pid_m - (tl.num_programs(0) - tl.cdiv(lq, BLOCK_M))
        pid_m = tl.where(pid_m < 0, tl.cdiv(lq, BLOCK_M), pid_m)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    q_rows = q_start.to(tl.int64)
    k_rows = k_start.to(tl.int64)

    # TMA descriptors over this (sequence, head)'s (L, D) slice: rows past L and columns past D read as 0
    q_desc = tl.make_tensor_descriptor(Q + bq * stride_qb + h64 * stride_qh + q_rows * stride_qm,
                                       shape=[tl.maximum(lq, 1), HEAD_D], strides=[stride_qm, 1],
                                       block_shape=[BLOCK_M, BLOCK_D])
    k_base = bq * stride_kb + hk.to(tl.int64) * stride_kh + k_rows * stride_kn
    k_desc = tl.make_tensor_descriptor(K + k_base, shape=[tl.maximum(lk, 1), HEAD_D],
                                       strides=[stride_kn, 1], block_shape=[BLOCK_N, BLOCK_D])
    v_desc = tl.make_tensor_descriptor(V + bq * stride_vb + hk.to(tl.int64) * stride_vh + k_rows * stride_vn,
                                       shape=[tl.maximum(lk, 1), HEAD_DV], strides=[stride_vn, 1],
                                       block_shape=[BLOCK_N, BLOCK_DV])
    q = q_desc.load([m0, 0])

    shift = lk - lq
    lo, hi = visible_keys(offs_m, shift, kv_lo, kv_hi, win_left, win_right, IS_CAUSAL, WINDOW)
    rs = tl.zeros([BLOCK_M], dtype=tl.float32) + scale_log2
    if TEMP_MODE != TEMP_NONE:
        rs = rs * row_temperature(offs_m, tl.maximum(hi - lo, 0), lq,
                                  Temp + bq * stride_tb + h64 * stride_th + q_rows * stride_tm, stride_tm,
                                  Count + bq * stride_cb + h64 * stride_ch + q_rows * stride_cm, stride_cm,
                                  temp_a, temp_b, TEMP_MODE, CLIP, HAS_COUNT)
    if COS:
        qf = q.to(tl.float32)
        sq = tl.sum(qf * qf, 1)
        rs = rs * tl.where(sq > 0, 1.0 / tl.sqrt(tl.maximum(sq, 1e-30)), 0.0)
    mask_ptr = Mask
    if MASK_MODE != MASK_NONE:
        mask_ptr = Mask + bq * stride_mb + h64 * stride_mh

    # key tiles [start, full_lo) and [full_hi, end) are masked, [full_lo, full_hi) visible to every row
    start, full_lo, full_hi, end = key_blocks(m0, lq, shift, kv_lo, kv_hi, win_left, win_right, IS_CAUSAL,
                                              WINDOW, MASK_MODE != MASK_NONE, BLOCK_M, BLOCK_N)
    seed = 0
    if DROPOUT:
        seed = tl.load(Seed)
    bh = b * Hq + h64
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    u_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if WINDOW or HAS_KV_RANGE:
        # only a window or key padding can hide the first keys from some rows of the block
        acc, l_i, m_i, u_i = _fwd_tiles(
            acc, l_i, m_i, u_i, q, rs, k_desc, v_desc, mask_ptr, stride_mm, stride_mn, offs_m, lo, hi,
            start, full_lo, lq, lk, seed, bh, dropout_p,
            MASK_MODE, SIGNED, DROPOUT, ENTROPY, True, DOT_PREC, BLOCK_N, False)
    acc, l_i, m_i, u_i = _fwd_tiles(
        acc, l_i, m_i, u_i, q, rs, k_desc, v_desc, mask_ptr, stride_mm, stride_mn, offs_m, lo, hi,
        full_lo, full_hi, lq, lk, seed, bh, dropout_p,
        MASK_MODE, SIGNED, DROPOUT, ENTROPY, False, DOT_PREC, BLOCK_N, WARP_SPEC)
    acc, l_i, m_i, u_i = _fwd_tiles(
        acc, l_i, m_i, u_i, q, rs, k_desc, v_desc, mask_ptr, stride_mm, stride_mn, offs_m, lo, hi,
        full_hi, end, lq, lk, seed, bh, dropout_p,
        MASK_MODE, SIGNED, DROPOUT, ENTROPY, True, DOT_PREC, BLOCK_N, False)

    # Epilogue: rows that saw no key write zeros and a log-sum-exp of +inf (so a backward recomputes p = 0).
    has_key = l_i > 0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    if DROPOUT:
        out = out * dropout_scale
    row_ok = offs_m < lq
    row = (bq * Hq + h64) * Lq + q_rows + offs_m
    log_l = tl.log2(tl.where(has_key, l_i, 1.0))
    if MASK_MODE == MASK_ADD:
        # m + log2(l) would lose log2(l) next to a bias of ~finfo.min (|m| ~ 3e38): keep both
        tl.store(Lse + row, tl.where(has_key, m_i, float("inf")), mask=row_ok)
        tl.store(LogL + row, log_l, mask=row_ok)
    else:
        tl.store(Lse + row, tl.where(has_key, m_i + log_l, float("inf")), mask=row_ok)
    if ENTROPY:
        # p_j = 2^(s_j - m) / l: H = ln l - ln 2 * u / l, max_j p_j = 1 / l; empty rows give 0, 0
        l_safe = tl.where(has_key, l_i, 1.0)
        ent = tl.log(l_safe) - INV_LOG2E * u_i / l_safe
        tl.store(Entropy + row, tl.where(has_key, ent, 0.0), mask=row_ok)
        tl.store(MaxProb + row, tl.where(has_key, 1.0 / l_safe, 0.0), mask=row_ok)
    offs_dv = tl.arange(0, BLOCK_DV)
    o_ptrs = (Out + bq * stride_ob + h64 * stride_oh
              + (q_rows + offs_m[:, None].to(tl.int64)) * stride_om + offs_dv[None, :])
    tl.store(o_ptrs, cast(out, Out.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DV))


def _config(block_m, block_n, warps, stages, warp_spec=False):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "WARP_SPEC": warp_spec},
                         num_warps=warps, num_stages=stages)


# Candidates by padded head dim, (BLOCK_M, BLOCK_N, warps, stages, warp_specialize), the leaders of
# benchmarks/sweep_configs.py runs on the H100 and the H200 (benchmarks/NOTES.md): searched by the
# opt-in autotuner.
FWD_CONFIGS = {
    64: [(64, 64, 4, 2), (128, 128, 4, 3), (64, 128, 4, 2), (128, 64, 4, 3)],
    128: [(128, 64, 4, 2), (128, 128, 8, 3), (64, 64, 4, 3), (128, 128, 8, 3, True)],
    256: [(128, 64, 8, 2), (64, 64, 4, 3), (64, 64, 4, 2), (64, 32, 4, 3)],
}


def _table_key(block_d: int) -> int:
    return 64 if block_d <= 64 else 128 if block_d <= 128 else 256


def fwd_candidates(block_d: int) -> list:
    return [_config(*c) for c in FWD_CONFIGS[_table_key(block_d)]]


# Shared memory per CTA on the H100 is 227 KB; keep a margin for the compiler's own buffers.
SMEM_BUDGET = 216 * 1024


def smem_bytes(block_m: int, block_n: int, stages: int, block_d: int, block_dv: int, elsize: int) -> int:
    """The tiles a config keeps in shared memory: q, and the k and v buffers that Triton's pipeliner
    keeps in flight (num_stages - 1; 128x128 bf16 at D = 128 with 3 stages compiles and runs)."""
    return elsize * (block_m * block_d + max(stages - 1, 1) * block_n * (block_d + block_dv))


def fwd_config(block_d: int, block_dv: int, lk: int, elsize: int, interpret: bool,
               dropout: bool = False, masked: bool = False) -> dict:
    """The launch config used without autotuning: the sweep's leader for this head dim and length,
    shrunk until its tiles fit in shared memory (float32 tiles are twice the size).
    (The autotuner's own timings differ run to run by up to 10%, enough to pick a slower config.)"""
    if interpret:
        # small and unequal blocks exercise the tile-boundary and diagonal logic
        return {"BLOCK_M": 32, "BLOCK_N": 16, "WARP_SPEC": False, "num_warps": 4, "num_stages": 1}
    # H200 sweep, bf16, InfoScale, N = 1k-16k (benchmarks/NOTES.md, "H200 config sweep"). Calls with a
    # mask (an attn_mask or a window: many tiles load the mask or compare positions) or dropout's keep
    # mask keep the tiles checked with them: the 128x128 one-warpgroup tile spills 1.2 KB with a mask at
    # D = 64 and the keep mask serialised the wgmma of 64x128 (ptxas, sm_90); at D = 128 the 128x128 w8
    # s3 tile asked for 360 KB of shared memory with an additive mask on the H200 (241 KB with dropout
    # on the H100).
    key = _table_key(max(block_d, block_dv))
    checked = masked or dropout
    if key == 64:
        bm, bn, warps, stages = (64, 64, 4, 2) if lk < 8192 or checked else (128, 128, 4, 3)
    elif key == 128:
        bm, bn, warps, stages = (128, 64, 4, 2)
    else:
        bm, bn, warps, stages = (64, 64, 4, 2) if checked else (128, 64, 8, 2)
    budget = SMEM_BUDGET
    if elsize == 4:
        # exact float32 dots run on the FMA units and stage their operands through shared memory too:
        # the bf16 tile sizes failed to launch (out of shared memory) at D = 112 and 128 on the H100
        bm, budget = min(bm, 64), SMEM_BUDGET // 2
    while smem_bytes(bm, bn, stages, block_d, block_dv, elsize) > budget:
        if stages > 2:
            stages -= 1
        elif bn > 16:
            bn //= 2
        elif bm > 64:
            bm //= 2
        else:
            stages = 1
            break
    warps = 4 if bm * bn < 128 * 64 else warps
    if dropout and bm * bn == 128 * 64 and elsize == 2:
        # with the keep mask 4 warps spilled (ptxas, sm_90, offline); 8 halve each thread's share (untimed)
        warps = 8
    return {"BLOCK_M": bm, "BLOCK_N": bn, "WARP_SPEC": False, "num_warps": warps, "num_stages": stages}


def _prune(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}  # constexprs given as keywords arrive in kwargs
    wanted = {str(c) for c in fwd_candidates(max(args["BLOCK_D"], args["BLOCK_DV"]))}
    return [c for c in configs if str(c) in wanted]


_ALL = {(*c,) for table in FWD_CONFIGS.values() for c in table}
attention_fwd_autotuned = triton.autotune(
    configs=[_config(*c) for c in sorted(_ALL)],
    # COS and CLIP leave the key loop unchanged and share a config; these options change its work
    key=["BLOCK_D", "BLOCK_DV", "IS_CAUSAL", "TEMP_MODE", "MASK_MODE", "DOT_PREC", "SIGNED", "DROPOUT",
         "VARLEN", "HAS_KV_RANGE", "WINDOW", "ENTROPY", "LQ_KEY", "LK_KEY"],
    prune_configs_by={"early_config_prune": _prune},
)(attention_fwd_kernel)
