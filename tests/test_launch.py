"""The launch layer (infoscale_triton/launch.py): launch plans are never stale, the fast launch passes
Triton's launcher what JITFunction.run would, workspaces follow their rule, and the tuning switches.

Kernels do not run here (launches are recorded instead): the subject is the host side."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from helpers import DEVICE, make_qkv, randn
from infoscale_triton.kernels.attention_decode import decode_combine_kernel
from triton import knobs
from triton.backends.nvidia.compiler import CUDABackend
from triton.compiler import CompiledKernel
from triton.runtime.jit import JITFunction, create_function_from_signature

import infoscale_triton
from infoscale_triton import backward, forward, launch, operands, ops, splitkv, tuning
from infoscale_triton.validation import Problem, check_inputs


def _binder(kernel: Any) -> Callable[..., tuple]:
    """Triton's own argument binder for ``kernel`` (what JITFunction.run specialises with), on the CPU:
    a JITFunction of the same function and decorator options (under the interpreter the kernels are
    InterpretedFunctions)."""
    jit = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn, **kernel.kwargs)
    return create_function_from_signature(jit.signature, jit.params, CUDABackend)


_BINDERS: dict[Any, Callable[..., tuple]] = {}


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[int, tuple, list]]]:
    """Record instead of launching: (id of the Launch, its grid, Triton's specialisation of the
    arguments) per launch. The records are kept alive for the test, so that no id is reused when a plan
    cache drops its plans (it clears itself when full)."""
    calls: list[tuple[int, tuple, list]] = []
    alive: list[launch.Launch] = []

    def record(self: launch.Launch, *pointers: Any) -> None:
        kernel = self.variant.kernel
        binder = _BINDERS.setdefault(kernel, _binder(kernel))
        _, specialization, _ = binder(*pointers, *self.scalars, **self.variant.kwargs)
        alive.append(self)
        calls.append((id(self), self.grid, specialization))

    monkeypatch.setattr(launch.Launch, "__call__", record)
    yield calls


def _same_launch_same_specialization(calls: list[tuple[int, tuple, list]]) -> int:
    """Every Launch record saw one Triton specialisation (else its cached compiled kernel would be
    stale); returns how many records there were."""
    by_launch: dict[int, list] = {}
    for ident, _grid, spec in calls:
        by_launch.setdefault(ident, []).append(spec)
    for specs in by_launch.values():
        assert all(s == specs[0] for s in specs), f"one launch plan, two specialisations: {specs[0]} / {specs[1:]}"
    return len(by_launch)


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """The same values at a data pointer that is not 16-byte aligned (2 elements further)."""
    flat = torch.empty(t.numel() + 2, dtype=t.dtype, device=t.device)
    out = flat[2:].view(t.shape)
    out.copy_(t)
    return out


def _decode_problem(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **opts: Any) -> Problem:
    return check_inputs(q, k, v, None, 0.0, opts.pop("is_causal", True), None, True, opts.pop("temperature", None),
                        opts.pop("train_len", None), None, kernel=True, kv_lengths=opts.pop("kv_lengths", None),
                        names=("query", "key_cache", "value_cache"))


def test_decode_plans_follow_every_launch_input(launches: list) -> None:
    """A repeated call reuses its plan; a changed stride, alignment, dtype, shape, option or tuning
    setting gets a new one."""
    q, k, v = make_qkv(2, 4, 2, 1, 40, 32, 32, torch.float16)
    p = _decode_problem(q, k, v)
    built = splitkv._PLANS.built
    splitkv.decode_forward(q, k, v, p, num_splits=2)
    splitkv.decode_forward(q.clone(), k.clone(), v.clone(), p, num_splits=2)  # new pointers, same layout
    assert splitkv._PLANS.built == built + 1
    variants = [
        (q, k.transpose(1, 2).contiguous().transpose(1, 2), v),  # strides
        (q, _misaligned(k), v),  # alignment
        (_misaligned(q), k, v),
        (q.float(), k.float(), v.float()),  # dtype
        (q, k[:, :, :39], v[:, :, :39]),  # length (and batch/head strides)
    ]
    for args in variants:
        before = splitkv._PLANS.built
        splitkv.decode_forward(*args, _decode_problem(*args), num_splits=2)
        assert splitkv._PLANS.built == before + 1
    before = splitkv._PLANS.built
    splitkv.decode_forward(q, k, v, _decode_problem(q, k, v, temperature="logn", train_len=8), num_splits=2)
    splitkv.decode_forward(q, k, v, p, num_splits=3)
    with tuning.override(decode_config={"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}):
        splitkv.decode_forward(q, k, v, p, num_splits=2)
    assert splitkv._PLANS.built == before + 3
    _same_launch_same_specialization(launches)


def _neighbours(axes: dict[str, list], draws: int, seed: int) -> Iterator[dict[str, Any]]:
    """Random points of the grid ``axes``, each followed by every point that differs from it in one
    axis: a plan key that missed an axis would give two such calls one plan."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(draws):
        base = {name: values[torch.randint(len(values), (1,), generator=gen).item()] for name, values in axes.items()}
        yield base
        yield base  # (the same key again, with new tensors)
        for name, values in axes.items():
            for value in values:
                if value is not base[name]:
                    yield {**base, name: value}


