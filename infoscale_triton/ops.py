"""The kernels as PyTorch operators (``torch.ops.infoscale_triton.*``), so that ``torch.compile`` traces
through them without a graph break; and the eager path, which skips them.

``torch.library.custom_op`` rather than ``triton_op`` + ``wrap_triton``: the host launchers pick configs
from tables or the autotuner, pad operands for TMA after looking at their data pointers and install
Triton's allocator; none of that can be traced with fake tensors, and an opaque operator keeps it as it
is in eager mode. Inductor then calls the operators as they are instead of fusing around the kernels.

Operator arguments can only be tensors, scalars, strings and lists, so a validated :class:`Problem`
travels as the arguments that :data:`OPTIONS` lists, one per field (its shapes come from the tensors),
and is rebuilt inside without validating again: the Python entry points validate before calling.
Every operator call passes them by keyword. Nothing here reads a tensor's values on the host.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from . import splitkv, tuning
from .backward import attention_backward
from .forward import attention_forward, new_entropy_stats, new_output, new_row_stats
from .launch import on_device, transient_scratch
from .operands import kernel_key
from .temperature import TemperatureSpec
from .validation import Problem


def _same(x: object) -> object:
    return x


@dataclass(frozen=True)
class Option:
    """How one Problem field travels through an operator: its name (the field's and the argument's),
    its type in the operator schema, and the conversions to and from what the schema can hold."""

    name: str
    schema: str
    to_op: Callable[[object], object] = _same
    from_op: Callable[[object], object] = _same


# The one ordered definition of the problem options that reach the operators. A new Problem option
# is one line here (plus its validation and its kernel code); tests/test_compile.py checks that every
# Problem field but the shapes is listed.
OPTIONS: tuple[Option, ...] = (
    Option("temperature_tensor", "Tensor?"),  # differentiable: autograd must see it as an input
    Option("attn_mask", "Tensor?"),
    Option("kv_lengths", "Tensor?"),
    Option("cu_seqlens_q", "Tensor?"),
    Option("cu_seqlens_k", "Tensor?"),
    Option("dropout_p", "float"),
    Option("is_causal", "bool"),
    Option("scale", "float"),
    Option("temperature", "str?", lambda spec: None if spec is None else spec.name,
           lambda name: None if name is None else TemperatureSpec.parse(name)),
    Option("train_len", "int?"),
    Option("cos_scale", "float?"),
    Option("window", "int[]?", lambda w: None if w is None else list(w), lambda w: None if w is None else tuple(w)),
    Option("max_seqlen_q", "int"),
    Option("max_seqlen_k", "int"),
)


def option_args(p: Problem) -> dict[str, object]:
    """The operators' option arguments of ``p``, by name."""
    return {o.name: o.to_op(getattr(p, o.name)) for o in OPTIONS}


def problem(query: Tensor, key: Tensor, value: Tensor, options: dict[str, object]) -> Problem:
    """The Problem of ``option_args``' arguments (shapes from the tensors; no validation)."""
    batch, heads_q, lq, head_dim = query.shape
    return Problem(batch=batch, heads_q=heads_q, heads_kv=key.shape[1], lq=lq, lk=key.shape[2], head_dim=head_dim,
                   head_dim_v=value.shape[3], **{o.name: o.from_op(options[o.name]) for o in OPTIONS})


class _Signature:
    """An operator's arguments, in schema order: ``head`` (name, type) pairs, the OPTIONS, ``tail``."""

    def __init__(self, head: tuple[tuple[str, str], ...], tail: tuple[tuple[str, str], ...]) -> None:
        self.args = (*head, *((o.name, o.schema) for o in OPTIONS), *tail)
        self.names = tuple(name for name, _ in self.args)
        self.options = tuple(o.name for o in OPTIONS)

    def schema(self, returns: str) -> str:
        return "(" + ", ".join(f"{ty} {name}" for name, ty in self.args) + ") -> " + returns

    def bind(self, args: tuple) -> dict[str, object]:
        """The operator's positional arguments (as the dispatcher passes them), by name."""
        return dict(zip(self.names, args))

    def index(self, name: str) -> int:
        return self.names.index(name)


_FWD = _Signature((("query", "Tensor"), ("key", "Tensor"), ("value", "Tensor"), ("seed", "Tensor?")),
                  (("with_entropy", "bool"),))
_BWD = _Signature((("dout", "Tensor"), ("query", "Tensor"), ("key", "Tensor"), ("value", "Tensor"), ("out", "Tensor"),
                   ("lse", "Tensor"), ("key_inv", "Tensor?"), ("seed", "Tensor?")),
                  (("temperature_grad", "bool"),))
