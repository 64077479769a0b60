"""Gradients through the public function against autograd through the float64 reference.

Every check goes through ``infoscale_triton.scaled_dot_product_attention`` (helpers.check_fused_grads):
the output is compared with the reference, then dq, dk, dv and a tensor temperature's gradient, for a
random upstream gradient, with the forward's error budget (BUDGET_FACTOR x the error of the reference's
own gradients computed in the inputs' dtype, plus a floor), finite everywhere and exactly zero for rows
that see no key (dq, dt) and keys that no row sees (dk, dv).

On CPU (Triton interpreter) the breadth tests run at small shapes. On a GPU every new combination of
constexprs compiles three backward kernels (10-20 s each), so those breadth tests are skipped there
(``INFOSCALE_GRAD_BREADTH_ON_GPU=1`` runs them anyway) and the GPU runs the ``gpu``-marked cases at
larger shapes, a bounded set of configurations, plus determinism, a training step and a capped
property test.
"""

from __future__ import annotations

import copy
import itertools
import os
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from helpers import (
    DEVICE,
    DTYPES,
    LAYOUTS,
    MASKS,
    ON_GPU,
    QKV,
    STRING_TEMPERATURES,
    TENSOR_TEMPERATURES,
    assert_within_budget,
    check_fused_grads,
    empty_rows,
    fused_grads,
    make_mask,
    make_qkv,
    make_temperature,
    randn,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from test_properties import build_problem, problems

import infoscale_triton
from infoscale_triton import reference

gpu = pytest.mark.gpu
# interpreter-sized breadth: each case is cheap on CPU but a new compilation on a GPU
breadth = pytest.mark.skipif(ON_GPU and os.environ.get("INFOSCALE_GRAD_BREADTH_ON_GPU", "0") in ("", "0"),
                             reason="interpreter-sized breadth (compile-bound on a GPU; "
                                    "INFOSCALE_GRAD_BREADTH_ON_GPU=1 runs it)")
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
causal = pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])


def temperature_opts(kind: str | None, b: int, hq: int, lq: int, *, train_len: int = 24) -> dict[str, Any]:
    """helpers.make_temperature, with tensor temperatures requiring grad."""
    opts = make_temperature(kind, b, hq, lq, train_len=train_len)
    if isinstance(opts.get("temperature"), torch.Tensor):
        opts["temperature"].requires_grad_(True)
    return opts


# ---------------------------------------------------------------------------------------------------
# Option combinations (the cases of the first, internal backward test, now through the public function)

CASES = [
    # (hq, hkv, lq, lk, d, dv, causal, temperature, cos_scale, mask)
    (2, 2, 37, 37, 32, 32, False, None, None, None),
    (2, 2, 37, 37, 32, 32, True, "infoscale", None, None),
    (4, 2, 33, 50, 48, 32, True, "logn_clipped", None, None),
    (2, 1, 50, 20, 32, 40, True, "tensor", None, None),
    (2, 2, 29, 29, 32, 32, True, "infoscale", 32.0, None),
    (4, 2, 21, 45, 16, 16, False, "tensor", 64.0, None),
    (2, 2, 25, 30, 32, 32, False, "infoscale", None, "bool_qk"),
    (2, 2, 25, 30, 32, 32, True, "tensor", 32.0, "float_b1qk_empty_rows"),
    (2, 2, 17, 17, 80, 80, True, "logn", None, "bool_empty_rows"),
]


@breadth
@dtypes
@pytest.mark.parametrize("case", CASES, ids=str)
def test_option_combinations(case: tuple, dtype: torch.dtype) -> None:
    hq, hkv, lq, lk, d, dv, is_causal, temperature, cos_scale, mask = case
    q, k, v = make_qkv(2, hq, hkv, lq, lk, d, dv, dtype)
    opts: dict[str, Any] = {"temperature": temperature, "train_len": 16} if temperature else {}
    if temperature == "tensor":  # per (batch, head), in [0.25, 1.75]
        opts = {"temperature": (torch.rand(2, hq, 1, device=DEVICE) * 1.5 + 0.25).requires_grad_(True)}
    check_fused_grads(q, k, v, is_causal=is_causal, enable_gqa=hq != hkv, cos_scale=cos_scale,
                      attn_mask=make_mask(mask, 2, hq, lq, lk), **opts)