DECODE_AXES: dict[str, list] = {
    "dtype": [torch.float16, torch.float32],
    "batch": [1, 2],
    "lq": [1, 2],
    "lk": [16, 17, 32, 47],
    "layout": ["contiguous", "blhd", "misaligned"],
    "lengths": [None, torch.int32, torch.int64],
    "temperature": [None, "infoscale", "tensor"],
    "splits": [None, 1, 2],
}


def test_decode_launches_never_stale(launches: list) -> None:
    """Decode calls around random points (dtypes, shapes, layouts, alignments, options): every launch
    that one plan serves specialises as Triton would specialise that launch's own arguments, so the
    compiled kernel a plan keeps always fits."""
    for c in _neighbours(DECODE_AXES, 12, 0):
        b, lq, lk = c["batch"], c["lq"], c["lk"]
        q, k, v = make_qkv(b, 4, 2, lq, lk, 16, 16, c["dtype"],
                           layout=("contiguous", "blhd" if c["layout"] == "blhd" else "contiguous", "contiguous"))
        if c["layout"] == "misaligned":
            k = _misaligned(k)
        opts: dict[str, Any] = {}
        if c["lengths"] is not None:
            opts["kv_lengths"] = torch.full((b,), lk, dtype=c["lengths"], device=DEVICE)
        if c["temperature"] == "tensor":
            opts["temperature"] = torch.rand(b, 4, lq, device=DEVICE, dtype=c["dtype"])
        elif c["temperature"] is not None:
            opts.update(temperature=c["temperature"], train_len=8)
        splitkv.decode_forward(q, k, v, _decode_problem(q, k, v, **opts), num_splits=c["splits"])
    assert _same_launch_same_specialization(launches) > 100  # (many plans, each called one or more times)


DENSE_AXES: dict[str, list] = {
    "dtype": [torch.float16, torch.float32],
    "shape": [(1, 2, 2, 16, 16), (2, 4, 2, 17, 33), (1, 2, 1, 32, 48)],
    "layout": ["contiguous", "blhd", "misaligned"],
    "causal": [False, True],
    "options": ["none", "logn", "kv_lengths", "window", "bool_mask", "tensor_temperature"],
}


