"""What the options mean, checked through the public API: zero rows under CosScale, bottom-right
causal alignment, agreement with torch's SDPA, the temperature formulas, GQA as shared heads."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    DEVICE,
    DTYPES,
    FLOOR,
    assert_within_budget,
    check_fused,
    make_mask,
    make_qkv,
    randn,
    reference_in,
    rel_error,
)

import infoscale_triton
from infoscale_triton import reference
from infoscale_triton.temperature import TemperatureSpec, kernel_constants, row_temperature

sdpa = infoscale_triton.scaled_dot_product_attention
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
causal = pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])


@dtypes
@causal
@pytest.mark.parametrize("which", ["query", "key", "both"])
def test_zero_rows_under_cos_scale(which: str, is_causal: bool, dtype: torch.dtype) -> None:
    q, k, v = make_qkv(1, 2, 2, 40, 40, 32, 32, dtype)
    if which in ("query", "both"):
        q[:, :, ::3] = 0
    if which in ("key", "both"):
        k[:, :, 1::4] = 0
    out = check_fused(q, k, v, is_causal=is_causal, cos_scale=64.0, temperature="infoscale", train_len=8)
    # a zero query row has all cosines 0: it averages the values it may see
    row = 39 if is_causal else 0
    if which != "key":
        visible = v[:, :, : row + 1] if is_causal else v
        torch.testing.assert_close(out[:, :, row].float(), visible.float().mean(2), atol=2e-3, rtol=2e-3)


@dtypes
@pytest.mark.parametrize("lq,lk", [(40, 7), (33, 32), (5, 1)])
@pytest.mark.parametrize("route", ["routed", "dense"])
def test_causal_longer_queries_start_with_zero_rows(lq: int, lk: int, dtype: torch.dtype, route: str,
                                                    request: pytest.FixtureRequest) -> None:
    """Both kernels: ``routed`` is the public default, where the 5-row case and the one-row call run
    the decode kernel (attention.decodes); ``dense`` turns that routing off."""
    if route == "dense":
        request.getfixturevalue("dense_only")
    q, k, v = make_qkv(2, 2, 2, lq, lk, 32, 16, dtype)
    out = sdpa(q, k, v, is_causal=True, temperature="logn", train_len=4)
    assert (out[:, :, : lq - lk] == 0).all()
    assert (out[:, :, lq - lk:] != 0).any(-1).all()
    # the last row sees every key
    full = sdpa(q[:, :, -1:], k, v, temperature="logn", train_len=4)
    assert rel_error(out[:, :, -1:], full.double()) < 10 * FLOOR[dtype]


@pytest.mark.parametrize("scale", [None, 0.3])
@pytest.mark.parametrize("mask", [None, "causal", "bool_1hqk", "float_qk"])
@pytest.mark.parametrize("gqa", [False, True])
def test_matches_torch_sdpa(mask: str | None, scale: float | None, gqa: bool) -> None:
    """temperature=None is torch's SDPA: same masks (causal with Lq == Lk, where torch's top-left
    alignment agrees with ours), scale and GQA; the reference in float64 and float32, the kernel in
    float32."""
    b, hq, lq, lk = 2, 4, 29, 29 if mask == "causal" else 45
    opts = {"is_causal": mask == "causal", "scale": scale, "enable_gqa": gqa,
                "attn_mask": None if mask in (None, "causal") else make_mask(mask, b, hq, lq, lk)}
    q, k, v = make_qkv(b, hq, 2 if gqa else hq, lq, lk, 32, 48, torch.float64)
    expected = F.scaled_dot_product_attention(q, k, v, **opts)
    torch.testing.assert_close(reference.scaled_dot_product_attention(q, k, v, **opts), expected,
                               rtol=1e-12, atol=1e-12)
    q, k, v = (x.float() for x in (q, k, v))
    torch.testing.assert_close(reference.scaled_dot_product_attention(q, k, v, **opts),
                               F.scaled_dot_product_attention(q, k, v, **opts), rtol=1e-5, atol=1e-5)
    assert rel_error(sdpa(q, k, v, **opts), expected) < 1e-5


@dtypes
@causal
@pytest.mark.parametrize("shape", ["bhl", "l", "scalar"])
def test_temperature_of_ones_is_no_temperature(shape: str, is_causal: bool, dtype: torch.dtype) -> None:
    b, h, lq, lk = 2, 2, 37, 50
    q, k, v = make_qkv(b, h, h, lq, lk, 32, 32, dtype)
    ones = torch.ones({"bhl": (b, h, lq), "l": (lq,), "scalar": ()}[shape], device=DEVICE)
    plain = sdpa(q, k, v, is_causal=is_causal)
    assert rel_error(sdpa(q, k, v, is_causal=is_causal, temperature=ones), plain.double()) <= FLOOR[dtype]
    torch.testing.assert_close(reference.scaled_dot_product_attention(q, k, v, is_causal=is_causal,
                                                                      temperature=ones),
                               reference.scaled_dot_product_attention(q, k, v, is_causal=is_causal),
                               rtol=0, atol=0)


def _hand(kind: str, n: float, big_n: int, d: int) -> float:
    n = max(n, 1)
    if kind.startswith("infoscale"):
        t = math.sqrt((1 - n ** (-2 / d)) / (1 - big_n ** (-2 / d)))
    else:
        t = math.log(n) / math.log(big_n)
    return max(t, 1.0) if kind.endswith("_clipped") else t


@pytest.mark.parametrize("kind", ["infoscale", "logn", "infoscale_clipped", "logn_clipped"])
@pytest.mark.parametrize("d", [16, 64, 128])
def test_row_temperature_formula(kind: str, d: int) -> None:
    spec = TemperatureSpec.parse(kind)
    assert reference.row_temperature is row_temperature  # the reference uses this definition
    for big_n in (2, 16, 4096):
        ns = [0, 1, 2, 3, 15, 16, 17, 100, 4096, 65536, 2**31]
        got = row_temperature(torch.tensor(ns, dtype=torch.float64), spec, big_n, d)
        expected = torch.tensor([_hand(kind, n, big_n, d) for n in ns], dtype=torch.float64)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        # n = N gives t = 1 exactly in every formula
        assert row_temperature(torch.tensor([float(big_n)], dtype=torch.float64), spec, big_n, d).item() \
            == pytest.approx(1.0, abs=1e-12)
        # the kernels' form of the same formula
        a, b = kernel_constants(spec, big_n, d)
        for n in ns[1:]:
            t = math.sqrt((1 - 2 ** (a * math.log2(n))) * b) if spec.kind == "infoscale" else math.log2(n) * b
            assert (max(t, 1.0) if spec.clipped else t) == pytest.approx(_hand(kind, n, big_n, d), rel=1e-9)


@pytest.mark.parametrize("kind", ["logn_clipped", "infoscale_clipped"])
def test_clipped_temperature_never_below_one(kind: str) -> None:
    n = torch.arange(0, 20000, dtype=torch.float64)
    for big_n in (2, 3, 512, 10**6):
        assert (row_temperature(n, TemperatureSpec.parse(kind), big_n, 64) >= 1).all()


@dtypes
@pytest.mark.parametrize("kind", ["infoscale", "logn", "logn_clipped"])
def test_train_len_equal_to_row_length_is_no_temperature(kind: str, dtype: torch.dtype) -> None:
    """Non-causal without a mask every row sees n = Lk keys: train_len = Lk gives t = 1 on every row
    (and a clipped logn with a longer train_len clips every row to 1)."""
    lk = 45
    q, k, v = make_qkv(2, 2, 2, 30, lk, 48, 32, dtype)
    train_len = 10 * lk if kind.endswith("_clipped") else lk
    got = sdpa(q, k, v, temperature=kind, train_len=train_len, cos_scale=16.0)
    assert rel_error(got, sdpa(q, k, v, cos_scale=16.0).double()) <= 2 * FLOOR[dtype]


@dtypes
@causal
def test_float_mask_of_neg_inf_counts_like_bool_mask(is_causal: bool, dtype: torch.dtype) -> None:
    """A key whose float bias is -inf is masked for n_i, exactly like False in a boolean mask."""
    q, k, v = make_qkv(2, 2, 2, 33, 47, 32, 32, dtype)
    allowed = make_mask("bool_empty_rows", 2, 2, 33, 47)
    bias = torch.zeros(allowed.shape, device=DEVICE).masked_fill(~allowed, float("-inf"))
    opts = {"is_causal": is_causal, "temperature": "infoscale", "train_len": 16}
    with_bool = sdpa(q, k, v, attn_mask=allowed, **opts)
    assert rel_error(sdpa(q, k, v, attn_mask=bias, **opts), with_bool.double()) <= FLOOR[dtype]
    check_fused(q, k, v, attn_mask=bias, **opts)


@pytest.mark.parametrize("lq", [1, 20], ids=["decode", "dense"])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_mask_broadcast_along_keys_counts_every_key(lq: int, kind: str) -> None:
    """A mask of extent 1 along the keys stands for all Lk keys of its rows: n_i counts every one (a
    count over the mask's own last dimension gave 1 and a wrong temperature)."""
    b, h, lk = 2, 3, 37
    q, k, v = make_qkv(b, h, h, lq, lk, 32, 32, torch.float32)
    allowed = torch.rand(b, h, lq, 1, device=DEVICE) > 0.3
    mask = allowed if kind == "bool" else \
        torch.zeros(allowed.shape, device=DEVICE).masked_fill(~allowed, float("-inf"))
    opts = {"attn_mask": mask, "temperature": "infoscale", "train_len": 8}
    out = infoscale_triton.scaled_dot_product_attention(q, k, v, **opts)
    assert_within_budget(out, reference_in(torch.float64, q, k, v, **opts),
                         reference_in(torch.float32, q, k, v, **opts))


@dtypes
@causal
@pytest.mark.parametrize("group", [2, 4])
def test_gqa_equals_repeated_heads(group: int, is_causal: bool, dtype: torch.dtype) -> None:
    q, k, v = make_qkv(2, 2 * group, 2, 35, 41, 32, 32, dtype)
    opts = {"is_causal": is_causal, "temperature": "infoscale_clipped", "train_len": 8, "cos_scale": 32.0}
    shared = sdpa(q, k, v, enable_gqa=True, **opts)
    repeated = sdpa(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), **opts)
    assert torch.equal(shared, repeated)


