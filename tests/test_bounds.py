"""No kernel reads or writes outside its tensors, whatever the offsets and lengths the device reads say.

The host never reads cu_seqlens or kv_lengths (that would synchronise), so wrong values reach the
kernels: they clamp them (documented in varlen_attention and decode_attention). Checked two ways:
the inputs sit inside NaN-filled guard buffers (a read outside them would poison the result, compiled
or interpreted), and under Triton's interpreter every load and store lane is checked against the
launch's tensors (memcheck.interpreter_memcheck). On a GPU, ``compute-sanitizer --tool memcheck`` over
these tests does the latter.
"""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import torch
import triton
import triton.language as tl
from helpers import DEVICE, ON_GPU, make_qkv, randn
from memcheck import interpreter_memcheck

import infoscale_triton
from infoscale_triton import reference
from infoscale_triton.varlen import sequence_lengths

GUARD = 7  # poisoned rows before and after each packed tensor


def checked() -> contextlib.AbstractContextManager:
    """The interpreter's memcheck on CPU (compiled kernels: the poisoned guards and compute-sanitizer)."""
    return contextlib.nullcontext() if ON_GPU else interpreter_memcheck()


def guarded(x: torch.Tensor) -> torch.Tensor:
    """``x`` (tokens first) as a view into a buffer whose GUARD rows before and after it hold NaN."""
    buf = torch.full((x.shape[0] + 2 * GUARD, *x.shape[1:]), float("nan"), dtype=x.dtype, device=x.device)
    buf[GUARD:GUARD + x.shape[0]] = x
    return buf[GUARD:GUARD + x.shape[0]]


@triton.jit
def _read_at(X, Y, offset):
    tl.store(Y, tl.load(X + offset))


@pytest.mark.skipif(ON_GPU, reason="checks the interpreter's memcheck")
def test_memcheck_catches_an_out_of_bounds_read() -> None:
    """The checker itself: the last element of a view passes; one past it (inside the same, larger
    storage, so that nothing crashes) is refused and reported."""
    x = torch.arange(32, dtype=torch.float32)[:16]
    y = torch.zeros(1)
    with interpreter_memcheck():
        _read_at[(1,)](x, y, 15)
    assert y.item() == 15
    with pytest.raises(AssertionError, match=r"_read_at: 1 load lanes out of bounds"):
        with interpreter_memcheck():
            _read_at[(1,)](x, y, 16)


# (cu_seqlens_q, cu_seqlens_k, max lengths given?) for Tq = 20 query and Tk = 30 key tokens
OFFSETS = {
    "past-the-end": ([0, 5, 27], [0, 9, 130], True),
    "negative-then-decreasing": ([-3, 8, 20, 4], [-1, 16, 30, 12], False),
    "huge": ([0, 2**31 - 1], [0, 2**31 - 1], False),
    "empty-last": ([0, 20, 20], [0, 30, 30], True),
    # a decrease followed by a rise: sequences overlap (values unspecified, accesses still in bounds)
    "overlapping": ([0, 8, 4, 20], [0, 16, 12, 30], True),
}


@pytest.mark.parametrize("case", OFFSETS)
def test_varlen_offsets_out_of_range(case: str) -> None:
    """Offsets past the packed tokens, negative, decreasing or huge: clamped on the device (each to
    [0, T], each end to at least its start), the same as the reference's clamp; forward (with the
    entropy), backward with a tensor temperature and CosScale, all within the tensors (and, but for
    overlapping sequences, equal to the reference)."""
    tq, tk, hq, hkv = 20, 30, 2, 1
    cu_q, cu_k, given = OFFSETS[case]
    cu_q, cu_k = (torch.tensor(c, dtype=torch.int32, device=DEVICE) for c in (cu_q, cu_k))
    max_q, max_k = (int(sequence_lengths(c, t).max()) if given else None for c, t in ((cu_q, tq), (cu_k, tk)))
    q, k, v = (guarded(randn(t, h, 16, dtype=torch.float32)) for t, h in ((tq, hq), (tk, hkv), (tk, hkv)))
    temperature = guarded(torch.rand(tq, hq, device=DEVICE) + 0.5)
    dout = guarded(randn(tq, hq, 16, dtype=torch.float32))
    opts: dict[str, Any] = dict(is_causal=True, cos_scale=24.0, window=(9, 0) if case == "huge" else None)
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, temperature)]
    with checked():
        out, stats = infoscale_triton.varlen_attention(*leaves[:3], cu_q, cu_k, max_q, max_k,
                                                       temperature=leaves[3], return_entropy=True, **opts)
        grads = torch.autograd.grad(out, leaves, dout)
    if case == "overlapping":
        return
    ref_leaves = [x.detach().double().requires_grad_() for x in (q, k, v, temperature)]
    ref = reference.varlen_attention(*ref_leaves[:3], cu_q, cu_k, temperature=ref_leaves[3], **opts)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout.double())
    for name, got, want in zip(("out", "dq", "dk", "dv", "dt"), (out, *grads), (ref, *ref_grads)):
        assert torch.isfinite(got).all(), f"{name}: not finite (a read outside the tensors?)"
        err = ((got.double() - want).norm() / want.norm()).item()
        assert err < 2e-5, f"{name}: relative error {err:.2e}"
    assert all(torch.isfinite(field).all() for field in stats)


@pytest.mark.parametrize("opts", [
    dict(is_causal=True, kv_lengths=[-4, 100], temperature="infoscale", train_len=8),
    dict(attn_mask="float", window=(3, 2), dropout_p=0.3),
], ids=["causal-kv-lengths", "mask-window-dropout"])
def test_dense_within_bounds(opts: dict[str, Any]) -> None:
    """Dense forward and backward at lengths off the tile sizes (Lq = 1 against 33 keys and 33 against
    1), GQA, key lengths out of range and an additive mask: every access inside the tensors (on a GPU,
    a workload for compute-sanitizer)."""
    for lq, lk in ((1, 33), (33, 1)):
        run = dict(opts)
        if "kv_lengths" in run:
            run["kv_lengths"] = torch.tensor(opts["kv_lengths"], device=DEVICE)
        if run.get("attn_mask") == "float":
            run["attn_mask"] = torch.randn(lq, lk, device=DEVICE)
        q, k, v = (x.requires_grad_() for x in make_qkv(2, 2, 1, lq, lk, 24, 16, torch.float32))
        with checked():
            out = infoscale_triton.scaled_dot_product_attention(q, k, v, enable_gqa=True, **run)
            grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
        assert all(torch.isfinite(x).all() for x in (out, *grads))


def test_decode_within_bounds() -> None:
    """Split-KV decoding and its combine with more splits than tiles, lengths out of range, through
    pointers (a cache with padded rows) and through descriptors: every access inside the tensors."""
    q, k, v = make_qkv(3, 4, 2, 2, 37, 32, 16, torch.float32)
    padded_k = torch.zeros(3, 2, 37, 33, device=DEVICE)
    padded_k[..., :32] = k
    lengths = torch.tensor([-2, 19, 500], device=DEVICE)
    with checked(), torch.no_grad():
        for cache in (k, padded_k[..., :32]):
            for splits in (1, 5):
                out = infoscale_triton.decode_attention(q, cache, v, kv_lengths=lengths, num_splits=splits,
                                                        is_causal=False, temperature="logn", train_len=8)
                want = reference.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                                              enable_gqa=True, kv_lengths=lengths,
                                                              temperature="logn", train_len=8)
                assert ((out.double() - want).norm() / want.norm()).item() < 1e-5
