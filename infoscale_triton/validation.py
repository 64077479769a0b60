"""Input checks shared by the fused path and the reference.

Every message names the argument, what it got and what was expected, and every check runs before a
kernel launches.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass

import torch

from .kernels.primitives import INTERPRETED
from .temperature import TemperatureSpec, check_temperature_options

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
MAX_GRID_YZ = 65535  # CUDA's limit on the grid's y and z extents (heads, batch)


@dataclass(eq=False, slots=True)
class Problem:
    """The shapes and options of one attention call, after validation. Treat it as immutable (not frozen:
    a frozen dataclass costs microseconds per call to build; ``dataclasses.replace`` makes a changed copy)."""

    batch: int
    heads_q: int
    heads_kv: int
    lq: int
    lk: int
    head_dim: int
    head_dim_v: int
    scale: float  # c in t_i * c * q.k (the cosine scale s under CosScale)
    temperature: TemperatureSpec | None  # parsed string temperature, None otherwise
    temperature_tensor: torch.Tensor | None  # a per-row multiplier tensor, None otherwise
    train_len: int | None
    cos_scale: float | None
    attn_mask: torch.Tensor | None
    is_causal: bool
    dropout_p: float = 0.0
    kv_lengths: torch.Tensor | None = None  # (B,) valid keys per batch entry: keys [0, len_b)
    window: tuple[int, int] | None = None  # (left, right) around the bottom-right diagonal, -1 = no bound
    # packed variable-length batches (varlen.py): the 4-d views have one batch entry and these offsets
    cu_seqlens_q: torch.Tensor | None = None
    cu_seqlens_k: torch.Tensor | None = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0

    @property
    def group(self) -> int:
        return self.heads_q // self.heads_kv if self.heads_kv else 1

    @property
    def varlen(self) -> bool:
        return self.cu_seqlens_q is not None

    @property
    def sequences(self) -> int:
        """Programs along the grid's batch axis: packed sequences, or batch entries."""
        return self.cu_seqlens_q.shape[0] - 1 if self.varlen else self.batch

    @property
    def rows(self) -> int:
        """The longest sequence of queries (the grid's row axis)."""
        return self.max_seqlen_q if self.varlen else self.lq

    @property
    def keys(self) -> int:
        return self.max_seqlen_k if self.varlen else self.lk


# Triton picks the interpreter or the compiler when the kernels are decorated, i.e. when this package
# is imported: ask the kernels what it picked, so that validation agrees with them.
_INTERPRET = bool(INTERPRETED.value)


def interpreter_active() -> bool:
    return _INTERPRET


