"""Inverse L2 norms of rows, the CosScale pre-pass over K (read once, (B, H, L) float32 out)."""

import triton
import triton.language as tl


@triton.jit
def inverse_row_norm_kernel(
    X, Out, stride_b, stride_h, stride_l, stride_d, H, L,
    HEAD_D: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Out[b, h, l] = 1 / ||X[b, h, l, :]||, and 0 for a zero row (its cosines are then 0, not NaN)."""
    offs_l = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    ptrs = (X + b * stride_b + h * stride_h + offs_l[:, None].to(tl.int64) * stride_l
            + offs_d[None, :] * stride_d)
    row_ok = offs_l < L
    x = tl.load(ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_D), other=0.0).to(tl.float32)
    sq = tl.sum(x * x, 1)
    tl.store(Out + (b * H + h) * L + offs_l, tl.where(sq > 0, 1.0 / tl.sqrt(tl.maximum(sq, 1e-30)), 0.0), mask=row_ok)
