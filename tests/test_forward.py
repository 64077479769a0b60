"""The fused forward against the float64 reference, one focused parametrisation per group of axes.

Every launch writes into a NaN-poisoned output (helpers.run_fused). Shapes are small and not block
multiples so that the Triton interpreter stays fast on CPU; larger shapes are marked ``gpu``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from helpers import (
    DTYPES,
    LAYOUTS,
    MASKS,
    ON_GPU,
    STRING_TEMPERATURES,
    TENSOR_TEMPERATURES,
    check_fused,
    make_mask,
    make_qkv,
    make_temperature,
    reference_in,
    rel_error,
    run_fused,
)

gpu = pytest.mark.gpu
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
causal = pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])


@dtypes
@causal
@pytest.mark.parametrize("cos_scale", [None, 32.0, 128.0])
@pytest.mark.parametrize("temperature", [None, *STRING_TEMPERATURES, *TENSOR_TEMPERATURES])
def test_temperature_and_cos_scale(temperature: str | None, cos_scale: float | None, is_causal: bool,
                                   dtype: torch.dtype) -> None:
    # Lq != Lk: causal rows see 21..70 keys, on both sides of train_len; D != Dv, neither a power of 2
    b, h, lq, lk = 2, 2, 50, 70
    q, k, v = make_qkv(b, h, h, lq, lk, 48, 80, dtype)
    check_fused(q, k, v, is_causal=is_causal, cos_scale=cos_scale, **make_temperature(temperature, b, h, lq))


LENGTHS = [(1, 1), (17, 17), (33, 97), (97, 33), (1, 50), (50, 1),
           pytest.param(612, 612, marks=gpu), pytest.param(1025, 4001, marks=gpu),
           pytest.param(4001, 1025, marks=gpu)]
HEAD_DIMS = [(16, 16), (32, 32), (48, 48), (64, 64), (80, 80), (96, 96), (112, 112), (64, 32), (32, 112),
             pytest.param(59, 59, marks=gpu), pytest.param(128, 128, marks=gpu),
             pytest.param(111, 200, marks=gpu), pytest.param(256, 256, marks=gpu)]


@dtypes
@causal
@pytest.mark.parametrize("lq,lk", LENGTHS, ids=str)
@pytest.mark.parametrize("d,dv", HEAD_DIMS, ids=str)
def test_head_dims_and_lengths(d: int, dv: int, lq: int, lk: int, is_causal: bool, dtype: torch.dtype) -> None:
    # with Lq > Lk and causal the first Lq - Lk rows see no key and must be exactly zero
    q, k, v = make_qkv(1, 2, 2, lq, lk, d, dv, dtype, std=3.0)
    check_fused(q, k, v, is_causal=is_causal)


@dtypes
@causal
@pytest.mark.parametrize("cos_scale", [None, 32.0])
@pytest.mark.parametrize("temperature", [None, "logn_clipped", "tensor_bhl"])
@pytest.mark.parametrize("hq,hkv", [(2, 2), (8, 2), (4, 1), (6, 3)], ids=["mha", "gqa4", "mqa", "gqa2"])
def test_gqa(hq: int, hkv: int, temperature: str | None, cos_scale: float | None, is_causal: bool,
             dtype: torch.dtype) -> None:
    b, lq, lk = 2, 37, 45
    q, k, v = make_qkv(b, hq, hkv, lq, lk, 32, 32, dtype)
    check_fused(q, k, v, is_causal=is_causal, enable_gqa=True, cos_scale=cos_scale,
                **make_temperature(temperature, b, hq, lq))


@dtypes
@causal
@pytest.mark.parametrize("cos_scale", [None, 32.0])
@pytest.mark.parametrize("d", [32, 17])  # 17: rows of 34 / 68 bytes, never 16-byte aligned
@pytest.mark.parametrize("layout", [*LAYOUTS, ("blhd", "contiguous", "last_stride2"),
                                    ("offset", "blhd", "padded_rows")], ids=str)
def test_layouts(layout: str | tuple[str, str, str], d: int, cos_scale: float | None, is_causal: bool,
                 dtype: torch.dtype) -> None:
    q, k, v = make_qkv(2, 2, 2, 40, 33, d, d, dtype, layout=layout)
    check_fused(q, k, v, is_causal=is_causal, cos_scale=cos_scale)


@dtypes
@pytest.mark.parametrize("lq,lk", [(1, 9), (9, 1), (1, 1)], ids=str)
@pytest.mark.parametrize("source", ["contiguous", "prefix"])
def test_single_row_unaligned(source: str, lq: int, lk: int, dtype: torch.dtype) -> None:
    """Length-1 tensors whose row stride is not 16 bytes (D = 18): a contiguous (1, 1, 1, 18) tensor,
    or the first row of each (2, 2, 4, 18) head, as when decoding one token."""
    b, h = (1, 1) if source == "contiguous" else (2, 2)
    q, k, v = make_qkv(b, h, h, 4, 9, 18, 18, dtype)
    if source == "contiguous":
        q, k, v = q[:, :, :lq].contiguous(), k[:, :, :lk].contiguous(), v[:, :, :lk].contiguous()
    else:
        q, k, v = q[:, :, :lq], k[:, :, :lk], v[:, :, :lk]
    check_fused(q, k, v)


@dtypes
@causal
@pytest.mark.parametrize("temperature", [None, "infoscale", "logn_clipped", "tensor_b1l"])
@pytest.mark.parametrize("mask", MASKS)
def test_masks(mask: str, temperature: str | None, is_causal: bool, dtype: torch.dtype) -> None:
    # string temperatures count n_i after the mask (and the causal cut)
    b, h, lq, lk = 2, 2, 37, 53
    q, k, v = make_qkv(b, h, h, lq, lk, 32, 32, dtype)
    check_fused(q, k, v, attn_mask=make_mask(mask, b, h, lq, lk), is_causal=is_causal,
                **make_temperature(temperature, b, h, lq, train_len=20))


@pytest.mark.parametrize("opts", [
    dict(is_causal=True, enable_gqa=True, cos_scale=32.0, temperature="infoscale", train_len=20),
    dict(attn_mask="bool_empty_rows", temperature="tensor_bhl"),
    dict(is_causal=True, attn_mask="float_b1qk_empty_rows", temperature="logn_clipped", train_len=20),
], ids=["causal-gqa-cos", "bool-mask-tensor", "float-mask-clipped"])
def test_bfloat16(opts: dict) -> None:
    """bfloat16 on every path, also through the interpreter (whose own bf16 dot multiplies raw bits:
    the kernels widen the operands there). On CPU only these few: the matrices run float16/float32."""
    b, hq, lq, lk = 2, 4, 37, 53
    q, k, v = make_qkv(b, hq, 2 if opts.get("enable_gqa") else hq, lq, lk, 32, 48, torch.bfloat16)
    if "attn_mask" in opts:
        opts = dict(opts, attn_mask=make_mask(opts["attn_mask"], b, hq, lq, lk))
    if str(opts.get("temperature")).startswith("tensor"):
        opts = dict(opts, **make_temperature(opts["temperature"], b, hq, lq))
    check_fused(q, k, v, **opts)


@causal
@pytest.mark.parametrize("scale", [0.0, 0.02, 0.3, -0.05, -0.5])
def test_explicit_scale(scale: float, is_causal: bool) -> None:
    # torch accepts any finite scale, so does validation; a negative one flips which logit is largest
    q, k, v = make_qkv(1, 2, 2, 40, 40, 64, 64, torch.float32, std=3.0)
    check_fused(q, k, v, scale=scale, is_causal=is_causal)


CONFIGS = [(16, 32), (32, 32), (64, 16), (16, 64)]


@causal
@pytest.mark.parametrize("mask", [None, "bool_qk"])
@pytest.mark.parametrize("lq,lk", [(45, 100), (100, 45), (64, 64)], ids=str)
@pytest.mark.parametrize("block_m,block_n", CONFIGS, ids=str)
def test_block_configs(block_m: int, block_n: int, lq: int, lk: int, mask: str | None, is_causal: bool,
                       tune: Callable[..., None]) -> None:
    """Other tile shapes (BLOCK_N > BLOCK_M included) move the causal diagonal and tile boundaries."""
    tune(forward_config={"BLOCK_M": block_m, "BLOCK_N": block_n, "WARP_SPEC": False, "num_warps": 4,
                         "num_stages": 1})
    q, k, v = make_qkv(1, 2, 2, lq, lk, 32, 32, torch.float32)
    check_fused(q, k, v, is_causal=is_causal, attn_mask=make_mask(mask, 1, 2, lq, lk),
                temperature="infoscale", train_len=32)


@pytest.mark.skipif(not ON_GPU, reason="TF32 is a CUDA setting")
@gpu
@causal
def test_float32_tf32(is_causal: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """allow_tf32 switches the float32 dots to Triton's TF32 (10-bit mantissa). On the H100 its error
    measured 1.3e-3, about 5x PyTorch's own TF32 path on the same inputs (2.8e-4), so the budget is
    TF32's own, 4 * 2**-10; and an error above 1e-5 shows that TF32 is really in use (IEEE: ~1e-7)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    q, k, v = make_qkv(2, 4, 4, 300, 517, 64, 64, torch.float32)
    opts = dict(is_causal=is_causal, temperature="logn", train_len=128)
    out, _ = run_fused(q, k, v, **opts)
    err = rel_error(out, reference_in(torch.float64, q, k, v, **opts))
    assert 1e-5 < err <= 4 * 2**-10, f"TF32 relative error {err:.3e}"
