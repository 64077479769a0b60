"""torch.compile over the public functions: one graph (fullgraph=True raises on a break) through the
infoscale_triton operators (ops.py), with the same output and gradients as eager mode.

On CPU the backend is aot_eager: Dynamo and AOTAutograd trace with fake tensors (the operators' fake
kernels and autograd formula), then run the operators themselves through the interpreter, so compiled
and eager results must be bitwise equal. The ``gpu`` tests use Inductor, the default backend.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from helpers import DEVICE, make_mask, make_qkv
from torch._dynamo.testing import AotEagerAndRecordGraphs

import infoscale_triton
from infoscale_triton import ops, tuning

sdpa = infoscale_triton.scaled_dot_product_attention
gpu = pytest.mark.gpu
# AotEagerAndRecordGraphs hands AOTAutograd an unboxed function: harmless here
pytestmark = pytest.mark.filterwarnings("ignore:Your compiler for AOTAutograd:UserWarning")


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    """Every test compiles from scratch (no cache-size limit across parametrizations)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _dense_case(name: str, dtype: torch.dtype = torch.float32) -> tuple[tuple[torch.Tensor, ...], dict]:
    """(q, k, v) and the keyword arguments of one dense case."""
    b, hq, hkv, lq, lk = 2, 4, 2, 24, 24
    opts: dict[str, Any] = {"enable_gqa": True}
    if name == "infoscale_causal":
        opts.update(is_causal=True, temperature="infoscale", train_len=16)
    elif name == "cos_scale":
        lq = 16
        opts.update(is_causal=True, cos_scale=32.0, temperature="logn_clipped", train_len=16)
    elif name == "kv_lengths_window":
        opts.update(kv_lengths=torch.tensor([24, 13], device=DEVICE), window=(8, 0), temperature="infoscale",
                    train_len=16)
    elif name == "float_mask_tensor_temperature":
        opts.update(attn_mask=make_mask("float_qk", b, hq, lq, lk),
                    temperature=torch.rand(b, hq, lq, device=DEVICE) + 0.5)
    elif name == "dropout":
        opts.update(is_causal=True, dropout_p=0.25, temperature="logn", train_len=16)
    else:
        raise ValueError(name)
    return make_qkv(b, hq, hkv, lq, lk, 16, 16, dtype), opts


DENSE = ["infoscale_causal", "cos_scale", "kv_lengths_window", "float_mask_tensor_temperature", "dropout"]


def _leaves(tensors: dict[str, torch.Tensor], train: bool) -> dict[str, torch.Tensor]:
    """Fresh leaves: requiring grad when training (float tensors only)."""
    return {name: t.detach().clone().requires_grad_(train and t.is_floating_point())
            for name, t in tensors.items()}


def _run(fn: Callable[..., torch.Tensor], tensors: dict[str, torch.Tensor], train: bool,
         seed: int = 0) -> list[torch.Tensor]:
    """The output and, when training, the gradients of every float tensor for a fixed upstream
    gradient. ``seed`` is set first (dropout)."""
    leaves = _leaves(tensors, train)
    torch.manual_seed(seed)
    out = fn(**leaves)
    if not train:
        return [out]
    wrt = [t for t in leaves.values() if t.requires_grad]
    dout = torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out).to(out.dtype)
    return [out.detach(), *torch.autograd.grad(out, wrt, dout)]


def _assert_compiles_to_one_graph(fn: Callable[..., torch.Tensor], tensors: dict[str, torch.Tensor],
                                  train: bool, backend: Any = None, atol: float = 0.0) -> list[Any]:
    """fn compiled with fullgraph=True gives one graph and eager's results (within ``atol``; bitwise by
    default). Returns the recorded Dynamo graphs (aot_eager) or []."""
    recorder = AotEagerAndRecordGraphs() if backend is None else None
    compiled = torch.compile(fn, fullgraph=True, backend=recorder or backend)
    with torch.set_grad_enabled(train):
        eager = _run(fn, tensors, train)
        got = _run(compiled, tensors, train)
        again = _run(compiled, tensors, train, seed=1)  # a new dropout seed: no recompilation
    for name, g, e in zip(["out", *tensors], got, eager):
        assert g.shape == e.shape and g.stride() == e.stride(), f"{name}: layout differs from eager"
        torch.testing.assert_close(g, e, atol=atol, rtol=0.0, msg=lambda m, name=name: f"{name}: {m}")
    assert all(torch.isfinite(t).all() for t in again)
    if recorder is None:
        return []
    assert len(recorder.graphs) == 1, f"{len(recorder.graphs)} graphs"
    if train:
        assert len(recorder.fw_graphs) == 1 and len(recorder.bw_graphs) == 1
    return recorder.graphs


