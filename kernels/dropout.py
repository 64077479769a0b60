"""Debugging aid: write out the dropout keep mask that the attention kernels apply, from the same
primitives.dropout_keep helper (so the bits are the kernels' own)."""

import triton
import triton.language as tl

from .primitives import dropout_keep


@triton.jit
def dropout_mask_kernel(
    Seed, Keep, Hq, Lq, Lk, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Keep[b, h, i, j] (contiguous (B, Hq, Lq, Lk) uint8, 1 = kept) for one block of rows of one
    (batch, query head), over all keys."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    bh = tl.program_id(2).to(tl.int64) * Hq + tl.program_id(1)
    seed = tl.load(Seed)
    rows = Keep + (bh * Lq + offs_m[:, None]) * Lk
    for n0 in range(0, Lk, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        keep = dropout_keep(seed, bh, offs_m, n0, dropout_p, BLOCK_N)
        tl.store(rows + offs_n[None, :], keep.to(tl.uint8),
                 mask=(offs_m[:, None] < Lq) & (offs_n[None, :] < Lk))
