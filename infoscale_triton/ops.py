"""The kernels as PyTorch operators (``torch.ops.infoscale_triton.*``), so that ``torch.compile`` traces
through them without a graph break.

``torch.library.custom_op`` rather than ``triton_op`` + ``wrap_triton``: the host launchers pick configs
from tables or the autotuner, pad operands for TMA after looking at their data pointers and install
Triton's allocator; none of that can be traced with fake tensors, and an opaque operator keeps it as it
is in eager mode. Inductor then calls the operators as they are instead of fusing around the kernels.

Operator arguments can only be tensors and scalars, so a validated :class:`Problem` travels flattened
(:func:`_flatten`) and is rebuilt inside (:func:`_problem`) without validating again: the Python entry
points validate before calling. Nothing here reads a tensor's values on the host.
"""

import contextlib

import torch
from torch import Tensor

from .backward import attention_backward
from .forward import attention_forward, kernel_key, new_entropy_stats, new_output, new_row_stats
from .temperature import TemperatureSpec
from .validation import Problem

# Problem's options come in the operators' argument order (_flatten): its 5 tensors, then its scalars.
TENSOR_OPTIONS = 5
TEMPERATURE_ARG = 5  # attention_fwd's arguments: query, key, value, seed, attn_mask, temperature, ...
# Eager calls skip the operators (_EagerAttention: host cost); tests set this to run them eagerly too.
OPERATORS_IN_EAGER = False


def _flatten(p: Problem) -> tuple:
    left, right = p.window if p.window is not None else (-1, -1)
    kind = p.temperature.name if p.temperature is not None else None
    return (p.attn_mask, p.temperature_tensor, p.kv_lengths, p.cu_seqlens_q, p.cu_seqlens_k,
            p.dropout_p, p.is_causal, p.scale, kind, p.train_len, p.cos_scale, left, right,
            p.max_seqlen_q, p.max_seqlen_k)


def _problem(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None, temperature: Tensor | None,
             kv_lengths: Tensor | None, cu_seqlens_q: Tensor | None, cu_seqlens_k: Tensor | None,
             dropout_p: float, is_causal: bool, scale: float, temperature_kind: str | None,
             train_len: int | None, cos_scale: float | None, window_left: int, window_right: int,
             max_seqlen_q: int, max_seqlen_k: int) -> Problem:
    """The Problem that _flatten flattened (shapes from the tensors)."""
    batch, heads_q, lq, head_dim = query.shape
    window = None if (window_left, window_right) == (-1, -1) else (window_left, window_right)
    spec = TemperatureSpec.parse(temperature_kind) if temperature_kind is not None else None
    return Problem(batch, heads_q, key.shape[1], lq, key.shape[2], head_dim, value.shape[3], scale, spec,
                   temperature, train_len, cos_scale, attn_mask, is_causal, dropout_p, kv_lengths, window,
                   cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)


def _on_device(t: Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current device: make it the inputs' one (and the scratch allocator's)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _forward(query: Tensor, key: Tensor, value: Tensor, p: Problem, seed: Tensor | None,
             with_entropy: bool = False) -> tuple:
    """(out, row stats, unit K, 1/||k||, entropy stats); unit K and 1/||k|| are None without CosScale,
    the entropy stats (forward.new_entropy_stats) None unless ``with_entropy``."""
    with _on_device(query):
        unit_key, key_inv = kernel_key(key, p)
        entropy = new_entropy_stats(p, query.device) if with_entropy else None
        out, lse = attention_forward(query, key, value, p, unit_key=unit_key, seed=seed, entropy=entropy)
    return out, lse, unit_key, key_inv, entropy


def _backward_grads(dout: Tensor, query: Tensor, key: Tensor, value: Tensor, out: Tensor, lse: Tensor,
                    key_inv: Tensor | None, seed: Tensor | None, p: Problem, temperature_grad: bool) -> tuple:
    """(dq, dk, dv, dt) of _forward's call; ``key`` is the unit K under CosScale (``key_inv`` given)."""
    with _on_device(query):
        return attention_backward(query, key, value, out, lse, dout, p,
                                  unit_key=key if key_inv is not None else None, key_inv=key_inv, seed=seed,
                                  temperature_grad=temperature_grad)


