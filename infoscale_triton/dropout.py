"""Attention dropout's randomness: the per-call seed, and (a debugging aid) the keep mask it gives.

The kernels decide each (batch, head, row, key) element from Philox keyed by a seed that the
caller draws from torch's default generator on the inputs' device (:func:`draw_seed`); the backward
reuses the forward's seed, so it regenerates the same mask. To see the mask of a call::

    torch.manual_seed(s); out = infoscale_triton.scaled_dot_product_attention(q, k, v, dropout_p=0.1)
    torch.manual_seed(s); keep = dropout_mask(draw_seed(q.device), (B, Hq, Lq, Lk), 0.1)

(the public function draws its seed before anything else random), and
``infoscale_triton.reference.scaled_dot_product_attention(..., dropout_p=0.1, dropout_mask=keep)``
computes the same dropped attention.
"""

from __future__ import annotations

import contextlib

import torch
import triton

from .kernels.dropout import dropout_mask_kernel


def draw_seed(device: torch.device | str) -> torch.Tensor:
    """A fresh 62-bit Philox key: a one-element int64 tensor on ``device``, drawn from torch's default
    generator there. Reproducible under ``torch.manual_seed``; drawn on the device, it costs no host
    synchronisation, and the kernels read it from memory, so that a captured CUDA graph draws a new one
    at each replay instead of baking one in."""
    return torch.randint(2**62, (1,), dtype=torch.int64, device=device)


def dropout_mask(seed: torch.Tensor, shape: tuple[int, int, int, int], dropout_p: float) -> torch.Tensor:
    """Debugging aid: the boolean keep mask (True = kept) of shape ``(B, Hq, Lq, Lk)`` that the fused
    kernels apply for ``seed`` (a :func:`draw_seed` tensor; the mask is made on its device) and
    ``dropout_p``. O(B * Hq * Lq * Lk) memory: meant for tests and small shapes."""
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")
    batch, heads_q, lq, lk = shape
    keep = torch.empty(batch, heads_q, lq, lk, dtype=torch.bool, device=seed.device)
    block_m, block_n = 32, 64
    # Triton launches on the current device: make it the seed's one
    on_device = torch.cuda.device(seed.device) if seed.is_cuda else contextlib.nullcontext()
    with on_device:
        dropout_mask_kernel[(triton.cdiv(lq, block_m), heads_q, batch)](
            seed, keep.view(torch.uint8), heads_q, lq, lk, float(dropout_p), BLOCK_M=block_m, BLOCK_N=block_n,
        )
    return keep
