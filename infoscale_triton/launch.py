"""The launch layer: how the pass-specific launchers (forward.py, backward.py, splitkv.py) reach the kernels.

* :class:`Variant`: a kernel with its constexpr arguments and compile options fixed. Its
  :class:`Launch` records (a grid and the scalar arguments) launch through Triton's ``JITFunction``
  the first time, which binds and specialises the ~50 arguments (tens of microseconds of Python), and
  from then on through the ``CompiledKernel`` that call returned, the lightest launcher Triton has:
  only the pointers and the stream are new per call. Under the interpreter, while Triton's launch
  hooks are set (profilers), or after its debug or instrumentation settings changed, calls take the
  ``JITFunction`` path.
* :class:`PlanCache`: the launchers' per-call plans (configs, grids, scalar arguments, ``Launch``
  records), keyed on everything that changes a launch; :func:`tensor_key` is what a tensor
  contributes (shape, strides, dtype, device, and its data pointer modulo 16: Triton specialises
  pointers on 16-byte alignment and TMA needs it).
* :func:`workspace`: scratch memory reused across calls on one stream (the rule is in its docstring).
* Triton's set-up: the scratch allocator of device-side tensor descriptors, and which operands TMA
  can read in place.
* Integer helpers: ``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr functions, which
  cost microseconds per host call.

Why a ``Launch`` may skip Triton's binding: a plan's key fixes every scalar argument's value and
every pointer's dtype and 16-byte alignment, and the ``Variant`` fixes the constexprs and options.
Those are all that Triton's specialisation reads (pointers: dtype and alignment; integers: the value
1, divisibility by 16, the integer width; floats: nothing), so every call of one ``Launch`` would
select the same compiled kernel that its first call returned.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
import triton
from triton import knobs
from triton.compiler import CompiledKernel
from triton.knobs import HookChain
from triton.runtime import _allocation
from triton.runtime.driver import driver
from triton.runtime.jit import compute_cache_key

from . import tuning
from .kernels import primitives
from .validation import interpreter_active

INTERPRET = interpreter_active()
LOG2E: float = primitives.LOG2E.value


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else 1


# --- Triton set-up ---------------------------------------------------------------------------------


def _torch_allocator(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cpu" if INTERPRET else "cuda")


def ensure_allocator() -> None:
    """Device-side TMA descriptors need scratch memory from Triton's allocator (a context variable):
    install a torch-backed one unless the caller already set their own."""
    if _allocation._allocator.get() is _allocation._NULL_ALLOCATOR:
        triton.set_allocator(_torch_allocator)


def tma_ready(t: torch.Tensor) -> bool:
    """TMA needs a unit last stride, a 16-byte aligned base and 16-byte multiples for the row stride
    (always used by the descriptor) and the batch/head strides (unused where that extent is 1)."""
    size = t.element_size()
    stride = t.stride()
    if stride[-1] != 1 or t.data_ptr() % 16 or (stride[2] * size) % 16:
        return False
    shape = t.shape
    return (shape[0] == 1 or (stride[0] * size) % 16 == 0) and (shape[1] == 1 or (stride[1] * size) % 16 == 0)


def tma_operand(t: torch.Tensor) -> torch.Tensor:
    """The tensor itself when TMA can read it in place (any (B, L, H, D) transpose of a contiguous
    tensor with 16-byte rows can); otherwise a copy with its rows padded to 16 bytes."""
    if tma_ready(t):
        return t
    per16 = 16 // t.element_size()
    d = t.shape[-1]
    padded = t.new_empty(*t.shape[:-1], -(-d // per16) * per16)
    padded[..., :d].copy_(t)
    return padded[..., :d]


def on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current device: make it ``t``'s (a no-op when it already is)."""
    if t.is_cuda and t.get_device() != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


# --- launches --------------------------------------------------------------------------------------


