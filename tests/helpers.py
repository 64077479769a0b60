"""Shared test helpers: random inputs in several memory layouts, temperatures and masks, a poisoned
launch of the fused forward, and the comparison against the float64 reference with an error budget
relative to plain PyTorch in the inputs' precision.

The reference itself lives in :mod:`infoscale_triton.reference`; nothing here re-implements it.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from infoscale_triton import reference
from infoscale_triton.forward import attention_forward
from infoscale_triton.reference import allowed_keys
from infoscale_triton.validation import check_inputs

ON_GPU: bool = torch.cuda.is_available()
DEVICE: torch.device = torch.device("cuda" if ON_GPU else "cpu")
# The interpreter's bf16 tl.dot is wrong (FIELD-NOTES): bf16 is only checked compiled, on a GPU.
DTYPES: list[torch.dtype] = [torch.float16, torch.float32] + ([torch.bfloat16] if ON_GPU else [])
# The atol-like part of the budget, in relative-error units.
FLOOR: dict[torch.dtype, float] = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-3}
BUDGET_FACTOR = 2.0

LAYOUTS = ("contiguous", "blhd", "last_stride2", "padded_rows", "offset", "expanded")
STRING_TEMPERATURES = ("infoscale", "logn", "infoscale_clipped", "logn_clipped")
# Per-row tensor temperatures, by the shape they are given in (all broadcast to (B, Hq, Lq)).
TENSOR_TEMPERATURES = ("tensor_bhl", "tensor_b1l", "tensor_l", "tensor_h1")
MASKS = ("bool_b11k", "bool_1hqk", "bool_qk", "bool_empty_rows", "bool_empty_batch",
         "float_qk", "float_b1qk_empty_rows", "float16_1hqk")


def randn(*shape: int, dtype: torch.dtype, std: float = 1.0,
          generator: torch.Generator | None = None) -> torch.Tensor:
    """Normal(0, std^2) drawn in float32 on the CPU (so a generator reproduces it anywhere), then cast
    and moved to the test device."""
    x = torch.randn(*shape, generator=generator, dtype=torch.float32) * std
    return x.to(device=DEVICE, dtype=dtype)


def to_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """A (B, H, L, D) tensor in another memory layout. All but ``expanded`` keep the values.

    ``blhd``: a contiguous (B, L, H, D) tensor transposed (read in place by TMA when rows are 16-byte
    aligned); ``last_stride2``: every other element of a wider buffer (non-unit last stride);
    ``padded_rows``: row stride D + 1 (rows not 16-byte aligned); ``offset``: base one element past a
    16-byte boundary; ``expanded``: the first batch entry broadcast with batch stride 0.
    """
    d = x.shape[-1]
    if layout == "contiguous":
        return x.contiguous()
    if layout == "blhd":
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "last_stride2":
        buf = x.new_zeros(*x.shape[:-1], 2 * d)
        buf[..., ::2] = x
        return buf[..., ::2]
    if layout == "padded_rows":
        buf = x.new_zeros(*x.shape[:-1], d + 1)
        buf[..., :d] = x
        return buf[..., :d]
    if layout == "offset":
        flat = x.new_zeros(x.numel() + 1)
        y = flat[1:].view(x.shape)
        y.copy_(x)
        return y
    if layout == "expanded":
        return x[:1].expand_as(x)
    raise ValueError(layout)


def make_qkv(b: int, hq: int, hkv: int, lq: int, lk: int, d: int, dv: int, dtype: torch.dtype, *,
             std: float = 2.0, layout: str | tuple[str, str, str] = "contiguous",
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random query (B, Hq, Lq, D), key (B, Hkv, Lk, D), value (B, Hkv, Lk, Dv); ``layout`` is one
    name for all three or one per tensor. Values have std 1 (the output is a mix of them)."""
    layouts = (layout,) * 3 if isinstance(layout, str) else layout
    q = randn(b, hq, lq, d, dtype=dtype, std=std, generator=generator)
    k = randn(b, hkv, lk, d, dtype=dtype, std=std, generator=generator)
    v = randn(b, hkv, lk, dv, dtype=dtype, std=1.0, generator=generator)
    return tuple(to_layout(t, lay) for t, lay in zip((q, k, v), layouts))  # type: ignore[return-value]


