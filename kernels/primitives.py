"""Triton pieces shared by the attention kernels: where a batch entry lives (dense, packed varlen, key
padding), which keys each row sees (causal, window) and which tiles need a mask, the per-row
temperature, key validity of a tile, and attention dropout's keep mask."""

import triton
import triton.language as tl


@triton.jit
def _probe():
    pass


# Whether triton.jit made interpreter functions of these kernels (TRITON_INTERPRET when this module was
# imported; Triton decides at decoration, so ask it rather than parse the variable again).
INTERPRETED = tl.constexpr(not isinstance(_probe, triton.runtime.JITFunction))

# The constants and mode codes below are defined here only: the host launchers import them too.
LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): the kernels work in the exp2 domain
INV_LOG2E = tl.constexpr(0.6931471805599453)  # ln 2

# TEMP_MODE codes: no temperature, the string kinds (infoscale_triton.temperature), a per-row tensor.
TEMP_NONE = tl.constexpr(0)
TEMP_INFOSCALE = tl.constexpr(1)
TEMP_LOGN = tl.constexpr(2)
TEMP_TENSOR = tl.constexpr(3)

# MASK_MODE codes: no attn_mask, a boolean one (True = may attend), an additive float one.
MASK_NONE = tl.constexpr(0)
MASK_BOOL = tl.constexpr(1)
MASK_ADD = tl.constexpr(2)


@triton.jit
def dot(a, b, acc, DOT_PREC: tl.constexpr):
    """tl.dot(a, b, acc) in float32 accumulation. Triton's interpreter (3.6 to 3.8 at least) multiplies
    bfloat16 tiles as their raw 16-bit integers: there, and only there (INTERPRETED is a constexpr, so
    compiled code is unchanged), bfloat16 operands are widened to float32 first, which is exact, and
    every product of two bfloat16 values is exact in float32 as on the GPU's tensor cores."""
    if INTERPRETED:
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
        if b.dtype == tl.bfloat16:
            b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PREC)


@triton.jit
def cast(x, dtype: tl.constexpr):
    """``x.to(dtype)`` for float32 ``x``. The interpreter truncates float32 to bfloat16 (and its "rtne"
    mode carries into the exponent wrongly): there, and only there, bfloat16 is rounded to nearest
    even in integer arithmetic, as the GPU rounds (NaN stays NaN, overflow gives inf)."""
    if INTERPRETED and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)
        y = rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        y = x.to(dtype)
    return y


@triton.jit
def batch_extent(b, Lq, Lk, CuQ, CuK, KvRange, VARLEN: tl.constexpr, HAS_KV_RANGE: tl.constexpr):
    """Where batch entry ``b`` lives: (bq, q_start, lq, k_start, lk, kv_lo, kv_hi). Dense inputs: batch
    index bq = b, rows [0, Lq), keys [0, Lk). VARLEN: one packed sequence per ``b`` (the 4-d views have
    a single batch entry, bq = 0, of Lq query and Lk key tokens) starting at row CuQ[b] / key CuK[b].
    Keys outside [kv_lo, kv_hi) (per-batch key padding, HAS_KV_RANGE: KvRange[b] = (lo, hi), clamped to
    [0, lk]) are never seen."""
    if VARLEN:
        q_start, lq = _packed_extent(CuQ, b, Lq)
        k_start, lk = _packed_extent(CuK, b, Lk)
        bq = b * 0
    else:
        q_start = b * 0
        lq = Lq + q_start
        k_start = q_start
        lk = Lk + q_start
        bq = b
    kv_lo = q_start * 0
    kv_hi = lk
    if HAS_KV_RANGE:
        kv_lo = tl.minimum(tl.maximum(tl.load(KvRange + 2 * b), 0), lk)
        kv_hi = tl.minimum(tl.maximum(tl.load(KvRange + 2 * b + 1), kv_lo), lk)
    return bq.to(tl.int64), q_start, lq, k_start, lk, kv_lo, kv_hi


@triton.jit
def _packed_extent(Cu, b, tokens):
    """(start, length) of packed sequence ``b`` from the offsets Cu[b], Cu[b + 1], which the host never
    reads (a sync): each offset is clamped to [0, tokens] and the end to at least the start, so that no
    offset, however wrong, reaches outside the tensors. An empty sequence starts at 0: the kernels
    load a tile at the start unconditionally, and row 0 exists where row ``tokens`` would not (the
    public functions return before any launch when there is no token)."""
    start = tl.minimum(tl.maximum(tl.load(Cu + b), 0), tokens)
    end = tl.minimum(tl.maximum(tl.load(Cu + b + 1), start), tokens)
    return tl.where(end > start, start, 0), end - start


