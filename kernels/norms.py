"""The CosScale pre-pass over K: inverse L2 norms of its rows, or the unit rows themselves."""

import triton
import triton.language as tl


@triton.jit
def inverse_row_norm_kernel(
    X, Out, Unit, stride_b, stride_h, stride_l, stride_d, H, L,
    HEAD_D: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, WRITE_UNIT: tl.constexpr,
):
    """Out[b, h, l] = 1 / ||X[b, h, l, :]|| (0 for a zero row: its cosines are then 0, not NaN).
    WRITE_UNIT also writes X / ||X|| to Unit, contiguous (B, H, L, HEAD_D) in X's dtype."""
    offs_l = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_l < L
    in_bounds = row_ok[:, None] & (offs_d[None, :] < HEAD_D)
    ptrs = (X + b * stride_b + h * stride_h + offs_l[:, None].to(tl.int64) * stride_l
            + offs_d[None, :] * stride_d)
    x = tl.load(ptrs, mask=in_bounds, other=0.0).to(tl.float32)
    sq = tl.sum(x * x, 1)
    inv = tl.where(sq > 0, 1.0 / tl.sqrt(tl.maximum(sq, 1e-30)), 0.0)
    row = (b * H + h) * L + offs_l
    tl.store(Out + row, inv, mask=row_ok)
    if WRITE_UNIT:
        unit_ptrs = Unit + row[:, None] * HEAD_D + offs_d[None, :]
        tl.store(unit_ptrs, (x * inv[:, None]).to(Unit.dtype.element_ty), mask=in_bounds)
