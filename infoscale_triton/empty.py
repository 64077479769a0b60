"""Calls with nothing to compute: no batch entry, head, query or key (as torch's SDPA: the output of a
row that sees no key is zeros, and an empty output is empty). The public functions return here before
any kernel launch, with gradients (zeros of each input's shape) as the kernels' path would give."""

from __future__ import annotations

import torch

from .validation import Problem


def nothing_to_compute(p: Problem) -> bool:
    """No output element (B, Hq or Lq is 0), or none that sees a key (Lk is 0), or no packed sequence."""
    return p.batch == 0 or p.heads_q == 0 or p.lq == 0 or p.lk == 0 or (p.varlen and p.sequences == 0)


class _Zeros(torch.autograd.Function):
    """Zeros of ``shape`` that depend on the inputs: their gradients are zeros of each input's shape."""

    @staticmethod
    def forward(ctx, shape: tuple[int, ...], query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                temperature: torch.Tensor | None) -> torch.Tensor:
        ctx.inputs = [(t.shape, t.dtype, t.device) if t is not None else None
                      for t in (query, key, value, temperature)]
        return query.new_zeros(shape, dtype=query.dtype)

    @staticmethod
    def backward(ctx, _dout: torch.Tensor) -> tuple:
        return (None,) + tuple(
            torch.zeros(spec[0], dtype=spec[1], device=spec[2]) if spec is not None and need else None
            for spec, need in zip(ctx.inputs, ctx.needs_input_grad[1:]))


def zero_output(shape: tuple[int, ...], query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                temperature: object) -> torch.Tensor:
    """Zeros of ``shape`` in the query's dtype and device, contiguous, differentiable in query, key,
    value and a tensor temperature (all of whose gradients are zeros)."""
    t = temperature if isinstance(temperature, torch.Tensor) else None
    return _Zeros.apply(tuple(shape), query, key, value, t)


def zero_stats(shape: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy and largest probability of rows that see no key: 0 and 0 (float32, no gradient)."""
    return (torch.zeros(shape, dtype=torch.float32, device=device),
            torch.zeros(shape, dtype=torch.float32, device=device))
