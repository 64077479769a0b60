"""decode_attention (flash-decoding) against the float64 reference given the equivalent explicit mask
(valid cache length and bottom-right causality), and against the dense fused path when every cache is
full.

Every launch writes into a NaN-poisoned output. On CPU the interpreter runs 16-key tiles and at most
32 packed rows per program (decode_config), so Lk <= 200 gives several tiles per split and GQA 4 x
Lq 16 two row blocks; num_splits is forced above 1 to exercise the combine. The interpreter's combine
costs ~10 ms per query row: shapes keep B * Hq * Lq small. Larger shapes are marked ``gpu``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import (
    DEVICE,
    DTYPES,
    FLOOR,
    ON_GPU,
    STRING_TEMPERATURES,
    TENSOR_TEMPERATURES,
    assert_within_budget,
    make_qkv,
    make_temperature,
    mismatch_report,
    reference_in,
    rel_error,
)

import infoscale_triton
from infoscale_triton.decode import check_decode_inputs
from infoscale_triton.splitkv import choose_splits, decode_forward
from infoscale_triton.testing import error_budget

gpu = pytest.mark.gpu
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
causal = pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
REPO = Path(__file__).resolve().parent.parent


def visible_keys(kv_lengths: torch.Tensor | None, b: int, lq: int, lk: int, is_causal: bool) -> torch.Tensor:
    """Boolean (B, 1, Lq, Lk): key j is valid (j < len_b) and, if causal, j <= len_b - Lq + i."""
    lengths = torch.full((b,), lk) if kv_lengths is None else kv_lengths.cpu().long().clamp(0, lk)
    j = torch.arange(lk)[None, None, :]
    bound = lengths[:, None, None]
    allowed = j < bound
    if is_causal:
        allowed = allowed & (j <= bound - lq + torch.arange(lq)[None, :, None])
    return allowed[:, None].to(DEVICE)


def edge_lengths(b: int, lk: int, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """0, 1 and Lk, then random lengths in [2, Lk)."""
    fixed = torch.tensor([0, 1, lk])[:b]
    rest = torch.randint(2, lk, (max(b - 3, 0),))
    return torch.cat([fixed, rest]).to(device=DEVICE, dtype=dtype)


def run_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_lengths: torch.Tensor | None = None,
               num_splits: int | None = None, **opts: Any) -> torch.Tensor:
    """decode_forward into a NaN-poisoned output; ``opts`` are decode_attention's keyword options."""
    opts = {"is_causal": True, **opts}
    p = check_decode_inputs(q, k, v, kv_lengths, opts["is_causal"], opts.get("scale"), opts.get("temperature"),
                            opts.get("train_len"), opts.get("cos_scale"), num_splits)
    poisoned = torch.full((p.batch, p.heads_q, p.lq, p.head_dim_v), float("nan"), dtype=q.dtype, device=q.device)
    out = decode_forward(q, k, v, p, num_splits, out=poisoned)
    assert out.data_ptr() == poisoned.data_ptr(), "decode_forward did not write into out="
    return out


def reference_opts(q: torch.Tensor, k: torch.Tensor, kv_lengths: torch.Tensor | None, **opts: Any) -> dict:
    """The reference's keyword arguments for a decode call: the explicit mask instead of is_causal."""
    b, _, lq, _ = q.shape
    mask = visible_keys(kv_lengths, b, lq, k.shape[2], opts.pop("is_causal", True))
    return {**opts, "attn_mask": mask, "enable_gqa": True}


def check_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_lengths: torch.Tensor | None = None,
                 num_splits: int | None = None, *, clean: tuple[torch.Tensor, torch.Tensor] | None = None,
                 **opts: Any) -> torch.Tensor:
    """Run the poisoned decode and compare it with the float64 reference: no NaN, rows that see no key
    exactly zero, error within 2 x the reference's own in the inputs' dtype + FLOOR. ``clean``: the
    (k, v) the reference uses instead (when the cache holds garbage past the valid lengths)."""
    out = run_decode(q, k, v, kv_lengths, num_splits, **opts)
    ref_k, ref_v = clean or (k, v)
    ref_opts = reference_opts(q, k, kv_lengths, **opts)
    ref64 = reference_in(torch.float64, q, ref_k, ref_v, **ref_opts)
    empty = ~ref_opts["attn_mask"].any(-1).expand(out.shape[:3])
    assert not torch.isnan(out).any(), mismatch_report(out, ref64, "NaN in the output", FLOOR[q.dtype])
    assert (out[empty] == 0).all(), "rows that see no key must be exactly zero"
    if ref64.norm() > 0:
        assert_within_budget(out, ref64, reference_in(q.dtype, q, ref_k, ref_v, **ref_opts))
    return out