_DECODE = _Signature((("query", "Tensor"), ("key_cache", "Tensor"), ("value_cache", "Tensor")),
                     (("num_splits", "int?"),))


def _forward(query: Tensor, key: Tensor, value: Tensor, p: Problem, seed: Tensor | None,
             with_entropy: bool = False) -> tuple:
    """(out, row stats, unit K, 1/||k||, entropy stats); unit K and 1/||k|| are None without CosScale,
    the entropy stats (forward.new_entropy_stats) None unless ``with_entropy``."""
    with on_device(query):
        unit_key, key_inv = kernel_key(key, p)
        entropy = new_entropy_stats(p, query.device) if with_entropy else None
        out, lse = attention_forward(query, key, value, p, unit_key=unit_key, seed=seed, entropy=entropy)
    return out, lse, unit_key, key_inv, entropy


def _backward_grads(dout: Tensor, query: Tensor, key: Tensor, value: Tensor, out: Tensor, lse: Tensor,
                    key_inv: Tensor | None, seed: Tensor | None, p: Problem, temperature_grad: bool) -> tuple:
    """(dq, dk, dv, dt) of _forward's call; ``key`` is the unit K under CosScale (``key_inv`` given)."""
    with on_device(query):
        return attention_backward(query, key, value, out, lse, dout, p,
                                  unit_key=key if key_inv is not None else None, key_inv=key_inv, seed=seed,
                                  temperature_grad=temperature_grad)


def _operator_body(fn: Callable[..., object]) -> Callable[..., object]:
    """An operator's implementation, run under launch.transient_scratch: compiled graphs call the
    operators, and their CUDA-graph trees may run them with allocations going to a graph's pool."""
    @functools.wraps(fn)
    def body(*args: object) -> object:
        with transient_scratch():
            return fn(*args)
    return body


def _attention_fwd(*args: object) -> tuple[Tensor, ...]:
    """(out, row stats, unit K, 1/||k||, entropy stats): unit K and 1/||k|| are what the backward reads
    under CosScale, and empty without it (an operator cannot return None); the entropy stats are
    empty unless ``with_entropy``."""
    a = _FWD.bind(args)
    query, key, value = a["query"], a["key"], a["value"]
    p = problem(query, key, value, a)
    out, lse, unit_key, key_inv, entropy = _forward(query, key, value, p, a["seed"], a["with_entropy"])
    entropy = entropy if entropy is not None else lse.new_empty(0)
    if key_inv is None:
        return out, lse, key.new_empty(0), lse.new_empty(0), entropy
    return out, lse, unit_key, key_inv, entropy


attention_fwd = torch.library.custom_op("infoscale_triton::attention_fwd", _operator_body(_attention_fwd),
                                       mutates_args=(), schema=_FWD.schema("(Tensor, Tensor, Tensor, Tensor, Tensor)"))


@attention_fwd.register_fake
def _(*args: object) -> tuple[Tensor, ...]:
    a = _FWD.bind(args)
    query, key = a["query"], a["key"]
    p = problem(query, key, a["value"], a)
    out, lse = new_output(p, query.dtype, query.device), new_row_stats(p, query.device)
    entropy = new_entropy_stats(p, query.device) if a["with_entropy"] else lse.new_empty(0)
    if p.cos_scale is None:
        return out, lse, key.new_empty(0), lse.new_empty(0), entropy
    # operands.unit_rows' layouts: contiguous
    return (out, lse, torch.empty_like(key, memory_format=torch.contiguous_format), lse.new_empty(key.shape[:3]),
            entropy)


def _attention_bwd(*args: object) -> tuple[Tensor, ...]:
    """(dq, dk, dv, dt); ``key`` is the unit K under CosScale (with ``key_inv``); ``dt`` is empty unless
    ``temperature_grad``."""
    a = _BWD.bind(args)
    query = a["query"]
    p = problem(query, a["key"], a["value"], a)
    dq, dk, dv, dt = _backward_grads(a["dout"], query, a["key"], a["value"], a["out"], a["lse"], a["key_inv"],
                                     a["seed"], p, a["temperature_grad"])
    return dq, dk, dv, dt if dt is not None else query.new_empty(0)


attention_bwd = torch.library.custom_op("infoscale_triton::attention_bwd", _operator_body(_attention_bwd),
                                       mutates_args=(), schema=_BWD.schema("(Tensor, Tensor, Tensor, Tensor)"))