def test_dense_launches_never_stale(launches: list) -> None:
    """As for decoding, for the forward and the backward plans."""
    for c in _neighbours(DENSE_AXES, 6, 1):
        dtype, (b, hq, hkv, lq, lk), option = c["dtype"], c["shape"], c["options"]
        q, k, v = make_qkv(b, hq, hkv, lq, lk, 16, 16, dtype,
                           layout=("contiguous", "blhd" if c["layout"] == "blhd" else "contiguous", "contiguous"))
        if c["layout"] == "misaligned":
            q = _misaligned(q)
        attn_mask = torch.rand(lq, lk, device=DEVICE) > 0.3 if option == "bool_mask" else None
        lengths = torch.full((b,), lk - 1, dtype=torch.int64, device=DEVICE) if option == "kv_lengths" else None
        temperature, train_len = {"logn": ("logn", 8),
                                  "tensor_temperature": (torch.rand(b, hq, lq, device=DEVICE, dtype=dtype), None),
                                  }.get(option, (None, None))
        p = check_inputs(q, k, v, attn_mask, 0.0, c["causal"], None, hq != hkv, temperature, train_len, None,
                         kernel=True, kv_lengths=lengths, window=(4, 0) if option == "window" else None)
        out, lse = forward.attention_forward(q, k, v, p)
        backward.attention_backward(q, k, v, out, lse, torch.randn_like(out), p,
                                    temperature_grad=p.temperature_tensor is not None)
    assert _same_launch_same_specialization(launches) > 100


def test_dense_plans_follow_stride_and_alignment(launches: list) -> None:
    q, k, v = make_qkv(1, 2, 2, 24, 24, 16, 16, torch.float16)
    p = check_inputs(q, k, v, None, 0.0, True, None, False, None, None, None, kernel=True)
    built = forward._PLANS.built
    forward.attention_forward(q, k, v, p)
    forward.attention_forward(q.clone(), k.clone(), v.clone(), p)
    assert forward._PLANS.built == built + 1
    forward.attention_forward(q, k.transpose(1, 2).contiguous().transpose(1, 2), v, p)
    assert forward._PLANS.built == built + 2
    forward.attention_forward(q, k, _misaligned(v), p)
    assert forward._PLANS.built == built + 3
    _same_launch_same_specialization(launches)


class _FakeCompiled(CompiledKernel):
    """A compiled kernel whose launcher records its arguments (no GPU here)."""

    def __init__(self) -> None:  # (CompiledKernel's own reads the compiled files)
        self.function, self.packed_metadata, self.calls = "function", "metadata", []
        self._run = lambda *args: self.calls.append(args)


def test_fast_launch_passes_what_jit_run_would(monkeypatch: pytest.MonkeyPatch) -> None:
    """After the first launch of a Launch record returned its compiled kernel, later calls go straight
    to the compiled kernel's launcher with JITFunction.run's arguments: the grid, the stream, the
    kernel, its metadata, no launch metadata or hooks, then every parameter in signature order
    (constexprs included). Launch hooks (profilers) or another debug setting take the JIT path again."""
    fake = _FakeCompiled()
    jit_calls: list[tuple] = []

    def jit_launch(self: launch.Variant, grid: tuple, args: tuple) -> CompiledKernel:
        jit_calls.append((grid, args))
        return fake

    monkeypatch.setattr(launch.Variant, "launch", jit_launch)
    monkeypatch.setattr(launch, "_get_stream", lambda index: 1000 + index)
    constexprs = {"HEAD_DV": 24, "BLOCK_DV": 32, "BLOCK_S": 4}
    record = launch.Launch(launch.variant(decode_combine_kernel, constexprs, {"num_warps": 4}), (6, 1, 1),
                           (12, 4, 2, 3, 2, 4), torch.device("cuda", 1))
    pointers = tuple(torch.empty(4) for _ in range(4))
    record(*pointers)  # the JIT path, which returns the compiled kernel
    assert jit_calls == [((6, 1, 1), pointers + (12, 4, 2, 3, 2, 4))] and fake.calls == []
    record(*pointers)
    bound = inspect.signature(decode_combine_kernel.fn).bind(*pointers, 12, 4, 2, 3, 2, 4, **constexprs)
    assert len(fake.calls) == 1
    assert fake.calls[0] == (6, 1, 1, 1001, "function", "metadata", None, None, None, *bound.arguments.values())
    hook = lambda metadata: None
    knobs.runtime.launch_exit_hook.add(hook)  # (Triton 3.6 keeps hook chains, empty by default)
    try:
        record(*pointers)
    finally:
        knobs.runtime.launch_exit_hook.remove(hook)
    assert len(jit_calls) == 2 and len(fake.calls) == 1
    monkeypatch.setattr(knobs.runtime, "launch_enter_hook", hook)  # (a profiler may replace the chain)
    record(*pointers)
    assert len(jit_calls) == 3 and len(fake.calls) == 1
    monkeypatch.undo()
    monkeypatch.setattr(launch.Variant, "launch", jit_launch)
    monkeypatch.setattr(launch, "_get_stream", lambda index: 1000 + index)
    record(*pointers)
    assert len(jit_calls) == 3 and len(fake.calls) == 2  # hooks gone: the fast path again
    monkeypatch.setattr(knobs.runtime, "debug", not knobs.runtime.debug)
    record(*pointers)
    assert len(jit_calls) == 4 and len(fake.calls) == 2


