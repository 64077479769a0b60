"""Host side of the fused forward: a launch plan per problem (which kernel, config, grid, scalar
arguments), then the launch through the launch layer. On sm_90 the calls that the Gluon kernel covers
(:func:`hopper_forward`) take it, after the row pre-pass that gives it the row scales; every other call
takes the Triton kernel."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from . import tuning
from .kernels import attention_fwd_hopper as hopper
from .kernels.attention_fwd import attention_fwd_autotuned, attention_fwd_kernel, fwd_config
from .launch import (
    INTERPRET,
    LOG2E,
    Launch,
    PlanCache,
    cdiv,
    dummy,
    ensure_allocator,
    next_power_of_2,
    tma_operand,
    tma_ready,
    variant,
    workspace,
)
from .operands import (
    TEMP_TENSOR,
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

# Triton launch configs come from a table measured on the H200 (kernels/attention_fwd.py: fwd_config),
# or the autotuner (tuning: autotune), or a fixed one (tuning: forward_config).
_PLANS = PlanCache()


def _bucket(n: int) -> int:
    return min(max(next_power_of_2(n), 64), 16384)


def new_output(p: Problem, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The forward's output (B, Hq, Lq, Dv): contiguous, or for packed sequences token-major like the
    packed inputs and zeroed (tokens of no sequence, past cu_seqlens_q[-1], get zeros). ops.py's fake
    forward allocates it here too, so that compiled graphs see the real strides."""
    if p.varlen:
        return torch.zeros(p.batch, p.lq, p.heads_q, p.head_dim_v, dtype=dtype, device=device).transpose(1, 2)
    return torch.empty(p.batch, p.heads_q, p.lq, p.head_dim_v, dtype=dtype, device=device)


def new_row_stats(p: Problem, device: torch.device) -> torch.Tensor:
    """Row statistics for the backward, float32: the log-sum-exp in base 2 (1, B, Hq, Lq); under an
    additive mask two planes, the row max and log2 of the row sum (kernels/attention_fwd.py: why).
    Zeroed for packed sequences, whose tokens past cu_seqlens_q[-1] get no program (an operator's
    output must not depend on what the memory held)."""
    planes = 2 if p.attn_mask is not None and p.attn_mask.dtype != torch.bool else 1
    alloc = torch.zeros if p.varlen else torch.empty
    return alloc(planes, p.batch, p.heads_q, p.lq, dtype=torch.float32, device=device)


def new_entropy_stats(p: Problem, device: torch.device) -> torch.Tensor:
    """Where the forward writes each row's entropy and largest probability: (2, B, Hq, Lq) float32,
    zeroed for packed sequences (tokens of no sequence get no program; they read 0 and 0)."""
    alloc = torch.zeros if p.varlen else torch.empty
    return alloc(2, p.batch, p.heads_q, p.lq, dtype=torch.float32, device=device)


@functools.cache
def _is_sm90(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) == (9, 0)


def hopper_forward(p: Problem, dtype: torch.dtype, device: torch.device, with_entropy: bool) -> bool:
    """Whether this forward takes the Gluon kernel of kernels/attention_fwd_hopper.py: on sm_90, for
    what it covers and where it measured faster than the Triton kernel (benchmarks/NOTES.md, "Gluon
    forward": D = 128 from 4k tokens; at D = 64 and at 1k tokens it ran slower)."""
    settings = tuning.current()
    return (not INTERPRET and device.type == "cuda" and settings.hopper_forward
            and settings.forward_config is None and min(p.lq, p.lk) >= settings.hopper_min_len
            and dtype in (torch.float16, torch.bfloat16) and p.head_dim == p.head_dim_v == 128
            and p.attn_mask is None and p.window is None and p.kv_lengths is None and not p.varlen
            and p.dropout_p == 0 and not with_entropy and _is_sm90(device.index))


@dataclass(slots=True)
class _Plan:
    launch: Launch  # the table's config (or tuning's forward_config), or the Hopper kernel
    autotuned: tuple | None  # (grid function, constexprs, scalars) when the autotuner serves eager calls
    copies: tuple[bool, bool, bool]  # q, k, v that TMA cannot read in place (copied per call)
    count_strides: tuple  # the count operand's strides (a fixed function of the shapes)
    operands: Operands | None  # the pointers of every call, when they are all dummies
    rows: Launch | None  # the Hopper kernel's row pre-pass (its row scales), None for the Triton kernel


