"""KV-cache decoding (flash-decoding), forward only: validation, the split heuristic, the launches."""

from __future__ import annotations

import dataclasses
import functools
import numbers

import torch
import triton

from . import ops
from .empty import nothing_to_compute
from .forward import LOG2E, _ensure_allocator, _tma_ready, launch_options
from .kernels.attention_decode import decode_combine_kernel, decode_config, decode_split_kernel
from .validation import Problem, check_inputs, interpreter_active

MAX_QUERY_ROWS = 16  # Lq per sequence: the packed tile rows are GROUP * Lq
MAX_SPLITS = 256
# Split heuristic: aim at WAVES programs per SM, each with at least MIN_TILES_PER_SPLIT key tiles
# (fewer would spend more on the prologue and the combine than they save).
WAVES = 2
MIN_TILES_PER_SPLIT = 4
H100_SMS = 132  # stand-in for the interpreter, which has no device to ask
COMBINE_BLOCK_S = 32

# A fixed split-kernel config (BLOCK_M, BLOCK_N, num_warps, num_stages, and optionally TMA: bool, else
# TMA wherever the caches allow it) that bypasses the default: set by tests and by benchmarks/bench_decode.py --configs.
CONFIG_OVERRIDE: dict | None = None


def decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    kv_lengths: torch.Tensor | None = None,
    *,
    is_causal: bool = True,
    scale: float | None = None,
    temperature: str | torch.Tensor | None = None,
    train_len: int | None = None,
    cos_scale: float | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    r"""Attention of the newest ``Lq`` query positions against a KV cache (flash-decoding), inference only.

    Computes ``softmax(t_i * c * q_i . k_j) @ v`` over the valid cache keys row i sees, splitting the
    keys over many programs (so that a single sequence still fills the GPU) and merging the splits
    with a log-sum-exp combine. Each key/value tile is read once for all the query heads sharing it.

    Shapes: query ``(B, Hq, Lq, D)`` with ``Lq <= 16``; key_cache ``(B, Hkv, Lk, D)``; value_cache
    ``(B, Hkv, Lk, Dv)``; returns ``(B, Hq, Lq, Dv)`` in the input dtype. ``Hq`` must be a multiple of
    ``Hkv`` (grouped-query attention; the cache is never copied). Any strides with a unit last stride
    work for the caches, e.g. a ``(B, Lk, Hkv, D)`` buffer transposed; query may have any strides.

    Args:
        query, key_cache, value_cache: float16, bfloat16 or float32 CUDA tensors, ``16 <= D, Dv <= 256``.
        kv_lengths: int32 or int64 ``(B,)`` tensor on the query's device: the valid cache length
            ``len_b`` of each sequence (keys ``[0, len_b)``); default ``Lk`` for all. Not checked
            against the cache (that needs a host sync): values are clamped to ``[0, Lk]`` in the kernel.
        is_causal: the Lq query rows are the last Lq positions of the valid cache: row i sees keys
            ``j <= len_b - Lq + i`` (bottom-right)::

                Lq=2, len_b=5, Lk=7:   1 1 1 1 0 . .
                                       1 1 1 1 1 . .     (. = beyond len_b, never read into the result)

            Without it every row sees all ``len_b`` keys. A row that sees no key (``len_b - Lq + i < 0``
            or ``len_b = 0``, or an empty cache, ``Lk = 0``) returns zeros.
        scale: ``c``; default ``1/sqrt(D)``. Must be None with ``cos_scale``.
        temperature: None; ``"infoscale"``: ``t_i = sqrt((1 - n_i^(-2/D)) / (1 - N^(-2/D)))``;
            ``"logn"``: ``t_i = ln(n_i) / ln(N)``; ``"infoscale_clipped"`` / ``"logn_clipped"``:
            ``max(1, t_i)``; or a float tensor of per-row multipliers broadcastable to (B, Hq, Lq).
            ``n_i`` is the number of keys row i sees (its visible cache length).
        train_len: ``N``, the training length (int >= 2); required by the string temperatures.
        cos_scale: ``s`` for CosScale: q and k rows are L2-normalised (K tile by tile as it is read,
            no extra pass over the cache) and the logit is ``t_i * s * cos(q_i, k_j)``. A zero row has
            zero cosines.
        num_splits: how many programs share one sequence's keys (>= 1). Default: chosen from the
            shapes only (B * Hkv, Lk and the GPU's SM count, never kv_lengths' values), so calls are
            free of host syncs and CUDA-graph capturable.

    Raises:
        ValueError / TypeError naming the argument for bad input, before any launch.
        NotImplementedError if an input requires grad while grad mode is on: decoding is inference-only.
    """
    p = check_decode_inputs(query, key_cache, value_cache, kv_lengths, is_causal, scale, temperature,
                            train_len, cos_scale, num_splits)
    refuse_grad(query=query, key_cache=key_cache, value_cache=value_cache, temperature=temperature)
    if nothing_to_compute(p):  # Lk = 0: every row sees no key
        return query.new_zeros(p.batch, p.heads_q, p.lq, p.head_dim_v)
    return ops.decode(query, key_cache, value_cache, p, num_splits)


def refuse_grad(**tensors: object) -> None:
    if not torch.is_grad_enabled():
        return
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.requires_grad:
            raise NotImplementedError(
                f"{name} requires grad: decode_attention is inference-only (no backward); call it under "
                "torch.no_grad() or torch.inference_mode(), or pass detached tensors "
                "(infoscale_triton.scaled_dot_product_attention trains)")