def _targets(graph: torch.fx.GraphModule) -> str:
    return " ".join(str(node.target) for node in graph.graph.nodes)


@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("case", DENSE)
@pytest.mark.usefixtures("dense_only")  # (cos_scale has 16 query rows: inference would decode)
def test_dense(case: str, train: bool) -> None:
    (q, k, v), opts = _dense_case(case)
    tensors = {"q": q, "k": k, "v": v}
    temperature = opts.pop("temperature", None)
    if isinstance(temperature, torch.Tensor):
        tensors["temperature"] = temperature  # a leaf: its gradient is checked too
    else:
        opts["temperature"] = temperature

    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: torch.Tensor) -> torch.Tensor:
        return sdpa(q, k, v, **opts, **kw)

    (graph,) = _assert_compiles_to_one_graph(fn, tensors, train)
    assert "infoscale_triton.attention_fwd" in _targets(graph)


@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
def test_return_entropy(train: bool) -> None:
    """return_entropy=True compiles in one graph; the entropy comes back as eager's, and the loss may
    use it without a gradient through it."""
    (q, k, v), opts = _dense_case("infoscale_causal")

    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out, stats = sdpa(q, k, v, **opts, return_entropy=True)
        return out * stats.entropy.unsqueeze(-1) + stats.max_prob.unsqueeze(-1)

    _assert_compiles_to_one_graph(fn, {"q": q, "k": k, "v": v}, train)


def test_dynamic_shapes() -> None:
    """dynamic=True: the fake kernels take symbolic lengths; new lengths reuse the graph."""
    recorder = AotEagerAndRecordGraphs()

    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return sdpa(q, k, v, is_causal=True, enable_gqa=True, cos_scale=20.0, temperature="infoscale",
                    train_len=16)

    compiled = torch.compile(fn, fullgraph=True, backend=recorder, dynamic=True)
    for length in (20, 28, 36):
        tensors = dict(zip("qkv", make_qkv(1, 4, 2, length, length + 3, 16, 16, torch.float32)))
        got, eager = _run(compiled, tensors, train=True), _run(fn, tensors, train=True)
        assert all(torch.equal(g, e) for g, e in zip(got, eager))
        if length == 20:
            graphs = len(recorder.graphs)
    assert len(recorder.graphs) == graphs, "a new length recompiled"


def test_loss_backward_of_a_module() -> None:
    """A small module (projection, attention, loss) compiled whole; loss.backward() outside."""
    torch.manual_seed(0)
    module = torch.nn.Linear(16, 3 * 16, device=DEVICE)

    def step(x: torch.Tensor) -> torch.Tensor:
        q, k, v = module(x).view(2, 24, 3, 2, 8).permute(2, 0, 3, 1, 4).repeat_interleave(2, dim=-1)
        out = sdpa(q, k, v, is_causal=True, temperature="infoscale", train_len=16, dropout_p=0.1)
        return out.square().mean()

    x = torch.randn(2, 24, 16, device=DEVICE)
    grads = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        module.zero_grad()
        torch.manual_seed(3)
        fn(x).backward()
        grads.append([p.grad.clone() for p in module.parameters()])
    for g, e in zip(*grads):
        assert torch.equal(g, e)


def _varlen_tensors() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    cu_q = torch.tensor([0, 5, 17, 24], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 9, 15, 30], dtype=torch.int32, device=DEVICE)
    q, k, v = (t[0].transpose(0, 1) for t in make_qkv(1, 4, 2, 26, 30, 16, 16, torch.float32))
    opts = {"cu_seqlens_q": cu_q, "cu_seqlens_k": cu_k, "max_seqlen_q": 12, "max_seqlen_k": 15,
            "is_causal": True, "temperature": "infoscale", "train_len": 8}
    return {"q": q, "k": k, "v": v}, opts


