"""Smoke tests: few cases that together reach every kernel family once, each case switching on many
options at once, forward and backward against the float64 reference.

On a GPU they are ``gpu`` tests at tile-sized shapes, meant for a cold machine, where compiling the
kernel variants dominates (``python -m pytest tests -m "gpu and smoke"``, or ``-m smoke``): about 25
variants, dense forward and backward in bfloat16 (GQA, causal, a string temperature, key padding, a
window), float16 (a boolean mask, a tensor temperature with its gradient, CosScale, D = 256) and
float32 (an additive mask, a clipped temperature counted under the mask, D = 64); dropout; packed
sequences with the entropy; split-KV decoding with and without the combine. Without a GPU the same
cases run in Triton's interpreter at small shapes, bfloat16 included.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import (
    DEVICE,
    ON_GPU,
    assert_within_budget,
    check_fused_grads,
    make_mask,
    make_qkv,
    make_temperature,
    randn,
    rel_error,
)
from test_decode import check_decode

import infoscale_triton
from infoscale_triton import reference
from infoscale_triton.dropout import draw_seed, dropout_mask

pytestmark = [pytest.mark.smoke] + ([pytest.mark.gpu] if ON_GPU else [])


def sizes(gpu: tuple, cpu: tuple) -> tuple:
    return gpu if ON_GPU else cpu


# (dtype, (b, hq, hkv, lq, lk, d, dv) on the GPU, the same on CPU, options)
DENSE = {
    "bf16-d128-causal-gqa-infoscale-padding-window": (
        torch.bfloat16, (2, 8, 2, 1000, 1000, 128, 128), (2, 4, 2, 16, 36, 32, 32),
        dict(is_causal=True, temperature="infoscale", train_len=512, kv_lengths=(1.0, 0.37),
             window=(300, 0))),
    "fp16-d256-bool-mask-tensor-temperature-cos": (
        torch.float16, (2, 4, 4, 700, 900, 256, 256), (2, 2, 2, 33, 47, 256, 16),
        dict(attn_mask="bool_empty_rows", temperature="tensor_b1l", cos_scale=64.0)),
    # float32 at D = 64: exact IEEE float32 dots compile to FMA loops, which ptxas takes ~35 s to build at
    # D = 64 and ~500 s at D = 256 (benchmarks/ptxas_report.py, sm_90, triton 3.6)
    "fp32-d64-causal-additive-mask-logn-clipped": (
        torch.float32, (1, 4, 2, 513, 777, 64, 64), (1, 2, 1, 20, 30, 64, 32),
        dict(is_causal=True, attn_mask="float_b1qk_empty_rows", temperature="logn_clipped", train_len=512)),
}


def _options(spec: dict[str, Any], b: int, hq: int, lq: int, lk: int) -> dict[str, Any]:
    opts = dict(spec)
    if "kv_lengths" in opts:  # fractions of Lk
        opts["kv_lengths"] = torch.tensor([round(f * lk) for f in opts["kv_lengths"]], device=DEVICE)
    if "attn_mask" in opts:
        opts["attn_mask"] = make_mask(opts["attn_mask"], b, hq, lq, lk)
    if str(opts.get("temperature", "")).startswith("tensor"):
        opts.update(make_temperature(opts["temperature"], b, hq, lq))
        opts["temperature"].requires_grad_(True)
    return opts


@pytest.mark.parametrize("case", DENSE)
def test_dense(case: str) -> None:
    dtype, gpu, cpu, spec = DENSE[case]
    b, hq, hkv, lq, lk, d, dv = sizes(gpu, cpu)
    q, k, v = make_qkv(b, hq, hkv, lq, lk, d, dv, dtype, layout="blhd")
    check_fused_grads(q, k, v, enable_gqa=hq != hkv, output_rounding=True, **_options(spec, b, hq, lq, lk))


def _check_against(fused: list[torch.Tensor], ref_fn: Any, inputs: list[torch.Tensor], dout: torch.Tensor,
                   names: tuple[str, ...], dtype: torch.dtype) -> None:
    """Output and gradients (``fused``) against the float64 reference ``ref_fn`` of ``inputs``, with the
    error of the same reference in ``dtype`` as the budget."""
    def run(work: torch.dtype) -> list[torch.Tensor]:
        leaves = [x.detach().to(work).requires_grad_() for x in inputs]
        out = ref_fn(*leaves)
        return [out.double(), *(g.double() for g in torch.autograd.grad(out, leaves, dout.to(work)))]

    for name, got, want, low in zip(names, fused, run(torch.float64), run(dtype), strict=True):
        assert torch.isfinite(got).all(), f"{name}: not finite"
        assert_within_budget(got, want, low, dtype, f"{name}: ")


def test_dropout() -> None:
    """bfloat16 dropout with GQA, causal and a string temperature: the output and gradients against the
    reference given the kernels' own mask (dropout.py: how to get it)."""
    b, hq, hkv, lq, lk, d = sizes((2, 8, 2, 700, 1000, 64), (1, 4, 2, 20, 36, 32))
    dtype, p = torch.bfloat16, 0.1
    opts = dict(is_causal=True, enable_gqa=True, temperature="logn", train_len=512)
    q, k, v = make_qkv(b, hq, hkv, lq, lk, d, d, dtype)
    dout = randn(b, hq, lq, d, dtype=dtype)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    torch.manual_seed(1234)
    out = infoscale_triton.scaled_dot_product_attention(*leaves, dropout_p=p, **opts)
    fused = [out, *torch.autograd.grad(out, leaves, dout)]
    torch.manual_seed(1234)
    keep = dropout_mask(draw_seed(DEVICE), (b, hq, lq, lk), p)
    assert 0 < keep.float().mean().item() < 1
    def ref(*x: torch.Tensor) -> torch.Tensor:
        return reference.scaled_dot_product_attention(*x, dropout_p=p, dropout_mask=keep, **opts)

    _check_against(fused, ref, [q, k, v], dout, ("out", "dq", "dk", "dv"), dtype)