class Variant:
    """A kernel with its constexpr arguments and compile options fixed; launches go through
    :meth:`launch` (Triton's ``JITFunction``) or a :class:`Launch` record."""

    __slots__ = ("kernel", "kwargs", "runtime_args", "tail")

    def __init__(self, kernel: triton.runtime.JITFunction, constexprs: dict, options: dict) -> None:
        self.kernel = kernel
        self.kwargs = {**constexprs, **options}
        names = list(kernel.arg_names)
        self.runtime_args = len(names) - len(constexprs)
        # the launcher takes every parameter in order, constexprs included (it skips them): our kernels
        # put theirs last, so that per call they are a constant tail
        tail = names[self.runtime_args:]
        self.tail = tuple(constexprs[name] for name in tail) if set(tail) == set(constexprs) else None

    def launch(self, grid: tuple, args: tuple) -> CompiledKernel | None:
        """Through Triton's ``JITFunction`` (binding, specialisation, compiling if new); returns the
        compiled kernel (None under the interpreter)."""
        return self.kernel[grid](*args, **self.kwargs)


_VARIANTS: dict[tuple, Variant] = {}


def variant(kernel: triton.runtime.JITFunction, constexprs: dict, options: dict) -> Variant:
    """The shared :class:`Variant` of ``kernel`` for these constexprs and options."""
    key = (kernel, tuple(sorted(constexprs.items())), tuple(sorted(options.items())))
    found = _VARIANTS.get(key)
    if found is None:
        found = _VARIANTS[key] = Variant(kernel, constexprs, options)
    return found


_get_stream = None  # Triton's current-stream query (torch's raw stream of a device), bound at first use


class Launch:
    """One launch of a plan: a :class:`Variant`, its grid and its scalar arguments (everything but the
    pointers, which come first in our kernels' signatures). Valid for the plan's key only (see the
    module's docstring)."""

    __slots__ = ("args_tail", "compiled", "device", "grid", "knobs", "scalars", "variant")

    def __init__(self, variant: Variant, grid: tuple[int, int, int], scalars: tuple, device: torch.device) -> None:
        self.variant = variant
        self.grid = grid
        self.scalars = scalars
        self.args_tail = scalars + variant.tail if variant.tail is not None else None
        self.compiled: CompiledKernel | None = None
        self.device = device.index if device.type == "cuda" else None
        self.knobs: tuple = ()

    def __call__(self, *pointers: torch.Tensor | None) -> None:
        """Launch on the current stream of the plan's device (the caller makes it current)."""
        compiled = self.compiled
        if compiled is None and self.args_tail is not None and self.device is not None:
            compiled = self._compiled_before(pointers)
        if compiled is not None and _hooks_idle() and self.knobs == _compile_knobs():
            grid = self.grid
            compiled.run(grid[0], grid[1], grid[2], _get_stream(self.device), compiled.function,
                         compiled.packed_metadata, None, None, None, *pointers, *self.args_tail)
            return
        result = self.variant.launch(self.grid, pointers + self.scalars)
        if isinstance(result, CompiledKernel) and self.args_tail is not None and self.device is not None:
            current_stream(self.device)  # (binds the stream query)
            self.compiled, self.knobs = result, _compile_knobs()

    def _compiled_before(self, pointers: tuple) -> CompiledKernel | None:
        """The kernel that Triton compiled for an earlier launch of this variant whose arguments
        specialise as these do (another plan's: a decoding loop makes a plan per cache length), found
        the way Triton's own launch finds it (its binder and cache key) but without its launch path;
        None when there is none yet, or while launch hooks are set."""
        caches = getattr(self.variant.kernel, "device_caches", None)  # (none under the interpreter)
        if caches is None or self.device not in caches or not _hooks_idle():
            return None
        kernel_cache, key_cache, _target, _backend, binder = caches[self.device]
        debug, mode = _compile_knobs()
        kwargs = dict(self.variant.kwargs, debug=self.variant.kwargs.get("debug", self.variant.kernel.debug) or debug,
                      instrumentation_mode=mode)
        _bound, specialization, options = binder(*pointers, *self.scalars, **kwargs)
        compiled = kernel_cache.get(compute_cache_key(key_cache, specialization, options))
        if not isinstance(compiled, CompiledKernel):
            return None
        current_stream(self.device)  # (binds the stream query)
        self.compiled, self.knobs = compiled, (debug, mode)
        return compiled


def _idle(hook: object) -> bool:
    return hook is None or (type(hook) is HookChain and not hook.calls)


def _hooks_idle() -> bool:
    """No launch hooks (Triton 3.6 keeps an empty HookChain; profilers add to it or replace it): the
    launcher then calls none, and needs no launch metadata."""
    runtime = knobs.runtime
    return _idle(runtime.launch_enter_hook) and _idle(runtime.launch_exit_hook)


