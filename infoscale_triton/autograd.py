"""autograd.Function over the fused forward and backward kernels.

Status: checked through the Triton interpreter only; the public function does not route through it
until the backward kernels have been compiled and checked on a GPU (see benchmarks/NOTES.md).
"""

from __future__ import annotations

from typing import Any

import torch

from .backward import attention_backward
from .forward import attention_forward
from .validation import Problem


class FusedAttention(torch.autograd.Function):
    """``FusedAttention.apply(query, key, value, temperature_tensor_or_None, problem)``."""

    @staticmethod
    def forward(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                temperature: torch.Tensor | None, p: Problem) -> torch.Tensor:
        out, lse = attention_forward(query, key, value, p)
        if any(ctx.needs_input_grad[:4]):  # inference saves nothing
            ctx.save_for_backward(query, key, value, out, lse)
        ctx.p = p
        return out

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        query, key, value, out, lse = ctx.saved_tensors
        dq, dk, dv, dt = attention_backward(query, key, value, out, lse, dout, ctx.p)
        needs = ctx.needs_input_grad
        return (dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None,
                dt if needs[3] else None, None)