@attention_bwd.register_fake
def _(*args: object) -> tuple[Tensor, ...]:
    a = _BWD.bind(args)
    temperature = a["temperature_tensor"]
    dt = temperature.new_empty(temperature.shape) if a["temperature_grad"] and temperature is not None \
        else a["query"].new_empty(0)
    dq, dk, dv = (torch.empty_like(a[n], memory_format=torch.contiguous_format) for n in ("query", "key", "value"))
    return dq, dk, dv, dt


_TENSOR_OPTIONS = tuple(o.name for o in OPTIONS if o.schema.startswith("Tensor"))


def _setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: tuple) -> None:
    a = _FWD.bind(inputs)
    out, lse, unit_key, key_inv, entropy = output
    ctx.mark_non_differentiable(lse, unit_key, key_inv, entropy)
    cos = a["cos_scale"] is not None
    # CosScale: keep the unit K and its inverse norms (the backward reads them, not key); dropout: the
    # seed, so that the backward regenerates the forward's mask
    ctx.save_for_backward(a["query"], unit_key if cos else a["key"], a["value"], out, lse,
                          key_inv if cos else None, a["seed"], *(a[name] for name in _TENSOR_OPTIONS))
    ctx.scalars = {name: a[name] for name in _FWD.options if name not in _TENSOR_OPTIONS}


def _backward(ctx: torch.autograd.function.FunctionCtx, dout: Tensor, *_stats: Tensor) -> tuple:
    query, key, value, out, lse, key_inv, seed, *tensors = ctx.saved_tensors
    needs = ctx.needs_input_grad  # one per attention_fwd argument
    temperature_grad = needs[_FWD.index("temperature_tensor")]
    dq, dk, dv, dt = attention_bwd(dout=dout, query=query, key=key, value=value, out=out, lse=lse, key_inv=key_inv,
                                   seed=seed, **dict(zip(_TENSOR_OPTIONS, tensors)), **ctx.scalars,
                                   temperature_grad=temperature_grad)
    grads = {"query": dq, "key": dk, "value": dv, "temperature_tensor": dt}
    return tuple(grads.get(name) if need else None for name, need in zip(_FWD.names, needs))


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def _decode_fwd(*args: object) -> Tensor:
    """The split-KV decode forward (splitkv.py); no autograd: decoding is inference-only."""
    a = _DECODE.bind(args)
    query = a["query"]
    p = problem(query, a["key_cache"], a["value_cache"], a)
    with on_device(query):
        return splitkv.decode_forward(query, a["key_cache"], a["value_cache"], p, a["num_splits"])


decode_fwd = torch.library.custom_op("infoscale_triton::decode_fwd", _operator_body(_decode_fwd),
                                    mutates_args=(), schema=_DECODE.schema("Tensor"))


@decode_fwd.register_fake
def _(*args: object) -> Tensor:
    a = _DECODE.bind(args)
    b, h, lq, _ = a["query"].shape
    return a["query"].new_empty(b, h, lq, a["value_cache"].shape[3])


def _through_operators() -> bool:
    return torch.compiler.is_compiling() or tuning.current().operators_in_eager


def attention(query: Tensor, key: Tensor, value: Tensor, p: Problem, seed: Tensor | None,
              with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """The fused attention of a validated problem, differentiable in query, key, value and a tensor
    temperature: (out, entropy stats), the latter (2, B, Hq, Lq) float32 (each row's entropy and
    largest probability, no gradient) if ``with_entropy``, else None. With dropout, ``seed`` is the
    call's dropout.draw_seed (drawn by the caller, so that the operator is a function of its inputs).
    Eager calls skip the dispatcher (_EagerAttention)."""
    if _through_operators():
        outputs = attention_fwd(query=query, key=key, value=value, seed=seed, **option_args(p),
                                with_entropy=with_entropy)
        return outputs[0], outputs[4] if with_entropy else None
    inputs = (query, key, value, p.temperature_tensor)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        return _EagerAttention.apply(*inputs, p, seed, with_entropy)
    out, _lse, _unit_key, _key_inv, entropy = _forward(query, key, value, p, seed, with_entropy)
    return out, entropy


def decode(query: Tensor, key_cache: Tensor, value_cache: Tensor, p: Problem, num_splits: int | None = None) -> Tensor:
    """The split-KV decode of a validated problem (no window or dropout)."""
    if not _through_operators():
        with on_device(query):
            # (splitkv.decode_forward looked up per call: tests spy on it)
            return splitkv.decode_forward(query, key_cache, value_cache, p, num_splits)
    return decode_fwd(query=query, key_cache=key_cache, value_cache=value_cache, **option_args(p),
                      num_splits=num_splits)


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

