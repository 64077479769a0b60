"""Bad input: every check of infoscale_triton.validation raises the documented exception type with a
message that names the argument, in the fused path and (where the check is shared) in the reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from helpers import DEVICE, make_qkv

import infoscale_triton
from infoscale_triton import reference, validation

FUSED = infoscale_triton.scaled_dot_product_attention
REFERENCE = reference.scaled_dot_product_attention
B, H, L, D = 1, 2, 5, 16


def t(*shape: int, dtype: torch.dtype = torch.float32, device: str | torch.device = DEVICE) -> torch.Tensor:
    return torch.randn(*shape).to(device=device, dtype=dtype)


def call(fn: Callable[..., torch.Tensor], **changes: Any) -> torch.Tensor:
    """``fn`` on valid (1, 2, 5, 16) float32 inputs with ``changes`` to the keyword arguments."""
    kwargs: dict[str, Any] = {"query": t(B, H, L, D), "key": t(B, H, L, D), "value": t(B, H, L, D)}
    kwargs.update(changes)
    return fn(**kwargs)


def case(id: str, exc: type[Exception], match: str, **changes: Any) -> Any:
    return pytest.param(exc, match, changes, id=id)


# Checks shared by the fused path and the reference.
SHARED = [
    case("query-not-tensor", TypeError, r"query must be a torch\.Tensor, got list", query=[[1.0]]),
    case("query-rank3", ValueError, r"query must have 4 dimensions.*\(2, 5, 16\)", query=t(H, L, D)),
    case("key-rank5", ValueError, r"key must have 4 dimensions", key=t(1, B, H, L, D)),
    case("value-rank3", ValueError, r"value must have 4 dimensions", value=t(H, L, D)),
    case("head-dim-0", ValueError, r"query and key have head_dim 0; it must be at least 1",
         query=t(B, H, L, 0), key=t(B, H, L, 0)),
    case("query-int", TypeError, r"query must be a floating-point tensor, got torch\.int64",
         query=torch.ones(B, H, L, D, dtype=torch.int64, device=DEVICE)),
    case("value-int", TypeError, r"value must be a floating-point tensor, got torch\.int32",
         value=torch.ones(B, H, L, D, dtype=torch.int32, device=DEVICE)),
    case("dtype-mismatch", TypeError, r"query, key and value must share a dtype",
         key=t(B, H, L, D, dtype=torch.float16)),
    case("key-device", ValueError, r"key is on meta but query is on", key=t(B, H, L, D, device="meta")),
    case("value-device", ValueError, r"value is on meta but query is on",
         value=t(B, H, L, D, device="meta")),
    case("batch", ValueError, r"batch sizes differ: query \(1, 2, 5, 16\), key \(2, 2, 5, 16\)",
         key=t(2, H, L, D), value=t(2, H, L, D)),
    case("value-heads", ValueError, r"key \(1, 2, 5, 16\) and value \(1, 1, 5, 16\) must agree",
         value=t(B, 1, L, D)),
    case("value-length", ValueError, r"key .* and value \(1, 2, 6, 16\) must agree in heads and length",
         value=t(B, H, 6, D)),
    case("key-head-dim", ValueError, r"key's head_dim 32 differs from query's 16", key=t(B, H, L, 32)),
    case("gqa-not-multiple", ValueError, r"enable_gqa=True the query heads \(3\) must be a multiple of "
         r"the key/value heads \(2\)", query=t(B, 3, L, D), enable_gqa=True),
    case("heads-without-gqa", ValueError, r"query has 4 heads and key/value 2; pass enable_gqa=True",
         query=t(B, 4, L, D)),
    case("heads-not-multiple", ValueError, r"^the query heads \(3\) must be a multiple of the key/value "
         r"heads \(2\)$", query=t(B, 3, L, D)),
    case("key-heads-0", ValueError, r"the query heads \(2\) must be a multiple of the key/value heads \(0\)",
         key=t(B, 0, L, D), value=t(B, 0, L, D), enable_gqa=True),
    # a (B, L, H, D) tensor among (B, H, L, D) ones: say so, and do not advise enable_gqa alone
    case("query-blhd", ValueError, r"^query \(1, 64, 4, 16\) and key \(1, 4, 64, 16\) look like query or "
         r"key/value is laid out \(batch, length, heads, head_dim\), but this function takes \(batch, heads, "
         r"length, head_dim\): pass that one as x\.transpose\(1, 2\) .*; if they really are 64 query heads "
         r"sharing 4 key/value heads, pass enable_gqa=True$",
         query=t(B, 64, 4, D), key=t(B, 4, 64, D), value=t(B, 4, 64, D)),
    case("query-blhd-cross", ValueError, r"look like query is laid out .*: pass query\.transpose\(1, 2\) "
         r"\(a view, read in place\)$", query=t(B, 10, 4, D), key=t(B, 4, 30, D), value=t(B, 4, 30, D)),
    case("key-blhd-gqa", ValueError, r"look like key and value are laid out .*: pass key\.transpose\(1, 2\) "
         r"and value\.transpose\(1, 2\)", query=t(B, 8, 10, D), key=t(B, 30, 4, D), value=t(B, 30, 4, D),
         enable_gqa=True),
    case("value-blhd", ValueError, r"key \(1, 2, 5, 16\) and value \(1, 5, 2, 16\) must agree in heads and "
         r"length; value looks laid out \(batch, length, heads, head_dim\): pass value\.transpose\(1, 2\)",
         value=t(B, L, H, D)),
    case("mask-not-tensor", TypeError, r"attn_mask must be a torch\.Tensor or None, got list",
         attn_mask=[[True]]),
    case("mask-int", TypeError, r"attn_mask must be boolean .* got torch\.int64",
         attn_mask=torch.ones(L, L, dtype=torch.int64, device=DEVICE)),
    case("mask-shape", ValueError, r"attn_mask of shape \(6, 5\) does not broadcast to .* \(1, 2, 5, 5\)",
         attn_mask=torch.ones(6, L, dtype=torch.bool, device=DEVICE)),
    case("mask-rank5", ValueError, r"attn_mask of shape \(1, 1, 2, 5, 5\) does not broadcast",
         attn_mask=torch.ones(1, 1, H, L, L, dtype=torch.bool, device=DEVICE)),
    case("mask-heads", ValueError, r"attn_mask of shape \(3, 5, 5\) does not broadcast",
         attn_mask=torch.ones(3, L, L, dtype=torch.bool, device=DEVICE)),
    case("mask-device", ValueError, r"attn_mask is on meta but query is on",
         attn_mask=torch.ones(L, L, dtype=torch.bool, device="meta")),
    case("dropout-negative", ValueError, r"dropout_p must be a number in \[0, 1\), got -0\.1", dropout_p=-0.1),
    case("dropout-one", ValueError, r"dropout_p must be a number in \[0, 1\), got 1\.0", dropout_p=1.0),
    case("dropout-nan", ValueError, r"dropout_p must be a number", dropout_p=math.nan),
    case("dropout-bool", ValueError, r"dropout_p must be a number.*got True", dropout_p=True),
    case("dropout-str", ValueError, r"dropout_p must be a number.*got '0'", dropout_p="0"),
    case("causal-int", TypeError, r"is_causal must be a bool, got int", is_causal=1),
    case("causal-none", TypeError, r"is_causal must be a bool, got NoneType", is_causal=None),
    case("gqa-str", TypeError, r"enable_gqa must be a bool, got str", enable_gqa="yes"),
    case("cos-zero", ValueError, r"cos_scale must be a finite number > 0.*got 0", cos_scale=0.0),
    case("cos-negative", ValueError, r"cos_scale must be a finite number > 0.*got -32", cos_scale=-32),
    case("cos-nan", ValueError, r"cos_scale must be a finite number > 0.*got nan", cos_scale=math.nan),
    case("cos-inf", ValueError, r"cos_scale must be a finite number > 0.*got inf", cos_scale=math.inf),
    case("cos-bool", ValueError, r"cos_scale must be a finite number > 0.*got True", cos_scale=True),
    case("cos-str", ValueError, r"cos_scale must be a finite number > 0.*got '32'", cos_scale="32"),
    case("cos-with-scale", ValueError, r"scale must be None when cos_scale is given", cos_scale=32.0,
         scale=0.5),
    case("scale-nan", ValueError, r"scale must be a finite number or None, got nan", scale=math.nan),
    case("scale-inf", ValueError, r"scale must be a finite number or None, got -inf", scale=-math.inf),
    case("scale-str", ValueError, r"scale must be a finite number or None, got '1'", scale="1"),
    case("temperature-unknown", ValueError, r"temperature must be one of .*'infoscale_clipped'.*"
         r"a tensor or None; got 'log'", temperature="log",
         train_len=16),
    case("temperature-type", TypeError, r"temperature must be None, a string or a tensor, got float",
         temperature=1.5),
    case("temperature-no-train-len", ValueError, r"temperature='infoscale' needs train_len",
         temperature="infoscale"),
    case("train-len-1", ValueError, r"train_len must be an int >= 2, got 1", temperature="logn", train_len=1),
    case("train-len-0", ValueError, r"train_len must be an int >= 2, got 0", temperature="logn", train_len=0),
    case("train-len-bool", ValueError, r"train_len must be an int >= 2, got True", temperature="logn",
         train_len=True),
    case("train-len-float", ValueError, r"train_len must be an int >= 2, got 16\.0",
         temperature="infoscale_clipped", train_len=16.0),
    case("train-len-str", ValueError, r"train_len must be an int >= 2, got '16'", temperature="logn",
         train_len="16"),
    case("temperature-int-tensor", TypeError, r"temperature tensor must be floating-point, got torch\.int64",
         temperature=torch.ones(L, dtype=torch.int64, device=DEVICE)),
    case("temperature-length", ValueError, r"temperature of shape \(6\) does not broadcast to "
         r"\(batch, heads, Lq\) = \(1, 2, 5\)", temperature=t(6)),
    case("temperature-rank4", ValueError, r"temperature of shape \(1, 2, 5, 1\) does not broadcast",
         temperature=t(B, H, L, 1)),
    case("temperature-heads", ValueError, r"temperature of shape \(3, 1\) does not broadcast",
         temperature=t(3, 1)),
    case("temperature-device", ValueError, r"temperature is on meta but query is on",
         temperature=t(L, device="meta")),
    case("train-len-with-tensor", ValueError, r"train_len is only used by the string temperatures.*"
         r"train_len=16", temperature=t(L), train_len=16),
    case("train-len-alone", ValueError, r"train_len=16 given without a string temperature", train_len=16),
]


@pytest.mark.parametrize("fn", [FUSED, REFERENCE], ids=["fused", "reference"])
@pytest.mark.parametrize("exc,match,changes", SHARED)
def test_shared_checks(fn: Callable[..., torch.Tensor], exc: type[Exception], match: str,
                       changes: dict[str, Any]) -> None:
    with pytest.raises(exc, match=match):
        call(fn, **changes)


# Limits of the fused kernels only: the reference accepts these inputs.
KERNEL_ONLY = [
    case("float64", TypeError, r"query has dtype torch\.float64; the fused kernels take float16, "
         r"bfloat16 or float32", query=t(B, H, L, D, dtype=torch.float64),
         key=t(B, H, L, D, dtype=torch.float64), value=t(B, H, L, D, dtype=torch.float64)),
    case("head-dim-8", ValueError, r"query/key head_dim is 8; the fused kernels take 16 to 256",
         query=t(B, H, L, 8), key=t(B, H, L, 8), value=t(B, H, L, 8)),
    case("head-dim-15", ValueError, r"query/key head_dim is 15", query=t(B, H, L, 15), key=t(B, H, L, 15)),
    case("head-dim-272", ValueError, r"query/key head_dim is 272", query=t(B, H, L, 272),
         key=t(B, H, L, 272)),
    case("value-head-dim-0", ValueError, r"value head_dim is 0", value=t(B, H, L, 0)),
    case("value-head-dim-8", ValueError, r"value head_dim is 8", value=t(B, H, L, 8)),
    case("value-head-dim-257", ValueError, r"value head_dim is 257", value=t(B, H, L, 257)),
    case("grid-batch", ValueError, r"batch \(65536\) and query heads \(2\) must each be at most 65535",
         query=t(1, H, L, D).expand(65536, H, L, D), key=t(1, H, L, D).expand(65536, H, L, D),
         value=t(1, H, L, D).expand(65536, H, L, D)),
    case("grid-heads", ValueError, r"batch \(1\) and query heads \(65536\)",
         query=t(B, 1, L, D).expand(B, 65536, L, D), enable_gqa=True),
]


@pytest.mark.parametrize("exc,match,changes", KERNEL_ONLY)
def test_kernel_only_checks(exc: type[Exception], match: str, changes: dict[str, Any]) -> None:
    with pytest.raises(exc, match=match):
        call(FUSED, **changes)
    out = call(REFERENCE, **changes)  # kernel=False: no dtype, head-dim or grid limits
    assert out.shape[-1] == changes.get("value", t(B, H, L, D)).shape[-1]
    assert torch.isfinite(out).all()


def test_cpu_tensors_need_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(validation, "interpreter_active", lambda: False)  # as without TRITON_INTERPRET
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"query is on cpu: the fused kernels need CUDA tensors \(or "
                       r"TRITON_INTERPRET=1, set before triton or infoscale_triton is first imported"):
        call(FUSED, query=t(B, H, L, D, device="cpu"), key=t(B, H, L, D, device="cpu"),
             value=t(B, H, L, D, device="cpu"))
    # set after the import: the kernels were compiled for the GPU already; say when to set it
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match=r"TRITON_INTERPRET is set now but was not when infoscale_triton was "
                       r"imported: .* set it before the first import of triton or infoscale_triton"):
        call(FUSED, query=t(B, H, L, D, device="cpu"), key=t(B, H, L, D, device="cpu"),
             value=t(B, H, L, D, device="cpu"))
    call(REFERENCE, query=t(B, H, L, D, device="cpu"), key=t(B, H, L, D, device="cpu"),
         value=t(B, H, L, D, device="cpu"))


def test_reference_runs_float64_small_head_dims_on_cpu() -> None:
    """The reference takes any floating dtype, any head dim and any device (here CPU, float64, D=4)."""
    q, k, v = (torch.randn(2, 3, 7, 4, dtype=torch.float64) for _ in range(3))
    out = REFERENCE(q, k, v, is_causal=True, temperature="logn", train_len=4)
    assert out.dtype == torch.float64 and out.shape == (2, 3, 7, 4)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert not torch.allclose(out, expected)  # the temperature changes the result...
    torch.testing.assert_close(REFERENCE(q, k, v, is_causal=True), expected)  # ...and without it: SDPA


# The reference's dropout_mask (the fused path has no such argument).
REFERENCE_ONLY = [
    case("dropout-mask-float", TypeError, r"dropout_mask must be a boolean tensor .* got torch\.float32",
         dropout_p=0.1, dropout_mask=torch.ones(L, L, device=DEVICE)),
    case("dropout-mask-list", TypeError, r"dropout_mask must be a boolean tensor .* got list",
         dropout_p=0.1, dropout_mask=[[True]]),
    case("dropout-mask-shape", ValueError, r"dropout_mask of shape \(3, 5, 5\) does not broadcast to "
         r"\(batch, heads, Lq, Lk\) = \(1, 2, 5, 5\)", dropout_p=0.1,
         dropout_mask=torch.ones(3, L, L, dtype=torch.bool, device=DEVICE)),
    case("dropout-mask-device", ValueError, r"dropout_mask is on meta but query is on", dropout_p=0.1,
         dropout_mask=torch.ones(L, L, dtype=torch.bool, device="meta")),
]


@pytest.mark.parametrize("exc,match,changes", REFERENCE_ONLY)
def test_reference_only_checks(exc: type[Exception], match: str, changes: dict[str, Any]) -> None:
    with pytest.raises(exc, match=match):
        call(REFERENCE, **changes)


@pytest.mark.parametrize("fn", [FUSED, REFERENCE], ids=["fused", "reference"])
@pytest.mark.parametrize("dropout_p", [0.1, 0.999, 1e-9])
def test_dropout_is_accepted(fn: Callable[..., torch.Tensor], dropout_p: float) -> None:
    out = call(fn, dropout_p=dropout_p, is_causal=True)
    assert out.shape == (B, H, L, D) and torch.isfinite(out).all()


@pytest.mark.parametrize("train_len", [2, 4096])
def test_valid_edge_options_are_accepted(train_len: int) -> None:
    mask = torch.zeros(L, L, device=DEVICE)  # a float mask of zeros is valid and changes nothing
    for fn in (FUSED, REFERENCE):
        out = call(fn, temperature="infoscale", train_len=train_len, attn_mask=mask, dropout_p=0,
                   cos_scale=1e-3)
        assert torch.isfinite(out).all()


def test_mask_requiring_grad_is_refused() -> None:
    """The fused backward gives no gradient to attn_mask: refuse rather than drop it silently."""
    q, k, v = make_qkv(1, 2, 2, 8, 8, 16, 16, torch.float32)
    bias = torch.zeros(8, 8, device=DEVICE, requires_grad=True)
    with pytest.raises(NotImplementedError, match="attn_mask requires grad"):
        infoscale_triton.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    with torch.no_grad():
        out = infoscale_triton.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    assert out.shape == (1, 2, 8, 16) and not out.requires_grad


def test_no_grad_mode_builds_no_graph() -> None:
    q, k, v = make_qkv(1, 2, 2, 8, 8, 16, 16, torch.float32)
    q.requires_grad_(True)
    with torch.no_grad():
        out = infoscale_triton.scaled_dot_product_attention(q, k, v)
    assert not out.requires_grad
    out = infoscale_triton.scaled_dot_product_attention(q, k, v)
    assert out.requires_grad and out.grad_fn is not None
