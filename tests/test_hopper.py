"""The Gluon forward for Hopper (kernels/attention_fwd_hopper.py): which calls the host sends to it (on any
machine: the rule itself), and on an sm_90 GPU that the calls it takes match the reference."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from helpers import ON_GPU, check_fused, check_fused_grads, make_qkv, make_temperature

from infoscale_triton import forward, tuning
from infoscale_triton.validation import Problem, check_inputs

CUDA0 = torch.device("cuda", 0)
SM90 = ON_GPU and torch.cuda.get_device_capability() == (9, 0)


def _problem(d: int = 128, dv: int | None = None, dtype: torch.dtype = torch.bfloat16,
             **opts: Any) -> Problem:
    q = torch.zeros(1, 2, 8, d, dtype=dtype)
    k = torch.zeros(1, 2, 8, d, dtype=dtype)
    v = torch.zeros(1, 2, 8, dv or d, dtype=dtype)
    mask, causal = opts.pop("attn_mask", None), opts.pop("is_causal", False)
    dropout_p, cos_scale = opts.pop("dropout_p", 0.0), opts.pop("cos_scale", None)
    temperature, train_len = opts.pop("temperature", None), opts.pop("train_len", None)
    return check_inputs(q, k, v, mask, dropout_p, causal, None, False, temperature, train_len, cos_scale,
                        kernel=False, **opts)


@pytest.fixture
def on_sm90(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The selection rule as it runs on an sm_90 GPU, on any machine, for any length."""
    monkeypatch.setattr(forward, "INTERPRET", False)
    monkeypatch.setattr(forward, "_is_sm90", lambda index: True)
    with tuning.override(hopper_min_len=1):
        yield


@pytest.fixture
def any_length() -> Iterator[None]:
    """The Hopper kernel also for the short test shapes (by default it serves 4k tokens and more)."""
    with tuning.override(hopper_min_len=1):
        yield


TAKEN = {
    "plain": {},
    "causal-infoscale": dict(is_causal=True, temperature="infoscale", train_len=16),
    "tensor-temperature": dict(temperature=torch.rand(1, 2, 8)),
    "cos-scale": dict(cos_scale=10.0),
    "fp16": dict(dtype=torch.float16),
}
NOT_TAKEN = {
    "d64": dict(d=64),
    "d256": dict(d=256),
    "dv64": dict(dv=64),
    "float32": dict(dtype=torch.float32),
    "bool-mask": dict(attn_mask=torch.ones(8, 8, dtype=torch.bool)),
    "additive-mask": dict(attn_mask=torch.zeros(8, 8)),
    "window": dict(window=(2, 0)),
    "kv-lengths": dict(kv_lengths=torch.tensor([5])),
    "dropout": dict(dropout_p=0.1),
}


@pytest.mark.parametrize("case", TAKEN)
def test_selection_takes(case: str, on_sm90: None) -> None:
    opts = dict(TAKEN[case])
    dtype = opts.pop("dtype", torch.bfloat16)
    assert forward.hopper_forward(_problem(dtype=dtype, **opts), dtype, CUDA0, False)


@pytest.mark.parametrize("case", NOT_TAKEN)
def test_selection_refuses(case: str, on_sm90: None) -> None:
    """Every option the Gluon kernel lacks sends the call to the Triton kernel."""
    opts = dict(NOT_TAKEN[case])
    dtype = opts.get("dtype", torch.bfloat16)
    assert not forward.hopper_forward(_problem(**opts), dtype, CUDA0, False)


