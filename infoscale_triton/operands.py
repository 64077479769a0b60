"""What the attention kernels of every pass share on the host: the per-row temperature, attn_mask and
key-padding operands with their mode codes, the CosScale unit keys, and the dropout arguments.

:func:`launch_options` is split the way the launch plans need it: the constexprs, strides and scalars
follow from the problem's shapes and options (a plan computes them once), while
:func:`operand_tensors` makes the pointers of one call, some of them from the values of the mask or
the lengths (device work, never a host synchronisation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kernels import primitives as codes
from .kernels.norms import unit_rows_kernel
from .launch import Launch, PlanCache, cdiv, next_power_of_2, tensor_key, variant
from .masks import allowed_keys
from .temperature import TemperatureSpec, kernel_constants
from .validation import Problem

# The kernels' mode codes (kernels/primitives.py), as the host passes them.
TEMP_NONE, TEMP_INFOSCALE, TEMP_LOGN, TEMP_TENSOR = (
    codes.TEMP_NONE.value, codes.TEMP_INFOSCALE.value, codes.TEMP_LOGN.value, codes.TEMP_TENSOR.value)
MASK_NONE, MASK_BOOL, MASK_ADD = codes.MASK_NONE.value, codes.MASK_BOOL.value, codes.MASK_ADD.value


def temperature_mode(spec: TemperatureSpec | None, tensor: torch.Tensor | None) -> int:
    """The kernels' TEMP_MODE for a problem's temperature."""
    if tensor is not None:
        return TEMP_TENSOR
    if spec is None:
        return TEMP_NONE
    return TEMP_INFOSCALE if spec.kind == "infoscale" else TEMP_LOGN


_UNIT_ROWS = PlanCache(64)


def _unit_rows_launch(x: torch.Tensor) -> Launch:
    b, h, n, d = x.shape
    block_l = 64
    constexprs = {"HEAD_D": d, "BLOCK_L": block_l, "BLOCK_D": next_power_of_2(d)}
    return Launch(variant(unit_rows_kernel, constexprs, {}), (cdiv(n, block_l), h, b), (*x.stride(), h, n), x.device)


def unit_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x / ||x|| along the last dim as a contiguous tensor of x's dtype, and 1/||x|| as float32
    (both 0 for zero rows)."""
    b, h, n, d = x.shape
    unit = torch.empty(b, h, n, d, dtype=x.dtype, device=x.device)
    inv = torch.empty(b, h, n, dtype=torch.float32, device=x.device)
    _UNIT_ROWS.get((x.shape, x.stride(), x.dtype, x.device, x.data_ptr() & 15), _unit_rows_launch, x)(x, inv, unit)
    return unit, inv


def kernel_key(key: torch.Tensor, p: Problem) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The K the attention kernels read and, under CosScale, 1/||k_j|| (float32): the unit rows from
    the pre-pass (q is normalised inside the kernels, from the tile they load anyway). Without
    CosScale, key itself and None."""
    return unit_rows(key) if p.cos_scale is not None else (key, None)


def dropout_scalars(p: Problem) -> tuple[float, float]:
    """The kernels' (dropout_p, 1 / (1 - dropout_p)) arguments."""
    return (p.dropout_p, 1.0 / (1.0 - p.dropout_p)) if p.dropout_p > 0 else (0.0, 1.0)


def dropout_seed(p: Problem, seed: torch.Tensor | None, dummy: torch.Tensor) -> torch.Tensor:
    """The kernels' Seed argument: with dropout on, ``seed``, the call's dropout.draw_seed tensor (the
    forward and its backward must get the same one), after checking it; else ``dummy``."""
    if p.dropout_p == 0:
        return dummy
    if seed is None or seed.dtype != torch.int64 or seed.numel() != 1 or seed.device != dummy.device:
        raise ValueError(f"dropout_p={p.dropout_p} needs the call's seed: a one-element int64 tensor on "
                         f"{dummy.device} (infoscale_triton.dropout.draw_seed), got {seed!r}")
    return seed


def _broadcast_strides(t: torch.Tensor, shape: tuple[int, ...]) -> tuple[int, ...]:
    return t.expand(shape).stride()


def _key_only(mask: torch.Tensor, p: Problem) -> bool:
    """A boolean mask that is the same for every head and query row: key padding, (B, 1, 1, Lk)."""
    if mask.dtype != torch.bool:
        return False
    strides = _broadcast_strides(mask, (p.batch, p.heads_q, p.lq, p.lk))
    # a stride along an extent of 1 is never used: transformers' decoding masks are (B, 1, 1, Lk) with Lq = 1
    return all(stride == 0 or extent == 1 for stride, extent in zip(strides[1:3], (p.heads_q, p.lq)))