@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
def test_varlen(train: bool) -> None:
    """Packed sequences, token-major output (the fake kernel's strides must be the real ones), two
    tokens past the last sequence."""
    tensors, opts = _varlen_tensors()

    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return infoscale_triton.varlen_attention(q, k, v, **opts)

    _assert_compiles_to_one_graph(fn, tensors, train)


def _decode_tensors(lk: int = 64) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    q, k, v = make_qkv(2, 4, 2, 2, lk, 16, 16, torch.float32)
    opts = {"kv_lengths": torch.tensor([lk, 37], device=DEVICE), "temperature": "infoscale", "train_len": 16,
            "cos_scale": 24.0}
    return {"q": q, "k": k, "v": v}, opts


def test_decode() -> None:
    tensors, opts = _decode_tensors()

    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return infoscale_triton.decode_attention(q, k, v, **opts, num_splits=2)

    (graph,) = _assert_compiles_to_one_graph(fn, tensors, train=False)
    assert "infoscale_triton.decode_fwd" in _targets(graph)


def test_dense_routes_to_decode(tune: Callable[..., None]) -> None:
    """An inference call of the dense function that decodes goes through the decode operator."""
    tune(decode_min_keys=1)  # any cache length, whatever the measured threshold
    tensors, opts = _decode_tensors()

    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return sdpa(q, k, v, enable_gqa=True, **opts)

    (graph,) = _assert_compiles_to_one_graph(fn, tensors, train=False)
    assert "infoscale_triton.decode_fwd" in _targets(graph)


@pytest.mark.parametrize("fullgraph", [False, True])
def test_decode_refuses_grad_when_compiled(fullgraph: bool) -> None:
    """As in eager mode; with fullgraph=True Dynamo cannot fall back to run the raise, and reports it
    (with our message) as unsupported."""
    tensors, opts = _decode_tensors()
    q = tensors["q"].requires_grad_()
    compiled = torch.compile(infoscale_triton.decode_attention, fullgraph=fullgraph, backend="aot_eager")
    error = torch._dynamo.exc.Unsupported if fullgraph else NotImplementedError
    with pytest.raises(error, match="inference-only"):
        compiled(q, tensors["k"], tensors["v"], **opts)


def _record_operator_calls(monkeypatch: pytest.MonkeyPatch, tune: Callable[..., None]) -> dict[str, tuple]:
    """The (args, kwargs) of the last call of each operator (by name) that the public functions make."""
    calls: dict[str, tuple] = {}
    tune(operators_in_eager=True)  # eager calls skip the operators otherwise
    for name in ("attention_fwd", "attention_bwd", "decode_fwd"):
        def record(*args: Any, name: str = name, **kwargs: Any) -> Any:
            calls[name] = (args, kwargs)
            return getattr(torch.ops.infoscale_triton, name)(*args, **kwargs)

        monkeypatch.setattr(ops, name, record)
    return calls


@pytest.mark.parametrize("case", ["cos_scale", "dropout", "float_mask_tensor_temperature", "varlen"])
def test_opcheck_attention(case: str, monkeypatch: pytest.MonkeyPatch, tune: Callable[..., None]) -> None:
    """torch.library.opcheck of both operators on the arguments a training call gives them: schema,
    fake kernels (shapes and strides against the real ones), autograd registration, AOT dispatch."""
    calls = _record_operator_calls(monkeypatch, tune)
    if case == "varlen":
        tensors, opts = _varlen_tensors()
        fn: Callable[..., torch.Tensor] = infoscale_triton.varlen_attention
    else:
        (q, k, v), opts = _dense_case(case)
        tensors, fn = {"q": q, "k": k, "v": v}, sdpa
    _run(lambda q, k, v: fn(q, k, v, **opts), tensors, train=True)
    torch.library.opcheck(torch.ops.infoscale_triton.attention_fwd.default, *calls["attention_fwd"])
    torch.library.opcheck(torch.ops.infoscale_triton.attention_bwd.default, *calls["attention_bwd"])


def test_opcheck_decode(monkeypatch: pytest.MonkeyPatch, tune: Callable[..., None]) -> None:
    calls = _record_operator_calls(monkeypatch, tune)
    tensors, opts = _decode_tensors()
    infoscale_triton.decode_attention(*tensors.values(), **opts, num_splits=2)
    torch.library.opcheck(torch.ops.infoscale_triton.decode_fwd.default, *calls["decode_fwd"])


