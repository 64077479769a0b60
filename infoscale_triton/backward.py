"""Host side of the fused backward (kernels/attention_bwd.py): a launch plan per problem for the three
kernels (row pre-pass, dK/dV, dQ), then the launches through the launch layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import tuning
from .kernels.attention_bwd import attention_bwd_dkdv_kernel, attention_bwd_dq_kernel, bwd_config
from .launch import (
    INTERPRET,
    Launch,
    PlanCache,
    cdiv,
    dummy,
    ensure_allocator,
    tma_operand,
    tma_ready,
    variant,
)
from .operands import (
    Operands,
    dropout_scalars,
    dropout_seed,
    kernel_key,
    launch_options,
    needs_operand_tensors,
    operand_tensors,
    problem_key,
)
from .rows import rows_launch
from .validation import Problem

_PLANS = PlanCache()
# the options the gradient kernels take from launch_options' constexprs
_GRAD_META = ("HEAD_D", "HEAD_DV", "BLOCK_D", "BLOCK_DV", "IS_CAUSAL", "COS", "MASK_MODE", "DOT_PREC", "DROPOUT",
              "VARLEN", "HAS_KV_RANGE", "WINDOW")


def _launch_config(cfg: dict) -> tuple[dict, dict]:
    """(constexprs, compile options) of a config dict."""
    cfg = dict(cfg)
    return cfg, {name: cfg.pop(name) for name in ("num_warps", "num_stages") if name in cfg}


@dataclass(slots=True)
class _Plan:
    prep: Launch
    dkdv: Launch
    dq: Launch
    copies: tuple[bool, bool, bool, bool]  # q, k, v, dout that TMA cannot read in place
    count_strides: tuple
    operands: Operands | None  # the pointers of every call, when they are all dummies


def _build(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dout: torch.Tensor, out: torch.Tensor,
           p: Problem, temp_grad: bool) -> _Plan:
    """The plan of a new key, from the tensors of its first call (``key``: the unit K under CosScale)."""
    copies = tuple(not tma_ready(t) for t in (query, key, value, dout))
    q, k, v, do = (tma_operand(t) if copy else t for t, copy in zip((query, key, value, dout), copies))
    device = q.device
    operands = operand_tensors(p, dummy(device))
    opt = launch_options(p, q.dtype, operands)
    meta = opt.meta
    prep = rows_launch(p, opt, q, out, do)
    overrides = tuning.current().backward_configs
    dkdv_cfg, dq_cfg = overrides or bwd_config(meta["BLOCK_D"], meta["BLOCK_DV"], q.element_size(), INTERPRET)
    qkv_strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                   v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2))
    # dq, dk, dv are allocated contiguous
    dk_strides = (p.heads_kv * p.lk * p.head_dim, p.lk * p.head_dim, p.head_dim)
    dv_strides = (p.heads_kv * p.lk * p.head_dim_v, p.lk * p.head_dim_v, p.head_dim_v)
    dq_strides = (p.heads_q * p.lq * p.head_dim, p.lq * p.head_dim, p.head_dim)
    dropout = dropout_scalars(p)
    grad_meta = {n: meta[n] for n in _GRAD_META}
    constexprs, options = _launch_config(dkdv_cfg)
    dkdv = Launch(
        variant(attention_bwd_dkdv_kernel, {**grad_meta, **constexprs}, options),
        (cdiv(p.keys, constexprs["BLOCK_N"]), p.heads_kv, p.sequences),
        (*qkv_strides, *dk_strides, *dv_strides, *opt.strides[6:], p.heads_q, p.lq, p.lk, p.group, *dropout,
         *opt.window),
        device)
    constexprs, options = _launch_config(dq_cfg)
    dq = Launch(
        variant(attention_bwd_dq_kernel, {**grad_meta, "TEMP_GRAD": temp_grad, **constexprs}, options),
        (cdiv(p.rows, constexprs["BLOCK_M"]), p.heads_q, p.sequences),
        (*qkv_strides, *dq_strides, *opt.strides[6:], p.heads_q, p.lq, p.lk, p.group, p.scale, *dropout,
         *opt.window),
        device)
    return _Plan(prep, dkdv, dq, copies, operands.count_strides, None if needs_operand_tensors(p) else operands)


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
    CosScale, ``unit_key``/``key_inv`` are operands.kernel_key's result (recomputed if not given). With
    dropout, ``seed`` must be the forward's (it regenerates the same mask)."""
    ensure_allocator()
    if p.cos_scale is not None:
        if unit_key is None or key_inv is None:
            unit_key, key_inv = kernel_key(key, p)
        key = unit_key
    temperature = p.temperature_tensor
    temp_grad = temperature is not None and temperature_grad
    device = query.device
    plan_key = (
        query.shape, query.stride(), key.shape, key.stride(), value.shape, value.stride(), query.dtype, device,
        out.stride(), dout.stride(), lse.shape, lse.stride(),
        query.data_ptr() & 15, key.data_ptr() & 15, value.data_ptr() & 15, out.data_ptr() & 15,
        dout.data_ptr() & 15, lse.data_ptr() & 15, None if key_inv is None else key_inv.data_ptr() & 15,
        None if seed is None else (seed.dtype, seed.data_ptr() & 15), temp_grad, problem_key(p, query.dtype),
    )
    plan = _PLANS.get(plan_key, _build, query, key, value, dout, out, p, temp_grad)
    q, k, v, do = (tma_operand(t) if copy else t for t, copy in zip((query, key, value, dout), plan.copies))
    base = dummy(device)
    operands = plan.operands
    if operands is None:
        operands = operand_tensors(p, base)
        if operands.count_strides != plan.count_strides:
            raise RuntimeError("internal error: the count operand's strides differ from the launch plan's")
    temp_t, count_t, mask_t = operands.pointers
    seed = dropout_seed(p, seed, base)
    delta = torch.empty(p.batch, p.heads_q, p.lq, dtype=torch.float32, device=device)
    row_scale = torch.empty_like(delta)
    plan.prep(out, do, q, delta, row_scale, temp_t, count_t, *operands.extent)
    # tokens of no sequence (past cu_seqlens[-1]) get no program: their gradient is zero
    alloc = torch.zeros if p.varlen else torch.empty
    dq = alloc(p.batch, p.heads_q, p.lq, p.head_dim, dtype=q.dtype, device=device)
    dk = alloc(p.batch, p.heads_kv, p.lk, p.head_dim, dtype=q.dtype, device=device)
    dv = alloc(p.batch, p.heads_kv, p.lk, p.head_dim_v, dtype=q.dtype, device=device)
    # packed sequences: tokens past cu_seqlens_q[-1] get no program, and their dt is summed where the
    # temperature broadcasts over tokens
    dt = (torch.zeros_like(delta) if p.varlen else torch.empty_like(delta)) if temp_grad else delta
    logl = lse[1] if lse.shape[0] == 2 else lse
    plan.dkdv(q, k, v, do, lse, logl, delta, row_scale, dk, dv, key_inv if key_inv is not None else delta, mask_t,
              seed, *operands.extent)
    plan.dq(q, k, v, do, lse, logl, delta, row_scale, dq, dt, mask_t, seed, *operands.extent)
    if not temp_grad:
        return dq, dk, dv, None
    # the kernel's dt is per (B, Hq, Lq) row; sum it over the dimensions the temperature broadcast
    return dq, dk, dv, dt.sum_to_size(temperature.shape).to(temperature.dtype)
