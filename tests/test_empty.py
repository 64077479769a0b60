"""Inputs with nothing to compute: no key (Lk = 0, a packed batch without key tokens, an empty cache),
no query, no batch entry or no head. As torch's SDPA does on CPU (checked here against it): rows that
see no key are zeros, empty outputs are empty, and the gradients are zeros of each input's shape, on
every entry point (the fused function, with return_entropy too, varlen, decode, the reference, and
under torch.compile)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import DEVICE, randn
from torch.nn.attention import SDPBackend, sdpa_kernel

import infoscale_triton
from infoscale_triton import reference

# (query, key, value) shapes and options; torch's SDPA gives the expected output and gradients
DENSE = {
    "no-key": ((2, 4, 5, 16), (2, 4, 0, 16), (2, 4, 0, 16), {}),
    "no-key-causal-gqa": ((2, 4, 5, 16), (2, 2, 0, 16), (2, 2, 0, 24),
                          {"is_causal": True, "enable_gqa": True}),
    "no-query": ((2, 4, 0, 16), (2, 4, 7, 16), (2, 4, 7, 16), {"is_causal": True}),
    "no-batch": ((0, 4, 5, 16), (0, 4, 5, 16), (0, 4, 5, 16), {}),
    "no-head": ((2, 0, 5, 16), (2, 0, 5, 16), (2, 0, 5, 16), {}),
}


def leaves(*shapes: tuple[int, ...]) -> list[torch.Tensor]:
    return [randn(*s, dtype=torch.float32).requires_grad_() for s in shapes]


def outputs_and_grads(fn: Any, tensors: list[torch.Tensor], **opts: Any) -> list[torch.Tensor]:
    """fn's output and the gradients of ``tensors`` for an upstream gradient of ones."""
    fresh = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*fresh, **opts)
    if isinstance(out, tuple):
        out = out[0]
    grads = torch.autograd.grad(out, fresh, torch.ones_like(out), allow_unused=True)
    return [out.detach(), *(torch.zeros_like(t) if g is None else g for t, g in zip(fresh, grads))]