@breadth
@dtypes
@causal
@pytest.mark.parametrize("cos_scale", [None, 32.0])
@pytest.mark.parametrize("temperature", [None, *STRING_TEMPERATURES, *TENSOR_TEMPERATURES])
def test_temperature_and_cos_scale(temperature: str | None, cos_scale: float | None, is_causal: bool,
                                   dtype: torch.dtype) -> None:
    # Lq != Lk: causal rows see 11..29 keys, on both sides of train_len 24; D != Dv, neither a power of 2
    b, h, lq, lk = 2, 2, 19, 29
    q, k, v = make_qkv(b, h, h, lq, lk, 48, 40, dtype)
    check_fused_grads(q, k, v, is_causal=is_causal, cos_scale=cos_scale,
                      **temperature_opts(temperature, b, h, lq))


@breadth
@dtypes
@causal
@pytest.mark.parametrize("lq,lk", [(1, 1), (1, 23), (23, 1), (17, 17), (19, 37), (37, 19)], ids=str)
def test_lengths(lq: int, lk: int, is_causal: bool, dtype: torch.dtype) -> None:
    """Causal with Lq > Lk: the first Lq - Lk rows see no key (dq exactly zero there); Lk = 1: every row
    sees one key, so dq and dk are zero up to rounding. 2 x 4 heads: with Lq = 1 the relative error of
    dq is measured on that many rows only, and on two rows its ratio to the float16 reference's error
    scattered up to 4x over seeds (a sharp softmax's dq cancels); on eight it stays below 1."""
    q, k, v = make_qkv(2, 4, 4, lq, lk, 32, 48, dtype, std=3.0)
    check_fused_grads(q, k, v, is_causal=is_causal, temperature="logn_clipped", train_len=8)


@breadth
@dtypes
@causal
@pytest.mark.parametrize("d,dv", [(16, 16), (48, 48), (80, 80), (64, 32), (32, 80), (24, 17), (112, 112),
                                  (256, 255), (199, 256)], ids=str)
def test_head_dims(d: int, dv: int, is_causal: bool, dtype: torch.dtype) -> None:
    q, k, v = make_qkv(1, 2, 2, 19, 26, d, dv, dtype)
    check_fused_grads(q, k, v, is_causal=is_causal, cos_scale=32.0 if d % 2 else None,
                      **temperature_opts("tensor_bhl", 1, 2, 19))


@breadth
@dtypes
@causal
@pytest.mark.parametrize("temperature,cos_scale",
                         [(None, None), ("logn_clipped", None), ("tensor_bhl", 32.0)],
                         ids=["plain", "logn_clipped", "tensor-cos32"])
@pytest.mark.parametrize("hq,hkv", [(8, 2), (4, 1), (6, 3)], ids=["gqa4", "mqa", "gqa2"])
def test_gqa(hq: int, hkv: int, temperature: str | None, cos_scale: float | None, is_causal: bool,
             dtype: torch.dtype) -> None:
    # dk, dv sum over the query heads that share a key/value head
    b, lq, lk = 1, 21, 27
    q, k, v = make_qkv(b, hq, hkv, lq, lk, 32, 32, dtype)
    check_fused_grads(q, k, v, is_causal=is_causal, enable_gqa=True, cos_scale=cos_scale,
                      **temperature_opts(temperature, b, hq, lq, train_len=12))


@breadth
@dtypes
@pytest.mark.parametrize("is_causal,cos_scale", [(False, None), (True, 32.0)], ids=["full", "causal-cos32"])
@pytest.mark.parametrize("d", [32, 17])  # 17: rows of 34 / 68 bytes, never 16-byte aligned
@pytest.mark.parametrize("layout", [*LAYOUTS, ("blhd", "contiguous", "last_stride2"),
                                    ("offset", "blhd", "padded_rows")], ids=str)
