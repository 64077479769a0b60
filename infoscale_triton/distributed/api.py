"""Context parallelism: attention over a sequence sharded across the ranks of a process group."""

from __future__ import annotations

import numbers

import torch
import torch.distributed as dist

from ..attention import scaled_dot_product_attention
from ..temperature import TEMPERATURE_CHOICES, row_temperature
from ..validation import Problem, check_inputs
from .all_to_all import HeadsToSequence, SequenceToHeads
from .checks import Fact, agree, check_device, float_fact, process_group, shape_of
from .layout import LAYOUTS, chunk_count, global_positions, join, split
from .ring import Ring, RingAttention

METHODS = ("ring", "all_to_all")


def _check_layout(layout: object) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(map(repr, LAYOUTS))}, got {layout!r}")


def _check_dim(x: object, dim: object, name: str) -> int:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(dim, numbers.Integral) or isinstance(dim, bool) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be an int in [{-x.dim()}, {x.dim()}) for {name} of shape "
                         f"{tuple(x.shape)}, got {dim!r}")
    return int(dim) % x.dim()


def shard_sequence(x: torch.Tensor, dim: int, group: object = None, *,
                   layout: str = "zigzag") -> torch.Tensor:
    """This rank's part of the full tensor ``x`` (the same on every rank) along ``dim``, as a new tensor:
    ``"zigzag"``: of 2·W equal chunks, chunks r and 2W-1-r; ``"contiguous"``: of W, chunk r. The
    length along ``dim`` must divide into them. Differentiable; no communication. ``group``: a
    process group, a 1-D DeviceMesh, or None for the default group."""
    group = process_group(group)
    _check_layout(layout)
    dim = _check_dim(x, dim, "x")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    parts = chunk_count(world, layout)
    if x.shape[dim] % parts:
        raise ValueError(f"x: layout={layout!r} cuts dim {dim} into {parts} equal chunks for {world} ranks, "
                         f"but its length {x.shape[dim]} is not divisible by {parts}")
    return split(x, dim, rank, world, layout)


def unshard_sequence(x_local: torch.Tensor, dim: int, group: object = None, *,
                     layout: str = "zigzag") -> torch.Tensor:
    """The full tensor from every rank's shard ``x_local`` (shard_sequence's inverse), on every rank:
    one all_gather. Not differentiable. Every rank must pass a shard of the same shape."""
    group = process_group(group)

    def local_checks() -> None:
        _check_layout(layout)
        _check_dim(x_local, dim, "x_local")
        check_device("x_local", x_local, group)

    agree(group, local_checks, [
        Fact("x_local", "the shard's shape", shape_of(x_local)),
        Fact("dim", "the value", (dim,) if isinstance(dim, int) else ()),
        Fact("layout", "the value", (LAYOUTS.index(layout),) if layout in LAYOUTS else ()),
    ])
    dim = int(dim) % x_local.dim()
    world = dist.get_world_size(group)
    shard = x_local.detach().contiguous()
    gathered = [torch.empty_like(shard) for _ in range(world)]
    dist.all_gather(gathered, shard, group=group)
    return join(gathered, dim, layout)


