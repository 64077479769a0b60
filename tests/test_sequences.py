"""What real models feed attention: key padding (``kv_lengths`` and a ``(B, 1, 1, Lk)`` boolean mask),
sliding windows and packed variable-length batches (``varlen_attention``), forward and backward.

Each path is checked against the float64 reference given the equivalent explicit mask (and, for
varlen, the dense reference on each sequence), with fresh random lengths that include 0 and 1; rows
that see no key must give zeros and zero, finite gradients (helpers.check_fused_grads checks that).
"""

from __future__ import annotations

import itertools
import os
from typing import Any

import pytest
import torch
from helpers import (
    DEVICE,
    DTYPES,
    ON_GPU,
    assert_within_budget,
    check_fused,
    check_fused_grads,
    make_qkv,
    randn,
)

import infoscale_triton
from infoscale_triton import reference

gpu = pytest.mark.gpu
# interpreter-sized breadth: cheap on CPU, but every case is new kernel compiles on a GPU, which runs the
# ``gpu`` cases at tile-sized shapes instead (INFOSCALE_GRAD_BREADTH_ON_GPU=1 runs these there too)
breadth = pytest.mark.skipif(ON_GPU and os.environ.get("INFOSCALE_GRAD_BREADTH_ON_GPU", "0") in ("", "0"),
                             reason="interpreter-sized breadth (compile-bound on a GPU)")
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
causal = pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
TEMPS = [None, "infoscale", "logn_clipped"]
temps = pytest.mark.parametrize("temperature", TEMPS, ids=lambda t: str(t))


def _temp_opts(temperature: str | None) -> dict[str, Any]:
    return {"temperature": temperature, "train_len": 24} if temperature else {}