def test_layouts(layout: str | tuple[str, str, str], d: int, is_causal: bool, cos_scale: float | None,
                 dtype: torch.dtype) -> None:
    """Non-contiguous q, k, v (gradients come back in the inputs' shapes) and a non-contiguous upstream
    gradient (in the query's layout)."""
    q, k, v = make_qkv(2, 2, 2, 23, 19, d, d, dtype, layout=layout)
    dout_layout = layout if isinstance(layout, str) else layout[0]
    check_fused_grads(q, k, v, is_causal=is_causal, cos_scale=cos_scale, dout_layout=dout_layout)


@breadth
@dtypes
@causal
@pytest.mark.parametrize("temperature", [None, "infoscale", "tensor_b1l"])
@pytest.mark.parametrize("mask", MASKS)
def test_masks(mask: str, temperature: str | None, is_causal: bool, dtype: torch.dtype) -> None:
    # masks with empty rows (and a fully masked batch entry): dq and dt exactly zero there, all finite
    b, h, lq, lk = 2, 2, 21, 27
    q, k, v = make_qkv(b, h, h, lq, lk, 32, 32, dtype)
    check_fused_grads(q, k, v, attn_mask=make_mask(mask, b, h, lq, lk), is_causal=is_causal,
                      **temperature_opts(temperature, b, h, lq, train_len=12))


@breadth
@dtypes
@pytest.mark.parametrize("cos_scale", [None, 32.0])
def test_rows_and_keys_without_partners_have_zero_gradients(cos_scale: float | None,
                                                            dtype: torch.dtype) -> None:
    """Rows that see no key (whole rows masked, a whole batch entry masked, and causal rows before the
    first key) have dq = 0 and dt = 0 exactly; keys that no row sees have dk = dv = 0 exactly; nothing is
    NaN or inf."""
    b, h, lq, lk = 2, 2, 23, 17
    q, k, v = make_qkv(b, h, h, lq, lk, 32, 40, dtype)
    allowed = torch.rand(b, h, lq, lk, device=DEVICE) < 0.7
    allowed[:, :, 10:13] = False  # rows that see nothing
    allowed[:, 1, :, 4] = False  # a key that no row of head 1 sees
    allowed[1, 0] = False  # a whole (batch, head) masked
    mask = torch.zeros(b, h, lq, lk, device=DEVICE).masked_fill(~allowed, float("-inf"))
    temperature = (torch.rand(b, h, lq, device=DEVICE) + 0.5).requires_grad_(True)
    opts = {"attn_mask": mask, "is_causal": True, "cos_scale": cos_scale, "temperature": temperature}
    grads = check_fused_grads(q, k, v, **opts)
    empty = empty_rows(q, k, **opts)  # causal with Lq > Lk: rows 0..5 empty too
    assert empty[:, :, :6].all() and empty[:, :, 10:13].all() and empty[1, 0].all() and (~empty).any()
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert (grads["query"][empty] == 0).all() and (grads["temperature"][empty] == 0).all()
    assert (grads["key"][1, 0] == 0).all() and (grads["value"][1, 0] == 0).all()
    assert (grads["key"][:, 1, 4] == 0).all() and (grads["value"][:, 1, 4] == 0).all()


@breadth
@causal
@pytest.mark.parametrize("scale", [0.0, 0.3, -0.5])
def test_explicit_scale(scale: float, is_causal: bool) -> None:
    # scale 0: uniform attention, dq and dk exactly zero; a negative scale flips the largest logit
    q, k, v = make_qkv(1, 2, 2, 23, 23, 64, 64, torch.float32, std=3.0)
    grads = check_fused_grads(q, k, v, scale=scale, is_causal=is_causal)
    if scale == 0.0:
        assert (grads["query"] == 0).all() and (grads["key"] == 0).all()