def test_varlen_with_entropy() -> None:
    """bfloat16 packed sequences (lengths 0 and 1 among them, two spare tokens), causal, GQA, a string
    temperature, D = 128: output, gradients and the entropy against the reference on each sequence."""
    lens = torch.tensor(sizes([300, 1, 0, 517, 129], [9, 1, 0, 16]))
    d, hq, dtype = sizes(128, 32), sizes(8, 4), torch.bfloat16
    cu = torch.nn.functional.pad(lens.cumsum(0), (1, 0)).to(torch.int32).to(DEVICE)
    tokens = int(lens.sum()) + 2
    q, k, v = (randn(tokens, h, d, dtype=dtype) for h in (hq, 2, 2))
    dout = randn(tokens, hq, d, dtype=dtype)
    opts = dict(is_causal=True, temperature="infoscale", train_len=256)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    top = int(lens.max())
    out, stats = infoscale_triton.varlen_attention(*leaves, cu, cu, top, top, return_entropy=True, **opts)
    fused = [out, *torch.autograd.grad(out, leaves, dout)]
    _check_against(fused, lambda *x: reference.varlen_attention(*x, cu, cu, **opts), [q, k, v], dout,
                   ("out", "dq", "dk", "dv"), dtype)
    want = torch.zeros(tokens, hq, dtype=torch.float64, device=DEVICE)
    for s in range(len(lens)):
        a, z = int(cu[s]), int(cu[s + 1])
        if z > a:
            x = [t[a:z].double().transpose(0, 1)[None] for t in (q, k)]
            want[a:z] = reference.attention_entropy(*x, enable_gqa=True, **opts)[0][0].T
    # (the entropy's error follows the logits' rounding: test_entropy.py's bfloat16 tolerance)
    assert rel_error(stats.entropy, want) < 1e-1
    assert (stats.entropy[-2:] == 0).all() and (fused[0][-2:] == 0).all()


def test_decode() -> None:
    """bfloat16 split-KV decoding, D = 128, GQA 4, ragged cache lengths, two query rows: split and
    combine (default splits), and a single direct split."""
    b, lk = 2, sizes(5000, 70)
    d = sizes(128, 32)
    q, k, v = make_qkv(b, 8, 2, 2, lk, d, d, torch.bfloat16, layout=("contiguous", "blhd", "blhd"))
    lengths = torch.tensor([lk, lk // 3 + 1], dtype=torch.int32, device=DEVICE)
    for splits in (sizes(None, 3), 1):  # (the interpreter's short caches would get one split by default)
        check_decode(q, k, v, lengths, splits, temperature="infoscale", train_len=1024)