def check_decode_inputs(
    query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, kv_lengths: torch.Tensor | None,
    is_causal: bool, scale: float | None, temperature: str | torch.Tensor | None, train_len: int | None,
    cos_scale: float | None, num_splits: int | None,
) -> Problem:
    """Validate one decode call: the decode-specific limits here, the rest through
    validation.check_inputs (with the caches' own names in its messages)."""
    p = check_inputs(query, key_cache, value_cache, None, 0.0, is_causal, scale, True, temperature, train_len,
                     cos_scale, kernel=True, kv_lengths=kv_lengths, names=("query", "key_cache", "value_cache"))
    for name, t in (("key_cache", key_cache), ("value_cache", value_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a unit last stride (contiguous head_dim), got strides "
                             f"{tuple(t.stride())}")
    if p.lq > MAX_QUERY_ROWS:
        raise ValueError(f"query has Lq={p.lq} positions; decode_attention takes 1 to {MAX_QUERY_ROWS} per "
                         "sequence (use infoscale_triton.scaled_dot_product_attention for a prefill)")
    if num_splits is not None and (not isinstance(num_splits, numbers.Integral) or isinstance(num_splits, bool)
                                   or not 1 <= num_splits <= MAX_SPLITS):
        raise ValueError(f"num_splits must be None or an int in [1, {MAX_SPLITS}], got {num_splits!r}")
    return p


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
    tiles = triton.cdiv(lk, block_n)
    wanted = triton.cdiv(WAVES * _sm_count(device), programs)
    splits = max(1, min(wanted, tiles // MIN_TILES_PER_SPLIT, MAX_SPLITS))
    return triton.cdiv(tiles, triton.cdiv(tiles, splits))


def split_plan(p: Problem, block_d: int, block_dv: int, elsize: int, device: torch.device,
               num_splits: int | None = None) -> tuple[dict, int, int]:
    """decode_forward's (split-kernel config, row blocks per kv head, splits per sequence)."""
    rows = p.group * p.lq  # packed rows per kv head
    cfg = dict(CONFIG_OVERRIDE or decode_config(block_d, block_dv, rows, elsize, interpreter_active()))
    row_blocks = triton.cdiv(rows, cfg["BLOCK_M"])
    splits = num_splits or choose_splits(p.batch, p.heads_kv, row_blocks, p.lk, cfg["BLOCK_N"], device)
    return cfg, row_blocks, splits


def decode_forward(
    query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, p: Problem,
    num_splits: int | None = None, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch the split kernel (and the combine unless there is one split) for the cache lengths
    ``p.kv_lengths``. ``out``, if given, is written in place (tests pass a NaN-poisoned one)."""
    _ensure_allocator()
    q, k, v = query, key_cache, value_cache
    device = q.device
    if out is None:
        out = torch.empty(p.batch, p.heads_q, p.lq, p.head_dim_v, dtype=q.dtype, device=device)
    dummy = torch.empty(1, dtype=torch.float32, device=device)
    kv_lengths = p.kv_lengths
    # the split kernel reads kv_lengths itself: no dense key-range tensors to build on this hot path
    opt = launch_options(dataclasses.replace(p, kv_lengths=None), q.dtype, dummy)
    meta = {name: opt.meta[name] for name in
            ("HEAD_D", "HEAD_DV", "BLOCK_D", "BLOCK_DV", "IS_CAUSAL", "TEMP_MODE", "CLIP", "COS", "DOT_PREC")}

    cfg, row_blocks, splits = split_plan(p, meta["BLOCK_D"], meta["BLOCK_DV"], q.element_size(), device,
                                         num_splits)
    tma = cfg.pop("TMA", None)
    if tma is None:
        tma = _tma_ready(k) and _tma_ready(v)
    direct = splits == 1
    if direct:
        acc_ws = max_ws = sum_ws = dummy
    else:
        n_rows = p.batch * p.heads_q * p.lq
        acc_ws = torch.empty(n_rows, splits, p.head_dim_v, dtype=torch.float32, device=device)
        max_ws = torch.empty(n_rows, splits, dtype=torch.float32, device=device)
        sum_ws = torch.empty(n_rows, splits, dtype=torch.float32, device=device)
    lengths = kv_lengths if kv_lengths is not None else dummy
    decode_split_kernel[(splits, p.heads_kv * row_blocks, p.batch)](
        q, k, v, out, acc_ws, max_ws, sum_ws, lengths, opt.pointers[0],
        *q.stride(), *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *opt.strides[:3],
        lengths.stride(0),
        p.heads_q, p.lq, p.lk, p.group, row_blocks, splits, p.scale * LOG2E, opt.temp_a, opt.temp_b,
        **meta, HAS_LENGTHS=kv_lengths is not None, DIRECT=direct, TMA=tma, **cfg,
    )
    if not direct:
        decode_combine_kernel[(p.batch * p.heads_q * p.lq,)](
            acc_ws, max_ws, sum_ws, out, *out.stride()[:3], p.heads_q, p.lq, splits,
            HEAD_DV=p.head_dim_v, BLOCK_DV=meta["BLOCK_DV"],
            BLOCK_S=min(triton.next_power_of_2(splits), COMBINE_BLOCK_S),
        )
    return out