@breadth
@dtypes
@causal
@pytest.mark.parametrize("which", ["query", "key", "both"])
def test_zero_rows_under_cos_scale(which: str, is_causal: bool, dtype: torch.dtype) -> None:
    # the reference's L2 normalisation leaves zero rows at zero: their gradient is zero
    q, k, v = make_qkv(1, 2, 2, 21, 21, 32, 32, dtype)
    if which in ("query", "both"):
        q[:, :, ::3] = 0
    if which in ("key", "both"):
        k[:, :, 1::4] = 0
    grads = check_fused_grads(q, k, v, is_causal=is_causal, cos_scale=64.0, temperature="infoscale",
                              train_len=8)
    if which in ("query", "both"):
        assert (grads["query"][:, :, ::3] == 0).all()
    if which in ("key", "both"):
        assert (grads["key"][:, :, 1::4] == 0).all()


@breadth
def test_large_finite_float_bias() -> None:
    """A huge finite bias (torch.finfo(float32).min, Hugging Face's padding) is an ordinary bias; rows
    that also see keys of ordinary bias (the usual padding) get the gradients of that softmax."""
    lq, lk = 20, 30
    q, k, v = make_qkv(1, 2, 2, lq, lk, 32, 32, torch.float32)
    low = torch.finfo(torch.float32).min
    bias = torch.zeros(lq, lk, device=DEVICE).masked_fill(torch.rand(lq, lk, device=DEVICE) < 0.5, low)
    bias[:, -1] = 0.0  # every row sees at least one key of ordinary bias
    check_fused_grads(q, k, v, attn_mask=bias)


@breadth
def test_rows_whose_keys_all_carry_a_huge_finite_bias() -> None:
    """As in test_semantics.test_large_finite_float_bias_is_not_a_mask: a row whose keys all carry
    finfo.min attends uniformly, and one whose keys carry -1e38 and finfo.min attends to the -1e38
    ones; its gradients are those of that softmax. (Under an additive mask the forward keeps the row
    max and log2 of the row sum apart: their sum would lose log2(l) next to |m| ~ 3e38.)"""
    lq, lk = 20, 30
    q, k, v = make_qkv(1, 2, 2, lq, lk, 32, 32, torch.float32)
    low = torch.finfo(torch.float32).min
    bias = torch.zeros(lq, lk, device=DEVICE).masked_fill(torch.rand(lq, lk, device=DEVICE) < 0.5, low)
    bias[0] = low  # every key at the same huge bias: uniform attention
    bias[1] = low
    bias[1, :3] = -1.0e38  # the first three keys win
    check_fused_grads(q, k, v, attn_mask=bias)


DELTA_FROM_ROUNDED_OUTPUT = (
    "kernel accuracy (FlashAttention design, shared by PyTorch's CPU flash backward): the backward's "
    "delta = rowsum(dO * O) reads the output rounded to float16, and on a sharp row (p = 0.995, 0.005) "
    "dq comes out 11% off where float16 PyTorch math is 2e-4 off; the same kernels given O in float32 "
    "are 2e-4 off (test below)")


def _sharp_row() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Generator]:
    gen = torch.Generator().manual_seed(23)  # p = (0.9946, 0.0054)
    return (*make_qkv(1, 1, 1, 1, 2, 16, 16, torch.float16, std=2.0, generator=gen), gen)


@breadth
@pytest.mark.xfail(strict=True, reason=DELTA_FROM_ROUNDED_OUTPUT)
def test_sharp_rows_output_rounding() -> None:
    """One query row, two keys, float16: dq against the standard budget."""
    q, k, v, gen = _sharp_row()
    check_fused_grads(q, k, v, generator=gen)


@breadth
def test_sharp_rows_meet_the_budget_given_a_float32_output() -> None:
    """The same row: over budget only through the output's rounding (helpers' ``output_rounding``
    fallback, used by the property test, accepts it and warns)."""
    q, k, v, gen = _sharp_row()
    with warnings.catch_warnings(record=True) as caught:  # (pytest.warns would re-emit the interpreter's)
        warnings.simplefilter("always")
        check_fused_grads(q, k, v, generator=gen, output_rounding=True)
    assert any("output's rounding" in str(w.message) for w in caught)


