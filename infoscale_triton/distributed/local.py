"""The single-GPU kernels as the ring calls them: one attention block (a slice of this rank's query rows
against a slice of the K/V shard it holds) forward, and its gradients. The only place this package
reaches into the launchers (forward.py, backward.py, operands.py)."""

from __future__ import annotations

import torch

from ..backward import attention_backward
from ..forward import attention_forward
from ..operands import kernel_key
from ..validation import Problem


def key_operand(key: torch.Tensor, p: Problem) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The K the kernels read (the unit rows under CosScale, else key itself) and 1/||k_j|| (float32,
    CosScale only): computed once per shard, then sent around the ring instead of K."""
    return kernel_key(key, p)


def block_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  p: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of one block: ``k`` is key_operand's K. lse: log2-sum-exp (1, B, Hq, Lq) float32,
    +inf on rows that see no key (their out is 0)."""
    return attention_forward(q, k, v, p, unit_key=k if p.cos_scale is not None else None)


def block_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                   dout: torch.Tensor, p: Problem, key_inv: torch.Tensor | None,
                   temperature_grad: bool) -> tuple[torch.Tensor, ...]:
    """(dq, dk, dv, dt or None) of one block, given the rows' final ``out`` and ``lse`` (over all keys
    of the sequence): then each block's gradients are exactly its share of the sums over keys (dq, dt)
    and over rows (dk, dv). ``k``/``key_inv``: key_operand's."""
    unit = k if p.cos_scale is not None else None
    return attention_backward(q, k, v, out, lse, dout, p, unit_key=unit, key_inv=key_inv,
                              temperature_grad=temperature_grad)
