"""Flash-decoding: a few new query rows per sequence against a KV cache, the keys split over programs.

``decode_split_kernel``: one program per (key split, kv head x row block, batch). Its tile rows are the
query rows that share the kv head, packed: row r is query head ``hk * GROUP + r // Lq`` at position
``r % Lq`` (padded to a power of two >= 16 for tl.dot), so every K/V tile is read once for all of them.
A split owns a contiguous run of BLOCK_N tiles of its batch entry's valid length ``len_b``; it writes
its unnormalised partial output, running max and sum (exp2 domain) to a float32 workspace, or, when
it is the only split (DIRECT), the output itself.

``decode_combine_kernel``: one program per query row merges the splits (log-sum-exp rescaling).

Logit of row r, key j, in the exp2 domain:
    s_rj = rs_r * (q_r . k_j) [* 1/||k_j|| under CosScale]
    rs_r = t_r * c * log2(e) [* 1/||q_r|| under CosScale]
Under CosScale the K tiles are normalised here as they are loaded: decoding is memory-bound, and the
dense path's pre-pass over K would read the cache twice.

Causality is bottom-right against the valid length: row i (of Lq) sees keys j <= len_b - Lq + i.
An attn_mask (scaled_dot_product_attention's decoding calls: Hugging Face's padding and static-cache
masks) is read per (row, key) in every tile, as the dense kernel reads it; string temperatures then
take n_i from the host's Count.
"""

import triton
import triton.language as tl

from .primitives import LOG2E, MASK_NONE, TEMP_NONE, cast, dot, key_validity, row_temperature, visible_keys


@triton.jit
def _inv_norm(x):
    """1/||x_r|| per row of a tile (float32); 0 for a zero row, so that its cosines are 0, not NaN."""
    xf = x.to(tl.float32)
    sq = tl.sum(xf * xf, 1)
    return tl.where(sq > 0, 1.0 / tl.sqrt(tl.maximum(sq, 1e-30)), 0.0)