@torch.library.custom_op("infoscale_triton::attention_fwd", mutates_args=())
def attention_fwd(
    query: Tensor, key: Tensor, value: Tensor, seed: Tensor | None,
    attn_mask: Tensor | None, temperature: Tensor | None, kv_lengths: Tensor | None,
    cu_seqlens_q: Tensor | None, cu_seqlens_k: Tensor | None,
    dropout_p: float, is_causal: bool, scale: float, temperature_kind: str | None, train_len: int | None,
    cos_scale: float | None, window_left: int, window_right: int, max_seqlen_q: int, max_seqlen_k: int,
    with_entropy: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(out, row stats, unit K, 1/||k||, entropy stats): unit K and 1/||k|| are what the backward reads
    under CosScale, and empty without it (an operator cannot return None); the entropy stats are
    empty unless ``with_entropy``."""
    p = _problem(query, key, value, attn_mask, temperature, kv_lengths, cu_seqlens_q, cu_seqlens_k, dropout_p,
                 is_causal, scale, temperature_kind, train_len, cos_scale, window_left, window_right,
                 max_seqlen_q, max_seqlen_k)
    out, lse, unit_key, key_inv, entropy = _forward(query, key, value, p, seed, with_entropy)
    entropy = entropy if entropy is not None else lse.new_empty(0)
    if key_inv is None:
        return out, lse, key.new_empty(0), lse.new_empty(0), entropy
    return out, lse, unit_key, key_inv, entropy


@attention_fwd.register_fake
def _(query: Tensor, key: Tensor, value: Tensor, seed: Tensor | None, *options: object) -> tuple[Tensor, ...]:
    *options, with_entropy = options
    p = _problem(query, key, value, *options)
    out, lse = new_output(p, query.dtype, query.device), new_row_stats(p, query.device)
    entropy = new_entropy_stats(p, query.device) if with_entropy else lse.new_empty(0)
    if p.cos_scale is None:
        return out, lse, key.new_empty(0), lse.new_empty(0), entropy
    # forward.unit_rows' layouts: contiguous
    return (out, lse, torch.empty_like(key, memory_format=torch.contiguous_format), lse.new_empty(key.shape[:3]),
            entropy)


@torch.library.custom_op("infoscale_triton::attention_bwd", mutates_args=())
def attention_bwd(
    dout: Tensor, query: Tensor, key: Tensor, value: Tensor, out: Tensor, lse: Tensor, key_inv: Tensor | None,
    seed: Tensor | None,
    attn_mask: Tensor | None, temperature: Tensor | None, kv_lengths: Tensor | None,
    cu_seqlens_q: Tensor | None, cu_seqlens_k: Tensor | None,
    dropout_p: float, is_causal: bool, scale: float, temperature_kind: str | None, train_len: int | None,
    cos_scale: float | None, window_left: int, window_right: int, max_seqlen_q: int, max_seqlen_k: int,
    temperature_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dt); ``key`` is the unit K under CosScale (with ``key_inv``); ``dt`` is empty unless
    ``temperature_grad``."""
    p = _problem(query, key, value, attn_mask, temperature, kv_lengths, cu_seqlens_q, cu_seqlens_k, dropout_p,
                 is_causal, scale, temperature_kind, train_len, cos_scale, window_left, window_right,
                 max_seqlen_q, max_seqlen_k)
    dq, dk, dv, dt = _backward_grads(dout, query, key, value, out, lse, key_inv, seed, p, temperature_grad)
    return dq, dk, dv, dt if dt is not None else query.new_empty(0)


@attention_bwd.register_fake
def _(dout: Tensor, query: Tensor, key: Tensor, value: Tensor, out: Tensor, lse: Tensor, key_inv: Tensor | None,
      seed: Tensor | None, *options: object) -> tuple[Tensor, ...]:
    temperature, temperature_grad = options[1], options[-1]
    dt = temperature.new_empty(temperature.shape) if temperature_grad and temperature is not None \
        else query.new_empty(0)
    dq, dk, dv = (torch.empty_like(t, memory_format=torch.contiguous_format) for t in (query, key, value))
    return dq, dk, dv, dt


def _setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: tuple) -> None:
    query, key, value, seed, *options, _with_entropy = inputs
    out, lse, unit_key, key_inv, entropy = output
    ctx.mark_non_differentiable(lse, unit_key, key_inv, entropy)
    cos = _problem(query, key, value, *options).cos_scale is not None
    # CosScale: keep the unit K and its inverse norms (the backward reads them, not key); dropout: the
    # seed, so that the backward regenerates the forward's mask
    ctx.save_for_backward(query, unit_key if cos else key, value, out, lse, key_inv if cos else None, seed,
                          *options[:TENSOR_OPTIONS])
    ctx.scalars = options[TENSOR_OPTIONS:]


