"""Property-based: random configurations (shapes, GQA, dtype, layouts, masks, temperatures, CosScale,
causal) against the float64 reference. Hypothesis prints the drawn configuration on failure; the tensors
come from its ``seed`` field, so the printed example reproduces the failure. The number of examples
comes from the hypothesis profile (tests/conftest.py: 100 on CPU, 200 on a GPU; ``--hypothesis-profile
thorough`` for 500)."""

from __future__ import annotations

from typing import Any

import torch
from helpers import DEVICE, DTYPES, LAYOUTS, ON_GPU, STRING_TEMPERATURES, check_fused, make_qkv
from hypothesis import given
from hypothesis import strategies as st

MAX_LEN = 600 if ON_GPU else 70


def _broadcast_shape(draw: st.DrawFn, full: tuple[int, ...]) -> tuple[int, ...]:
    """A shape that broadcasts to ``full``: some leading dims dropped, some others set to 1."""
    kept = full[draw(st.integers(0, len(full) - 1)):]
    return tuple(n if draw(st.booleans()) else 1 for n in kept)


@st.composite
def problems(draw: st.DrawFn, max_len: int = MAX_LEN, max_dim: int = 128, max_heads_kv: int = 2,
             groups: tuple[int, ...] = (1, 2, 3, 4)) -> dict[str, Any]:
    """One random configuration (shared with the gradient property test in test_backward.py, which
    narrows the sizes through the arguments)."""
    hkv, group, b = draw(st.integers(1, max_heads_kv)), draw(st.sampled_from(groups)), draw(st.integers(1, 2))
    hq, lq, lk = hkv * group, draw(st.integers(1, max_len)), draw(st.integers(1, max_len))
    d = draw(st.integers(16, max_dim))
    cos_scale = draw(st.sampled_from([None, None, 8.0, 32.0, 128.0]))
    temperature = draw(st.sampled_from([None, *STRING_TEMPERATURES, "tensor"]))
    mask = draw(st.sampled_from([None, "bool", "float"]))
    return {
        "b": b, "hq": hq, "hkv": hkv, "lq": lq, "lk": lk, "d": d,
        "dv": draw(st.one_of(st.just(d), st.integers(16, max_dim))),
        "dtype": draw(st.sampled_from(DTYPES)), "std": draw(st.floats(1.0, 3.0)),
        "layout": tuple(draw(st.sampled_from(LAYOUTS)) for _ in range(3)),
        "is_causal": draw(st.booleans()), "enable_gqa": group > 1 or draw(st.booleans()), "cos_scale": cos_scale,
        "scale": None if cos_scale else draw(st.one_of(st.none(), st.floats(0.01, 0.5))),
        "temperature": temperature,
        "train_len": draw(st.integers(2, 300)) if temperature in STRING_TEMPERATURES else None,
        "temperature_shape": _broadcast_shape(draw, (b, hq, lq)) if temperature == "tensor" else None,
        "mask": mask, "mask_shape": _broadcast_shape(draw, (b, hq, lq, lk)) if mask else None,
        "mask_density": draw(st.sampled_from([0.0, 0.3, 0.9, 1.0])) if mask else None,
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


def build_problem(cfg: dict[str, Any],
                  gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
    """query, key, value and the keyword arguments of a configuration drawn by :func:`problems`."""
    q, k, v = make_qkv(cfg["b"], cfg["hq"], cfg["hkv"], cfg["lq"], cfg["lk"], cfg["d"], cfg["dv"],
                       cfg["dtype"], std=cfg["std"], layout=cfg["layout"], generator=gen)
    opts: dict[str, Any] = {key: cfg[key] for key in ("is_causal", "enable_gqa", "cos_scale", "scale")}
    if cfg["temperature"] == "tensor":  # per-row multipliers in [-1.5, 2.5]
        opts["temperature"] = (torch.rand(cfg["temperature_shape"], generator=gen) * 4 - 1.5).to(DEVICE)
    elif cfg["temperature"] is not None:
        opts["temperature"], opts["train_len"] = cfg["temperature"], cfg["train_len"]
    if cfg["mask"] is not None:  # density 0 masks everything: every row must then be exactly zero
        allowed = torch.rand(cfg["mask_shape"], generator=gen) < cfg["mask_density"]
        bias = torch.randn(cfg["mask_shape"], generator=gen).masked_fill(~allowed, float("-inf"))
        opts["attn_mask"] = (bias if cfg["mask"] == "float" else allowed).to(DEVICE)
    return q, k, v, opts


@given(cfg=problems())
def test_random_problems_match_reference(cfg: dict[str, Any]) -> None:
    q, k, v, opts = build_problem(cfg, torch.Generator().manual_seed(cfg["seed"]))
    check_fused(q, k, v, **opts)