def test_interpreter_takes_the_jit_path() -> None:
    """Under the interpreter a launch returns no compiled kernel, so every call goes through it (and
    computes: the combine of one split copies the partial output)."""
    if not launch.INTERPRET:
        pytest.skip("compiled kernels here")
    constexprs = {"HEAD_DV": 16, "BLOCK_DV": 16, "BLOCK_S": 1}
    record = launch.Launch(launch.variant(decode_combine_kernel, constexprs, {}), (2, 1, 1), (16, 16, 16, 2, 1, 1),
                           torch.device("cpu"))
    acc = torch.randn(2, 16)
    for _ in range(2):
        out = torch.full((1, 2, 1, 16), float("nan"))
        record(acc, torch.zeros(2), torch.ones(2), out)
        torch.testing.assert_close(out.view(2, 16), acc)
    assert record.compiled is None


def test_workspace_rule() -> None:
    sizes = (10, 3, 3)
    parts = launch.workspace(sizes, torch.device("cpu"))
    assert [t.numel() for t in parts] == list(sizes) and all(t.data_ptr() % 16 == 0 for t in parts)
    assert not launch._WORKSPACES  # nothing kept off the GPU


@pytest.mark.gpu
def test_workspace_rule_gpu() -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    first = launch.workspace((64, 8, 8), device)
    assert launch.workspace((64, 8, 8), device)[0] is first[0]  # same stream: reused
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        assert launch.workspace((64, 8, 8), device)[0] is not first[0]  # another stream: its own
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = launch.workspace((64, 8, 8), device)
    assert captured[0] is not first[0] and all(captured[0] is not w[0] for w in launch._WORKSPACES.values())


def test_tuning_override() -> None:
    before = tuning.current()
    generation = tuning.generation()
    with tuning.override(decode_min_keys=7, autotune=False) as inside:
        assert tuning.current() is inside and inside.decode_min_keys == 7
        assert tuning.generation() != generation
    assert tuning.current() is before
    with pytest.raises(RuntimeError), tuning.override(decode_min_keys=3):
        raise RuntimeError
    assert tuning.current() is before
    with pytest.raises(TypeError, match="unknown tuning setting.*decode_min_key"), tuning.override(decode_min_key=3):
        pass
    with pytest.raises(dataclasses.FrozenInstanceError):
        tuning.current().autotune = True  # type: ignore[misc]


def test_options_cover_the_problem() -> None:
    """ops.OPTIONS lists every Problem field but the shapes (a new option cannot be forgotten), and a
    Problem survives the trip through the operators' arguments."""
    shapes = {"batch", "heads_q", "heads_kv", "lq", "lk", "head_dim", "head_dim_v"}
    fields = [f.name for f in dataclasses.fields(Problem)]
    assert sorted(o.name for o in ops.OPTIONS) == sorted(set(fields) - shapes)
    q, k, v = make_qkv(2, 4, 2, 5, 9, 16, 16, torch.float32)
    p = check_inputs(q, k, v, torch.rand(5, 9, device=DEVICE) > 0.5, 0.1, True, 0.3, True, "logn_clipped", 8,
                     None, kernel=True, kv_lengths=torch.tensor([9, 4], device=DEVICE), window=(3, -1))
    back = ops.problem(q, k, v, ops.option_args(p))
    for name in fields:
        assert getattr(back, name) is getattr(p, name) or getattr(back, name) == getattr(p, name), name