def _backward(ctx: torch.autograd.function.FunctionCtx, dout: Tensor, *_stats: Tensor) -> tuple:
    query, key, value, out, lse, key_inv, seed, *tensors = ctx.saved_tensors
    needs = ctx.needs_input_grad  # one per attention_fwd argument
    dq, dk, dv, dt = attention_bwd(dout, query, key, value, out, lse, key_inv, seed, *tensors, *ctx.scalars,
                                   needs[TEMPERATURE_ARG])
    grads = {0: dq, 1: dk, 2: dv, TEMPERATURE_ARG: dt}
    return tuple(grads.get(i) if need else None for i, need in enumerate(needs))


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("infoscale_triton::decode_fwd", mutates_args=())
def decode_fwd(
    query: Tensor, key_cache: Tensor, value_cache: Tensor, kv_lengths: Tensor | None, temperature: Tensor | None,
    is_causal: bool, scale: float, temperature_kind: str | None, train_len: int | None, cos_scale: float | None,
    num_splits: int | None,
) -> Tensor:
    """The split-KV decode forward (decode.py); no autograd: decoding is inference-only."""
    from .decode import decode_forward  # here: decode.py imports this module for decode_attention

    p = _problem(query, key_cache, value_cache, None, temperature, kv_lengths, None, None, 0.0, is_causal, scale,
                 temperature_kind, train_len, cos_scale, -1, -1, 0, 0)
    with _on_device(query):
        return decode_forward(query, key_cache, value_cache, p, num_splits)


@decode_fwd.register_fake
def _(query: Tensor, key_cache: Tensor, value_cache: Tensor, *options: object) -> Tensor:
    b, h, lq, _ = query.shape
    return query.new_empty(b, h, lq, value_cache.shape[3])


def attention(query: Tensor, key: Tensor, value: Tensor, p: Problem, seed: Tensor | None,
              with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """The fused attention of a validated problem, differentiable in query, key, value and a tensor
    temperature: (out, entropy stats), the latter (2, B, Hq, Lq) float32 (each row's entropy and
    largest probability, no gradient) if ``with_entropy``, else None. With dropout, ``seed`` is the
    call's dropout.draw_seed (drawn by the caller, so that the operator is a function of its inputs).
    Eager calls skip the dispatcher (_EagerAttention)."""
    if torch.compiler.is_compiling() or OPERATORS_IN_EAGER:
        outputs = attention_fwd(query, key, value, seed, *_flatten(p), with_entropy)
        return outputs[0], outputs[4] if with_entropy else None
    inputs = (query, key, value, p.temperature_tensor)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        return _EagerAttention.apply(*inputs, p, seed, with_entropy)
    out, _lse, _unit_key, _key_inv, entropy = _forward(query, key, value, p, seed, with_entropy)
    return out, entropy


def decode(query: Tensor, key_cache: Tensor, value_cache: Tensor, p: Problem, num_splits: int | None = None) -> Tensor:
    """The split-KV decode of a validated problem (no attn_mask, window or dropout)."""
    if not (torch.compiler.is_compiling() or OPERATORS_IN_EAGER):
        from . import decode as decode_module  # (looked up per call: tests spy on it)

        with _on_device(query):
            return decode_module.decode_forward(query, key_cache, value_cache, p, num_splits)
    kind = p.temperature.name if p.temperature is not None else None
    return decode_fwd(query, key_cache, value_cache, p.kv_lengths, p.temperature_tensor, p.is_causal, p.scale,
                      kind, p.train_len, p.cos_scale, num_splits)


class _EagerAttention(torch.autograd.Function):
    """The operators' forward and backward without the dispatcher, for eager calls: a custom operator
    costs ~50-150 us of host time per call (H100: forward+backward at N = 1k, D = 128 went from 0.87x to
    0.63x of cuDNN through it). Same launchers, same saved state as attention_fwd's autograd."""

    @staticmethod
    def forward(ctx, query: Tensor, key: Tensor, value: Tensor, temperature: Tensor | None, p: Problem,
                seed: Tensor | None, with_entropy: bool) -> tuple[Tensor, Tensor | None]:
        out, lse, unit_key, key_inv, entropy = _forward(query, key, value, p, seed, with_entropy)
        ctx.save_for_backward(query, key if key_inv is None else unit_key, value, out, lse, key_inv, seed)
        ctx.p = p
        if entropy is not None:
            ctx.mark_non_differentiable(entropy)
        return out, entropy

    @staticmethod
    def backward(ctx, dout: Tensor, _dentropy: Tensor | None) -> tuple:
        query, key, value, out, lse, key_inv, seed = ctx.saved_tensors
        needs = ctx.needs_input_grad
        dq, dk, dv, dt = _backward_grads(dout, query, key, value, out, lse, key_inv, seed, ctx.p, needs[3])
        return tuple(g if need else None for g, need in zip((dq, dk, dv, dt), needs[:4])) + (None, None, None)