# --- the reference, with the mask built from lengths and causality ------------------------------

ROWS = [(1, 1), (1, 4), (3, 1), (3, 4), (16, 1), (16, 4)]  # (Lq, GQA group); 16 x 4: two row blocks


@causal
@pytest.mark.parametrize("lq,group", ROWS, ids=str)
def test_rows_and_groups(lq: int, group: int, is_causal: bool) -> None:
    """Lengths 0, 1, Lk and a random one; 3 splits (the combine); with Lq = 16 and causal, length 1
    leaves 15 rows empty."""
    q, k, v = make_qkv(4, group, 1, lq, 70, 32, 32, torch.float32)
    check_decode(q, k, v, edge_lengths(4, 70), num_splits=3, is_causal=is_causal,
                 temperature="infoscale", train_len=16)


@pytest.mark.parametrize("lq,group", [(1, 4), (3, 1), (16, 4)], ids=str)
@pytest.mark.parametrize("num_splits", [1, 4])
def test_float16(num_splits: int, lq: int, group: int) -> None:
    q, k, v = make_qkv(4, group, 1, lq, 100, 32, 32, torch.float16)
    check_decode(q, k, v, edge_lengths(4, 100, torch.int64), num_splits=num_splits,
                 temperature="logn", train_len=32)


# every temperature kind with and without CosScale in float32; a few in the other dtypes
TEMPERATURE_CASES = [
    *[pytest.param(t, c, torch.float32, id=f"{t}-{c}-float32")
      for t in (None, *STRING_TEMPERATURES, *TENSOR_TEMPERATURES) for c in (None, 32.0)],
    *[pytest.param(t, 32.0, d, id=f"{t}-32.0-{str(d).removeprefix('torch.')}")
      for t in (None, "infoscale", "tensor_bhl") for d in DTYPES if d != torch.float32],
]


@pytest.mark.parametrize("temperature,cos_scale,dtype", TEMPERATURE_CASES)
def test_temperature_and_cos_scale(temperature: str | None, cos_scale: float | None, dtype: torch.dtype) -> None:
    """n_i is the visible cache length: rows see 1 to 90 keys, on both sides of train_len = 24."""
    b, hq, lq = 3, 4, 2
    q, k, v = make_qkv(b, hq, 2, lq, 90, 48, 40, dtype)
    lengths = torch.tensor([90, 2, 37], dtype=torch.int32, device=DEVICE)
    check_decode(q, k, v, lengths, num_splits=2, cos_scale=cos_scale, **make_temperature(temperature, b, hq, lq))


@pytest.mark.parametrize("cos_scale", [None, 32.0])
@pytest.mark.parametrize("kind", ["zero_query", "zero_keys"])
def test_cos_scale_zero_rows(kind: str, cos_scale: float | None) -> None:
    """Zero rows have zero cosines (not NaN); without CosScale they are ordinary rows."""
    q, k, v = make_qkv(2, 4, 2, 2, 60, 32, 32, torch.float32)
    if kind == "zero_query":
        q[:, 1] = 0
    else:
        k[:, :, ::3] = 0
    check_decode(q, k, v, torch.tensor([60, 41], device=DEVICE), num_splits=3, cos_scale=cos_scale,
                 temperature="infoscale_clipped", train_len=16)


# --- splits, loads and layouts -----------------------------------------------------------------

@causal
@pytest.mark.parametrize("num_splits", [None, 1, 2, 5, 16])  # 16 > the 13 tiles of 200 keys: empty splits
def test_num_splits(num_splits: int | None, is_causal: bool) -> None:
    q, k, v = make_qkv(2, 4, 2, 2, 200, 32, 32, torch.float32)
    check_decode(q, k, v, torch.tensor([200, 123], device=DEVICE), num_splits=num_splits, is_causal=is_causal)


