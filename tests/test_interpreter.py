"""bfloat16 arithmetic the kernels rely on, wherever they run: Triton's interpreter multiplies bfloat16
tiles in tl.dot as raw 16-bit integers and truncates float32 to bfloat16, so the kernels' ``dot`` and
``cast`` (kernels/primitives.py) work around both there. Checked against torch, compiled too."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from helpers import DEVICE
from infoscale_triton.kernels.primitives import cast, dot


@triton.jit
def _cast_kernel(X, Y, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(Y + offs, cast(tl.load(X + offs), Y.dtype.element_ty))


@triton.jit
def _dot_kernel(A, B, C, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    m, n, k = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    a = tl.load(A + m[:, None] * K + k[None, :])
    b = tl.load(B + k[:, None] * N + n[None, :])
    acc = dot(a, b, None, "ieee")
    tl.store(C + m[:, None] * N + n[None, :], dot(a, b, acc, "ieee"))  # with an accumulator too


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cast_rounds_to_nearest_even(dtype: torch.dtype) -> None:
    """float32 to the kernels' storage dtype: bit for bit torch's rounding (to nearest, ties to even),
    on random values, exact ties, values that carry into the exponent, the largest floats, subnormals,
    infinities and NaN."""
    special = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 2 - 2**-9, 255.99, 3.3e38, -3.4e38, 1e-39,
                            -2e-40, 0.0, -0.0, float("inf"), float("-inf"), float("nan")])
    n = 1024 - special.numel()
    x = torch.cat([torch.randn(n) * 10.0 ** torch.randint(-30, 30, (n,)), special]).to(DEVICE)
    y = torch.empty(1024, dtype=dtype, device=DEVICE)
    _cast_kernel[(1,)](x, y, 1024)
    want = x.to(dtype)
    same = (y.view(torch.int16) == want.view(torch.int16)) | (y.isnan() & want.isnan())
    assert same.all(), (f"{int((~same).sum())} differ, e.g. {x[~same][:4].tolist()} -> "
                        f"{y[~same][:4].tolist()} instead of {want[~same][:4].tolist()}")


def test_bfloat16_dot() -> None:
    """A bfloat16 product against float64: within float32 accumulation error (every product of two
    bfloat16 values is exact in float32)."""
    a = torch.randn(32, 64).to(DEVICE, torch.bfloat16)
    b = torch.randn(64, 16).to(DEVICE, torch.bfloat16)
    c = torch.empty(32, 16, dtype=torch.float32, device=DEVICE)
    _dot_kernel[(1,)](a, b, c, 32, 16, 64)
    want = 2 * (a.double() @ b.double())
    assert ((c.double() - want).norm() / want.norm()).item() < 1e-6
