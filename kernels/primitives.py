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