def random_lengths(count: int, most: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``count`` lengths in [0, most] that always include 0, 1 and ``most`` (shuffled), the rest random."""
    fixed = torch.tensor([0, 1, most])[:count]
    rest = torch.randint(0, most + 1, (max(count - 3, 0),), generator=generator)
    both = torch.cat([fixed, rest])
    return both[torch.randperm(count, generator=generator)]


def padding_mask(lengths: torch.Tensor, lk: int) -> torch.Tensor:
    """The explicit (B, 1, 1, Lk) boolean mask of right padding."""
    return (torch.arange(lk) < lengths[:, None]).view(-1, 1, 1, lk).to(DEVICE)


# ---- key padding -------------------------------------------------------------------------------

@breadth
@dtypes
@causal
@temps
def test_kv_lengths(dtype: torch.dtype, is_causal: bool, temperature: str | None) -> None:
    """kv_lengths against the reference with kv_lengths and with the explicit padding mask."""
    b, lq, lk = 4, 45, 70
    lengths = random_lengths(b, lk)
    q, k, v = make_qkv(b, 4, 2, lq, lk, 32, 24, dtype)
    opts = dict(is_causal=is_causal, enable_gqa=True, **_temp_opts(temperature))
    kv = lengths.to(DEVICE)
    if dtype != torch.bfloat16:  # (bf16 gradients: the GPU cases below and test_smoke.py)
        check_fused_grads(q, k, v, kv_lengths=kv, **opts)
    fused = check_fused(q, k, v, kv_lengths=kv, **opts)
    mask = padding_mask(lengths, lk)
    explicit = reference.scaled_dot_product_attention(*(x.double() for x in (q, k, v)), attn_mask=mask, **opts)
    low = reference.scaled_dot_product_attention(q, k, v, attn_mask=mask, **opts).double()
    assert_within_budget(fused, explicit, low, dtype, "kv_lengths vs the explicit mask: ")


@causal
def test_kv_lengths_out_of_range_are_clamped(is_causal: bool) -> None:
    """Lengths past Lk count as Lk and negative ones as 0 (clamped on the device, never read on the
    host)."""
    q, k, v = make_qkv(3, 2, 2, 20, 30, 16, 16, torch.float32)
    kv = torch.tensor([-5, 31, 1000], device=DEVICE)
    out = infoscale_triton.scaled_dot_product_attention(q, k, v, is_causal=is_causal, kv_lengths=kv)
    ref = reference.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=is_causal,
                                                 kv_lengths=torch.tensor([0, 30, 30], device=DEVICE))
    assert torch.allclose(out.double(), ref, atol=1e-5, rtol=1e-5)
    assert (out[0] == 0).all()


@breadth
@dtypes
@causal
@pytest.mark.parametrize("pattern", ["right", "left", "holes"])
def test_key_padding_mask(dtype: torch.dtype, is_causal: bool, pattern: str) -> None:
    """A (B, 1, 1, Lk) boolean mask (Hugging Face's padding) with InfoScale: n_i counts the unmasked
    keys; left padding and holes inside the valid range work as well as right padding."""
    b, lq, lk = 4, 40, 56
    lengths = random_lengths(b, lk)
    keys = torch.arange(lk) < lengths[:, None]
    if pattern == "left":
        keys = keys.flip(-1)
    elif pattern == "holes":
        keys = keys & (torch.rand(b, lk) < 0.7)
    mask = keys.view(b, 1, 1, lk).to(DEVICE)
    q, k, v = make_qkv(b, 2, 2, lq, lk, 32, 32, dtype)
    opts = dict(attn_mask=mask, is_causal=is_causal, temperature="infoscale", train_len=24)
    if dtype == torch.bfloat16:
        check_fused(q, k, v, **opts)
    else:
        check_fused_grads(q, k, v, **opts)


def test_key_padding_mask_matches_kv_lengths() -> None:
    """A right-padding mask and the same kv_lengths are one semantics (and both skip the padded tiles)."""
    b, lq, lk = 3, 33, 64
    lengths = random_lengths(b, lk)
    q, k, v = make_qkv(b, 2, 2, lq, lk, 32, 32, torch.float32)
    opts = dict(is_causal=True, temperature="infoscale", train_len=24)
    by_mask = infoscale_triton.scaled_dot_product_attention(q, k, v, attn_mask=padding_mask(lengths, lk), **opts)
    by_len = infoscale_triton.scaled_dot_product_attention(q, k, v, kv_lengths=lengths.to(DEVICE), **opts)
    assert torch.allclose(by_mask, by_len, atol=1e-6, rtol=1e-5)


# ---- sliding window ----------------------------------------------------------------------------

WINDOWS = [(0, 0), (1, 0), (0, 1), (3, 2), (-1, 4), (5, -1), (500, 500)]


@breadth
@pytest.mark.parametrize("window", WINDOWS, ids=lambda w: f"{w[0]}_{w[1]}")
@causal
@pytest.mark.parametrize("lengths", [(48, 48), (37, 61), (61, 37)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_window(window: tuple[int, int], is_causal: bool, lengths: tuple[int, int]) -> None:
    """Window sizes 0, 1, a few, unbounded on one side and larger than the sequence; with and without
    causal; Lq != Lk aligns to the bottom-right."""
    lq, lk = lengths
    q, k, v = make_qkv(2, 2, 1, lq, lk, 32, 16, torch.float32)
    check_fused_grads(q, k, v, window=window, is_causal=is_causal, enable_gqa=True,
                      temperature="infoscale", train_len=24)


@breadth
@dtypes
def test_window_with_padding_and_cos(dtype: torch.dtype) -> None:
    b, lq, lk = 3, 50, 50
    q, k, v = make_qkv(b, 2, 2, lq, lk, 32, 32, dtype)
    opts = dict(window=(7, 0), is_causal=True, kv_lengths=random_lengths(b, lk).to(DEVICE),
                cos_scale=32.0, temperature="infoscale", train_len=24)
    if dtype == torch.bfloat16:
        check_fused(q, k, v, **opts)
    else:
        check_fused_grads(q, k, v, **opts)


def test_window_matches_explicit_mask() -> None:
    """The reference's window is the explicit band mask (so the fused checks above test the band)."""
    q, k, v = (x.double() for x in make_qkv(1, 1, 1, 9, 12, 16, 16, torch.float32))
    got = reference.scaled_dot_product_attention(q, k, v, window=(2, 1), temperature="infoscale", train_len=8)
    i = torch.arange(9)[:, None] + 3
    j = torch.arange(12)[None, :]
    band = ((j >= i - 2) & (j <= i + 1)).to(DEVICE)
    want = reference.scaled_dot_product_attention(q, k, v, attn_mask=band, temperature="infoscale", train_len=8)
    assert torch.equal(got, want)


@pytest.mark.parametrize("window", [(2,), (1, 2, 3), (-2, 0), (1.5, 0), "3", (True, 0)], ids=str)
def test_window_validation(window: object) -> None:
    q, k, v = make_qkv(1, 1, 1, 8, 8, 16, 16, torch.float32)
    with pytest.raises(ValueError, match="window"):
        infoscale_triton.scaled_dot_product_attention(q, k, v, window=window)


@pytest.mark.parametrize("bad, error", [
    (torch.tensor([3, 4]), ValueError),  # wrong shape (B = 3)
    (torch.tensor([3.0, 4.0, 5.0]), TypeError),
    ([3, 4, 5], TypeError),
], ids=["shape", "dtype", "list"])
def test_kv_lengths_validation(bad: object, error: type) -> None:
    q, k, v = make_qkv(3, 1, 1, 8, 8, 16, 16, torch.float32)
    if isinstance(bad, torch.Tensor):
        bad = bad.to(DEVICE)
    with pytest.raises(error, match="kv_lengths"):
        infoscale_triton.scaled_dot_product_attention(q, k, v, kv_lengths=bad)


# ---- packed variable-length batches ------------------------------------------------------------

def make_packed(lq: torch.Tensor, lk: torch.Tensor, hq: int, hkv: int, d: int, dv: int, dtype: torch.dtype,
                spare: int = 0) -> tuple[torch.Tensor, ...]:
    """Packed q, k, v for sequences of query lengths ``lq`` and key lengths ``lk`` (``spare`` extra
    tokens past the last sequence), and their int32 offsets."""
    cu_q = torch.nn.functional.pad(lq.cumsum(0), (1, 0)).to(torch.int32)
    cu_k = torch.nn.functional.pad(lk.cumsum(0), (1, 0)).to(torch.int32)
    tq, tk = int(cu_q[-1]) + spare, int(cu_k[-1]) + spare
    q = randn(tq, hq, d, dtype=dtype)
    k = randn(tk, hkv, d, dtype=dtype)
    v = randn(tk, hkv, dv, dtype=dtype)
    return q, k, v, cu_q.to(DEVICE), cu_k.to(DEVICE)


def block_mask(cu_q: torch.Tensor, cu_k: torch.Tensor, is_causal: bool, window: tuple[int, int] | None,
               tq: int, tk: int) -> torch.Tensor:
    """The explicit (Tq, Tk) mask of a packed batch: each sequence's own keys, with causal and the
    window aligned to its bottom-right corner."""
    allowed = torch.zeros(tq, tk, dtype=torch.bool)
    for s in range(cu_q.shape[0] - 1):
        q0, q1, k0, k1 = int(cu_q[s]), int(cu_q[s + 1]), int(cu_k[s]), int(cu_k[s + 1])
        allowed[q0:q1, k0:k1] = reference.allowed_keys(None, is_causal, q1 - q0, k1 - k0, torch.device("cpu"),
                                                       window=window)
    return allowed.to(DEVICE)


def varlen_grads(fn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor,
                 dtype: torch.dtype, **opts: Any) -> tuple[torch.Tensor, ...]:
    leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    out = fn(*leaves, **opts)
    return (out, *torch.autograd.grad(out, leaves, dout.to(dtype)))


@breadth
@dtypes
@causal
@pytest.mark.parametrize("window", [None, (6, 0)], ids=["nowin", "win6"])
@pytest.mark.parametrize("temperature", [None, "infoscale"], ids=str)
def test_varlen(dtype: torch.dtype, is_causal: bool, window: tuple[int, int] | None,
                temperature: str | None) -> None:
    """Sequences of random lengths (0 and 1 included, Lq != Lk within a sequence), GQA, two spare tokens
    past the last sequence: output and gradients against the reference on each sequence, and the output
    against the dense reference with the explicit block mask."""
    count = 6
    lq, lk = random_lengths(count, 40), random_lengths(count, 52)
    q, k, v, cu_q, cu_k = make_packed(lq, lk, 4, 2, 32, 24, dtype, spare=2)
    opts = dict(is_causal=is_causal, window=window, **_temp_opts(temperature))
    offsets = (cu_q, cu_k, int(lq.max()), int(lk.max()))
    dout = randn(q.shape[0], 4, 24, dtype=dtype)
    fused = varlen_grads(lambda a, b_, c, **o: infoscale_triton.varlen_attention(a, b_, c, *offsets, **o),
                         q, k, v, dout, dtype, **opts)
    ref = lambda a, b_, c, **o: reference.varlen_attention(a, b_, c, *offsets, **o)  # noqa: E731
    ref64 = varlen_grads(ref, q, k, v, dout, torch.float64, **opts)
    low = varlen_grads(ref, q, k, v, dout, dtype, **opts)
    names = ("out", "dq", "dk", "dv")
    for name, f, r, lo in zip(names, fused, ref64, low):
        assert torch.isfinite(f).all(), f"{name} not finite"
        assert_within_budget(f, r, lo.double(), dtype, f"varlen {name}: ")
    # tokens past the last sequence: zeros, zero gradients
    for name, f in zip(names, fused):
        assert (f[-2:] == 0).all(), f"{name}: tokens past cu_seqlens[-1] must be zero"
    # the dense reference on the packed batch with the explicit block mask (temperature counts it)
    tq, tk = q.shape[0], k.shape[0]
    mask = block_mask(cu_q, cu_k, is_causal, window, tq, tk)
    dense = reference.scaled_dot_product_attention(
        *(x.double().transpose(0, 1).unsqueeze(0) for x in (q, k, v)), attn_mask=mask, enable_gqa=True,
        **_temp_opts(temperature))[0].transpose(0, 1)
    assert_within_budget(fused[0], dense, low[0].double(), dtype, "varlen vs explicit block mask: ")


@pytest.mark.parametrize("per_token", [True, False], ids=["tokens_heads", "heads"])
def test_varlen_tensor_temperature_and_cos(per_token: bool) -> None:
    """A (Tq, Hq) or (Hq,) tensor temperature (with its gradient: summed over the tokens for the
    latter, where the 2 tokens past cu_seqlens_q[-1] must add nothing) and CosScale on packed sequences."""
    lq = lk = torch.tensor([5, 0, 33, 1, 20])
    q, k, v, cu_q, cu_k = make_packed(lq, lk, 2, 2, 32, 32, torch.float32, spare=2)
    temp = (torch.rand(*((q.shape[0],) if per_token else ()), 2, device=DEVICE) + 0.5).requires_grad_()
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = infoscale_triton.varlen_attention(*leaves, cu_q, cu_k, 33, 33, is_causal=True, temperature=temp,
                                            cos_scale=16.0)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, [*leaves, temp], dout)
    ref_leaves = [x.detach().double().requires_grad_() for x in (q, k, v, temp)]
    ref = reference.varlen_attention(*ref_leaves[:3], cu_q, cu_k, is_causal=True, temperature=ref_leaves[3],
                                     cos_scale=16.0)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout.double())
    for name, g, r in zip(("out", "dq", "dk", "dv", "dt"), (out, *grads), (ref, *ref_grads)):
        err = ((g.double() - r).norm() / r.norm()).item()
        assert err < 2e-5, f"{name}: relative error {err:.2e}"


