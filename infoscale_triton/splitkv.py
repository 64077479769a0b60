"""Host side of the split-KV decode (flash-decoding, kernels/attention_decode.py): the split heuristic,
a launch plan per problem, the split and combine launches."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from . import tuning
from .kernels.attention_decode import decode_combine_kernel, decode_config, decode_split_kernel
from .launch import (
    INTERPRET,
    LOG2E,
    Launch,
    PlanCache,
    cdiv,
    dummy,
    ensure_allocator,
    tensor_key,
    tma_ready,
    variant,
    workspace,
)
from .operands import Operands, launch_options, operand_tensors
from .validation import Problem

MAX_QUERY_ROWS = 16  # Lq per sequence: the packed tile rows are GROUP * Lq
MAX_SPLITS = 256
# Split heuristic: aim at WAVES programs per SM, each with at least MIN_TILES_PER_SPLIT key tiles
# (fewer would spend more on the prologue and the combine than they save).
WAVES = 2
MIN_TILES_PER_SPLIT = 4
H100_SMS = 132  # stand-in for the interpreter, which has no device to ask
COMBINE_BLOCK_S = 32
_META = ("HEAD_D", "HEAD_DV", "BLOCK_D", "BLOCK_DV", "IS_CAUSAL", "TEMP_MODE", "CLIP", "HAS_COUNT", "COS",
         "MASK_MODE", "DOT_PREC")

_PLANS = PlanCache()


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return H100_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_splits(batch: int, heads_kv: int, row_blocks: int, lk: int, block_n: int,
                  device: torch.device) -> int:
    """Splits per sequence from the shapes alone: about WAVES programs per SM, never fewer than
    MIN_TILES_PER_SPLIT tiles of the longest possible cache per split, and no more splits than that
    many tiles each needs (a full cache then leaves no split empty)."""
    programs = batch * heads_kv * row_blocks
    tiles = cdiv(lk, block_n)
    wanted = cdiv(WAVES * _sm_count(device), programs)
    splits = max(1, min(wanted, tiles // MIN_TILES_PER_SPLIT, MAX_SPLITS))
    return cdiv(tiles, cdiv(tiles, splits))


def _split_config(p: Problem, block_d: int, block_dv: int, elsize: int) -> tuple[dict, int]:
    """The split kernel's config and its row blocks per kv head (the GQA rows packed into tiles)."""
    rows = p.group * p.lq  # packed rows per kv head
    cfg = dict(tuning.current().decode_config or decode_config(block_d, block_dv, rows, elsize, INTERPRET))
    return cfg, cdiv(rows, cfg["BLOCK_M"])


def split_plan(p: Problem, block_d: int, block_dv: int, elsize: int, device: torch.device,
               num_splits: int | None = None) -> tuple[dict, int, int]:
    """decode_forward's (split-kernel config, row blocks per kv head, splits per sequence)."""
    cfg, row_blocks = _split_config(p, block_d, block_dv, elsize)
    splits = num_splits or choose_splits(p.batch, p.heads_kv, row_blocks, p.lk, cfg["BLOCK_N"], device)
    return cfg, row_blocks, splits


@dataclass(slots=True)
class _Plan:
    split: Launch
    combine: Launch | None  # None with one split: the split kernel writes the output (DIRECT)
    workspace: tuple[int, int, int]  # elements of the partial outputs, maxima and sums


@dataclass(slots=True)
class _Layout:
    """What a plan needs that no cache length changes: a decoding loop with a growing cache makes a new
    plan per length, and builds it from this (kept per _LAYOUTS key) instead of from the Problem."""

    meta: dict
    cfg: dict  # the split kernel's block constexprs
    options: dict  # num_warps, num_stages
    tma: bool
    row_blocks: int
    out_strides: tuple
    operand_strides: tuple  # the Temp, Count (B, Hq, Lq) and Mask (B, Hq, Lq, Lk) broadcast strides
    lengths_stride: int
    temp_a: float
    temp_b: float


_LAYOUTS = PlanCache(size=64)


def _layout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Problem, out: torch.Tensor | None) -> _Layout:
    device = q.device
    base = dummy(device)
    opt = launch_options(p, q.dtype, _operands(p, base))
    meta = {name: opt.meta[name] for name in _META}
    cfg, row_blocks = _split_config(p, meta["BLOCK_D"], meta["BLOCK_DV"], q.element_size())
    tma = cfg.pop("TMA", None)
    if tma is None:
        tma = tma_ready(k) and tma_ready(v)
    options = {name: cfg.pop(name) for name in ("num_warps", "num_stages") if name in cfg}
    out_strides = (out if out is not None else torch.empty(p.batch, p.heads_q, p.lq, p.head_dim_v,
                                                           device="meta")).stride()[:3]
    lengths_stride = p.kv_lengths.stride(0) if p.kv_lengths is not None else base.stride(0)
    return _Layout(meta, cfg, options, tma, row_blocks, out_strides, opt.strides, lengths_stride, opt.temp_a,
                   opt.temp_b)