def make_temperature(kind: str | None, b: int, hq: int, lq: int, *, train_len: int = 24,
                     generator: torch.Generator | None = None) -> dict[str, Any]:
    """Keyword arguments ``temperature`` (and ``train_len``) for a temperature kind: None, a string of
    :data:`STRING_TEMPERATURES`, or a tensor kind of :data:`TENSOR_TEMPERATURES` (values in about
    [-1.5, 2.5], negatives included)."""
    if kind is None:
        return {}
    if kind in STRING_TEMPERATURES:
        return {"temperature": kind, "train_len": train_len}
    shape = {"tensor_bhl": (b, hq, lq), "tensor_b1l": (b, 1, lq), "tensor_l": (lq,),
             "tensor_h1": (hq, 1)}[kind]
    t = torch.rand(*shape, generator=generator) * 4 - 1.5
    return {"temperature": t.to(DEVICE)}


def make_mask(kind: str | None, b: int, h: int, lq: int, lk: int, *,
              generator: torch.Generator | None = None) -> torch.Tensor | None:
    """An attn_mask of :data:`MASKS` (bool: True = may attend; float: additive, -inf = masked)."""
    if kind is None:
        return None

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator)

    if kind == "bool_b11k":  # padding: batch i sees its first lengths[i] keys (at least one)
        lengths = 1 + (rand(b) * lk).long()
        m = torch.arange(lk)[None, :] < lengths[:, None]
        mask = m[:, None, None, :]
    elif kind == "bool_1hqk":
        mask = rand(1, h, lq, lk) < 0.7
    elif kind == "bool_qk":
        mask = rand(lq, lk) < 0.5
    elif kind == "bool_empty_rows":  # about a third of the rows see no key at all
        mask = (rand(b, h, lq, lk) < 0.6) & (rand(b, h, lq, 1) < 0.65)
    elif kind == "bool_empty_batch":  # the whole last batch entry is masked out
        mask = (rand(b, 1, 1, lk) < 0.8) & (torch.arange(b) < b - 1)[:, None, None, None]
    elif kind == "float_qk":
        mask = torch.where(rand(lq, lk) < 0.3, float("-inf"), torch.randn(lq, lk, generator=generator))
    elif kind == "float_b1qk_empty_rows":
        bias = torch.randn(b, 1, lq, lk, generator=generator) * 2
        mask = torch.where((rand(b, 1, lq, lk) < 0.4) | (rand(b, 1, lq, 1) < 0.3), float("-inf"), bias)
    elif kind == "float16_1hqk":
        mask = torch.where(rand(1, h, lq, lk) < 0.2, float("-inf"), rand(1, h, lq, lk) * 3 - 1.5)
        mask = mask.half()
    else:
        raise ValueError(kind)
    return mask.to(DEVICE)


