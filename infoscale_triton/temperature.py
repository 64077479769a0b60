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
import numbers
from dataclasses import dataclass

import torch

TEMPERATURE_KINDS = ("infoscale", "logn")
TEMPERATURE_CHOICES = tuple(k + s for k in TEMPERATURE_KINDS for s in ("", "_clipped"))


@dataclass(frozen=True)
class TemperatureSpec:
    """A parsed string temperature: which formula and whether it is clipped below at 1."""

    kind: str  # "infoscale" or "logn"
    clipped: bool

    @classmethod
    def parse(cls, name: str) -> TemperatureSpec:
        known = _PARSED.get(name)  # (the choices are parsed once; a dict, which torch.compile traces)
        if known is not None:
            return known
        clipped = name.endswith("_clipped")
        kind = name[: -len("_clipped")] if clipped else name
        return cls(kind, clipped)

    @property
    def name(self) -> str:
        """The string it was parsed from."""
        return self.kind + ("_clipped" if self.clipped else "")


_PARSED: dict[str, TemperatureSpec] = {}
_PARSED.update({name: TemperatureSpec.parse(name) for name in TEMPERATURE_CHOICES})


def check_temperature_options(
    temperature: object, train_len: object, *, names: tuple[str, str] = ("temperature", "train_len"),
    tensor_refused: str | None = None, train_len_hint: str = "",
) -> TemperatureSpec | None:
    """Check a ``temperature`` option and its ``train_len``; return the parsed string temperature (None
    for None or a tensor). Used by every entry point that takes them (validation.check_inputs and the
    transformers integration), so that the rules and messages exist once.

    ``names``: how the two are called in the messages; ``tensor_refused``: why a tensor temperature is
    refused here (None: accepted, and its shape, dtype and device are the caller's to check);
    ``train_len_hint``: appended to the message for a missing ``train_len``.

    Raises:
        ValueError / TypeError naming the argument.
    """
    t_name, n_name = names
    if isinstance(temperature, str):
        if temperature not in TEMPERATURE_CHOICES:
            choices = ", ".join(map(repr, TEMPERATURE_CHOICES))
            if tensor_refused is None:
                raise ValueError(f"{t_name} must be one of {choices}, a tensor or None; got {temperature!r}")
            raise ValueError(f"{t_name} must be None or one of {choices}, got {temperature!r}")
        if train_len is None:
            raise ValueError(f"{t_name}={temperature!r} needs {n_name}, the training length N at which the "
                             f"temperature is 1 (the paper's N); there is no default.{train_len_hint}")
        if type(train_len) is not int and (not isinstance(train_len, numbers.Integral)
                                           or isinstance(train_len, bool)) or train_len < 2:
            raise ValueError(f"{n_name} must be an int >= 2, got {train_len!r}")
        return TemperatureSpec.parse(temperature)
    if isinstance(temperature, torch.Tensor):
        if tensor_refused is not None:
            raise TypeError(f"{t_name} must be a string or None: {tensor_refused}")
        if train_len is not None:
            raise ValueError(f"{n_name} is only used by the string temperatures; got a tensor {t_name} and "
                             f"{n_name}={train_len!r}")
        return None
    if temperature is not None:
        if tensor_refused is None:
            raise TypeError(f"{t_name} must be None, a string or a tensor, got {type(temperature).__name__}")
        choices = ", ".join(map(repr, TEMPERATURE_CHOICES))
        raise ValueError(f"{t_name} must be None or one of {choices}, got {temperature!r}")
    if train_len is not None:
        raise ValueError(f"{n_name}={train_len!r} given without a string {t_name}: {n_name}={train_len!r} is "
                         f"only used with a string {t_name}; pass e.g. {t_name}='infoscale' or leave {n_name} "
                         "None")
    return None


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