def _operands(p: Problem, base: torch.Tensor) -> Operands:
    # the split kernel reads kv_lengths itself: no key-range tensors
    return operand_tensors(p, base, key_padding=False)


def _build(k: torch.Tensor, v: torch.Tensor, q_strides: tuple, p: Problem, num_splits: int | None,
           lay: _Layout) -> _Plan:
    device = k.device
    splits = num_splits or choose_splits(p.batch, p.heads_kv, lay.row_blocks, p.lk, lay.cfg["BLOCK_N"], device)
    direct = splits == 1
    split = Launch(
        variant(decode_split_kernel, {**lay.meta, "HAS_LENGTHS": p.kv_lengths is not None, "DIRECT": direct,
                                      "TMA": lay.tma, **lay.cfg}, lay.options),
        (splits, p.heads_kv * lay.row_blocks, p.batch),
        (*q_strides, *k.stride()[:3], *v.stride()[:3], *lay.out_strides, *lay.operand_strides,
         lay.lengths_stride, p.heads_q, p.lq, p.lk, p.group, lay.row_blocks, splits, p.scale * LOG2E,
         lay.temp_a, lay.temp_b),
        device)
    n_rows = p.batch * p.heads_q * p.lq
    combine = None if direct else Launch(
        variant(decode_combine_kernel, {"HEAD_DV": p.head_dim_v, "BLOCK_DV": lay.meta["BLOCK_DV"],
                                        "BLOCK_S": min(1 << (splits - 1).bit_length(), COMBINE_BLOCK_S)}, {}),
        (n_rows, 1, 1), (*lay.out_strides, p.heads_q, p.lq, splits), device)
    return _Plan(split, combine, (n_rows * splits * p.head_dim_v, n_rows * splits, n_rows * splits))


def _plan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Problem, num_splits: int | None,
          out: torch.Tensor | None, layout_key: tuple, q_strides: tuple) -> _Plan:
    return _build(k, v, q_strides, p, num_splits, _LAYOUTS.get(layout_key, _layout, q, k, v, p, out))


def decode_forward(
    query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, p: Problem,
    num_splits: int | None = None, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch the split kernel (and the combine unless there is one split) for the cache lengths
    ``p.kv_lengths``. ``out``, if given, is written in place (tests pass a NaN-poisoned one)."""
    ensure_allocator()
    q, k, v = query, key_cache, value_cache
    device = q.device
    lengths, temperature = p.kv_lengths, p.temperature_tensor
    q_strides, k_strides, v_strides = q.stride(), k.stride(), v.stride()
    # everything but the cache length and the caches' strides, which grow with it
    layout_key = (
        q.shape, q_strides, k.shape[:2], k.shape[3], v.shape[:2], v.shape[3], q.dtype, device,
        q.data_ptr() & 15, k.data_ptr() & 15, v.data_ptr() & 15, tma_ready(k) and tma_ready(v),
        None if out is None else (out.stride(), out.dtype, out.data_ptr() & 15),
        None if lengths is None else (lengths.dtype, lengths.stride(), lengths.data_ptr() & 15),
        None if temperature is None else (temperature.shape, temperature.stride(), temperature.dtype,
                                          temperature.data_ptr() & 15),
        tensor_key(p.attn_mask),
        p.is_causal, p.scale, p.temperature, p.train_len, p.cos_scale,
        q.dtype is torch.float32 and torch.backends.cuda.matmul.allow_tf32,
    )
    plan_key = (layout_key, p.lk, k_strides, v_strides, num_splits)
    plan = _PLANS.get(plan_key, _plan, q, k, v, p, num_splits, out, layout_key, q_strides)
    if out is None:
        out = torch.empty(p.batch, p.heads_q, p.lq, p.head_dim_v, dtype=q.dtype, device=device)
    base = dummy(device)
    if lengths is None:
        lengths = base
    if p.attn_mask is not None:
        temperature, count, mask = _operands(p, base).pointers
    else:
        count = mask = base
        if temperature is None:
            temperature = base
    if plan.combine is None:
        plan.split(q, k, v, out, base, base, base, lengths, temperature, count, mask)
    else:
        acc, maxima, sums = workspace(plan.workspace, device)
        plan.split(q, k, v, out, acc, maxima, sums, lengths, temperature, count, mask)
        plan.combine(acc, maxima, sums, out)
    return out