def test_selection_refuses_elsewhere(on_sm90: None, monkeypatch: pytest.MonkeyPatch) -> None:
    p = _problem()
    assert forward.hopper_forward(p, torch.bfloat16, CUDA0, False)
    assert not forward.hopper_forward(p, torch.bfloat16, CUDA0, True), "entropy output"
    assert not forward.hopper_forward(p, torch.bfloat16, torch.device("cpu"), False)
    cu = torch.tensor([0, 8], dtype=torch.int32)
    varlen = dataclasses.replace(p, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=8, max_seqlen_k=8)
    assert not forward.hopper_forward(varlen, torch.bfloat16, CUDA0, False), "packed sequences"
    with tuning.override(hopper_forward=False):
        assert not forward.hopper_forward(p, torch.bfloat16, CUDA0, False)
    fixed = {"BLOCK_M": 64, "BLOCK_N": 64, "WARP_SPEC": False, "num_warps": 4, "num_stages": 2}
    with tuning.override(forward_config=fixed):
        assert not forward.hopper_forward(p, torch.bfloat16, CUDA0, False)
    with tuning.override(hopper_min_len=9):
        assert not forward.hopper_forward(p, torch.bfloat16, CUDA0, False), "shorter than hopper_min_len"
    monkeypatch.setattr(forward, "_is_sm90", lambda index: False)
    assert not forward.hopper_forward(p, torch.bfloat16, CUDA0, False), "not sm_90"


# (dtype, (b, hq, hkv, lq, lk), layout, options): tile edges (lengths not multiples of 64 or 128), Lq > Lk
# under causality (rows that see no key), GQA, every temperature kind, CosScale, (B, L, H, D) strides
CASES = {
    "bf16-causal-gqa-infoscale": (torch.bfloat16, (2, 8, 2, 1000, 1000), "contiguous",
                                  dict(is_causal=True, temperature="infoscale", train_len=512)),
    "bf16-full-short-rows": (torch.bfloat16, (1, 2, 2, 70, 777), "contiguous", {}),
    "fp16-causal-more-rows-than-keys": (torch.float16, (1, 3, 1, 777, 300), "blhd",
                                        dict(is_causal=True, temperature="logn_clipped", train_len=128)),
    "bf16-causal-keys-past-rows-tensor-temperature": (torch.bfloat16, (2, 4, 4, 129, 4100), "contiguous",
                                                      dict(is_causal=True, temperature="tensor_bhl")),
    "fp16-full-cos": (torch.float16, (1, 4, 2, 513, 513), "blhd",
                      dict(cos_scale=32.0, temperature="infoscale", train_len=256)),
}


def _case(case: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
    dtype, (b, hq, hkv, lq, lk), layout, spec = CASES[case]
    q, k, v = make_qkv(b, hq, hkv, lq, lk, 128, 128, dtype, layout=layout)
    opts = dict(spec, enable_gqa=hq != hkv)
    if str(opts.get("temperature", "")).startswith("tensor"):
        opts.update(make_temperature(opts["temperature"], b, hq, lq))
    return q, k, v, opts


def _assert_taken(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, opts: dict[str, Any]) -> None:
    o = dict(opts)
    p = check_inputs(q, k, v, None, 0.0, o.get("is_causal", False), None, o.get("enable_gqa", False),
                     o.get("temperature"), o.get("train_len"), o.get("cos_scale"), kernel=True)
    assert forward.hopper_forward(p, q.dtype, q.device, False), "the case does not reach the Hopper kernel"


@pytest.mark.gpu
@pytest.mark.skipif(not SM90, reason="needs an sm_90 GPU")
@pytest.mark.parametrize("case", CASES)
def test_hopper_forward(case: str, any_length: None) -> None:
    q, k, v, opts = _case(case)
    _assert_taken(q, k, v, opts)
    check_fused(q, k, v, **opts)  # into a NaN-poisoned output, with the log-sum-exp's empty rows


@pytest.mark.gpu
@pytest.mark.skipif(not SM90, reason="needs an sm_90 GPU")
@pytest.mark.parametrize("case", ["bf16-causal-gqa-infoscale", "fp16-full-cos"])
def test_hopper_forward_gradients(case: str, any_length: None) -> None:
    """The Triton backward on the Gluon forward's output and log-sum-exp."""
    q, k, v, opts = _case(case)
    _assert_taken(q, k, v, opts)
    check_fused_grads(q, k, v, **opts)


@pytest.mark.gpu
@pytest.mark.smoke
@pytest.mark.skipif(not SM90, reason="needs an sm_90 GPU")
def test_hopper_forward_smoke(any_length: None) -> None:
    q, k, v, opts = _case("bf16-causal-gqa-infoscale")
    _assert_taken(q, k, v, opts)
    check_fused_grads(q, k, v, **opts)
    with tuning.override(hopper_forward=False):  # the Triton kernel, same call: the same function
        check_fused(q, k, v, **opts)