def run_fused(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              **opts: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused forward writing into a NaN-poisoned output: returns (out, lse). ``opts`` are the
    keyword arguments of ``scaled_dot_product_attention`` (dropout_p aside)."""
    mask, causal = opts.get("attn_mask"), opts.get("is_causal", False)
    temperature, train_len, cos_scale = opts.get("temperature"), opts.get("train_len"), opts.get("cos_scale")
    p = check_inputs(query, key, value, mask, 0.0, causal, opts.get("scale"), opts.get("enable_gqa", False),
                     temperature, train_len, cos_scale, kernel=True)
    poisoned = torch.full((p.batch, p.heads_q, p.lq, p.head_dim_v), float("nan"), dtype=query.dtype,
                          device=query.device)
    out, lse = attention_forward(query, key, value, p, out=poisoned)
    assert out.data_ptr() == poisoned.data_ptr(), "attention_forward did not write into out="
    return out, lse


def reference_in(dtype: torch.dtype, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 **opts: Any) -> torch.Tensor:
    """The reference computed in ``dtype`` (inputs cast to it), returned in float64."""
    q, k, v = (t.to(dtype) for t in (query, key, value))
    return reference.scaled_dot_product_attention(q, k, v, **opts).to(torch.float64)


def empty_rows(query: torch.Tensor, key: torch.Tensor, **opts: Any) -> torch.Tensor:
    """Boolean (B, Hq, Lq): rows that may attend to no key."""
    b, hq, lq, _ = query.shape
    lk = key.shape[2]
    allowed = allowed_keys(opts.get("attn_mask"), opts.get("is_causal", False), lq, lk, query.device)
    return ~allowed.any(-1).expand(b, hq, lq)


def rel_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in float64 (inf when x has a NaN or inf)."""
    x = x.to(torch.float64)
    if not torch.isfinite(x).all():
        return math.inf
    return ((x - ref).norm() / ref.norm()).item()


def _positions(mask: torch.Tensor, limit: int) -> str:
    idx = mask.nonzero()[:limit].tolist()
    more = int(mask.sum()) - len(idx)
    return ", ".join(str(tuple(i)) for i in idx) + (f" and {more} more" if more > 0 else "")


def mismatch_report(out: torch.Tensor, ref: torch.Tensor, headline: str, budget: float,
                    limit: int = 8) -> str:
    """What went wrong: NaN/inf positions and the first elements off by more than ``budget`` (relative
    to the element or, for small ones, to the RMS of the reference)."""
    x = out.detach().to(torch.float64).cpu()
    ref = ref.cpu()
    lines = [f"{headline}; shape {tuple(out.shape)}, dtype {out.dtype}"]
    for name, bad in (("NaN", torch.isnan(x)), ("inf", torch.isinf(x))):
        if bad.any():
            lines.append(f"{int(bad.sum())} {name} in output at {_positions(bad, limit)}")
    rms = ref.norm().item() / math.sqrt(max(ref.numel(), 1))
    diff = (x - ref).abs()
    off = ~(diff <= budget * (ref.abs() + rms))  # NaN counts as off
    if off.any():
        lines.append(f"{int(off.sum())} elements off; first (index: got vs expected):")
        for i in off.nonzero()[:limit].tolist():
            lines.append(f"  {tuple(i)}: {x[tuple(i)].item():.6g} vs {ref[tuple(i)].item():.6g}")
    finite = diff[torch.isfinite(diff)]
    if finite.numel():
        worst = int(torch.where(torch.isfinite(diff), diff, -1).argmax())
        idx = tuple(torch.unravel_index(torch.tensor(worst), diff.shape))
        lines.append(f"largest finite |diff| {finite.max().item():.3e} at {tuple(int(i) for i in idx)}")
    return "\n".join(lines)


def assert_matches_reference(out: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                             value: torch.Tensor, lse: torch.Tensor | None = None, **opts: Any) -> None:
    """Check the fused output against the float64 reference with the same options.

    Budget: ``2 * err(reference in the inputs' dtype) + FLOOR[dtype]`` in relative error. Also: no NaN
    or inf anywhere (the reference is always finite), rows that see no key are exactly zero, and the
    log-sum-exp (if given) is +inf exactly on those rows.
    """
    dtype = query.dtype
    ref64 = reference_in(torch.float64, query, key, value, **opts)
    assert torch.isfinite(ref64).all(), "the float64 reference itself is not finite: bad test input"
    empty = empty_rows(query, key, **opts)
    assert not torch.isnan(out).any(), mismatch_report(out, ref64, "NaN in the output", FLOOR[dtype])
    if empty.any():
        got = out[empty]
        assert (got == 0).all(), (f"rows that see no key must be exactly zero, got nonzero/NaN at "
                                  f"{_positions((out != 0).any(-1) & empty, 8)}")
    if ref64.norm() > 0:  # (else every row is empty: checked exactly above)
        _check_budget(out, ref64, reference_in(dtype, query, key, value, **opts))
    if lse is not None:
        bad = (torch.isinf(lse) & (lse > 0)) != empty
        assert not bad.any(), f"lse must be +inf exactly on empty rows; wrong at {_positions(bad, 8)}"
        assert not torch.isnan(lse).any(), f"NaN in lse at {_positions(torch.isnan(lse), 8)}"


def _check_budget(out: torch.Tensor, ref64: torch.Tensor, low: torch.Tensor) -> None:
    dtype = out.dtype
    low_err = rel_error(low, ref64)
    assert math.isfinite(low_err), f"the {dtype} reference is not finite: inputs too large for {dtype}"
    budget = BUDGET_FACTOR * low_err + FLOOR[dtype]
    err = rel_error(out, ref64)
    assert err <= budget, mismatch_report(
        out, ref64, f"rel. error {err:.3e} > budget {budget:.3e} (= {BUDGET_FACTOR:g} x {dtype} "
        f"reference's {low_err:.3e} + {FLOOR[dtype]:g})", budget)


def check_fused(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **opts: Any) -> torch.Tensor:
    """Run the poisoned fused forward and compare it with the reference; returns the output."""
    out, lse = run_fused(query, key, value, **opts)
    assert_matches_reference(out, query, key, value, lse=lse, **opts)
    return out
