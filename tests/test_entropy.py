"""The fused forward's per-row attention entropy and largest probability (issue 6) against the float64
reference (``reference.attention_entropy``), computed from the same pass's running max and sums.

Outputs are poisoned with NaN before the run so that unwritten rows show; rows that see no key must
give 0 and 0."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from helpers import DEVICE, DTYPES, make_mask, make_qkv, make_temperature, rel_error

import infoscale_triton
from infoscale_triton import AttentionEntropy, reference
from infoscale_triton.forward import attention_forward
from infoscale_triton.validation import check_inputs

dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
# the entropy of a row is a sum of p ln p: its error follows the probabilities', i.e. the logits'
# rounding (about the inputs' epsilon times the logit scale), not the output's
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 1e-1}


def fused_entropy(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **opts: Any) -> torch.Tensor:
    p = check_inputs(q, k, v, opts.get("attn_mask"), 0.0, opts.get("is_causal", False), opts.get("scale"),
                     opts.get("enable_gqa", False), opts.get("temperature"), opts.get("train_len"),
                     opts.get("cos_scale"), kernel=True, kv_lengths=opts.get("kv_lengths"), window=opts.get("window"))
    stats = torch.full((2, p.batch, p.heads_q, p.lq), float("nan"), device=q.device)
    attention_forward(q, k, v, p, entropy=stats)
    return stats


def check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **opts: Any) -> None:
    stats = fused_entropy(q, k, v, **opts)
    ref_opts = {name: (x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x)
                for name, x in opts.items()}
    h_ref, p_ref = reference.attention_entropy(q.double(), k.double(), **ref_opts)
    assert not stats.isnan().any(), "unwritten or NaN entropy rows"
    for name, got, want in (("entropy", stats[0], h_ref), ("max prob", stats[1], p_ref)):
        err = ((got.double() - want).norm() / want.norm()).item()
        assert err <= TOLERANCE[q.dtype], f"{name}: relative error {err:.2e} > {TOLERANCE[q.dtype]:.0e}"
    empty = p_ref == 0
    assert (stats[:, empty] == 0).all(), "rows that see no key must give entropy 0 and max prob 0"


@dtypes
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("temperature", [None, "infoscale", "logn_clipped", "tensor_bhl"], ids=str)
def test_entropy(dtype: torch.dtype, is_causal: bool, temperature: str | None) -> None:
    q, k, v = make_qkv(2, 4, 2, 45, 70, 32, 16, dtype)
    check(q, k, v, is_causal=is_causal, enable_gqa=True, **make_temperature(temperature, 2, 4, 45))


@pytest.mark.parametrize("mask", ["bool_empty_rows", "float_b1qk_empty_rows", "bool_b11k"])
def test_entropy_with_masks(mask: str) -> None:
    q, k, v = make_qkv(2, 2, 2, 40, 50, 32, 32, torch.float32)
    check(q, k, v, attn_mask=make_mask(mask, 2, 2, 40, 50), temperature="infoscale", train_len=24)


@pytest.mark.parametrize("opts", [
    dict(cos_scale=64.0, is_causal=True),
    dict(window=(6, 0), is_causal=True, kv_lengths=torch.tensor([50, 0])),
    dict(kv_lengths=torch.tensor([1, 33])),
], ids=["cos", "window-padding", "padding"])
def test_entropy_options(opts: dict[str, Any]) -> None:
    opts = {name: (x.to(DEVICE) if isinstance(x, torch.Tensor) else x) for name, x in opts.items()}
    q, k, v = make_qkv(2, 2, 2, 50, 50, 32, 32, torch.float32)
    check(q, k, v, temperature="infoscale", train_len=24, **opts)


def test_entropy_of_uniform_and_one_hot_rows() -> None:
    """Known values: equal logits give ln(n) and 1/n; one dominant key gives ~0 and ~1."""
    n = 37
    q = torch.zeros(1, 1, 2, 16, device=DEVICE)
    k = torch.randn(1, 1, n, 16, device=DEVICE)
    q[0, 0, 1] = 100 * k[0, 0, 5] / k[0, 0, 5].norm()  # row 1 aims hard at key 5
    k[0, 0, 5] *= 10
    stats = fused_entropy(q, k, k)
    assert abs(stats[0, 0, 0, 0].item() - torch.log(torch.tensor(float(n))).item()) < 1e-5
    assert abs(stats[1, 0, 0, 0].item() - 1 / n) < 1e-6
    assert stats[0, 0, 0, 1].item() < 1e-3 and stats[1, 0, 0, 1].item() > 0.999


@pytest.mark.parametrize("opts", [
    dict(is_causal=True),
    dict(attn_mask="bool_empty_rows", window=(5, 2)),
    dict(attn_mask="huge_biases"),
], ids=["causal", "mask-window", "huge-biases"])
def test_entropy_arithmetic_makes_no_nan(opts: dict[str, Any]) -> None:
    """No NaN-producing operation in the entropy's accumulation, not even in a lane that is discarded:
    the interpreter evaluates every lane with numpy and reports 0 * -inf as an "invalid value"
    RuntimeWarning, made an error here. Covers the first tile of a causal row (running max -inf), hidden
    keys (s = -inf) and biases near +-finfo.max, whose differences overflow to -inf (an overflow that
    exp2 turns into p = 0, as intended: not an error)."""
    q, k, v = make_qkv(1, 2, 2, 40, 50, 32, 32, torch.float32)
    if opts.get("attn_mask") == "huge_biases":  # per row: keys at +3e38 (a few), -3e38, -inf or 0
        choice = torch.randint(0, 4, (40, 50))
        bias = torch.where(choice == 0, -3e38, torch.where(choice == 1, float("-inf"), 0.0))
        bias = torch.where(torch.rand(40, 50) < 0.1, 3e38, bias)
        bias[:, 0] = bias[:, -1] = 3e38  # (the probability is shared by those keys: entropy ln(count))
        opts = dict(opts, attn_mask=bias.to(DEVICE))
    elif "attn_mask" in opts:
        opts = dict(opts, attn_mask=make_mask(opts["attn_mask"], 1, 2, 40, 50))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "invalid value", RuntimeWarning)
        check(q, k, v, **opts)


def assert_same_stats(got: AttentionEntropy, want: torch.Tensor) -> None:
    assert isinstance(got, AttentionEntropy)
    for field, plane in zip(got, want):
        assert field.dtype == torch.float32 and not field.requires_grad
        torch.testing.assert_close(field, plane, rtol=0, atol=0)


@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("operators", [False, True], ids=["eager", "operators"])
def test_public_return_entropy(train: bool, operators: bool, tune: Callable[..., None]) -> None:
    """return_entropy=True gives the kernel's statistics (bit for bit) next to an unchanged output, in
    inference and training, through the eager autograd.Function and through the torch.library
    operators (what torch.compile traces); the gradients are those of the output alone."""
    tune(operators_in_eager=operators)
    opts = dict(is_causal=True, enable_gqa=True, temperature="infoscale", train_len=16)
    q, k, v = (x.requires_grad_(train) for x in make_qkv(2, 4, 2, 33, 40, 32, 16, torch.float32))
    out, stats = infoscale_triton.scaled_dot_product_attention(q, k, v, return_entropy=True, **opts)
    plain = infoscale_triton.scaled_dot_product_attention(q, k, v, **opts)
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    assert_same_stats(stats, fused_entropy(q.detach(), k.detach(), v.detach(), **opts))
    if train:
        dout = torch.randn_like(out)
        got = torch.autograd.grad(out, (q, k, v), dout)
        want = torch.autograd.grad(plain, (q, k, v), dout)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_public_return_entropy_never_decodes(tune: Callable[..., None]) -> None:
    """An inference call that would decode stays on the forward kernel, which computes the entropy."""
    tune(decode_min_keys=16)
    q, k, v = make_qkv(1, 4, 2, 2, 64, 32, 32, torch.float32)
    opts = dict(is_causal=True, enable_gqa=True, temperature="logn", train_len=16)
    with torch.no_grad():
        _, stats = infoscale_triton.scaled_dot_product_attention(q, k, v, return_entropy=True, **opts)
    assert_same_stats(stats, fused_entropy(q, k, v, **opts))
    h_ref, _ = reference.attention_entropy(q.double(), k.double(), **opts)
    assert rel_error(stats.entropy, h_ref) <= 1e-5


def test_public_varlen_return_entropy() -> None:
    """Packed sequences: (Tq, Hq) fields, each sequence's rows against the dense reference of that
    sequence alone; tokens past the last offset read 0."""
    cu_q = torch.tensor([0, 7, 7, 30], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 12, 20, 41], dtype=torch.int32, device=DEVICE)
    q, k, v = (t[0].transpose(0, 1) for t in make_qkv(1, 4, 2, 33, 41, 32, 16, torch.float32))
    opts = dict(is_causal=True, temperature="infoscale", train_len=8, cos_scale=40.0)
    _, stats = infoscale_triton.varlen_attention(q, k, v, cu_q, cu_k, return_entropy=True, **opts)
    assert stats.entropy.shape == stats.max_prob.shape == (33, 4)
    for s in range(3):
        (q0, q1), (k0, k1) = cu_q[s : s + 2].tolist(), cu_k[s : s + 2].tolist()
        if q1 == q0:
            continue
        qs, ks = (x.transpose(0, 1)[None].double() for x in (q[q0:q1], k[k0:k1]))
        h_ref, p_ref = reference.attention_entropy(qs, ks, enable_gqa=True, **opts)
        assert rel_error(stats.entropy[q0:q1], h_ref[0].T) <= 1e-5
        assert rel_error(stats.max_prob[q0:q1], p_ref[0].T) <= 1e-5
    assert (stats.entropy[30:] == 0).all() and (stats.max_prob[30:] == 0).all()


def test_return_entropy_must_be_bool() -> None:
    q, k, v = make_qkv(1, 2, 2, 8, 8, 16, 16, torch.float32)
    with pytest.raises(TypeError, match="return_entropy must be a bool"):
        infoscale_triton.scaled_dot_product_attention(q, k, v, return_entropy="yes")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_entropy(dtype: torch.dtype, d: int) -> None:
    """Compiled, tile-sized: causal InfoScale at 2000 x 2000 (the unmasked tiles carry the sum too)."""
    q, k, v = make_qkv(2, 4, 4, 2000, 2000, d, d, dtype)
    check(q, k, v, is_causal=True, temperature="infoscale", train_len=512)
    check(q, k, v, window=(300, 0), is_causal=True, cos_scale=32.0)
