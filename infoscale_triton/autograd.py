"""autograd.Function over the fused forward and backward kernels."""

from __future__ import annotations

from typing import Any

import torch

from .backward import attention_backward
from .forward import attention_forward, kernel_key
from .validation import Problem


class FusedAttention(torch.autograd.Function):
    """``FusedAttention.apply(query, key, value, temperature_tensor_or_None, problem)``."""

    @staticmethod
    def forward(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                temperature: torch.Tensor | None, p: Problem) -> torch.Tensor:
        unit_key, key_inv = kernel_key(key, p)
        out, lse = attention_forward(query, key, value, p, unit_key=unit_key)
        if any(ctx.needs_input_grad[:4]):  # inference saves nothing
            # CosScale: keep the unit K and its inverse norms (the backward reads them, not key)
            ctx.save_for_backward(query, key if key_inv is None else unit_key, value, out, lse, key_inv)
        ctx.p = p
        return out

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        query, key, value, out, lse, key_inv = ctx.saved_tensors
        p = ctx.p
        unit_key = key if key_inv is not None else None
        dq, dk, dv, dt = attention_backward(query, key, value, out, lse, dout, p,
                                            unit_key=unit_key, key_inv=key_inv)
        needs = ctx.needs_input_grad
        return (dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None,
                dt if needs[3] else None, None)