@triton.jit
def visible_keys(offs_m, shift, kv_lo, kv_hi, win_left, win_right,
                 IS_CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """[lo_i, hi_i): the keys row i may see before attn_mask. Causal and the window are aligned to the
    bottom-right (``shift`` = keys - queries of the sequence): row i sees j <= i + shift when causal and
    i + shift - win_left <= j <= i + shift + win_right in a window (the host passes a bound that never
    binds for -1)."""
    lo = tl.zeros_like(offs_m) + kv_lo
    hi = tl.zeros_like(offs_m) + kv_hi
    if IS_CAUSAL:
        hi = tl.minimum(hi, offs_m + shift + 1)
    if WINDOW:
        lo = tl.maximum(lo, offs_m + shift - win_left)
        hi = tl.minimum(hi, offs_m + shift + win_right + 1)
    return lo, hi


@triton.jit
def key_blocks(m0, lq, shift, kv_lo, kv_hi, win_left, win_right,
               IS_CAUSAL: tl.constexpr, WINDOW: tl.constexpr, ALL_MASKED: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key tiles for the query rows [m0, m0 + BLOCK_M) as (start, full_lo, full_hi, end): the tiles
    from ``start`` (step BLOCK_N) below ``end`` hold every key some row sees; those in [full_lo,
    full_hi) are seen whole by every row and need no mask. Keys past the sequence read as zeros, so a
    partial last tile is always masked; rows past lq see nothing (end = start). [start, full_lo) is
    empty unless a window or key padding hides leading keys from some rows."""
    last = tl.minimum(m0 + BLOCK_M, lq) - 1
    # lo_i and hi_i never decrease with i: some row sees [lo_first, hi_last), every row [lo_last, hi_first)
    lo_first, hi_first = visible_keys(m0, shift, kv_lo, kv_hi, win_left, win_right, IS_CAUSAL, WINDOW)
    lo_last, hi_last = visible_keys(last, shift, kv_lo, kv_hi, win_left, win_right, IS_CAUSAL, WINDOW)
    start = lo_first // BLOCK_N * BLOCK_N
    end = tl.where(last >= m0, tl.maximum(hi_last, start), start)
    if ALL_MASKED:
        # an attn_mask can hide any key: every tile goes to the last (masked) range
        full_lo = start
        full_hi = start
    else:
        full_lo = tl.minimum(tl.maximum((lo_last + BLOCK_N - 1) // BLOCK_N * BLOCK_N, start), end)
        full_hi = tl.minimum(tl.maximum(hi_first // BLOCK_N * BLOCK_N, full_lo), end)
    return start, full_lo, full_hi, end


@triton.jit
def query_blocks(n0, lq, lk, shift, kv_lo, kv_hi, win_left, win_right,
                 IS_CAUSAL: tl.constexpr, WINDOW: tl.constexpr, ALL_MASKED: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The transpose of key_blocks for the keys [n0, n0 + BLOCK_N): the query tiles from ``start``
    (step BLOCK_M) below ``end`` hold every row that sees one of these keys; those in [full_lo,
    full_hi) see all of them and need no mask. Keys past lk do not count (their gradient rows are not
    stored) and rows past lq read an infinite log-sum-exp (p = 0), so neither forces a mask."""
    n_last = tl.minimum(n0 + BLOCK_N, lk) - 1
    # row i sees key j iff kv_lo <= j < kv_hi, i >= j - shift (causal) and
    # j - shift - win_right <= i <= j - shift + win_left (window)
    first_any = tl.maximum(n0 * 0, 0)
    last_any = first_any + lq - 1
    first_all = first_any
    last_all = last_any
    if IS_CAUSAL:
        first_any = tl.maximum(first_any, n0 - shift)
        first_all = tl.maximum(first_all, n_last - shift)
    if WINDOW:
        first_any = tl.maximum(first_any, n0 - shift - win_right)
        first_all = tl.maximum(first_all, n_last - shift - win_right)
        last_any = tl.minimum(last_any, n_last - shift + win_left)
        last_all = tl.minimum(last_all, n0 - shift + win_left)
    seen = (n0 < kv_hi) & (n_last >= kv_lo) & (n_last >= n0) & (last_any >= first_any)
    start = first_any // BLOCK_M * BLOCK_M
    end = tl.where(seen, tl.maximum(last_any + 1, start), start)
    full_lo = tl.minimum(tl.maximum((first_all + BLOCK_M - 1) // BLOCK_M * BLOCK_M, start), end)
    full_hi = tl.where(last_all >= lq - 1, end, (last_all + 1) // BLOCK_M * BLOCK_M)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), end)
    whole = (n0 >= kv_lo) & (n_last < kv_hi)
    if ALL_MASKED:
        whole = whole & False
    full_lo = tl.where(whole, full_lo, end)
    full_hi = tl.where(whole, full_hi, end)
    return start, full_lo, full_hi, end


@triton.jit
def row_temperature(
    offs_m, n_seen, lq, temp_ptr, stride_tm, count_ptr, stride_cm, temp_a, temp_b,
    TEMP_MODE: tl.constexpr, CLIP: tl.constexpr, HAS_COUNT: tl.constexpr,
):
    """t_i for the rows ``offs_m`` (float32). ``temp_ptr``/``count_ptr`` already point at this (batch,
    head). String temperatures need n_i, the keys row i may attend to: ``n_seen`` (from visible_keys)
    unless an attn_mask makes the host count them (HAS_COUNT)."""
    row_ok = offs_m < lq
    if TEMP_MODE == TEMP_TENSOR:
        t = tl.load(temp_ptr + offs_m.to(tl.int64) * stride_tm, mask=row_ok, other=1.0).to(tl.float32)
    else:
        if HAS_COUNT:
            n = tl.load(count_ptr + offs_m.to(tl.int64) * stride_cm, mask=row_ok, other=1).to(tl.float32)
        else:
            n = n_seen.to(tl.float32)
        # a row with no key outputs zeros whatever t is; n >= 1 keeps t finite
        n = tl.maximum(n, 1.0)
        if TEMP_MODE == TEMP_INFOSCALE:
            t = tl.sqrt((1.0 - tl.exp2(temp_a * tl.log2(n))) * temp_b)
        else:
            t = tl.log2(n) * temp_b
        if CLIP:
            t = tl.maximum(t, 1.0)
    return t


@triton.jit
def key_validity(
    offs_m, offs_n, lo, hi, lq, lk, mask_ptr, stride_mm, stride_mn, MASK_MODE: tl.constexpr,
):
    """(valid, bias): which (row, key) pairs of a tile may attend (keys in [lo_i, hi_i) from
    visible_keys, and attn_mask), and the additive mask (natural-log units, 0 without a float mask).
    ``mask_ptr`` already points at this (batch, head)."""
    valid = (offs_n[None, :] >= lo[:, None]) & (offs_n[None, :] < hi[:, None])
    bias = tl.zeros([offs_m.shape[0], offs_n.shape[0]], dtype=tl.float32)
    if MASK_MODE != MASK_NONE:
        in_bounds = (offs_m[:, None] < lq) & (offs_n[None, :] < lk)
        ptrs = mask_ptr + offs_m[:, None].to(tl.int64) * stride_mm + offs_n[None, :].to(tl.int64) * stride_mn
        if MASK_MODE == MASK_BOOL:
            valid = valid & (tl.load(ptrs, mask=in_bounds, other=0) != 0)
        else:
            bias = tl.load(ptrs, mask=in_bounds, other=0.0).to(tl.float32)
            valid = valid & (bias != float("-inf"))
            # keep finite biases finite in the exp2 domain (x log2(e)): finfo.min pads, it does not mask;
            # biases beyond +-2.3e38 saturate there (documented)
            bias = tl.minimum(tl.maximum(bias, -2.3e38), 2.3e38)
    return valid, bias


@triton.jit
def dropout_keep(seed, bh, offs_m, n0, dropout_p, BLOCK_N: tl.constexpr):
    """Attention dropout's keep mask, (rows, keys), for rows ``offs_m`` and keys ``n0 .. n0 + BLOCK_N``
    (n0 a multiple of 4) of the (batch, query head) ``bh = b * Hq + h``.

    One Philox call at the 4 x 32-bit counter (j // 4, i, bh, 0) under the call's 64-bit ``seed`` gives
    four words, one for each of the keys 4 (j // 4) .. + 3 of row i: a quarter of the integer work and
    registers of a call per element, and the bits do not depend on the tile shape, so every kernel
    regenerates the same mask. Separate counters for key, row and head cannot wrap at any
    size (a flattened index would at 2**32). Keep iff u >= dropout_p with u uniform on the 2**-24 grid
    (exact in float32): P(keep) = 1 - dropout_p to within 6e-8."""
    zero = tl.zeros([offs_m.shape[0], BLOCK_N // 4], dtype=tl.uint32)
    group = (n0 // 4 + tl.arange(0, BLOCK_N // 4))[None, :].to(tl.uint32) + zero
    row = offs_m[:, None].to(tl.uint32) + zero
    r0, r1, r2, r3 = tl.philox(seed, group, row, zero + bh.to(tl.uint32), zero)
    k0 = _uniform24(r0) >= dropout_p
    k1 = _uniform24(r1) >= dropout_p
    k2 = _uniform24(r2) >= dropout_p
    k3 = _uniform24(r3) >= dropout_p
    # key 4 g + c takes word c (interleave(a, b) puts a at the even positions, b at the odd ones)
    return tl.interleave(tl.interleave(k0, k2), tl.interleave(k1, k3))


@triton.jit
def _uniform24(r):
    """A uint32 Philox word to a float32 uniform on [0, 1) with 24 random bits (exactly representable)."""
    return (r >> 8).to(tl.float32) * (1.0 / 16777216.0)