@triton.jit
def _kv_tile(src, start_n, stride_n, key_ok, HEAD: tl.constexpr, BLOCK_D: tl.constexpr,
             BLOCK_N: tl.constexpr, MASKED: tl.constexpr, TMA: tl.constexpr):
    """The (BLOCK_N, BLOCK_D) cache tile at key ``start_n``: from a tensor descriptor (TMA) or through
    pointers from ``src``, the (batch, kv head) base. MASKED tiles zero the keys past the valid length:
    a cache holds anything there (NaN included), and 0 * NaN in P @ V would poison the row."""
    if TMA:
        x = src.load([start_n, 0])
        if MASKED:
            x = tl.where(key_ok[:, None], x, 0.0)
    else:
        offs_d = tl.arange(0, BLOCK_D)
        rows = (start_n + tl.arange(0, BLOCK_N)).to(tl.int64) * stride_n
        ptrs = src + rows[:, None] + offs_d[None, :]
        if MASKED:
            x = tl.load(ptrs, mask=key_ok[:, None] & (offs_d[None, :] < HEAD), other=0.0)
        elif BLOCK_D != HEAD:
            x = tl.load(ptrs, mask=offs_d[None, :] < HEAD, other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _split_tiles(
    acc, l_i, m_i, q, rs, k_src, v_src, stride_kn, stride_vn, pos, row_lo, row_hi, mask_rows, stride_mm,
    stride_mn, lo, hi, Lq, len_b,
    COS: tl.constexpr, MASK_MODE: tl.constexpr, MASKED: tl.constexpr, TMA: tl.constexpr,
    DOT_PREC: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Online-softmax update of the packed rows over the key tiles [lo, hi). Unmasked tiles lie below
    every row's causal bound and the valid length; MASKED ones check each row's keys [row_lo, row_hi)
    and the attn_mask (``mask_rows``: each row's (batch, head) base, (BLOCK_M, 1)) per (row, key)."""
    for start_n in tl.range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_ok = offs_n < len_b
        k = _kv_tile(k_src, start_n, stride_kn, key_ok, HEAD_D, BLOCK_D, BLOCK_N, MASKED, TMA)
        # always the full product with rs: a tensor temperature or a scale may be negative
        s = dot(q, k.T, None, DOT_PREC) * rs[:, None]
        if COS:
            s = s * _inv_norm(k)[None, :]
        if MASKED:
            valid, bias = key_validity(pos, offs_n, row_lo, row_hi, Lq, len_b, mask_rows, stride_mm, stride_mn,
                                       MASK_MODE)
            if MASK_MODE != MASK_NONE:
                s = s + bias * LOG2E
            s = tl.where(valid, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # rows with no visible key yet keep m = -inf; subtract 0 so that exp2 gives 0, not NaN
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_sub = m_new
        p = tl.math.exp2(s - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _kv_tile(v_src, start_n, stride_vn, key_ok, HEAD_DV, BLOCK_DV, BLOCK_N, MASKED, TMA)
        acc = dot(cast(p, v.dtype), v, acc * alpha[:, None], DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


# Lk is not specialised (the dense kernel's note: a constant Lk == 1 miscompiled on the H100).
@triton.jit(do_not_specialize=["Lk"])
def decode_split_kernel(
    Q, K, V, Out, AccWs, MaxWs, SumWs, KvLen, Temp, Count, Mask,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_tb, stride_th, stride_tm,
    stride_cb, stride_ch, stride_cm,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_len,
    Hq, Lq, Lk, GROUP, ROW_BLOCKS, NUM_SPLITS, scale_log2, temp_a, temp_b,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    TEMP_MODE: tl.constexpr,  # none / infoscale / logn / tensor (primitives.TEMP_*)
    CLIP: tl.constexpr,  # max(1, t)
    HAS_COUNT: tl.constexpr,  # n_i read from Count (attn_mask given) instead of derived from position
    COS: tl.constexpr,  # CosScale: q and K tiles normalised in the kernel
    MASK_MODE: tl.constexpr,  # none / bool / additive attn_mask
    HAS_LENGTHS: tl.constexpr,  # KvLen holds len_b per batch entry (else Lk for all)
    DIRECT: tl.constexpr,  # one split: write the normalised output instead of a partial
    TMA: tl.constexpr,  # K and V through tensor descriptors (16-byte aligned caches)
    DOT_PREC: tl.constexpr,  # "ieee" or "tf32" for float32 inputs
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    split = tl.program_id(0)
    hk = tl.program_id(1) // ROW_BLOCKS
    b = tl.program_id(2).to(tl.int64)

    # packed rows: padded ones (beyond GROUP * Lq) get position Lq, which every row mask rejects
    r = (tl.program_id(1) % ROW_BLOCKS) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = r < GROUP * Lq
    pos = tl.where(row_ok, r % Lq, Lq)
    head = (hk * GROUP + tl.where(row_ok, r // Lq, 0)).to(tl.int64)

    len_b = Lk
    if HAS_LENGTHS:
        # documented: lengths are clamped to [0, Lk] (checking them would need a host sync)
        len_b = tl.minimum(tl.maximum(tl.load(KvLen + b * stride_len), 0), Lk).to(tl.int32)

    offs_d = tl.arange(0, BLOCK_D)
    q_ptrs = (Q + b * stride_qb + head[:, None] * stride_qh + pos[:, None].to(tl.int64) * stride_qm
              + offs_d[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_D), other=0.0)
    row_lo, row_hi = visible_keys(pos, len_b - Lq, 0, len_b, 0, 0, IS_CAUSAL, False)
    rs = tl.zeros([BLOCK_M], dtype=tl.float32) + scale_log2
    if TEMP_MODE != TEMP_NONE:
        # without a mask n_i is analytic in the position against len_b
        rs = rs * row_temperature(pos, tl.maximum(row_hi - row_lo, 0), Lq, Temp + b * stride_tb + head * stride_th,
                                  stride_tm, Count + b * stride_cb + head * stride_ch, stride_cm, temp_a, temp_b,
                                  TEMP_MODE, CLIP, HAS_COUNT)
    if COS:
        rs = rs * _inv_norm(q)

    k_base = K + b * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b * stride_vb + hk.to(tl.int64) * stride_vh
    if TMA:
        # rows past Lk read as 0; rows in [len_b, Lk) are zeroed by _kv_tile
        k_src = tl.make_tensor_descriptor(k_base, shape=[Lk, HEAD_D], strides=[stride_kn, 1],
                                          block_shape=[BLOCK_N, BLOCK_D])
        v_src = tl.make_tensor_descriptor(v_base, shape=[Lk, HEAD_DV], strides=[stride_vn, 1],
                                          block_shape=[BLOCK_N, BLOCK_DV])
    else:
        k_src = k_base
        v_src = v_base

    # This split's keys: an equal share of len_b's tiles (splits past the end get none). Keys below
    # `vis` are visible to every row: whole tiles there skip the masks.
    tiles = tl.cdiv(tl.cdiv(len_b, BLOCK_N), NUM_SPLITS)
    lo = split * tiles * BLOCK_N
    hi = tl.minimum(lo + tiles * BLOCK_N, len_b)
    vis = len_b
    if IS_CAUSAL:
        vis = tl.maximum(len_b - Lq + 1, 0)
    if MASK_MODE != MASK_NONE:
        vis = 0  # an attn_mask can hide any key
    mid = tl.minimum(tl.maximum(vis // BLOCK_N * BLOCK_N, lo), hi)
    mask_rows = (Mask + b * stride_mb + head * stride_mh)[:, None]

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    acc, l_i, m_i = _split_tiles(acc, l_i, m_i, q, rs, k_src, v_src, stride_kn, stride_vn, pos, row_lo, row_hi,
                                 mask_rows, stride_mm, stride_mn, lo, mid, Lq, len_b, COS, MASK_MODE, False, TMA,
                                 DOT_PREC, HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, BLOCK_N)
    acc, l_i, m_i = _split_tiles(acc, l_i, m_i, q, rs, k_src, v_src, stride_kn, stride_vn, pos, row_lo, row_hi,
                                 mask_rows, stride_mm, stride_mn, mid, hi, Lq, len_b, COS, MASK_MODE, True, TMA,
                                 DOT_PREC, HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, BLOCK_N)

    offs_dv = tl.arange(0, BLOCK_DV)
    col_ok = row_ok[:, None] & (offs_dv[None, :] < HEAD_DV)
    if DIRECT:
        # rows that saw no key have acc = 0 and l = 0: they write zeros
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        o_ptrs = (Out + b * stride_ob + head[:, None] * stride_oh + pos[:, None].to(tl.int64) * stride_om
                  + offs_dv[None, :])
        tl.store(o_ptrs, cast(out, Out.dtype.element_ty), mask=col_ok)
    else:
        # workspace rows (b, h, i) of NUM_SPLITS partials each; an empty split leaves m = -inf, l = 0
        ws = ((b * Hq + head) * Lq + pos) * NUM_SPLITS + split
        tl.store(MaxWs + ws, m_i, mask=row_ok)
        tl.store(SumWs + ws, l_i, mask=row_ok)
        tl.store(AccWs + ws[:, None] * HEAD_DV + offs_dv[None, :], acc, mask=col_ok)


@triton.jit
def decode_combine_kernel(
    AccWs, MaxWs, SumWs, Out, stride_ob, stride_oh, stride_om, Hq, Lq, NUM_SPLITS,
    HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Out[b, h, i] = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s over the splits of one row
    (M = max_s m_s); zeros when no split saw a key. BLOCK_S splits per step."""
    row = tl.program_id(0).to(tl.int64)
    pos = row % Lq
    head = (row // Lq) % Hq
    b = row // (Lq * Hq)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_run = float("-inf")
    l_run = 0.0
    acc = tl.zeros([BLOCK_DV], dtype=tl.float32)
    for s0 in range(0, NUM_SPLITS, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        s_ok = offs_s < NUM_SPLITS
        ws = row * NUM_SPLITS + offs_s
        m = tl.load(MaxWs + ws, mask=s_ok, other=float("-inf"))
        l_s = tl.load(SumWs + ws, mask=s_ok, other=0.0)
        part = tl.load(AccWs + ws[:, None] * HEAD_DV + offs_dv[None, :],
                       mask=s_ok[:, None] & (offs_dv[None, :] < HEAD_DV), other=0.0)
        m_new = tl.maximum(m_run, tl.max(m, 0))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        w = tl.math.exp2(m - m_sub)  # 0 for empty splits (m = -inf)
        alpha = tl.math.exp2(m_run - m_sub)
        l_run = l_run * alpha + tl.sum(w * l_s, 0)
        acc = acc * alpha + tl.sum(w[:, None] * part, 0)
        m_run = m_new
    out = acc / tl.where(l_run > 0, l_run, 1.0)
    o_ptrs = Out + b * stride_ob + head * stride_oh + pos * stride_om + offs_dv
    tl.store(o_ptrs, cast(out, Out.dtype.element_ty), mask=offs_dv < HEAD_DV)


# Launch configs for the H100, checked offline (ptxas for sm_90: registers, spills, shared memory) but
# untimed until the lead's benchmark run. Decoding is bound by reading the cache: what matters is
# enough K/V stages in flight per SM, not the tiny MMAs.
def decode_config(block_d: int, block_dv: int, rows: int, elsize: int, interpret: bool) -> dict:
    """BLOCK_M (packed rows per program, a power of two >= 16), BLOCK_N, num_warps, num_stages."""
    block_m = max(triton.next_power_of_2(rows), 16)
    if interpret:
        # small tiles: several per split at test lengths, and two row blocks at GROUP * Lq = 64
        return {"BLOCK_M": min(block_m, 32), "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
    width = max(block_d, block_dv)
    if elsize == 4:
        # exact float32 dots run on the FMA units: 32 rows spilled ~350 bytes at D = 128, 16 rows none
        # (D = 256 still spills ~470 bytes: float32 decoding is not a fast path)
        return {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 8, "num_stages": 3}
    # 3 stages: a stage of K+V is 32 KB at D = 128 (64 keys), and two programs fit per SM at 16 rows
    block_n = 128 if width <= 64 else 64 if width <= 128 else 32
    block_m = min(block_m, 128 if width <= 128 else 64)
    # 4 warps spilled at 64 rows x 256 columns of accumulator
    warps = 4 if block_m * width <= 64 * 128 else 8
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": warps, "num_stages": 3}