def _row_key_bounds(p: Problem, kv_lo: torch.Tensor, kv_hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[lo_i, hi_i) of primitives.visible_keys for every row, (B, Lq) int64, from (B, 1) key ranges."""
    diag = torch.arange(p.lq, device=kv_lo.device)[None, :] + (p.lk - p.lq)
    lo, hi = kv_lo.expand(-1, p.lq), kv_hi.expand(-1, p.lq)
    if p.is_causal:
        hi = torch.minimum(hi, diag + 1)
    if p.window is not None:
        left, right = p.window
        if left >= 0:
            lo = torch.maximum(lo, diag - left)
        if right >= 0:
            hi = torch.minimum(hi, diag + right + 1)
    return lo, hi


def _key_padding(p: Problem, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Key padding as the kernels take it: (B, 2) int32 ranges [first, end) of the keys that may be
    seen (from kv_lengths and/or a key-only boolean mask: tiles outside are skipped), and, when a
    string temperature needs n_i under a key-only mask, its counts (B, Lq) from a prefix sum over the
    keys, without a (Lq, Lk) mask in memory. Both None when neither is given."""
    mask = p.attn_mask if p.attn_mask is not None and _key_only(p.attn_mask, p) else None
    if p.kv_lengths is None and mask is None:
        return None, None
    b = p.batch
    lo = torch.zeros(b, 1, dtype=torch.int64, device=device)
    hi = torch.full((b, 1), p.lk, dtype=torch.int64, device=device)
    if p.kv_lengths is not None:
        hi = p.kv_lengths.to(torch.int64).clamp(0, p.lk).view(b, 1)
    counts = None
    if mask is not None:
        keys = mask.expand(b, 1, 1, p.lk).reshape(b, p.lk)
        some = keys.any(-1, keepdim=True)
        first = keys.to(torch.uint8).argmax(-1, keepdim=True)
        end = p.lk - keys.flip(-1).to(torch.uint8).argmax(-1, keepdim=True)
        lo = torch.where(some, torch.maximum(lo, first), hi)
        hi = torch.where(some, torch.minimum(hi, end), hi)
        if p.temperature is not None:
            prefix = torch.nn.functional.pad(keys.to(torch.int32).cumsum(-1, dtype=torch.int32), (1, 0))
            row_lo, row_hi = _row_key_bounds(p, lo, hi)
            row_lo = row_lo.clamp(0, p.lk)
            row_hi = torch.maximum(row_hi.clamp(0, p.lk), row_lo)
            counts = (prefix.gather(1, row_hi) - prefix.gather(1, row_lo)).to(torch.int32)
    return torch.cat([lo, hi], 1).to(torch.int32), counts


def _mask_counts(p: Problem, device: torch.device) -> torch.Tensor:
    """n_i under an attn_mask, int32, broadcastable to (B, Hq, Lq). When every row of the mask sees
    the same key range before the mask (no window, no key padding, not causal or a single row: a
    decoding step), the mask's own count: one or two small kernels instead of the (Lq, Lk) build."""
    mask = p.attn_mask
    if p.window is None and p.kv_lengths is None and (not p.is_causal or p.lq == 1):
        allowed = mask if mask.dtype == torch.bool else mask != float("-inf")
        # a mask broadcast along the keys (last extent 1) counts each of the Lk keys it stands for
        return allowed.expand(*allowed.shape[:-1], p.lk).sum(-1, dtype=torch.int32)
    return allowed_keys(mask, p.is_causal, p.lq, p.lk, device, window=p.window,
                        kv_lengths=p.kv_lengths).sum(-1, dtype=torch.int32)


@dataclass(slots=True)
class Operands:
    """One call's operand tensors (``dummy`` where a feature is off)."""

    pointers: tuple  # Temp, Count, Mask
    extent: tuple  # CuQ, CuK, KvRange
    count_strides: tuple  # Count's (B, Hq, Lq) broadcast strides, (0, 0, 0) without it
    has_count: bool  # n_i comes from Count (a mask decides it)
    has_kv_range: bool  # KvRange holds per-batch key ranges


def operand_tensors(p: Problem, dummy: torch.Tensor, key_padding: bool = True) -> Operands:
    """The temperature, count and mask pointers and the sequence extent of one call. ``key_padding``:
    whether the kernel takes key padding as ranges (the dense kernels); the decode kernel reads
    kv_lengths itself."""
    device, attn_mask = dummy.device, p.attn_mask
    kv_range, key_counts = _key_padding(p, device) if key_padding and not p.varlen else (None, None)
    temp_t = count_t = mask_t = dummy
    count_strides = (0, 0, 0)
    if p.temperature_tensor is not None:
        temp_t = p.temperature_tensor
    elif p.temperature is not None:
        if key_counts is not None:
            count_t = key_counts.view(p.batch, 1, p.lq)
        elif attn_mask is not None:
            count_t = _mask_counts(p, device)
        if count_t is not dummy:
            count_strides = _broadcast_strides(count_t, (p.batch, p.heads_q, p.lq))
    if attn_mask is not None:
        mask_t = attn_mask.view(torch.uint8) if attn_mask.dtype == torch.bool else attn_mask
    if p.varlen:
        extent = (p.cu_seqlens_q, p.cu_seqlens_k, dummy)
    else:
        extent = (dummy, dummy, kv_range if kv_range is not None else dummy)
    return Operands((temp_t, count_t, mask_t), extent, count_strides, count_t is not dummy, kv_range is not None)


def needs_operand_tensors(p: Problem) -> bool:
    """Whether a call's operand pointers depend on more than the device (a dummy for every feature)."""
    return (p.temperature_tensor is not None or p.attn_mask is not None or p.kv_lengths is not None
            or p.varlen)


@dataclass(slots=True)
class LaunchOptions:
    """What the forward, backward and decode kernels share, for one problem: the constexpr options and
    the scalar arguments that follow from its shapes and options."""

    strides: tuple  # the Temp, Count and Mask strides, 3 + 3 + 4, broadcast to (B, Hq, Lq[, Lk])
    temp_a: float
    temp_b: float
    window: tuple[int, int]  # win_left, win_right (a bound that never binds for -1)
    meta: dict


def launch_options(p: Problem, dtype: torch.dtype, operands: Operands) -> LaunchOptions:
    """The options of ``p`` for kernels on ``dtype`` inputs; ``operands``: operand_tensors' result for
    one call of the problem (its strides follow from the shapes)."""
    mask_t = operands.pointers[2]
    temperature = p.temperature_tensor
    temp_strides = _broadcast_strides(temperature, (p.batch, p.heads_q, p.lq)) if temperature is not None \
        else (0, 0, 0)
    temp_a, temp_b = kernel_constants(p.temperature, p.train_len, p.head_dim)

    mask_mode, mask_strides = MASK_NONE, (0, 0, 0, 0)
    if p.attn_mask is not None:
        mask_mode = MASK_BOOL if p.attn_mask.dtype == torch.bool else MASK_ADD
        mask_strides = _broadcast_strides(mask_t, (p.batch, p.heads_q, p.lq, p.lk))
    # a window bound of -1 becomes one no row can reach
    unbounded = p.lq + p.lk + 1
    left, right = p.window if p.window is not None else (-1, -1)
    window = (left if left >= 0 else unbounded, right if right >= 0 else unbounded)

    # float32 dots: exact IEEE unless the user allowed TF32 for matmuls
    dot_prec = "tf32" if dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32 else "ieee"
    meta = {
        "HEAD_D": p.head_dim, "HEAD_DV": p.head_dim_v,
        "BLOCK_D": max(next_power_of_2(p.head_dim), 16), "BLOCK_DV": max(next_power_of_2(p.head_dim_v), 16),
        "IS_CAUSAL": p.is_causal, "TEMP_MODE": temperature_mode(p.temperature, temperature),
        "CLIP": p.temperature is not None and p.temperature.clipped, "HAS_COUNT": operands.has_count,
        "COS": p.cos_scale is not None, "MASK_MODE": mask_mode, "DOT_PREC": dot_prec, "DROPOUT": p.dropout_p > 0,
        "VARLEN": p.varlen, "HAS_KV_RANGE": operands.has_kv_range, "WINDOW": p.window is not None,
    }
    return LaunchOptions((*temp_strides, *operands.count_strides, *mask_strides), temp_a, temp_b, window, meta)


def problem_key(p: Problem, dtype: torch.dtype) -> tuple:
    """What a problem's options contribute to a launch plan's key (its shapes come from the tensors):
    every option, for the option tensors their layouts and alignments (launch.tensor_key), and for
    float32 inputs the TF32 switch (launch_options: DOT_PREC)."""
    return (
        p.is_causal, p.scale, p.temperature, p.train_len, p.cos_scale, p.dropout_p, p.window,
        p.max_seqlen_q, p.max_seqlen_k,
        None if p.temperature_tensor is None else tensor_key(p.temperature_tensor),
        None if p.attn_mask is None else tensor_key(p.attn_mask),
        None if p.kv_lengths is None else tensor_key(p.kv_lengths),
        None if p.cu_seqlens_q is None else tensor_key(p.cu_seqlens_q),
        None if p.cu_seqlens_k is None else tensor_key(p.cu_seqlens_k),
        dtype is torch.float32 and torch.backends.cuda.matmul.allow_tf32,
    )