def assert_same(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype, (
            f"{tuple(g.shape)} {g.dtype} vs {tuple(w.shape)} {w.dtype}")
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("case", DENSE)
def test_dense_matches_torch(case: str) -> None:
    q_shape, k_shape, v_shape, opts = DENSE[case]
    tensors = leaves(q_shape, k_shape, v_shape)
    # torch's math backend: its fused CUDA backwards assert on zero heads (torch 2.11)
    with sdpa_kernel(SDPBackend.MATH):
        want = outputs_and_grads(torch.nn.functional.scaled_dot_product_attention, tensors, **opts)
    assert_same(outputs_and_grads(infoscale_triton.scaled_dot_product_attention, tensors, **opts), want)
    assert_same(outputs_and_grads(reference.scaled_dot_product_attention, tensors, **opts), want)
    with torch.no_grad():
        out, stats = infoscale_triton.scaled_dot_product_attention(*tensors, return_entropy=True, **opts)
    assert_same([out], want[:1])
    for field in stats:
        assert field.shape == out.shape[:3] and field.dtype == torch.float32 and (field == 0).all()


def test_no_key_with_every_option() -> None:
    """Lk = 0 with a mask, key padding, a window, dropout, CosScale and a tensor temperature: zeros, and
    zero gradients for the temperature too; the reference and its entropy agree."""
    q, k, v = leaves((2, 4, 6, 16), (2, 2, 0, 16), (2, 2, 0, 16))
    temperature = (torch.rand(2, 1, 6, device=DEVICE) + 0.5).requires_grad_()
    opts: dict[str, Any] = dict(attn_mask=torch.ones(6, 0, dtype=torch.bool, device=DEVICE), is_causal=True,
                                enable_gqa=True, kv_lengths=torch.tensor([3, 0], device=DEVICE),
                                window=(2, 0), cos_scale=32.0)
    fused = outputs_and_grads(lambda q, k, v, t, **o: infoscale_triton.scaled_dot_product_attention(
        q, k, v, temperature=t, dropout_p=0.2, **o), [q, k, v, temperature], **opts)
    want = outputs_and_grads(lambda q, k, v, t, **o: reference.scaled_dot_product_attention(
        q, k, v, temperature=t, **o), [q, k, v, temperature], **opts)
    assert_same(fused, want)
    assert (want[0] == 0).all() and (want[-1] == 0).all()
    entropy, largest = reference.attention_entropy(q.detach(), k.detach(), temperature=temperature.detach(),
                                                   **opts)
    assert entropy.shape == largest.shape == (2, 4, 6) and (entropy == 0).all() and (largest == 0).all()


@pytest.mark.parametrize("case", ["no-key-tokens", "no-query-tokens", "no-sequence"])
def test_varlen(case: str) -> None:
    """A pack without key tokens gives zeros, without query tokens an empty output, and one without
    sequences (cu_seqlens of one entry) zeros for every token: as the reference does."""
    tq, tk, cu_q, cu_k = {
        "no-key-tokens": (9, 0, [0, 4, 9], [0, 0, 0]),
        "no-query-tokens": (0, 9, [0, 0, 0], [0, 4, 9]),
        "no-sequence": (9, 9, [0], [0]),
    }[case]
    tensors = leaves((tq, 4, 16), (tk, 2, 16), (tk, 2, 32))
    cu = [torch.tensor(c, dtype=torch.int32, device=DEVICE) for c in (cu_q, cu_k)]
    opts = dict(is_causal=True, temperature="infoscale", train_len=8)
    fused = outputs_and_grads(lambda *t, **o: infoscale_triton.varlen_attention(*t, *cu, **o), tensors,
                              **opts)
    want = outputs_and_grads(lambda *t, **o: reference.varlen_attention(*t, *cu, **o), tensors, **opts)
    assert_same(fused, want)
    assert fused[0].shape == (tq, 4, 32) and (fused[0] == 0).all() and all((g == 0).all() for g in fused[1:])
    _, stats = infoscale_triton.varlen_attention(*(t.detach() for t in tensors), *cu, 1, 1,
                                                 return_entropy=True)
    assert all(field.shape == (tq, 4) and (field == 0).all() for field in stats)


@pytest.mark.parametrize("shapes", [
    ((2, 8, 3, 16), (2, 2, 0, 16), (2, 2, 0, 16)),
    ((2, 8, 0, 16), (2, 2, 9, 16), (2, 2, 9, 16)),
    ((0, 8, 1, 16), (0, 2, 9, 16), (0, 2, 9, 16)),
], ids=["empty-cache", "no-query", "no-batch"])
def test_decode(shapes: tuple[tuple[int, ...], ...]) -> None:
    q, k, v = (randn(*s, dtype=torch.float32) for s in shapes)
    out = infoscale_triton.decode_attention(q, k, v, kv_lengths=torch.zeros(q.shape[0], dtype=torch.int32,
                                                                             device=DEVICE))
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=False, enable_gqa=True)
    assert_same([out], [want])


def test_compiled() -> None:
    """torch.compile (one graph) of a call without keys, training: the same zeros and gradients."""
    tensors = leaves((2, 4, 5, 16), (2, 2, 0, 16), (2, 2, 0, 16))
    opts = dict(is_causal=True, enable_gqa=True, temperature="infoscale", train_len=8)
    torch._dynamo.reset()
    compiled = torch.compile(infoscale_triton.scaled_dot_product_attention, backend="aot_eager",
                             fullgraph=True)
    try:
        got = outputs_and_grads(compiled, tensors, **opts)
    finally:
        torch._dynamo.reset()
    assert_same(got, outputs_and_grads(torch.nn.functional.scaled_dot_product_attention, tensors,
                                       is_causal=True, enable_gqa=True))