@breadth
@pytest.mark.parametrize("temperature_dtype", [torch.float16, torch.float32, torch.float64],
                         ids=lambda d: str(d).removeprefix("torch."))
def test_temperature_tensor_dtypes(temperature_dtype: torch.dtype) -> None:
    # dt comes back in the temperature's dtype
    q, k, v = make_qkv(2, 2, 2, 19, 23, 32, 32, torch.float32)
    temperature = (torch.rand(2, 1, 19, device=DEVICE) * 2 - 0.5).to(temperature_dtype).requires_grad_(True)
    check_fused_grads(q, k, v, is_causal=True, cos_scale=16.0, temperature=temperature)


@breadth
@pytest.mark.parametrize("wrt,temperature_grad", [(("query",), False), (("key",), False), (("value",), False),
                                                  (("query", "value"), True), ((), True)], ids=str)
def test_some_inputs_require_grad(wrt: tuple[str, ...], temperature_grad: bool) -> None:
    """Only the inputs that require grad get one (the temperature alone included)."""
    q, k, v = make_qkv(2, 4, 2, 19, 23, 32, 32, torch.float16)
    temperature = (torch.rand(2, 4, 1, device=DEVICE) + 0.5).requires_grad_(temperature_grad)
    grads = check_fused_grads(q, k, v, wrt=wrt, enable_gqa=True, is_causal=True, temperature=temperature)
    assert set(grads) == set(wrt) | ({"temperature"} if temperature_grad else set())


BWD_CONFIGS = [(16, 16), (16, 32), (32, 16), (64, 16), (16, 64), (32, 32)]


@breadth
@pytest.mark.parametrize("is_causal,mask", [(False, None), (True, None), (True, "bool_qk")],
                         ids=["full", "causal", "causal-mask"])