def _build(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, p: Problem, out: torch.Tensor | None,
           with_entropy: bool) -> _Plan:
    """The plan of a new key, from the tensors of its first call."""
    copies = tuple(not tma_ready(t) for t in (query, key, value))
    q, k, v = (tma_operand(t) if copy else t for t, copy in zip((query, key, value), copies))
    out = new_output(p, q.dtype, torch.device("meta")) if out is None else out  # (its strides only)
    operands = operand_tensors(p, dummy(q.device))
    opt = launch_options(p, q.dtype, operands)
    tensor_strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                      v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2))
    operands_kept = None if needs_operand_tensors(p) else operands
    if hopper_forward(p, q.dtype, q.device, with_entropy):
        constexprs = {"HEAD_D": p.head_dim, "IS_CAUSAL": p.is_causal, "BLOCK_N": hopper.BLOCK_N,
                      "STAGES": hopper.STAGES}
        launch = Launch(
            variant(hopper.attention_fwd_hopper_kernel, constexprs, {"num_warps": hopper.PRODUCER_WARPS}),
            (cdiv(p.lq, hopper.ROWS), p.heads_q, p.batch),
            (*tensor_strides, p.heads_q, p.lq, p.lk, p.group), q.device)
        return _Plan(launch, None, copies, operands.count_strides, operands_kept, rows_launch(p, opt, q))
    scalars = (
        *tensor_strides, *opt.strides,
        p.heads_q, p.lq, p.lk, p.group, p.scale * LOG2E, opt.temp_a, opt.temp_b, *dropout_scalars(p),
        *opt.window, _bucket(p.rows), _bucket(p.keys),
    )
    meta = dict(opt.meta, SIGNED=opt.meta["TEMP_MODE"] == TEMP_TENSOR or p.scale < 0, ENTROPY=with_entropy)
    settings = tuning.current()
    cfg = dict(settings.forward_config or fwd_config(meta["BLOCK_D"], meta["BLOCK_DV"], p.keys, q.element_size(),
                                                      INTERPRET, dropout=p.dropout_p > 0,
                                                      masked=p.attn_mask is not None or p.window is not None))
    options = {name: cfg.pop(name) for name in ("num_warps", "num_stages") if name in cfg}
    grid = (cdiv(p.rows, cfg["BLOCK_M"]), p.heads_q, p.sequences)
    launch = Launch(variant(attention_fwd_kernel, {**meta, **cfg}, options), grid, scalars, q.device)
    autotuned = None
    if settings.autotune and not INTERPRET and settings.forward_config is None:
        rows, heads, sequences = p.rows, p.heads_q, p.sequences

        def autotune_grid(c: dict) -> tuple[int, int, int]:
            return cdiv(rows, c["BLOCK_M"]), heads, sequences

        autotuned = (autotune_grid, meta, scalars)
    return _Plan(launch, autotuned, copies, operands.count_strides, operands_kept, None)


def attention_forward(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, p: Problem, out: torch.Tensor | None = None,
    unit_key: torch.Tensor | None = None, seed: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. Returns the output (B, Hq, Lq, Dv) in the input dtype and the row
    statistics the backward needs, float32: the log-sum-exp in base 2 as (1, B, Hq, Lq) (+inf for rows
    that see no key), or under an additive mask (2, B, Hq, Lq), the row max and log2 of the row sum.
    ``out``, if given, is written in place (tests pass a NaN-poisoned one to catch unwritten elements).
    Under CosScale, ``unit_key`` is kernel_key's result if the caller already has it (the attention
    operator keeps it for the backward). With ``p.dropout_p > 0``, ``seed`` (dropout.draw_seed) picks
    the dropout mask; the log-sum-exp is that of the undropped probabilities. ``entropy``, if given
    ((2, B, Hq, Lq) float32), receives each row's attention entropy in nats and its largest probability
    (undropped; 0 and 0 for rows that see no key), computed in the same pass."""
    ensure_allocator()
    if p.cos_scale is not None:
        key = unit_key if unit_key is not None else kernel_key(key, p)[0]
    device = query.device
    plan_key = (
        query.shape, query.stride(), key.shape, key.stride(), value.shape, value.stride(), query.dtype, device,
        query.data_ptr() & 15, key.data_ptr() & 15, value.data_ptr() & 15,
        None if out is None else (out.stride(), out.dtype, out.data_ptr() & 15),
        None if entropy is None else (entropy.stride(), entropy.dtype, entropy.data_ptr() & 15),
        None if seed is None else (seed.dtype, seed.data_ptr() & 15), problem_key(p, query.dtype),
    )
    plan = _PLANS.get(plan_key, _build, query, key, value, p, out, entropy is not None)
    if plan.copies != (False, False, False):
        query, key, value = (tma_operand(t) if copy else t for t, copy in zip((query, key, value), plan.copies))
    out = new_output(p, query.dtype, device) if out is None else out
    lse = new_row_stats(p, device)
    base = dummy(device)
    operands = plan.operands
    if operands is None:
        operands = operand_tensors(p, base)
        if operands.count_strides != plan.count_strides:
            raise RuntimeError("internal error: the count operand's strides differ from the launch plan's")
    if plan.rows is not None:
        row_scale = workspace((p.batch * p.heads_q * p.lq,), device)[0]
        temp_t, count_t, _mask = operands.pointers
        plan.rows(base, base, query, base, row_scale, temp_t, count_t, *operands.extent)
        plan.launch(query, key, value, out, lse, row_scale)
        return out, lse
    stats = (entropy[0], entropy[1]) if entropy is not None else (base, base)
    pointers = (query, key, value, out, lse, lse[1] if lse.shape[0] == 2 else lse, *operands.pointers,
                dropout_seed(p, seed, base), *operands.extent, *stats)
    if plan.autotuned is not None and not (query.is_cuda and torch.cuda.is_current_stream_capturing()):
        # (never inside a CUDA-graph capture: the autotuner's timing runs would be captured too)
        grid, meta, scalars = plan.autotuned
        attention_fwd_autotuned[grid](*pointers, *scalars, **meta)
    else:
        plan.launch(*pointers)
    return out, lse