def test_varlen_max_seqlen_read_from_offsets() -> None:
    lq = lk = torch.tensor([3, 17, 9])
    q, k, v, cu_q, cu_k = make_packed(lq, lk, 2, 2, 16, 16, torch.float32)
    a = infoscale_triton.varlen_attention(q, k, v, cu_q, cu_k, is_causal=True)
    b = infoscale_triton.varlen_attention(q, k, v, cu_q, cu_k, 17, 17, is_causal=True)
    assert torch.equal(a, b)
    assert a.is_contiguous() and a.shape == (29, 2, 16)


@pytest.mark.parametrize("case", ["dims", "cu_dtype", "cu_shape", "cu_mismatch", "max_seqlen", "heads",
                                  "temperature"])
def test_varlen_validation(case: str) -> None:
    lq = lk = torch.tensor([3, 5])
    q, k, v, cu_q, cu_k = make_packed(lq, lk, 2, 2, 16, 16, torch.float32)
    args: list[Any] = [q, k, v, cu_q, cu_k, 5, 5]
    kwargs: dict[str, Any] = {}
    match = {"dims": "query", "cu_dtype": "cu_seqlens_q", "cu_shape": "cu_seqlens_k",
             "cu_mismatch": "cu_seqlens_q", "max_seqlen": "max_seqlen_q", "heads": "heads",
             "temperature": "temperature"}[case]
    if case == "dims":
        args[0] = q.unsqueeze(0)
    elif case == "cu_dtype":
        args[3] = cu_q.long()
    elif case == "cu_shape":
        args[4] = cu_k[:1]
    elif case == "cu_mismatch":
        args[3] = torch.cat([cu_q, cu_q[-1:]])
    elif case == "max_seqlen":
        args[5] = -1
    elif case == "heads":
        args[0] = randn(8, 3, 16, dtype=torch.float32)
    else:
        kwargs["temperature"] = torch.ones(8, 3, device=DEVICE)
    with pytest.raises((ValueError, TypeError), match=match):
        infoscale_triton.varlen_attention(*args, **kwargs)


