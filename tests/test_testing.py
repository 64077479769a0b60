"""infoscale_triton.testing: the error budget every check uses (tests, `check`, the benchmarks)."""

from __future__ import annotations

import math

import pytest
import torch

from infoscale_triton import testing


def test_rel_error() -> None:
    ref = torch.tensor([3.0, 4.0], dtype=torch.float64)
    assert testing.rel_error(torch.tensor([3.0, 4.5]), ref) == pytest.approx(0.1)
    assert testing.rel_error(torch.tensor([3.0, float("nan")]), ref) == math.inf
    assert testing.rel_error(torch.tensor([float("inf"), 4.0]), ref) == math.inf
    assert testing.rel_error(torch.zeros(2), torch.zeros(2)) == 0.0
    assert testing.rel_error(torch.ones(2), torch.zeros(2)) == math.inf


def test_budget_follows_the_baseline() -> None:
    assert testing.error_budget(1e-3, torch.bfloat16) == pytest.approx(2e-3 + testing.FLOOR[torch.bfloat16])
    assert testing.error_budget(0.0, torch.float32) == testing.FLOOR[torch.float32]
    with pytest.raises(ValueError, match="dtype"):
        testing.error_budget(0.0, torch.int32)
    assert testing.within_budget(1e-3, 1e-3) and not testing.within_budget(math.nan, 1.0)
    assert not testing.within_budget(math.inf, math.inf)


def test_compare_and_assert_close() -> None:
    """A result twice as far from the float64 reference as the float16 baseline passes; one ten times as
    far fails, with the first mismatching elements and the NaN positions in the message."""
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(4, 64, generator=gen, dtype=torch.float64)
    baseline = ref.to(torch.float16)
    noise = (baseline.double() - ref)
    good = (ref + 1.9 * noise).to(torch.float16)
    c = testing.assert_close(good, ref, baseline)
    assert c.ok and c.error <= c.budget
    assert c.baseline_error == pytest.approx(testing.rel_error(baseline, ref))
    bad = (ref + 10 * noise + 0.05).to(torch.float16)
    bad[1, 3] = float("nan")
    assert not testing.compare(bad, ref, baseline).ok
    with pytest.raises(AssertionError) as e:
        testing.assert_close(bad, ref, baseline, what="out: ")
    msg = str(e.value)
    assert msg.startswith("out: rel. error inf > budget") and "1 NaN in output at (1, 3)" in msg
    assert "elements off; first" in msg and "largest finite |diff|" in msg