# --- Inductor (compiled Triton, GPU) -------------------------------------------------------------


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("case", ["infoscale_causal", "cos_scale", "float_mask_tensor_temperature"])
def test_inductor_dense_training(case: str, dtype: torch.dtype) -> None:
    (q, k, v), opts = _dense_case(case, dtype)
    tensors = {"q": q, "k": k, "v": v}

    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return sdpa(q, k, v, **opts)

    _assert_compiles_to_one_graph(fn, tensors, train=True, backend="inductor", atol=1e-6)


@gpu
def test_inductor_decode() -> None:
    tensors, opts = _decode_tensors(lk=1500)

    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return infoscale_triton.decode_attention(q, k, v, **opts)

    _assert_compiles_to_one_graph(fn, tensors, train=False, backend="inductor", atol=1e-6)


@gpu
def test_inductor_decode_cuda_graphs() -> None:
    """mode="reduce-overhead" (CUDA graphs): replays see new cache contents and lengths."""
    tensors, opts = _decode_tensors(lk=1500)
    q, k, v = tensors.values()
    lengths = opts.pop("kv_lengths")
    compiled = torch.compile(infoscale_triton.decode_attention, fullgraph=True, mode="reduce-overhead")
    with torch.no_grad():
        for step in range(4):
            lengths.copy_(torch.tensor([1500 - step, 700 + step]))
            k.normal_()
            got = compiled(q, k, v, lengths, **opts).clone()
            torch.testing.assert_close(got, infoscale_triton.decode_attention(q, k, v, lengths, **opts),
                                       atol=1e-6, rtol=0.0)


@gpu
def test_reduce_overhead_training_step() -> None:
    """Forward and loss under mode="reduce-overhead" (CUDA graphs, the backward graph too), then
    loss.backward(): every replay, on new inputs, gives eager's gradients bit for bit (the operators
    are opaque to Inductor, so nothing around the kernels can change their numerics)."""

    def loss_of(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        out = sdpa(q, k, v, is_causal=True, enable_gqa=True, temperature="infoscale", train_len=64,
                   cos_scale=32.0)
        return (out * w).sum()

    compiled = torch.compile(loss_of, mode="reduce-overhead")
    for _ in range(4):  # warm-up, recording, then replays
        inputs = make_qkv(2, 4, 2, 300, 300, 64, 64, torch.bfloat16)
        w = torch.randn(2, 4, 300, 64, device=DEVICE, dtype=torch.bfloat16)
        runs = []
        for fn in (compiled, loss_of):
            leaves = [x.detach().clone().requires_grad_() for x in inputs]
            loss = fn(*leaves, w)
            loss.backward()
            runs.append([loss.detach().clone(), *(x.grad for x in leaves)])
        (loss, *grads), (eager_loss, *eager_grads) = runs
        # Inductor's fused sum may add in another order: the loss to rounding, the gradients exactly
        torch.testing.assert_close(loss, eager_loss, rtol=1e-2, atol=0.0)
        for got, want in zip(grads, eager_grads):
            assert torch.equal(got, want)


@gpu
def test_cuda_graph_capture_autotune_off() -> None:
    """A dense forward+backward captured in torch.cuda.CUDAGraph with the autotuner switched on: the
    capture takes the table's config (autotuning would time kernels inside the capture) and replays
    follow new contents of the captured inputs."""
    leaves = [x.requires_grad_() for x in make_qkv(1, 4, 2, 333, 333, 64, 64, torch.bfloat16)]
    dout = torch.randn(1, 4, 333, 64, device=DEVICE, dtype=torch.bfloat16)

    def step() -> tuple[torch.Tensor, ...]:
        out = sdpa(*leaves, is_causal=True, enable_gqa=True, temperature="logn", train_len=64)
        return (out, *torch.autograd.grad(out, leaves, dout))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # compile the table's config outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with tuning.override(autotune=True), torch.cuda.graph(graph):
        captured = step()
    # eager comparison with the same (table) config
    for _ in range(2):
        for x in (*leaves, dout):
            x.data.copy_(torch.randn_like(x))
        graph.replay()
        for got, want in zip(captured, step()):
            assert torch.equal(got, want)
