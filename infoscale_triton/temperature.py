"""Per-row logit temperatures: the formulas, and how the string options are spelled.

``t(n)`` multiplies row i of the logits, where ``n`` is the number of keys that row may attend to and
``N`` (``train_len``) the training length:

* ``"infoscale"``: ``sqrt((1 - n^(-2/d)) / (1 - N^(-2/d)))`` with ``d`` the q/k head dim (Li et al., 2025).
* ``"logn"``: ``ln(n) / ln(N)`` (Su; Qwen's ``use_logn_attn``).
* ``"<kind>_clipped"``: ``max(1, t(n))``, which only ever sharpens (Qwen applies log-n this way).

This module is the readable definition used by the reference; the kernels evaluate the same formulas
from the constants that :func:`kernel_constants` returns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

TEMPERATURE_KINDS = ("infoscale", "logn")
TEMPERATURE_CHOICES = tuple(k + s for k in TEMPERATURE_KINDS for s in ("", "_clipped"))

# Codes shared with the kernels (``TEMP_MODE``).
MODE_NONE, MODE_INFOSCALE, MODE_LOGN, MODE_TENSOR = 0, 1, 2, 3


@dataclass(frozen=True)
class TemperatureSpec:
    """A parsed string temperature: which formula and whether it is clipped below at 1."""

    kind: str  # "infoscale" or "logn"
    clipped: bool

    @classmethod
    def parse(cls, name: str) -> "TemperatureSpec":
        clipped = name.endswith("_clipped")
        kind = name[: -len("_clipped")] if clipped else name
        return cls(kind, clipped)

    @property
    def name(self) -> str:
        """The string it was parsed from."""
        return self.kind + ("_clipped" if self.clipped else "")

    @property
    def mode(self) -> int:
        return MODE_INFOSCALE if self.kind == "infoscale" else MODE_LOGN


def row_temperature(n: torch.Tensor, spec: TemperatureSpec, train_len: int, head_dim: int) -> torch.Tensor:
    """``t(n)`` elementwise, in the dtype of ``n`` (use float64 for checks). ``n`` below 1 is treated as 1:
    such a row attends to nothing and its output is zero whatever its temperature."""
    n = n.clamp_min(1)
    if spec.kind == "infoscale":
        expo = -2.0 / head_dim
        t = torch.sqrt((1 - n.pow(expo)) / (1 - float(train_len) ** expo))
    else:
        t = torch.log(n) / math.log(train_len)
    return t.clamp_min(1) if spec.clipped else t


def kernel_constants(spec: TemperatureSpec | None, train_len: int | None, head_dim: int) -> tuple[float, float]:
    """``(a, b)`` such that the kernels compute infoscale as ``sqrt((1 - 2^(a log2 n)) * b)`` and logn as
    ``log2(n) * b``."""
    if spec is None:
        return 0.0, 0.0
    assert train_len is not None
    if spec.kind == "infoscale":
        expo = -2.0 / head_dim
        return expo, 1.0 / (1.0 - float(train_len) ** expo)
    return 0.0, 1.0 / math.log2(train_len)