# ---- compiled, larger shapes (GPU) ---------------------------------------------------------------

@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("kind", ["kv_lengths", "key_mask", "window", "varlen"])
def test_gpu_padding_window_varlen(kind: str, dtype: torch.dtype, d: int) -> None:
    """Tile-sized shapes, forward and backward against the reference: padding that skips whole tiles
    (lengths 700, 333, 0), a left-padding key mask, a 200-key window spanning several tiles, and a
    packed batch whose sequences straddle tile boundaries."""
    b, lq = 3, 700
    lengths = torch.tensor([700, 333, 0])
    opts = dict(is_causal=True, temperature="infoscale", train_len=256)
    if kind != "varlen":
        q, k, v = make_qkv(b, 4, 2, lq, lq, d, d, dtype)
        extra = {"kv_lengths": dict(kv_lengths=lengths.to(DEVICE)),
                 "key_mask": dict(attn_mask=padding_mask(lengths, lq).flip(-1)),
                 "window": dict(window=(200, 0))}[kind]
        check_fused_grads(q, k, v, enable_gqa=True, **opts, **extra)
        return
    lens = torch.tensor([300, 1, 0, 517, 129])
    pq, pk, pv, cu_q, cu_k = make_packed(lens, lens, 4, 2, d, d, dtype)
    dout = randn(pq.shape[0], 4, d, dtype=dtype)
    fused = varlen_grads(lambda a, b_, c, **o: infoscale_triton.varlen_attention(a, b_, c, cu_q, cu_k, 517, 517,
                                                                                   **o), pq, pk, pv, dout, dtype,
                         **opts)
    ref = lambda a, b_, c, **o: reference.varlen_attention(a, b_, c, cu_q, cu_k, **o)  # noqa: E731
    for name, f, r, lo in zip(("out", "dq", "dk", "dv"), fused, varlen_grads(ref, pq, pk, pv, dout, torch.float64, **opts),
                              varlen_grads(ref, pq, pk, pv, dout, dtype, **opts)):
        assert_within_budget(f, r, lo.double(), dtype, f"gpu varlen {name}: ")


