"""Compiled-only checks (skipped without CUDA): the autotuner, realistic sizes, 64-bit offsets."""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICE, DTYPES, assert_matches_reference, check_fused, make_qkv
from infoscale_triton.kernels.attention_fwd import attention_fwd_autotuned

import infoscale_triton

pytestmark = pytest.mark.gpu
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))


@pytest.mark.autotune
@dtypes
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("d", [64, 128])
def test_autotuned(d: int, is_causal: bool, dtype: torch.dtype) -> None:
    """The autotuner on (marker): every candidate config must compile and give the right answer."""
    q, k, v = make_qkv(2, 8, 2, 1000, 1500, d, d, dtype)
    opts = {"is_causal": is_causal, "enable_gqa": True, "temperature": "infoscale", "train_len": 512}
    out = infoscale_triton.scaled_dot_product_attention(q, k, v, **opts)
    assert len(attention_fwd_autotuned.cache) > 0, "the autotuner did not run"
    assert_matches_reference(out, q, k, v, **opts)
    check_fused(q, k, v, **opts)  # the cached best config, into a poisoned output


@dtypes
@pytest.mark.parametrize("cos_scale", [None, 64.0])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("b,hq,hkv,length", [(4, 16, 4, 2048), (1, 4, 1, 8500)], ids=str)  # 8500: long-Lk config
def test_realistic_size(b: int, hq: int, hkv: int, length: int, is_causal: bool, cos_scale: float | None,
                        dtype: torch.dtype) -> None:
    q, k, v = make_qkv(b, hq, hkv, length, length, 128, 128, dtype, layout="blhd")
    check_fused(q, k, v, is_causal=is_causal, cos_scale=cos_scale, enable_gqa=True,
                temperature="logn_clipped", train_len=1024)


@pytest.mark.slow
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided-past-2**31"])
def test_long_sequence_sampled_rows(strided: bool) -> None:
    """L = 256k causal with InfoScale, checked on a few query rows against the reference (which is
    O(Lq * Lk): the rows' causal mask is explicit, and it also gives the reference n_i = i + 1).
    ``strided``: q, k, v are heads of one (1, L, 136, 64) buffer, so their last elements lie more
    than 2**31 elements (4 GiB) past its start."""
    length, d = 2**18, 64
    if strided:
        buf = torch.empty(1, length, 136, d, dtype=torch.float16, device=DEVICE)
        q, k, v = (buf[:, :, h:h + 1].transpose(1, 2) for h in (135, 134, 133))
        for x, std in ((q, 2.0), (k, 2.0), (v, 1.0)):
            x.normal_(0, std)
        assert q.storage_offset() + (length - 1) * q.stride(2) > 2**31
    else:
        q, k, v = make_qkv(1, 1, 1, length, length, d, d, torch.float16)
    opts = {"temperature": "infoscale", "train_len": 4096}
    out = infoscale_triton.scaled_dot_product_attention(q, k, v, is_causal=True, **opts)
    rows = torch.tensor([0, 1, 63, 64, 4095, 65535, 131072, length - 2, length - 1], device=DEVICE)
    rows = torch.cat([rows, torch.randint(0, length, (7,), device=DEVICE)])
    allowed = torch.arange(length, device=DEVICE)[None, :] <= rows[:, None]
    assert_matches_reference(out[:, :, rows], q[:, :, rows], k, v, attn_mask=allowed, **opts)
    assert torch.equal(out[0, 0, 0], v[0, 0, 0])  # row 0 sees key 0 only
