"""The error budget: when is an attention output (or gradient) right? Used by the tests, the command line
(``check``, ``info``) and the benchmarks' checks, and public, for checking your own use of the kernels.

The rule: compare with the float64 reference (:mod:`infoscale_triton.reference`) by the relative error
``||out - ref|| / ||ref||``. A kernel working in a low precision cannot beat the rounding of that
precision, so its budget is ``BUDGET_FACTOR`` (2) times the error of the same math done by PyTorch in
the inputs' dtype (the *baseline*), plus a small floor ``FLOOR[dtype]`` at the dtype's rounding scale.
The budget thus follows the dtype and the problem's size instead of a fixed tolerance. A NaN or inf in
the output never passes.

    from infoscale_triton import reference, testing

    opts = dict(is_causal=True, temperature="infoscale", train_len=512)
    ref = reference.scaled_dot_product_attention(q.double(), k.double(), v.double(), **opts)
    low = reference.scaled_dot_product_attention(q, k, v, **opts)  # PyTorch in q's dtype: the baseline
    testing.assert_close(out, ref, low)  # AssertionError listing NaN/inf and the first mismatches
    c = testing.compare(out, ref, low)  # Comparison(error, baseline_error, budget); c.ok

Nothing here imports triton: it can be used before the backend is chosen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["BUDGET_FACTOR", "FLOOR", "Comparison", "assert_close", "compare", "error_budget",
           "mismatch_report", "positions", "rel_error", "within_budget"]

BUDGET_FACTOR = 2.0
# The atol-like part of the budget, in relative-error units: about the dtype's rounding of one value.
FLOOR: dict[torch.dtype, float] = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-3}


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` computed in float64; ``inf`` when ``out`` holds a NaN or inf (so it never
    passes), 0 when both are zero."""
    x = out.detach().to(torch.float64)
    r = ref.detach().to(device=x.device, dtype=torch.float64)
    if not torch.isfinite(x).all():
        return math.inf
    diff, norm = torch.linalg.vector_norm(x - r).item(), torch.linalg.vector_norm(r).item()
    if norm == 0:
        return 0.0 if diff == 0 else math.inf
    return diff / norm


def error_budget(baseline_error: float, dtype: torch.dtype) -> float:
    """``BUDGET_FACTOR x baseline_error + FLOOR[dtype]``: the largest relative error allowed for a result
    in ``dtype`` whose PyTorch baseline (the same math in ``dtype``) has relative error ``baseline_error``."""
    if dtype not in FLOOR:
        raise ValueError(f"dtype must be one of {[str(d) for d in FLOOR]} (the kernels' dtypes), got {dtype}")
    return BUDGET_FACTOR * baseline_error + FLOOR[dtype]


def within_budget(error: float, budget: float) -> bool:
    """``error <= budget``; a NaN or inf error never passes."""
    return math.isfinite(error) and error <= budget


@dataclass(frozen=True)
class Comparison:
    """A result against the float64 reference: its relative error, the baseline's, and the budget."""

    error: float
    baseline_error: float
    budget: float

    @property
    def ok(self) -> bool:
        return within_budget(self.error, self.budget)


def compare(out: torch.Tensor, ref: torch.Tensor, baseline: torch.Tensor,
            dtype: torch.dtype | None = None) -> Comparison:
    """``out`` and the PyTorch ``baseline`` against the float64 ``ref``; ``dtype`` is the inputs'
    precision (default: out's)."""
    base = rel_error(baseline, ref)
    return Comparison(rel_error(out, ref), base, error_budget(base, dtype or out.dtype))


def positions(mask: torch.Tensor, limit: int = 8) -> str:
    """Where a boolean tensor is True, as index tuples: the first ``limit`` and how many more."""
    idx = mask.nonzero()[:limit].tolist()
    more = int(mask.sum()) - len(idx)
    return ", ".join(str(tuple(i)) for i in idx) + (f" and {more} more" if more > 0 else "")


def mismatch_report(out: torch.Tensor, ref: torch.Tensor, headline: str, budget: float,
                    limit: int = 8) -> str:
    """What went wrong, for an assertion message: the NaN / inf positions and the first elements off by
    more than ``budget`` (relative to the element or, for small ones, to the RMS of ``ref``), and the
    largest difference."""
    x = out.detach().to(torch.float64).cpu()
    ref = ref.detach().to(torch.float64).cpu()
    lines = [f"{headline}; shape {tuple(out.shape)}, dtype {out.dtype}"]
    for name, bad in (("NaN", torch.isnan(x)), ("inf", torch.isinf(x))):
        if bad.any():
            lines.append(f"{int(bad.sum())} {name} in output at {positions(bad, limit)}")
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
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), diff.shape))
        lines.append(f"largest finite |diff| {finite.max().item():.3e} at {idx}")
    return "\n".join(lines)


def assert_close(out: torch.Tensor, ref: torch.Tensor, baseline: torch.Tensor,
                 dtype: torch.dtype | None = None, what: str = "") -> Comparison:
    """Raise AssertionError (with :func:`mismatch_report`) unless ``out`` is within the budget of the float64
    ``ref`` (see :func:`compare`); ``what`` prefixes the message. Returns the comparison."""
    dtype = dtype or out.dtype
    c = compare(out, ref, baseline, dtype)
    assert math.isfinite(c.baseline_error), (
        f"{what}the {dtype} baseline is not finite: inputs too large for {dtype}")
    assert c.ok, mismatch_report(
        out, ref, f"{what}rel. error {c.error:.3e} > budget {c.budget:.3e} (= {BUDGET_FACTOR:g} x {dtype} "
        f"baseline's {c.baseline_error:.3e} + {FLOOR[dtype]:g})", c.budget)
    return c