def _interpret_requested_now() -> bool:
    """TRITON_INTERPRET as Triton reads it (1, true, on or yes), in the environment now."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def _not_cuda_message(device: torch.device) -> str:
    if _interpret_requested_now():
        return (f"query is on {device}, and TRITON_INTERPRET is set now but was not when infoscale_triton "
                "was imported: Triton reads it when the kernels are defined, so set it before the first "
                "import of triton or infoscale_triton (in the shell: TRITON_INTERPRET=1 python ..., or "
                "os.environ at the very top of the script); infoscale_triton.reference runs anywhere")
    return (f"query is on {device}: the fused kernels need CUDA tensors (or TRITON_INTERPRET=1, set before "
            "triton or infoscale_triton is first imported, for Triton's interpreter on CPU); "
            "infoscale_triton.reference runs anywhere")


def _looks_transposed(query: torch.Tensor, key: torch.Tensor, names: tuple[str, str, str]) -> str:
    """A hint for query and key that disagree in heads (already an error) because one of them is laid
    out (batch, length, heads, head_dim): read that way its heads would fit the other's, and either an
    axis matches the other tensor's (self-attention) or its "heads" outnumber its "length" (lengths
    usually exceed head counts). "" when the shapes do not suggest it."""
    qn, kn, vn = names
    (hq, lq), (hk, lk) = query.shape[1:3], key.shape[1:3]
    query_blhd = lq != hq and hk > 0 and lq % hk == 0 and (lq == hk or hq == lk or hq > lq)
    key_blhd = lk != hk and lk > 0 and hq % lk == 0 and (lk == hq or hk == lq or hk > lk)
    if query_blhd and key_blhd:
        which, fix = f"{qn} or {kn}/{vn} is", "that one as x.transpose(1, 2)"
    elif query_blhd:
        which, fix = f"{qn} is", f"{qn}.transpose(1, 2)"
    elif key_blhd:
        which, fix = f"{kn} and {vn} are", f"{kn}.transpose(1, 2) and {vn}.transpose(1, 2)"
    else:
        return ""
    return (f"{qn} {shape_text(query)} and {kn} {shape_text(key)} look like {which} laid out (batch, length, "
            f"heads, head_dim), but this function takes (batch, heads, length, head_dim): pass {fix} (a "
            "view, read in place)")


def _check_heads(query: torch.Tensor, key: torch.Tensor, enable_gqa: bool,
                 names: tuple[str, str, str]) -> None:
    heads_q, heads_kv = query.shape[1], key.shape[1]
    grouped = heads_kv > 0 and heads_q % heads_kv == 0
    if heads_q == heads_kv or (enable_gqa and grouped):
        return
    hint = _looks_transposed(query, key, names)
    if hint:
        raise ValueError(hint + (f"; if they really are {heads_q} query heads sharing {heads_kv} key/value "
                                 "heads, pass enable_gqa=True" if grouped and not enable_gqa else ""))
    if not grouped:
        raise ValueError(f"{'with enable_gqa=True ' if enable_gqa else ''}the query heads ({heads_q}) must "
                         f"be a multiple of the key/value heads ({heads_kv})")
    raise ValueError(f"query has {heads_q} heads and key/value {heads_kv}; pass enable_gqa=True "
                     "to share key/value heads across query heads")


def shape_text(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _is_real(x: object) -> bool:
    return type(x) is float or type(x) is int or (isinstance(x, numbers.Real) and not isinstance(x, bool))


def broadcastable(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    if len(shape) > len(target):
        return False
    return all(s in (1, t) for s, t in zip(reversed(shape), reversed(target)))


def check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def check_inputs(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
    temperature: str | torch.Tensor | None,
    train_len: int | None,
    cos_scale: float | None,
    *,
    kernel: bool,
    kv_lengths: torch.Tensor | None = None,
    window: object = None,
    names: tuple[str, str, str] = ("query", "key", "value"),
) -> Problem:
    """Validate one call; ``kernel`` adds the fused path's limits (dtypes, head dims, device).
    ``names``: what the caller calls its three tensors (in the messages)."""
    qn, kn, vn = names
    for name, t in ((qn, query), (kn, key), (vn, value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dimensions (batch, heads, length, head_dim), "
                             f"got shape {shape_text(t)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if kernel and t.dtype not in KERNEL_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; the fused kernels take float16, bfloat16 or "
                            "float32 (use infoscale_triton.reference for other dtypes)")
    dtype = query.dtype
    if key.dtype != dtype or value.dtype != dtype:
        raise TypeError(f"{qn}, {kn} and {vn} must share a dtype, got {query.dtype}, {key.dtype}, "
                        f"{value.dtype}")
    device = query.device  # (each .device and .shape read builds a new object: read them once)
    for name, t in ((kn, key), (vn, value)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but query is on {query.device}; "
                             "all tensors must be on one device")
    if kernel and device.type != "cuda" and not interpreter_active():
        raise ValueError(_not_cuda_message(device))

    batch, heads_q, lq, head_dim = query.shape
    key_batch, heads_kv, lk, key_head_dim = key.shape
    value_batch, value_heads, value_len, head_dim_v = value.shape
    if key_batch != batch or value_batch != batch:
        raise ValueError(f"batch sizes differ: {qn} {shape_text(query)}, {kn} {shape_text(key)}, "
                         f"{vn} {shape_text(value)}")
    if value_heads != heads_kv or value_len != lk:
        swapped = value_heads == lk and value_len == heads_kv
        raise ValueError(f"{kn} {shape_text(key)} and {vn} {shape_text(value)} must agree in heads and length"
                         + (f"; {vn} looks laid out (batch, length, heads, head_dim): pass "
                            f"{vn}.transpose(1, 2)" if swapped else ""))
    if key_head_dim != head_dim:
        raise ValueError(f"{kn}'s head_dim {key.shape[3]} differs from {qn}'s {head_dim}: "
                         f"{qn} {shape_text(query)}, {kn} {shape_text(key)}")
    if head_dim == 0:
        raise ValueError(f"{qn} and {kn} have head_dim 0; it must be at least 1")
    if heads_q != heads_kv:
        _check_heads(query, key, enable_gqa, names)
    if kernel:
        for name, d in (("query/key head_dim", head_dim), ("value head_dim", head_dim_v)):
            if not MIN_HEAD_DIM <= d <= MAX_HEAD_DIM:
                raise ValueError(f"{name} is {d}; the fused kernels take {MIN_HEAD_DIM} to "
                                 f"{MAX_HEAD_DIM}")
        if batch > MAX_GRID_YZ or heads_q > MAX_GRID_YZ:
            raise ValueError(f"batch ({batch}) and query heads ({heads_q}) must each be at most "
                             f"{MAX_GRID_YZ}")

    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise TypeError(f"attn_mask must be boolean (True = may attend) or floating (added to the "
                            f"logits), got {attn_mask.dtype}")
        if attn_mask.device != device:
            raise ValueError(f"attn_mask is on {attn_mask.device} but query is on {query.device}")
        target = (batch, heads_q, lq, lk)
        if not broadcastable(tuple(attn_mask.shape), target):
            raise ValueError(f"attn_mask of shape {shape_text(attn_mask)} does not broadcast to "
                             f"(batch, heads, Lq, Lk) = {target}")

    # (the common float 0.0 needs no more checks)
    if (dropout_p != 0.0 or type(dropout_p) is not float) and (not _is_real(dropout_p)
                                                              or not 0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")
    if is_causal is not True and is_causal is not False:
        check_bool("is_causal", is_causal)
    if enable_gqa is not True and enable_gqa is not False:
        check_bool("enable_gqa", enable_gqa)

    if cos_scale is not None:
        if not _is_real(cos_scale) or not math.isfinite(cos_scale) or cos_scale <= 0:
            raise ValueError(f"cos_scale must be a finite number > 0 (the paper uses 32 to 256), "
                             f"got {cos_scale!r}")
        if scale is not None:
            raise ValueError("scale must be None when cos_scale is given: the logits are "
                             "cos_scale * cos(q, k)")
        c = float(cos_scale)
    elif scale is not None:
        if not _is_real(scale) or not math.isfinite(scale):
            raise ValueError(f"scale must be a finite number or None, got {scale!r}")
        c = float(scale)
    else:
        c = 1.0 / math.sqrt(head_dim)

    if isinstance(temperature, torch.Tensor):
        target = (batch, heads_q, lq)
        if not temperature.is_floating_point():
            raise TypeError(f"temperature tensor must be floating-point, got {temperature.dtype}")
        if temperature.device != device:
            raise ValueError(f"temperature is on {temperature.device} but query is on {query.device}")
        if not broadcastable(tuple(temperature.shape), target):
            raise ValueError(f"temperature of shape {shape_text(temperature)} does not broadcast to "
                             f"(batch, heads, Lq) = {target}")
    spec = check_temperature_options(temperature, train_len)

    tensor_temperature = temperature if isinstance(temperature, torch.Tensor) else None
    if window is not None:
        window = check_window(window)
    if kv_lengths is not None:
        check_lengths("kv_lengths", kv_lengths, batch, device)
    return Problem(batch, heads_q, heads_kv, lq, lk, head_dim, head_dim_v, c, spec, tensor_temperature,
                   train_len, None if cos_scale is None else float(cos_scale), attn_mask, is_causal,
                   float(dropout_p), kv_lengths, window)


def check_window(window: object) -> tuple[int, int] | None:
    """``(left, right)`` key counts around the diagonal, -1 for no bound; None or (-1, -1) = no window."""
    if window is None:
        return None
    ok = (isinstance(window, (tuple, list)) and len(window) == 2
          and all(isinstance(w, numbers.Integral) and not isinstance(w, bool) and w >= -1 for w in window))
    if not ok:
        raise ValueError(f"window must be None or a pair (left, right) of ints >= -1 (-1 = unbounded), "
                         f"got {window!r}")
    left, right = int(window[0]), int(window[1])
    return None if (left, right) == (-1, -1) else (left, right)


def check_lengths(name: str, lengths: object, count: int, device: torch.device) -> None:
    """A per-sequence integer tensor of shape (count,) on ``device`` (its values are not read: that
    would synchronise with the GPU)."""
    if not isinstance(lengths, torch.Tensor):
        raise TypeError(f"{name} must be an int32 or int64 tensor of shape ({count},), got "
                        f"{type(lengths).__name__}")
    if lengths.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 or int64, got {lengths.dtype}")
    if tuple(lengths.shape) != (count,):
        raise ValueError(f"{name} must have shape ({count},), got {shape_text(lengths)}")
    if lengths.device != device:
        raise ValueError(f"{name} is on {lengths.device} but query is on {device}")
