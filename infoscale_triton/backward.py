"""Host side of the fused backward (kernels/attention_bwd.py).

Status: checked through the Triton interpreter against autograd of the float64 reference; not yet run
compiled on a GPU, so the public function does not use it yet (it refuses inputs that require grad).
"""

from __future__ import annotations

import torch
import triton

from .forward import _ensure_allocator, _tma_operand, launch_options, unit_rows
from .kernels.attention_bwd import (
    attention_bwd_delta_kernel,
    attention_bwd_dkdv_kernel,
    attention_bwd_dq_kernel,
)
from .validation import Problem, interpreter_active


def attention_backward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
    p: Problem,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients (dq, dk, dv, dt) of the forward that produced ``out`` and ``lse``; ``dt`` (the gradient
    of a tensor temperature, in the temperature's own shape) is None for other temperatures."""
    _ensure_allocator()
    k_inv = None
    if p.cos_scale is not None:
        key, k_inv = unit_rows(key)
    q, k, v, do = (_tma_operand(t) for t in (query, key, value, dout))
    device = q.device
    delta = torch.empty(p.batch, p.heads_q, p.lq, dtype=torch.float32, device=device)
    block_dv = max(triton.next_power_of_2(p.head_dim_v), 16)
    attention_bwd_delta_kernel[(triton.cdiv(p.lq, 64), p.heads_q, p.batch)](
        out, do, delta, out.stride(0), out.stride(1), out.stride(2),
        do.stride(0), do.stride(1), do.stride(2), p.heads_q, p.lq,
        HEAD_DV=p.head_dim_v, BLOCK_M=64, BLOCK_DV=block_dv,
    )
    opt = launch_options(p, q.dtype, delta)
    temperature = p.temperature_tensor
    dq = torch.empty(p.batch, p.heads_q, p.lq, p.head_dim, dtype=q.dtype, device=device)
    dk = torch.empty(p.batch, p.heads_kv, p.lk, p.head_dim, dtype=q.dtype, device=device)
    dv = torch.empty(p.batch, p.heads_kv, p.lk, p.head_dim_v, dtype=q.dtype, device=device)
    temp_grad = temperature is not None and temperature.requires_grad
    dt = torch.empty(p.batch, p.heads_q, p.lq, dtype=torch.float32, device=device) if temp_grad else delta
    # one small config until the backward is tuned on the GPU
    cfg = dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1) if interpreter_active() else \
        dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)
    qkv_strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                   v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2))
    common = (p.heads_q, p.lq, p.lk, p.group, p.scale, opt.temp_a, opt.temp_b)
    attention_bwd_dkdv_kernel[(triton.cdiv(p.lk, cfg["BLOCK_N"]), p.heads_kv, p.batch)](
        q, k, v, do, lse, delta, dk, dv, k_inv if k_inv is not None else delta, *opt.pointers,
        *qkv_strides, dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        *opt.strides, *common, **opt.meta, **cfg,
    )
    attention_bwd_dq_kernel[(triton.cdiv(p.lq, cfg["BLOCK_M"]), p.heads_q, p.batch)](
        q, k, v, do, lse, delta, dq, dt, *opt.pointers,
        *qkv_strides, dq.stride(0), dq.stride(1), dq.stride(2),
        *opt.strides, *common, **opt.meta, TEMP_GRAD=temp_grad, **cfg,
    )
    if not temp_grad:
        return dq, dk, dv, None
    # the kernel's dt is per (B, Hq, Lq) row; sum it over the dimensions the temperature broadcast
    return dq, dk, dv, dt.sum_to_size(temperature.shape).to(temperature.dtype)