def test_lengths_helper_covers_edges() -> None:
    """The test's own generator: 0, 1 and the maximum are always drawn."""
    for count, most in itertools.product((3, 6), (5, 40)):
        got = set(random_lengths(count, most).tolist())
        assert {0, 1, most} <= got


@gpu
def test_gpu_varlen_and_padding_capture_in_a_cuda_graph() -> None:
    """With the max lengths given, varlen (forward and backward) and kv_lengths never synchronise with
    the host: both capture in a CUDA graph, and replays follow new contents of the captured tensors."""
    lens = torch.tensor([300, 1, 0, 517])
    q, k, v, cu_q, cu_k = make_packed(lens, lens, 4, 2, 64, 64, torch.bfloat16)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    dout = torch.randn(q.shape[0], 4, 64, device=DEVICE, dtype=torch.bfloat16)
    b, lk = 2, 1100  # one query row against 1100 keys: the split-KV decode kernel
    dq, dk, dv = make_qkv(b, 4, 2, 1, lk, 64, 64, torch.bfloat16)
    kv = torch.tensor([1100, 100], device=DEVICE)

    def step() -> tuple[torch.Tensor, ...]:
        out = infoscale_triton.varlen_attention(*leaves, cu_q, cu_k, 517, 517, is_causal=True,
                                                temperature="infoscale", train_len=256)
        grads = torch.autograd.grad(out, leaves, dout)
        dec = infoscale_triton.scaled_dot_product_attention(dq, dk, dv, is_causal=True, enable_gqa=True,
                                                            kv_lengths=kv)
        return (out, *grads, dec)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for _ in range(2):  # new inputs in the captured buffers, then replay
        for x in (*leaves, dout, dq, dk, dv):
            x.data.copy_(torch.randn_like(x))
        kv.copy_(torch.randint(0, lk + 1, (b,), device=DEVICE))
        graph.replay()
        eager = step()
        for got, want in zip(captured, eager):
            assert torch.equal(got, want)