@pytest.mark.parametrize("lq,lk", [(29, 70), (70, 29), (48, 48)], ids=str)
@pytest.mark.parametrize("block_m,block_n", BWD_CONFIGS, ids=str)
def test_block_configs(block_m: int, block_n: int, lq: int, lk: int, is_causal: bool, mask: str | None,
                       tune: Callable[..., None]) -> None:
    """Other backward tile shapes (both kernels) move the causal diagonal and the masked/unmasked tile
    split across block boundaries."""
    cfg = {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": 4, "num_stages": 1}
    tune(backward_configs=(cfg, cfg))
    q, k, v = make_qkv(1, 2, 2, lq, lk, 32, 32, torch.float32)
    check_fused_grads(q, k, v, is_causal=is_causal, attn_mask=make_mask(mask, 1, 2, lq, lk),
                      **temperature_opts("tensor_bhl", 1, 2, lq))


# ---------------------------------------------------------------------------------------------------
# Property-based: random configurations, forward and backward together. Few and small on CPU; on a GPU
# each example is a new compilation of the backward kernels, so it is capped there.

GPU_GRAD_EXAMPLES = int(os.environ.get("INFOSCALE_GPU_GRAD_EXAMPLES", "10"))


@st.composite
def grad_problems(draw: st.DrawFn) -> dict[str, Any]:
    if ON_GPU:
        cfg = draw(problems(max_len=600, max_dim=256))
    else:  # the interpreter's cost grows with batch x heads x tiles
        cfg = draw(problems(max_len=32, max_dim=256, max_heads_kv=1, groups=(1, 2, 3)))
    cfg["temperature_grad"] = cfg["temperature"] == "tensor" and draw(st.booleans())
    cfg["dout_layout"] = draw(st.sampled_from(LAYOUTS))
    return cfg


def _gpu_capped(test: Any) -> Any:
    return settings(max_examples=GPU_GRAD_EXAMPLES)(test) if ON_GPU else test


def _check_drawn(cfg: dict[str, Any], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    q, k, v, opts = build_problem(cfg, gen)
    if cfg["temperature_grad"]:
        opts["temperature"].requires_grad_(True)
    # output_rounding: dq/dk/dt over budget only through the float16/bfloat16 output's rounding (a known
    # limitation, test_sharp_rows_output_rounding) pass if the kernels given O in float32 meet it
    check_fused_grads(q, k, v, dout_layout=cfg["dout_layout"], generator=gen, output_rounding=True, **opts)


@_gpu_capped
@given(cfg=grad_problems())
def test_random_problems_gradients(cfg: dict[str, Any]) -> None:
    """Forward and gradients of a random configuration. A small problem is a handful of samples of
    rounding error, compared with another handful (the reference's in the dtype): the ratio has a tail
    (float16, CosScale 128, dq dominated by one row with two keys: the float16 reference came out 6x
    more accurate than the kernel on one draw, while 30 fresh draws of that configuration all passed).
    A failure must therefore reproduce on fresh values of the same configuration: two draws of three."""
    try:
        _check_drawn(cfg, cfg["seed"])
    except AssertionError as first:
        failures = 1
        for extra in (1, 2):
            try:
                _check_drawn(cfg, (cfg["seed"] + extra * 7919) % 2**32)
            except AssertionError:
                failures += 1
        if failures >= 2:
            raise
        warnings.warn(f"failed on one draw of three only: {str(first).splitlines()[0]}", stacklevel=1)


# ---------------------------------------------------------------------------------------------------
# Determinism and training (CPU and GPU)

DETERMINISM = [
    # (dtype, b, hq, hkv, lq, lk, d, dv, cos_scale, mask)
    pytest.param(torch.float16, 2, 4, 2, 37, 29, 96, 96, 128.0, "bool_empty_rows", id="small-fp16"),
    pytest.param(torch.bfloat16, 2, 8, 2, 1000, 1000, 256, 256, 32.0, None, marks=gpu, id="gpu-bf16"),
    pytest.param(torch.float16, 2, 8, 2, 700, 700, 96, 96, 128.0, "bool_empty_rows", marks=gpu,
                 id="gpu-fp16"),
]


@pytest.mark.parametrize("dtype,b,hq,hkv,lq,lk,d,dv,cos_scale,mask", DETERMINISM)
def test_backward_is_deterministic(dtype: torch.dtype, b: int, hq: int, hkv: int, lq: int, lk: int, d: int,
                                   dv: int, cos_scale: float | None, mask: str | None) -> None:
    """The same inputs and upstream gradient give bitwise-equal gradients: twice through one graph
    (retain_graph) and once through a fresh forward. GQA, causal and a tensor temperature: dk/dv sum over
    query heads, dt over rows (no atomics, so the order is fixed)."""
    q, k, v = make_qkv(b, hq, hkv, lq, lk, d, dv, dtype)
    opts = {"is_causal": True, "enable_gqa": True, "cos_scale": cos_scale,
            "attn_mask": make_mask(mask, b, hq, lq, lk)}
    temperature = torch.rand(b, hq, lq, device=DEVICE) + 0.5
    dout = randn(b, hq, lq, dv, dtype=dtype)
    leaves = [x.detach().requires_grad_(True) for x in (q, k, v, temperature)]
    out = infoscale_triton.scaled_dot_product_attention(*leaves[:3], temperature=leaves[3], **opts)
    first = torch.autograd.grad(out, leaves, dout, retain_graph=True)
    again = torch.autograd.grad(out, leaves, dout)
    _, fresh = fused_grads(q, k, v, dout, temperature=temperature.requires_grad_(True), **opts)
    for name, g1, g2, g3 in zip((*QKV, "temperature"), first, again, fresh.values()):
        assert torch.isfinite(g1).all() and g1.abs().sum() > 0, f"d{name} not finite or all zero"
        assert torch.equal(g1, g2), f"d{name} differs between two backward passes of one graph"
        assert torch.equal(g1, g3), f"d{name} differs between two forward + backward runs"


@gpu
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("masking", ["float_qk", "window"])
def test_gpu_masked_long_keys(d: int, masking: str) -> None:
    """8192 keys with an additive mask or a window: the launch configs that masked calls take at long
    lengths launch (one that asked for 360 KB of shared memory did not) and are right."""
    q, k, v = make_qkv(1, 2, 2, 128, 8192, d, d, torch.bfloat16)
    opts: dict[str, Any] = {"is_causal": True, "window": (3000, 0)} if masking == "window" else \
        {"attn_mask": make_mask(masking, 1, 2, 128, 8192)}
    check_fused_grads(q, k, v, temperature="infoscale", train_len=512, **opts)


@gpu
@pytest.mark.parametrize("d", [128, 256])
def test_gpu_backward_repeats_bitwise(d: int) -> None:
    """The default backward 50 times over one graph (bf16, causal, GQA, InfoScale, at the benchmark's
    tile sizes): every repeat bitwise equal to the first."""
    q, k, v = (x.requires_grad_(True) for x in make_qkv(2, 8, 2, 2048, 2048, d, d, torch.bfloat16))
    out = infoscale_triton.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True,
                                                        temperature="infoscale", train_len=512)
    dout = randn(*out.shape, dtype=out.dtype)
    first = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    for _ in range(49):
        again = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
        for name, g1, g2 in zip(QKV, first, again):
            assert torch.equal(g1, g2), f"d{name} differs between repeats of the backward"


class TinyAttention(torch.nn.Module):
    """Linear projections -> the attention function (CosScale, GQA, causal, a learned per-head
    temperature) -> output projection. q, k, v are strided (B, L, H, D) views transposed to (B, H, L, D)."""

    def __init__(self, dim: int = 48, heads: int = 4, kv_heads: int = 2, head_dim: int = 16) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q = torch.nn.Linear(dim, heads * head_dim)
        self.kv = torch.nn.Linear(dim, 2 * kv_heads * head_dim)
        self.o = torch.nn.Linear(heads * head_dim, dim)
        self.temperature = torch.nn.Parameter(torch.ones(heads, 1))

    def forward(self, x: torch.Tensor, attention: Any) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(b, n, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        y = attention(q, k, v, is_causal=True, enable_gqa=True, cos_scale=16.0, temperature=self.temperature)
        return self.o(y.transpose(1, 2).reshape(b, n, -1))


def test_training_step_decreases_loss() -> None:
    """A small attention layer trained through the public function: the first step's parameter
    gradients match the same layer through the reference (float64, with the float32 reference's error
    as budget), the learned temperature gets a gradient, and SGD steps lower the loss each time."""
    b, n, dim = 2, 24, 48
    model = TinyAttention(dim).to(DEVICE)
    x, target = randn(b, n, dim, dtype=torch.float32), randn(b, n, dim, dtype=torch.float32)
    fused = infoscale_triton.scaled_dot_product_attention

    def loss_of(m: torch.nn.Module, attention: Any, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.nn.functional.mse_loss(m(x.to(dtype), attention), target.to(dtype))

    ref64, ref32 = copy.deepcopy(model).double(), copy.deepcopy(model)
    loss_of(ref64, reference.scaled_dot_product_attention, torch.float64).backward()
    loss_of(ref32, reference.scaled_dot_product_attention).backward()
    loss_of(model, fused).backward()
    for (name, p), p64, p32 in zip(model.named_parameters(), ref64.parameters(), ref32.parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name}: no or non-finite gradient"
        assert_within_budget(p.grad, p64.grad, p32.grad.double(), torch.float32, f"{name}.grad: ")
    assert model.temperature.grad.abs().min() > 0

    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = loss_of(model, fused)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(b < a for a, b in itertools.pairwise(losses)), f"loss did not decrease at every step: {losses}"
    assert not torch.equal(model.temperature.detach(), torch.ones_like(model.temperature))


# ---------------------------------------------------------------------------------------------------
# GPU: larger shapes, every dtype, D in {64, 96, 128, 256}. Each row is one compiled configuration
# (dtype, D, Dv, causal, CosScale, mask kind, tensor temperature with grad); keep the list short.

GPU_CASES = [
    # (dtype, b, hq, hkv, lq, lk, d, dv, causal, temperature, cos_scale, mask)
    (torch.bfloat16, 2, 8, 2, 1024, 1024, 128, 128, True, "infoscale", None, None),
    (torch.bfloat16, 1, 4, 4, 2048, 2048, 64, 64, False, None, None, None),
    (torch.bfloat16, 1, 8, 2, 777, 1500, 96, 96, True, "logn_clipped", None, None),
    (torch.bfloat16, 1, 4, 4, 512, 512, 256, 256, True, "tensor_bhl", 32.0, None),
    (torch.bfloat16, 2, 4, 2, 1000, 1000, 128, 128, False, "infoscale", 64.0, "bool_b11k"),
    (torch.bfloat16, 1, 4, 4, 600, 900, 96, 200, True, "tensor_b1l", None, "float_b1qk_empty_rows"),
    (torch.bfloat16, 1, 4, 4, 1500, 600, 64, 64, True, "logn", None, None),  # Lq > Lk: empty rows
    (torch.float16, 2, 8, 2, 1024, 1024, 128, 128, True, "infoscale", None, None),
    (torch.float16, 1, 4, 4, 2048, 2048, 64, 64, True, None, 32.0, None),
    (torch.float16, 1, 4, 4, 513, 1025, 256, 256, False, "logn", None, None),
    (torch.float16, 2, 4, 4, 700, 700, 96, 96, True, "tensor_bhl", 128.0, "bool_empty_rows"),
    (torch.float16, 1, 6, 3, 999, 1001, 80, 112, False, "infoscale_clipped", None, "float16_1hqk"),
    (torch.float32, 1, 8, 2, 1024, 1024, 128, 128, True, "infoscale", None, None),
    (torch.float32, 1, 4, 4, 600, 600, 64, 64, False, "tensor_h1", 32.0, None),
    (torch.float32, 1, 4, 4, 512, 777, 256, 256, True, None, None, None),
    (torch.float32, 1, 4, 4, 500, 500, 96, 96, True, "logn", None, "bool_qk"),
]


def _gpu_id(case: tuple) -> str:
    dtype, b, hq, hkv, lq, lk, d, dv, is_causal, temperature, cos_scale, mask = case
    return (f"{str(dtype).removeprefix('torch.')}-{b}x{hq}/{hkv}-L{lq}x{lk}-D{d}x{dv}-"
            f"{'causal' if is_causal else 'full'}-{temperature}-cos{cos_scale}-{mask}")


@gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=_gpu_id)
def test_gpu_gradients(case: tuple) -> None:
    dtype, b, hq, hkv, lq, lk, d, dv, is_causal, temperature, cos_scale, mask = case
    q, k, v = make_qkv(b, hq, hkv, lq, lk, d, dv, dtype, layout="blhd")
    check_fused_grads(q, k, v, is_causal=is_causal, enable_gqa=hq != hkv, cos_scale=cos_scale,
                      attn_mask=make_mask(mask, b, hq, lq, lk), **temperature_opts(temperature, b, hq, lq,
                                                                                   train_len=512))


@gpu
@pytest.mark.parametrize("dtype,d,layout", [
    (torch.bfloat16, 96, ("last_stride2", "expanded", "offset")),  # constexprs of a GPU_CASES row
    (torch.float16, 17, ("offset", "blhd", "padded_rows")),  # rows of 34 bytes: padded copies
], ids=["bf16-d96", "fp16-d17"])
def test_gpu_layouts(dtype: torch.dtype, d: int, layout: tuple[str, str, str]) -> None:
    q, k, v = make_qkv(2, 4, 4, 700, 900, d, d, dtype, layout=layout)
    check_fused_grads(q, k, v, is_causal=True, dout_layout="last_stride2",
                      **temperature_opts("logn_clipped", 2, 4, 700, train_len=512))
