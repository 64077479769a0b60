"""Host side of the fused backward (kernels/attention_bwd.py)."""

from __future__ import annotations

import torch
import triton

from .forward import LOG2E, _ensure_allocator, _tma_operand, dropout_args, kernel_key, launch_options
from .kernels.attention_bwd import (
    attention_bwd_dkdv_kernel,
    attention_bwd_dq_kernel,
    attention_bwd_prep_kernel,
    bwd_config,
)
from .validation import Problem, interpreter_active

# Fixed (dK/dV, dQ) launch configs that bypass the table: set by benchmarks/sweep_configs.py.
CONFIG_OVERRIDE: tuple[dict, dict] | None = None


def attention_backward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
    p: Problem,
    unit_key: torch.Tensor | None = None,
    key_inv: torch.Tensor | None = None,
    seed: torch.Tensor | None = None,
    *,
    temperature_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients (dq, dk, dv, dt) of the forward that produced ``out`` and ``lse``; ``dt`` (the gradient
    of a tensor temperature, in the temperature's own shape) is None unless ``temperature_grad`` (asked
    for explicitly: inside an operator the temperature's requires_grad is not the caller's). Under
    CosScale, ``unit_key``/``key_inv`` are forward.kernel_key's result (recomputed if not given). With
    dropout, ``seed`` must be the forward's (it regenerates the same mask)."""
    _ensure_allocator()
    if p.cos_scale is not None:
        if unit_key is None or key_inv is None:
            unit_key, key_inv = kernel_key(key, p)
        key = unit_key
    q, k, v, do = (_tma_operand(t) for t in (query, key, value, dout))
    device = q.device
    delta = torch.empty(p.batch, p.heads_q, p.lq, dtype=torch.float32, device=device)
    row_scale = torch.empty_like(delta)
    opt = launch_options(p, q.dtype, delta)
    meta = opt.meta
    seed, dropout_p, dropout_scale = dropout_args(p, seed, delta)
    temp_t, count_t, mask_t = opt.pointers
    block_m = 64
    attention_bwd_prep_kernel[(triton.cdiv(p.rows, block_m), p.heads_q, p.sequences)](
        out, do, q, delta, row_scale, temp_t, count_t, *opt.extent,
        out.stride(0), out.stride(1), out.stride(2), do.stride(0), do.stride(1), do.stride(2),
        q.stride(0), q.stride(1), q.stride(2), *opt.strides[:6],
        p.heads_q, p.lq, p.lk, p.scale * LOG2E, opt.temp_a, opt.temp_b, *opt.window,
        HEAD_D=p.head_dim, HEAD_DV=p.head_dim_v, BLOCK_D=meta["BLOCK_D"], BLOCK_DV=meta["BLOCK_DV"],
        IS_CAUSAL=p.is_causal, TEMP_MODE=meta["TEMP_MODE"], CLIP=meta["CLIP"], HAS_COUNT=meta["HAS_COUNT"],
        COS=meta["COS"], VARLEN=meta["VARLEN"], HAS_KV_RANGE=meta["HAS_KV_RANGE"], WINDOW=meta["WINDOW"],
        BLOCK_M=block_m,
    )
    temperature = p.temperature_tensor
    dq = torch.empty(p.batch, p.heads_q, p.lq, p.head_dim, dtype=q.dtype, device=device)
    dk = torch.empty(p.batch, p.heads_kv, p.lk, p.head_dim, dtype=q.dtype, device=device)
    dv = torch.empty(p.batch, p.heads_kv, p.lk, p.head_dim_v, dtype=q.dtype, device=device)
    if p.varlen:
        # tokens of no sequence (past cu_seqlens[-1]) get no program: their gradient is zero
        dq.zero_()
        dk.zero_()
        dv.zero_()
    temp_grad = temperature is not None and temperature_grad
    # packed sequences: tokens past cu_seqlens_q[-1] get no program, and their dt is summed where the
    # temperature broadcasts over tokens
    dt = (torch.zeros_like(delta) if p.varlen else torch.empty_like(delta)) if temp_grad else delta
    dkdv_cfg, dq_cfg = CONFIG_OVERRIDE or bwd_config(meta["BLOCK_D"], meta["BLOCK_DV"], q.element_size(),
                                                     interpreter_active())
    qkv_strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                   v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2))
    shared = {name: meta[name] for name in ("HEAD_D", "HEAD_DV", "BLOCK_D", "BLOCK_DV", "IS_CAUSAL", "COS",
                                            "MASK_MODE", "DOT_PREC", "DROPOUT", "VARLEN", "HAS_KV_RANGE",
                                            "WINDOW")}
    attention_bwd_dkdv_kernel[(triton.cdiv(p.keys, dkdv_cfg["BLOCK_N"]), p.heads_kv, p.sequences)](
        q, k, v, do, lse[0], lse[-1], delta, row_scale, dk, dv, key_inv if key_inv is not None else delta,
        mask_t, seed, *opt.extent,
        *qkv_strides, dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        *opt.strides[6:], p.heads_q, p.lq, p.lk, p.group, dropout_p, dropout_scale, *opt.window,
        **shared, **dkdv_cfg,
    )
    attention_bwd_dq_kernel[(triton.cdiv(p.rows, dq_cfg["BLOCK_M"]), p.heads_q, p.sequences)](
        q, k, v, do, lse[0], lse[-1], delta, row_scale, dq, dt, mask_t, seed, *opt.extent,
        *qkv_strides, dq.stride(0), dq.stride(1), dq.stride(2), *opt.strides[6:],
        p.heads_q, p.lq, p.lk, p.group, p.scale, dropout_p, dropout_scale, *opt.window, **shared,
        TEMP_GRAD=temp_grad, **dq_cfg,
    )
    if not temp_grad:
        return dq, dk, dv, None
    # the kernel's dt is per (B, Hq, Lq) row; sum it over the dimensions the temperature broadcast
    return dq, dk, dv, dt.sum_to_size(temperature.shape).to(temperature.dtype)