@pytest.mark.parametrize("tma", [True, False], ids=["tma", "pointers"])
@pytest.mark.parametrize("garbage", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_cache_garbage_past_lengths(garbage: float, tma: bool, tune: Callable[..., None]) -> None:
    """A cache holds anything past the valid lengths: NaN or inf there must not reach the output."""
    tune(decode_config={"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1, "TMA": tma})
    q, k, v = make_qkv(3, 2, 2, 3, 75, 32, 32, torch.float16)
    lengths = torch.tensor([75, 20, 0], device=DEVICE)
    dirty_k, dirty_v = k.clone(), v.clone()
    for b, n in enumerate(lengths.tolist()):
        dirty_k[b, :, n:], dirty_v[b, :, n:] = garbage, garbage
    check_decode(q, dirty_k, dirty_v, lengths, num_splits=2, clean=(k, v), cos_scale=32.0)


# (query, cache): the caches as a transposed (B, L, H, D) buffer, with rows that are not 16-byte aligned
# or an unaligned base (pointer loads), or broadcast over the batch; query in any strides
LAYOUT_CASES = [("contiguous", c) for c in ("contiguous", "blhd", "padded_rows", "offset", "expanded")] + [
    ("blhd", "blhd"), ("last_stride2", "contiguous")]


@pytest.mark.parametrize("query_layout,cache_layout", LAYOUT_CASES, ids=str)
def test_layouts(query_layout: str, cache_layout: str) -> None:
    q, k, v = make_qkv(2, 4, 2, 3, 50, 24, 24, torch.float16, layout=(query_layout, cache_layout, cache_layout))
    check_decode(q, k, v, torch.tensor([50, 33], device=DEVICE), num_splits=2, temperature="logn", train_len=8)


@pytest.mark.parametrize("tma", [True, False], ids=["tma", "pointers"])
def test_loads_agree(tma: bool, tune: Callable[..., None]) -> None:
    """Both load paths, forced, on a layout that allows both."""
    tune(decode_config={"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1, "TMA": tma})
    q, k, v = make_qkv(2, 8, 2, 3, 90, 64, 32, torch.float32, layout="blhd")
    check_decode(q, k, v, torch.tensor([90, 47], device=DEVICE), num_splits=2,
                 **make_temperature("tensor_bhl", 2, 8, 3))


def test_lengths_clamped() -> None:
    """Lengths beyond [0, Lk] are clamped in the kernel (documented: checking needs a host sync)."""
    q, k, v = make_qkv(3, 2, 2, 2, 40, 16, 16, torch.float32)
    out = run_decode(q, k, v, torch.tensor([1000, -5, 40], device=DEVICE), num_splits=2)
    expected = run_decode(q, k, v, torch.tensor([40, 0, 40], device=DEVICE), num_splits=2)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_strided_lengths() -> None:
    q, k, v = make_qkv(2, 2, 2, 1, 40, 16, 16, torch.float32)
    lengths = torch.tensor([7, 99, 31, 99], dtype=torch.int32, device=DEVICE)[::2]
    check_decode(q, k, v, lengths, num_splits=2)


# --- the dense fused path on full caches ------------------------------------------------------

@dtypes
@causal
@pytest.mark.parametrize("lq,group,opts", [
    (1, 4, {}),
    (5, 1, {"temperature": "infoscale", "train_len": 32}),
    (16, 2, {"temperature": "logn_clipped", "train_len": 32, "cos_scale": 64.0}),
], ids=["lq1-gqa4-plain", "lq5-mha-infoscale", "lq16-gqa2-logn-cos"])
def test_matches_dense(opts: dict, lq: int, group: int, is_causal: bool, dtype: torch.dtype) -> None:
    """kv_lengths=None against infoscale_triton.scaled_dot_product_attention (bottom-right causal, GQA):
    both within budget of the float64 reference, and within twice that budget of each other."""
    b, hkv, lk = 1, 2, 57
    q, k, v = make_qkv(b, hkv * group, hkv, lq, lk, 32, 32, dtype)
    ours = check_decode(q, k, v, num_splits=2, is_causal=is_causal, **opts)
    dense = infoscale_triton.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=True, **opts)
    ref_opts = reference_opts(q, k, None, is_causal=is_causal, **opts)
    ref64 = reference_in(torch.float64, q, k, v, **ref_opts)
    budget = error_budget(rel_error(reference_in(dtype, q, k, v, **ref_opts), ref64), dtype)
    err = rel_error(ours, dense.to(torch.float64))
    assert err <= 2 * budget, f"decode vs dense: rel. difference {err:.3e} > {2 * budget:.3e}"


# --- the split heuristic ----------------------------------------------------------------------

@pytest.mark.parametrize("batch,heads_kv,lk,block_n,expected", [
    (1, 8, 32768, 64, 32),  # the benchmark's shape: 33 wanted (2 programs per SM), 16 tiles each
    (1, 8, 4096, 64, 16),  # capped: at least 4 tiles per split
    (1, 8, 4160, 64, 13),  # 65 tiles: 16 splits would take 5 tiles each, and 13 do
    (1, 8, 100, 64, 1),
    (64, 8, 32768, 64, 1),  # 512 programs already
    (1, 1, 2**20, 64, 256),  # capped at MAX_SPLITS
])
def test_choose_splits(batch: int, heads_kv: int, lk: int, block_n: int, expected: int) -> None:
    assert choose_splits(batch, heads_kv, 1, lk, block_n, torch.device("cpu")) == expected


# --- bad input -------------------------------------------------------------------------------

def _t(*shape: int, dtype: torch.dtype = torch.float32, device: str | torch.device = DEVICE) -> torch.Tensor:
    return torch.randn(*shape).to(device=device, dtype=dtype)


def _call(**changes: Any) -> torch.Tensor:
    """decode_attention on valid inputs (B=2, Hq=4, Hkv=2, Lq=1, Lk=8, D=16) with ``changes``."""
    kwargs: dict[str, Any] = {"query": _t(2, 4, 1, 16), "key_cache": _t(2, 2, 8, 16),
                              "value_cache": _t(2, 2, 8, 16)}
    kwargs.update(changes)
    return infoscale_triton.decode_attention(**kwargs)


BAD = [
    ("query-not-tensor", TypeError, r"query must be a torch\.Tensor", {"query": [1.0]}),
    ("key-rank3", ValueError, r"key_cache must have 4 dimensions", {"key_cache": _t(2, 8, 16)}),
    ("value-head-dim-0", ValueError, r"value head_dim is 0", {"value_cache": _t(2, 2, 8, 0)}),
    ("cache-blhd", ValueError, r"key_cache and value_cache are laid out \(batch, length, heads, head_dim\).*"
     r"pass key_cache\.transpose\(1, 2\) and value_cache\.transpose\(1, 2\)",
     {"query": _t(2, 4, 1, 16), "key_cache": _t(2, 8, 2, 16), "value_cache": _t(2, 8, 2, 16)}),
    ("query-float64", TypeError, r"query has dtype torch\.float64",
     {"query": _t(2, 4, 1, 16, dtype=torch.float64)}),
    ("dtype-mismatch", TypeError, r"query, key_cache and value_cache must share a dtype",
     {"key_cache": _t(2, 2, 8, 16, dtype=torch.float16)}),
    ("key-device", ValueError, r"key_cache is on meta", {"key_cache": _t(2, 2, 8, 16, device="meta")}),
    ("key-last-stride", ValueError, r"key_cache must have a unit last stride",
     {"key_cache": _t(2, 2, 8, 32)[..., ::2]}),
    ("value-last-stride", ValueError, r"value_cache must have a unit last stride",
     {"value_cache": _t(2, 2, 16, 8).transpose(-1, -2)}),
    ("lq-17", ValueError, r"query has Lq=17 positions; decode_attention takes 1 to 16",
     {"query": _t(2, 4, 17, 16)}),
    ("batch", ValueError, r"batch sizes differ", {"query": _t(3, 4, 1, 16)}),
    ("value-length", ValueError, r"key_cache .* and value_cache .* must agree in heads and length",
     {"value_cache": _t(2, 2, 9, 16)}),
    ("head-dim", ValueError, r"key_cache's head_dim 32 differs from query's 16",
     {"key_cache": _t(2, 2, 8, 32)}),
    ("gqa", ValueError, r"query heads \(3\) must be a multiple of the key/value heads \(2\)",
     {"query": _t(2, 3, 1, 16)}),
    ("small-head-dim", ValueError, r"head_dim is 8", {"query": _t(2, 4, 1, 8), "key_cache": _t(2, 2, 8, 8)}),
    ("lengths-list", TypeError, r"kv_lengths must be an int32 or int64 tensor", {"kv_lengths": [8, 8]}),
    ("lengths-float", TypeError, r"kv_lengths must be int32 or int64, got torch\.float32",
     {"kv_lengths": torch.ones(2, device=DEVICE)}),
    ("lengths-shape", ValueError, r"kv_lengths must have shape \(2,\), got \(2, 1\)",
     {"kv_lengths": torch.ones(2, 1, dtype=torch.int32, device=DEVICE)}),
    ("lengths-device", ValueError, r"kv_lengths is on meta",
     {"kv_lengths": torch.ones(2, dtype=torch.int32, device="meta")}),
    ("splits-0", ValueError, r"num_splits must be None or an int in \[1, 256\], got 0", {"num_splits": 0}),
    ("splits-float", ValueError, r"num_splits must be .* got 2\.0", {"num_splits": 2.0}),
    ("causal", TypeError, r"is_causal must be a bool", {"is_causal": 1}),
    ("scale-cos", ValueError, r"scale must be None when cos_scale", {"scale": 0.1, "cos_scale": 32.0}),
    ("temperature-name", ValueError, r"temperature must be one of", {"temperature": "log"}),
    ("train-len", ValueError, r"needs train_len", {"temperature": "logn"}),
    ("temperature-shape", ValueError, r"temperature of shape \(3\) does not broadcast",
     {"temperature": torch.ones(3, device=DEVICE)}),
]


@pytest.mark.parametrize("exc,match,changes", [pytest.param(*c[1:], id=c[0]) for c in BAD])
def test_bad_input(exc: type[Exception], match: str, changes: dict) -> None:
    with pytest.raises(exc, match=match):
        _call(**changes)


@pytest.mark.parametrize("name", ["query", "key_cache", "value_cache", "temperature"])
def test_refuses_grad(name: str) -> None:
    inputs = {"query": _t(2, 4, 1, 16), "key_cache": _t(2, 2, 8, 16), "value_cache": _t(2, 2, 8, 16),
              "temperature": _t(2, 4, 1)}
    inputs[name].requires_grad_(True)
    with pytest.raises(NotImplementedError, match=f"{name} requires grad: decode_attention is inference-only"):
        _call(**inputs)
    with torch.no_grad():
        out = _call(**inputs)
    assert not out.requires_grad and torch.isfinite(out).all()


# --- the benchmark script ---------------------------------------------------------------------

def _benchmark_module(monkeypatch: pytest.MonkeyPatch) -> Any:
    spec = importlib.util.spec_from_file_location("bench_decode", REPO / "benchmarks" / "bench_decode.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    return bench


@pytest.mark.skipif(ON_GPU, reason="the smoke mode is the CPU stand-in of the GPU benchmark")
def test_benchmark_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """benchmarks/bench_decode.py --smoke through the interpreter: it checks ours, times every provider
    it can (the CUDA-only ones record why not) and writes JSON and CSV."""
    bench = _benchmark_module(monkeypatch)
    assert bench.main(["--smoke", "--out", str(tmp_path), "--rep", "1", "--warmup", "0"]) == 0
    (result,) = tmp_path.glob("bench_decode_*.json")
    rows = json.loads(result.read_text())["results"]
    ours = [r for r in rows if r["provider"] == "ours"]
    assert ours and all(math.isfinite(r["ms"]) for r in ours)
    assert all(r["reason"] for r in rows if r["provider"].startswith("sdpa"))
    assert list(tmp_path.glob("bench_decode_*.csv"))


@pytest.mark.skipif(ON_GPU, reason="the smoke mode is the CPU stand-in of the GPU benchmark")
def test_benchmark_short_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """bench_decode.py --short (the routing threshold's measurement) through the interpreter: both
    launchers checked and timed at every (B, Lq, temperature) point, JSON and CSV written."""
    bench = _benchmark_module(monkeypatch)
    assert bench.main(["--smoke", "--short", "--lk", "16", "--out", str(tmp_path), "--rep", "0",
                       "--warmup", "0"]) == 0
    (result,) = tmp_path.glob("bench_decode_short_*.json")
    rows = json.loads(result.read_text())["results"]
    assert len(rows) == len(bench.SHORT_QUERY_ROWS) * len(bench.SHORT_TEMPERATURES)
    assert all(r["ok"] and math.isfinite(r["dense_us"]) and math.isfinite(r["decode_us"]) for r in rows)
    assert list(tmp_path.glob("bench_decode_short_*.csv"))


# --- compiled only ---------------------------------------------------------------------------

@gpu
@dtypes
@pytest.mark.parametrize("cos_scale", [None, 64.0])
@pytest.mark.parametrize("lq,group", [(1, 4), (4, 8), (16, 8)], ids=str)
@pytest.mark.parametrize("lk", [4097, 32768])
def test_gpu_lengths(lk: int, lq: int, group: int, cos_scale: float | None, dtype: torch.dtype) -> None:
    """Realistic caches with the default split heuristic, D = 128, a (B, L, H, D) layout, ragged lengths."""
    b, hkv = 3, 2
    q, k, v = make_qkv(b, hkv * group, hkv, lq, lk, 128, 128, dtype, layout=("contiguous", "blhd", "blhd"))
    lengths = torch.tensor([lk, lk // 3 + 5, 1], dtype=torch.int32, device=DEVICE)
    check_decode(q, k, v, lengths, cos_scale=cos_scale, temperature="infoscale", train_len=4096)


@gpu
@pytest.mark.parametrize("d", [64, 80, 256])
def test_gpu_head_dims(d: int) -> None:
    q, k, v = make_qkv(2, 8, 2, 2, 5000, d, d, torch.bfloat16)
    check_decode(q, k, v, torch.tensor([5000, 4321], device=DEVICE), temperature="logn", train_len=1024)


@gpu
def test_gpu_cuda_graph() -> None:
    """The default path captures and replays: no host sync (splits from shapes, lengths read on device)."""
    q, k, v = make_qkv(2, 8, 2, 1, 8192, 128, 128, torch.bfloat16)
    lengths = torch.tensor([8192, 3000], dtype=torch.int32, device=DEVICE)
    opts = {"temperature": "infoscale", "train_len": 2048}
    infoscale_triton.decode_attention(q, k, v, lengths, **opts)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = infoscale_triton.decode_attention(q, k, v, lengths, **opts)
    for n in (8192, 1, 0, 5000):
        lengths[1] = n
        q.normal_()
        graph.replay()
        torch.cuda.synchronize()
        expected = reference_in(torch.float64, q, k, v, **reference_opts(q, k, lengths, **opts))
        assert rel_error(out, expected) < 2e-2, f"replay with length {n}"


@gpu
@pytest.mark.slow
def test_gpu_offsets_past_2_31() -> None:
    """K and V are heads of one (1, 2**18, 72, 128) buffer: their last rows lie past 2**31 elements."""
    length, d = 2**18, 128
    buf = torch.empty(1, length, 72, d, dtype=torch.float16, device=DEVICE)
    k, v = (buf[:, :, h:h + 1].transpose(1, 2) for h in (70, 71))
    k.normal_(0, 2.0)
    v.normal_()
    assert k.storage_offset() + (length - 1) * k.stride(2) > 2**31
    q = torch.randn(1, 4, 1, d, dtype=torch.float16, device=DEVICE)
    check_decode(q, k, v, torch.tensor([length - 3], device=DEVICE), temperature="infoscale", train_len=4096)


# (Lq, Lk, options, routed): what scaled_dot_product_attention sends to the split-KV kernel, whatever
# the cache length (test_decode_min_keys: the length threshold). "kv_lengths": "edge" lengths 0, 1,
# Lk..., "attn_mask" one of decoding_mask's kinds, "layout" the key's,
# "grad": the query requires grad.
ROUTING = {
    "lq1-short": (1, 20, {}, True),
    "lq16-short": (16, 9, {}, True),  # causal, Lq > Lk: the first 7 rows see no key
    "lq1-long": (1, 1100, {}, True),
    "lq4-long": (4, 1100, {}, True),
    "lq1-lengths": (1, 1100, {"kv_lengths": "edge"}, True),
    "lq4-lengths-full": (4, 60, {"kv_lengths": "edge", "is_causal": False}, True),
    "cos-tensor-temperature": (3, 30, {"cos_scale": 24.0, "temperature": "tensor"}, True),
    # dense: causal rows align to Lk there, to each cache's own length in decode
    "lq4-lengths-dense": (4, 60, {"kv_lengths": "edge"}, False),
    "lq17-dense": (17, 60, {}, False),
    "padding-mask": (1, 60, {"attn_mask": "padding"}, True),  # left-padded HF batches
    "static-cache-mask": (1, 60, {"attn_mask": "static"}, True),  # additive, -inf past each position
    "long-padding-mask": (2, 300, {"attn_mask": "padding"}, True),  # n_i counted over several key chunks
    "row-bool-mask": (4, 60, {"attn_mask": "random_bool"}, True),  # (B, Hq, Lq, Lk), causal on top
    "row-additive-mask": (3, 60, {"attn_mask": "random_additive", "is_causal": False}, True),
    "mask-tensor-temperature": (2, 40, {"attn_mask": "random_bool", "temperature": "tensor", "cos_scale": 8.0}, True),
    "window-dense": (1, 60, {"window": (8, 0)}, False),
    "key-last-stride2-dense": (1, 60, {"layout": "last_stride2"}, False),
    "grad-dense": (1, 60, {"grad": True}, False),  # training: the dense path has the backward
}


def decoding_mask(kind: str, b: int, hq: int, lq: int, lk: int) -> torch.Tensor:
    """ROUTING's masks: "padding" left padding of 0, 5 and 30 keys (B, 1, 1, Lk) boolean; "static" a
    static cache filled to 20, 41 and Lk keys, additive (0 / -inf); "random_*" (B, Hq, Lq, Lk) with about
    a quarter of the pairs hidden and one row hiding every key, boolean or additive (random finite
    biases, -inf where hidden)."""
    keys = torch.arange(lk, device=DEVICE)
    if kind == "padding":
        return (keys >= torch.tensor([0, 5, 30], device=DEVICE)[:, None]).view(b, 1, 1, lk)
    if kind == "static":
        filled = keys < torch.tensor([20, 41, lk], device=DEVICE)[:, None]
        return torch.zeros(b, 1, 1, lk, device=DEVICE).masked_fill(~filled.view(b, 1, 1, lk), float("-inf"))
    allowed = torch.rand(b, hq, lq, lk, device=DEVICE) > 0.25
    allowed[0, 1, -1] = False
    if kind == "random_bool":
        return allowed
    return torch.randn(b, hq, lq, lk, device=DEVICE).masked_fill(~allowed, float("-inf"))


@pytest.mark.parametrize("lq,lk,options,routed", ROUTING.values(), ids=ROUTING.keys())
def test_dense_function_routes_decoding(lq: int, lk: int, options: dict[str, Any], routed: bool,
                                        decode_calls: list[tuple[int, int]], tune: Callable[..., None]) -> None:
    """scaled_dot_product_attention sends inference calls with few query rows to the split-KV kernel
    (and nothing else), with the dense function's semantics either way."""
    tune(decode_min_keys=1)
    b, hq = 3, 4
    opts = {"is_causal": True, "temperature": "infoscale", "train_len": 16, **options}
    layout, grad = opts.pop("layout", "contiguous"), opts.pop("grad", False)
    q, k, v = make_qkv(b, hq, 2, lq, lk, 16, 16, torch.float32, layout=("contiguous", layout, "contiguous"))
    if opts.get("kv_lengths") == "edge":
        opts["kv_lengths"] = edge_lengths(b, lk)
    if "attn_mask" in opts:
        opts["attn_mask"] = decoding_mask(opts["attn_mask"], b, hq, lq, lk)
    if opts["temperature"] == "tensor":
        del opts["train_len"]
        opts.update(make_temperature("tensor_bhl", b, hq, lq))
    opts["enable_gqa"] = True
    out = infoscale_triton.scaled_dot_product_attention(q.requires_grad_(grad), k, v, **opts)
    assert decode_calls == ([(lq, lk)] if routed else [])
    q = q.detach()
    ref = reference_in(torch.float64, q, k, v, **opts)
    assert_within_budget(out.detach(), ref, reference_in(torch.float32, q, k, v, **opts))


def test_decode_min_keys(tune: Callable[..., None], decode_calls: list[tuple[int, int]]) -> None:
    """The routing threshold (measured: benchmarks/bench_decode.py --short): caches shorter than
    tuning's decode_min_keys stay on the dense kernel."""
    tune(decode_min_keys=48)
    for lk in (47, 48):
        q, k, v = make_qkv(1, 4, 2, 2, lk, 16, 16, torch.float32)
        infoscale_triton.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert decode_calls == [(2, 48)]