@pytest.mark.gpu
def test_fast_launches_compute_what_jit_launches_compute() -> None:
    """On the GPU: a plan's first call (JITFunction.run) keeps the compiled kernels, later calls launch
    them directly and give the same bits; a misaligned cache gets its own plan and the same result to
    rounding."""
    q, k, v = make_qkv(2, 8, 2, 1, 3000, 128, 128, torch.bfloat16)
    p = _decode_problem(q, k, v, temperature="infoscale", train_len=512)
    first = splitkv.decode_forward(q, k, v, p)
    plan = splitkv._PLANS.plans[next(reversed(splitkv._PLANS.plans))]
    assert plan.split.compiled is not None and (plan.combine is None or plan.combine.compiled is not None)
    for _ in range(3):
        assert torch.equal(splitkv.decode_forward(q, k, v, p), first)
    built = splitkv._PLANS.built
    moved = splitkv.decode_forward(q, _misaligned(k), _misaligned(v), p)
    assert splitkv._PLANS.built == built + 1
    torch.testing.assert_close(moved, first, rtol=2e-2, atol=2e-2)
    qd, kd, vd = make_qkv(1, 16, 16, 256, 256, 128, 128, torch.bfloat16)
    pd = check_inputs(qd, kd, vd, None, 0.0, True, None, False, None, None, None, kernel=True)
    out, lse = forward.attention_forward(qd, kd, vd, pd)
    for _ in range(3):
        again, lse_again = forward.attention_forward(qd, kd, vd, pd)
        assert torch.equal(again, out) and torch.equal(lse_again, lse)


@pytest.mark.gpu
def test_growing_cache_reuses_compiled_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache one key longer at each call (generate() with a dynamic cache) is a new plan per length.
    Once Triton has compiled each specialisation (lengths that are multiples of 16 specialise apart, and
    so do split counts), a new plan finds its kernel without Triton's JITFunction path
    (Launch._compiled_before) and computes the same bits."""
    q = randn(1, 32, 1, 128, dtype=torch.bfloat16)
    full_k, full_v = (randn(1, 8, 1200, 128, dtype=torch.bfloat16) for _ in range(2))
    caches = [(full_k[:, :, :n].contiguous(), full_v[:, :, :n].contiguous()) for n in range(1100, 1200)]
    opts: dict[str, Any] = dict(temperature="infoscale", train_len=512)
    first = [infoscale_triton.decode_attention(q, k, v, **opts) for k, v in caches]  # through Triton's path
    jit_launches = []
    real = launch.Variant.launch
    monkeypatch.setattr(launch.Variant, "launch", lambda self, *a: jit_launches.append(1) or real(self, *a))
    splitkv._PLANS.plans.clear()
    for (k, v), want in zip(caches, first):
        assert torch.equal(infoscale_triton.decode_attention(q, k, v, **opts), want)
    assert not jit_launches


def test_key_only_masks() -> None:
    """A boolean mask the same for every head and query row takes the key-range path (tiles outside its
    keys skipped), whatever the stride of an extent of 1: transformers' decoding steps pass a contiguous
    (B, 1, 1, Lk) mask with Lq = 1. A mask that differs by row does not."""
    q, k, v = make_qkv(2, 4, 2, 1, 40, 16, 16, torch.float32)
    mask = torch.ones(2, 1, 1, 40, dtype=torch.bool, device=DEVICE)
    mask[1, ..., :7] = False
    p = check_inputs(q, k, v, mask, 0.0, False, None, True, None, None, None, kernel=True)
    assert mask.stride()[1:3] == (40, 40) and operands._key_only(mask, p)
    q3 = make_qkv(2, 4, 2, 3, 40, 16, 16, torch.float32)[0]
    p3 = check_inputs(q3, k, v, mask, 0.0, False, None, True, None, None, None, kernel=True)
    assert operands._key_only(mask, p3)  # broadcast over the 3 rows
    rows = mask.expand(2, 1, 3, 40).clone()
    rows[0, 0, 2, 5] = False
    assert not operands._key_only(rows, dataclasses.replace(p3, attn_mask=rows))