def test_deterministic_and_inputs_untouched() -> None:
    q, k, v = make_qkv(2, 4, 2, 50, 50, 80, 80, torch.float16, layout="last_stride2")
    mask, temp = make_mask("float_qk", 2, 4, 50, 50), randn(50, dtype=torch.float32)
    before = [x.clone() for x in (q, k, v, mask, temp)]
    outs = [sdpa(q, k, v, attn_mask=mask, temperature=temp, enable_gqa=True) for _ in range(3)]
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    assert all(torch.equal(a, b) for a, b in zip(before, (q, k, v, mask, temp)))
    assert outs[0].dtype == torch.float16 and outs[0].shape == (2, 4, 50, 80) and outs[0].is_contiguous()


def test_large_finite_float_bias_is_not_a_mask() -> None:
    """Only -inf masks a key: a huge finite bias such as torch.finfo(float32).min (Hugging Face's
    padding convention) is an ordinary bias, so a row whose keys all carry it still attends (uniformly
    when the biases are equal), as in torch's SDPA and the reference. (float32 inputs: in float16 the
    bias itself rounds to -inf.)"""
    lq, lk = 20, 30
    q, k, v = make_qkv(1, 2, 2, lq, lk, 32, 32, torch.float32)
    low = torch.finfo(torch.float32).min
    bias = torch.zeros(lq, lk, device=DEVICE).masked_fill(torch.rand(lq, lk, device=DEVICE) < 0.5, low)
    bias[0] = low  # every key at the same huge bias: uniform attention
    bias[1] = low
    bias[1, :3] = -1.0e38  # the first three keys win (biases below -2.3e38 saturate: see attention.py)
    check_fused(q, k, v, attn_mask=bias)
