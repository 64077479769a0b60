"""Triton pieces shared by the attention kernels: per-row temperature, key validity of a tile, and
attention dropout's keep mask."""

import triton
import triton.language as tl

# TEMP_MODE codes (mirrors infoscale_triton.temperature).
TEMP_NONE = tl.constexpr(0)
TEMP_INFOSCALE = tl.constexpr(1)
TEMP_LOGN = tl.constexpr(2)
TEMP_TENSOR = tl.constexpr(3)

# MASK_MODE codes: no attn_mask, a boolean one (True = may attend), an additive float one.
MASK_NONE = tl.constexpr(0)
MASK_BOOL = tl.constexpr(1)
MASK_ADD = tl.constexpr(2)


@triton.jit
def row_temperature(
    offs_m, Lq, Lk, temp_ptr, stride_tm, count_ptr, stride_cm, temp_a, temp_b,
    IS_CAUSAL: tl.constexpr, TEMP_MODE: tl.constexpr, CLIP: tl.constexpr, HAS_COUNT: tl.constexpr,
):
    """t_i for the rows ``offs_m`` (float32). ``temp_ptr``/``count_ptr`` already point at this (batch,
    head). String temperatures need n_i, the keys row i may attend to: analytic from the position
    unless an attn_mask makes the host count them (HAS_COUNT)."""
    row_ok = offs_m < Lq
    if TEMP_MODE == TEMP_TENSOR:
        t = tl.load(temp_ptr + offs_m.to(tl.int64) * stride_tm, mask=row_ok, other=1.0).to(tl.float32)
    else:
        if HAS_COUNT:
            n = tl.load(count_ptr + offs_m.to(tl.int64) * stride_cm, mask=row_ok, other=1).to(tl.float32)
        elif IS_CAUSAL:
            # bottom-right causal: row i sees keys j <= i + Lk - Lq
            n = tl.minimum(offs_m + 1 + Lk - Lq, Lk).to(tl.float32)
        else:
            n = tl.zeros_like(offs_m).to(tl.float32) + Lk
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
    offs_m, offs_n, Lq, Lk, mask_ptr, stride_mm, stride_mn,
    IS_CAUSAL: tl.constexpr, MASK_MODE: tl.constexpr,
):
    """(valid, bias): which (row, key) pairs of a tile may attend, and the additive mask (natural-log
    units, 0 without a float mask). ``mask_ptr`` already points at this (batch, head)."""
    valid = (offs_n[None, :] < Lk) & (offs_m[:, None] >= 0)
    if IS_CAUSAL:
        valid = valid & (offs_n[None, :] <= offs_m[:, None] + (Lk - Lq))
    bias = tl.zeros([offs_m.shape[0], offs_n.shape[0]], dtype=tl.float32)
    if MASK_MODE != MASK_NONE:
        in_bounds = (offs_m[:, None] < Lq) & (offs_n[None, :] < Lk)
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
def dropout_keep(seed, bh, offs_m, offs_n, dropout_p, TRANSPOSED: tl.constexpr):
    """Attention dropout's keep mask for rows ``offs_m`` and keys ``offs_n`` of the (batch, query head)
    ``bh = b * Hq + h``: shape (rows, keys), or (keys, rows) with TRANSPOSED (the dK/dV kernel's tiles).

    Element (i, j) is decided by one Philox draw at the 4 x 32-bit counter (j, i, bh, 0) under the call's
    64-bit ``seed``: every element has its own counter at any size (no flattened index that could wrap
    at 2**32), and every kernel, tile shape and orientation gets the same bit. Keep iff u >= dropout_p
    with u uniform on the 2**-24 grid (exact in float32), so P(keep) = 1 - dropout_p to within 6e-8."""
    if TRANSPOSED:
        zero = tl.zeros([offs_n.shape[0], offs_m.shape[0]], dtype=tl.uint32)
        c0 = offs_n[:, None].to(tl.uint32) + zero
        c1 = offs_m[None, :].to(tl.uint32) + zero
    else:
        zero = tl.zeros([offs_m.shape[0], offs_n.shape[0]], dtype=tl.uint32)
        c0 = offs_n[None, :].to(tl.uint32) + zero
        c1 = offs_m[:, None].to(tl.uint32) + zero
    r, _, _, _ = tl.philox(seed, c0, c1, zero + bh.to(tl.uint32), zero)
    u = (r >> 8).to(tl.float32) * (1.0 / 16777216.0)
    return u >= dropout_p