def context_parallel_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    group: object = None,
    *,
    method: str = "ring",
    layout: str = "zigzag",
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    temperature: str | torch.Tensor | None = None,
    train_len: int | None = None,
    cos_scale: float | None = None,
    kv_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Attention over a sequence sharded across the ranks of ``group``: the same result as
    :func:`infoscale_triton.scaled_dot_product_attention` on the full tensors, sharded like the query.

    Every argument means what it means there, for the whole sequence: ``n_i`` (InfoScale, logn) counts
    the keys row i sees in the whole sequence (its global position under ``is_causal``, the full key
    length, ``kv_lengths``), never those of one shard.

    Args:
        query, key, value: this rank's shards along the sequence (dim 2 of (B, H, L, D)), as
            :func:`shard_sequence` with the same ``layout`` gives them; every rank's of the same shape,
            on the rank's current CUDA device (or the CPU with a gloo group and the Triton interpreter).
        group: a process group, a 1-D DeviceMesh, or None for the default group.
        method: ``"ring"``: K/V shards travel around the ring by P2P (overlapped with compute), partial
            results merge through each row's log-sum-exp; ``is_causal`` then needs query and key of one
            length. ``"all_to_all"`` (DeepSpeed Ulysses): heads are scattered and the sequence gathered,
            each rank runs the single-GPU kernel on the whole sequence for H/W of the heads; needs
            query and key/value heads divisible by W.
        layout: ``"zigzag"`` (default; balances causal work: rank r holds chunks r and 2W-1-r of 2·W)
            or ``"contiguous"`` (rank r holds chunk r of W).
        temperature: a string as in the single-GPU function (train_len required), or a tensor of
            per-row multipliers for this rank's rows, broadcastable to (B, Hq, L_local) (sharded like
            the query; it gets a gradient, for this rank's rows: reduce it across ranks yourself if it
            is shared).
        kv_lengths: global key padding (B,), the same tensor on every rank.

    Returns:
        This rank's shard of the output, (B, Hq, L_local, Dv), in the inputs' dtype. Differentiable in
        query, key, value and a tensor temperature; deterministic (the same bits on every run).

    Raises:
        ValueError / TypeError naming the argument, on every rank alike and before any communication
        but one small all_gather: bad input on any rank, shards whose shapes or options differ across
        ranks, a length the layout cannot split, an uninitialised process group, tensors off the
        rank's current device.
    """
    group = process_group(group)
    world, rank = dist.get_world_size(group), dist.get_rank(group)

    def local_checks() -> Problem:
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
        _check_layout(layout)
        p = check_inputs(query, key, value, None, 0.0, is_causal, scale, enable_gqa, temperature, train_len,
                         cos_scale, kernel=True, kv_lengths=kv_lengths)
        check_device("query", query, group)
        parts = chunk_count(world, layout) // world
        for name, n in (("query", p.lq), ("key", p.lk)):
            if n % parts:
                raise ValueError(f"{name}: layout='zigzag' cuts the sequence into 2·W = {2 * world} chunks, "
                                 f"but its length {n * world} ({n} per rank) is not divisible by {2 * world}")
        if method == "ring" and is_causal and p.lq != p.lk:
            raise ValueError(f"is_causal with method='ring' needs query and key of one sequence length, "
                             f"got {p.lq * world} and {p.lk * world} (method='all_to_all' aligns them "
                             "bottom-right)")
        if method == "all_to_all" and (p.heads_q % world or p.heads_kv % world):
            raise ValueError(f"query: method='all_to_all' splits the heads across {world} ranks, but query "
                             f"has {p.heads_q} heads and key/value {p.heads_kv}: both must be divisible by "
                             f"{world}")
        return p

    string_temperature = temperature if isinstance(temperature, str) else None
    p = agree(group, local_checks, [
        Fact("query", "the shard's shape", shape_of(query)),
        Fact("key", "the shard's shape", shape_of(key)),
        Fact("value", "the shard's shape", shape_of(value)),
        Fact("query", "the dtype", (_dtype_code(query),)),
        Fact("method", "the value", (METHODS.index(method),) if method in METHODS else (-1,)),
        Fact("layout", "the value", (LAYOUTS.index(layout),) if layout in LAYOUTS else (-1,)),
        Fact("is_causal", "the value", (int(bool(is_causal)),)),
        Fact("enable_gqa", "the value", (int(bool(enable_gqa)),)),
        float_fact("scale", "the value", scale if isinstance(scale, (int, float)) else None),
        float_fact("cos_scale", "the value", cos_scale if isinstance(cos_scale, (int, float)) else None),
        Fact("temperature", "the kind or shape", _temperature_fact(temperature)),
        Fact("train_len", "the value", (train_len,) if isinstance(train_len, int) else ()),
        Fact("kv_lengths", "the shape", shape_of(kv_lengths)),
    ])
    if world == 1:
        return scaled_dot_product_attention(query, key, value, is_causal=is_causal, scale=scale,
                                            enable_gqa=enable_gqa, temperature=temperature,
                                            train_len=train_len, cos_scale=cos_scale, kv_lengths=kv_lengths)
    if method == "all_to_all":
        return _all_to_all(query, key, value, group, layout, is_causal, scale, enable_gqa, temperature,
                           train_len, cos_scale, kv_lengths, p)

    row_temperature_t = temperature if isinstance(temperature, torch.Tensor) else None
    if string_temperature is not None:
        row_temperature_t = _global_temperature(p, rank, world, layout, kv_lengths, query.device)
    ring = Ring(group, rank, world, layout, p, query.dtype, kv_lengths, row_temperature_t)
    tensor_temperature = temperature if isinstance(temperature, torch.Tensor) else None
    return RingAttention.apply(query, key, value, tensor_temperature, ring)


def _dtype_code(t: object) -> int:
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    return dtypes.index(t.dtype) if isinstance(t, torch.Tensor) and t.dtype in dtypes else -1


def _temperature_fact(temperature: object) -> tuple[int, ...]:
    if isinstance(temperature, str):
        return (TEMPERATURE_CHOICES.index(temperature),) if temperature in TEMPERATURE_CHOICES else (-1,)
    if isinstance(temperature, torch.Tensor):
        return (100, *temperature.shape)[:7]
    return ()


def _global_temperature(p: Problem, rank: int, world: int, layout: str, kv_lengths: torch.Tensor | None,
                        device: torch.device) -> torch.Tensor:
    """t_i of this rank's rows from their global n_i, float32 (B or 1, 1, L_local): what the single-GPU
    kernel computes from n_i, computed here so that each ring block uses the row's real n_i whatever
    keys it sees. n_i: the row's global position + 1 under is_causal (query and key of one length),
    the whole key length otherwise, capped by kv_lengths."""
    lk = p.lk * world
    if p.is_causal:
        n = global_positions(rank, world, layout, p.lq, device) + 1
    else:
        n = torch.full((p.lq,), lk, dtype=torch.int64, device=device)
    n = n[None, :]
    if kv_lengths is not None:
        n = torch.minimum(n, kv_lengths.to(torch.int64).clamp(0, lk)[:, None])
    t = row_temperature(n.to(torch.float32), p.temperature, p.train_len, p.head_dim)
    return t.unsqueeze(1)


def _all_to_all(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, group: dist.ProcessGroup,
                layout: str, is_causal: bool, scale: float | None, enable_gqa: bool,
                temperature: str | torch.Tensor | None, train_len: int | None, cos_scale: float | None,
                kv_lengths: torch.Tensor | None, p: Problem) -> torch.Tensor:
    q, k, v = (SequenceToHeads.apply(t, group, layout) for t in (query, key, value))
    if isinstance(temperature, torch.Tensor):
        rows = temperature.expand(p.batch, p.heads_q, p.lq).unsqueeze(-1)
        temperature = SequenceToHeads.apply(rows, group, layout).squeeze(-1)
    out = scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa,
                                       temperature=temperature, train_len=train_len, cos_scale=cos_scale,
                                       kv_lengths=kv_lengths)
    return HeadsToSequence.apply(out, group, layout)
