"""autograd.Function over the fused forward and backward kernels."""

from __future__ import annotations

from typing import Any

import torch

from .backward import attention_backward
from .dropout import draw_seed
from .forward import attention_forward, kernel_key
from .validation import Problem


class FusedAttention(torch.autograd.Function):
    """``FusedAttention.apply(query, key, value, temperature_tensor_or_None, problem[, seed])``; with
    dropout, ``seed`` (dropout.draw_seed) is drawn here unless given."""

    @staticmethod
    def forward(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                temperature: torch.Tensor | None, p: Problem,
                seed: torch.Tensor | None = None) -> torch.Tensor:
        if p.dropout_p > 0 and seed is None:
            seed = draw_seed(query.device)
        unit_key, key_inv = kernel_key(key, p)
        out, lse = attention_forward(query, key, value, p, unit_key=unit_key, seed=seed)
        if any(ctx.needs_input_grad[:4]):  # inference saves nothing
            # CosScale: keep the unit K and its inverse norms (the backward reads them, not key);
            # dropout: the seed, so that the backward regenerates the forward's mask
            ctx.save_for_backward(query, key if key_inv is None else unit_key, value, out, lse, key_inv, seed)
        ctx.p = p
        return out

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        query, key, value, out, lse, key_inv, seed = ctx.saved_tensors
        p = ctx.p
        unit_key = key if key_inv is not None else None
        dq, dk, dv, dt = attention_backward(query, key, value, out, lse, dout, p,
                                            unit_key=unit_key, key_inv=key_inv, seed=seed)
        needs = ctx.needs_input_grad
        return (dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None,
                dt if needs[3] else None, None, None)
