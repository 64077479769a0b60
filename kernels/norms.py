"""The CosScale pre-pass over K: its unit rows (what the attention kernels read) and inverse norms.

Normalising K once costs one read and one write of K; applying 1/||k_j|| to every logit tile inside
the attention loop instead measured 9-12% slower at 16k tokens (benchmarks/NOTES.md, v1)."""

import triton
import triton.language as tl

from .primitives import cast


@triton.jit
def unit_rows_kernel(
    X, InvNorm, Unit, stride_b, stride_h, stride_l, stride_d, H, L,
    HEAD_D: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Unit[b, h, l] = X[b, h, l] / ||X[b, h, l]|| (contiguous (B, H, L, HEAD_D), X's dtype) and
    InvNorm[b, h, l] = 1 / ||X[b, h, l]|| (float32). A zero row gives 0s: its cosines are 0, not NaN."""
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
    tl.store(InvNorm + row, inv, mask=row_ok)
    unit_ptrs = Unit + row[:, None] * HEAD_D + offs_d[None, :]
    tl.store(unit_ptrs, cast(x * inv[:, None], Unit.dtype.element_ty), mask=in_bounds)