def _compile_knobs() -> tuple:
    """Triton settings that select another compiled kernel for the same arguments (JITFunction.run
    reads them per call)."""
    return knobs.runtime.debug, knobs.compilation.instrumentation_mode


# --- plans -----------------------------------------------------------------------------------------


def tensor_key(t: torch.Tensor | None) -> tuple | None:
    """What a tensor argument contributes to a plan's key: shape, strides, dtype, device and its data
    pointer modulo 16 (None for None)."""
    if t is None:
        return None
    return t.shape, t.stride(), t.dtype, t.device, t.data_ptr() & 15


class PlanCache:
    """Launch plans by key. The key must hold everything that changes a launch (shapes, strides,
    dtypes, devices, options, pointer alignments: :func:`tensor_key`); the tuning settings' generation
    is added here. Cleared when it reaches ``size`` entries (a decoding loop with a growing cache
    makes a new key per length)."""

    def __init__(self, size: int = 512) -> None:
        self.size = size
        self.plans: dict = {}
        self.built = 0  # plans made so far (tests read it)

    def get(self, key: tuple, build, *args: object):
        """The plan for ``key``, made by ``build(*args)`` on a miss."""
        key = (tuning.generation(), key)
        plan = self.plans.get(key)
        if plan is None:
            if len(self.plans) >= self.size:
                self.plans.clear()
            plan = self.plans[key] = build(*args)
            self.built += 1
        return plan


# --- workspaces ------------------------------------------------------------------------------------

_WORKSPACES: dict[tuple, tuple[torch.Tensor, ...]] = {}
_DUMMIES: dict[torch.device, torch.Tensor] = {}


def _carve(sizes: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """One float32 allocation cut into 1-d tensors of ``sizes`` elements, each 16-byte aligned."""
    padded = [-(-n // 4) * 4 for n in sizes]
    buf = torch.empty(sum(padded), dtype=torch.float32, device=device)
    parts, start = [], 0
    for n, step in zip(sizes, padded):
        parts.append(buf[start:start + n])
        start += step
    return tuple(parts)


class _Scratch(threading.local):
    keep = True  # False inside transient_scratch()


_SCRATCH = _Scratch()


@contextlib.contextmanager
def transient_scratch() -> Iterator[None]:
    """Inside, :func:`workspace` and :func:`dummy` keep nothing for later calls. For the operators that
    compiled graphs call: torch.compile's CUDA-graph trees run them while allocations go to a graph's
    private memory pool (also in the warm-up runs before a capture), where a kept buffer would be memory
    of the pool that no graph output accounts for."""
    keep, _SCRATCH.keep = _SCRATCH.keep, False
    try:
        yield
    finally:
        _SCRATCH.keep = keep


def workspace(sizes: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Float32 scratch tensors of ``sizes`` elements on ``device`` (1-d, 16-byte aligned), for memory that
    a call writes and reads back before it returns (e.g. the split-KV partial results).

    The rule: reused by later calls on the same CUDA stream, which the stream orders after this call's
    kernels. New ones (not kept) on the CPU, inside :func:`transient_scratch` and while the current stream
    captures a CUDA graph: a cached buffer inside a graph would be shared with eager calls and other
    graphs, which may run concurrently on other streams. So a workspace must never be returned to the
    caller or kept after the call."""
    if device.type != "cuda" or not _SCRATCH.keep or torch.cuda.is_current_stream_capturing():
        return _carve(sizes, device)
    key = (device, current_stream(device.index), sizes)
    found = _WORKSPACES.get(key)
    if found is None:
        if len(_WORKSPACES) >= 64:
            _WORKSPACES.clear()
        found = _WORKSPACES[key] = _carve(sizes, device)
    return found


def current_stream(index: int) -> int:
    """The raw current stream of CUDA device ``index`` (the query Triton's launcher uses)."""
    global _get_stream
    if _get_stream is None:
        _get_stream = driver.active.get_current_stream
    return _get_stream(index)


def dummy(device: torch.device) -> torch.Tensor:
    """A one-element float32 tensor for pointer arguments whose feature is off (never read or written
    by the kernels)."""
    t = _DUMMIES.get(device)
    if t is None:
        t = torch.empty(1, dtype=torch.float32, device=device)
        if device.type != "cuda" or (_SCRATCH.keep and not torch.cuda.is_current_stream_capturing()):
            _DUMMIES[device] = t  # (not memory of a graph's private pool)
    return t
