"""The package's tuning switches, in one place.

Every setting has a default that suits users; tests and benchmarks change them for the length of a
``with`` block and never by assignment::

    from infoscale_triton import tuning

    with tuning.override(autotune=True):               # search forward configs per shape
        out = infoscale_triton.scaled_dot_product_attention(q, k, v)
    tuning.current().decode_min_keys                  # read the value in force

=======================  ======================================================================
setting                  meaning
=======================  ======================================================================
``autotune``             forward: search the candidate configs per shape (the first call of each
                         shape is slow) instead of the measured table; never inside a CUDA-graph
                         capture. Default from ``INFOSCALE_TRITON_AUTOTUNE=1``.
``forward_config``       a fixed forward launch config ``{BLOCK_M, BLOCK_N, WARP_SPEC, num_warps,
                         num_stages}`` that bypasses the table and the autotuner
                         (benchmarks/sweep_configs.py times each candidate this way)
``backward_configs``     fixed ``(dK/dV, dQ)`` backward configs ``{BLOCK_M, BLOCK_N, num_warps,
                         num_stages}``
``decode_config``        a fixed decode split-kernel config ``{BLOCK_M, BLOCK_N, num_warps,
                         num_stages}`` and optionally ``TMA`` (bool; else TMA wherever the caches
                         allow it)
``decode_min_keys``      inference calls of ``scaled_dot_product_attention`` with at most 16 query
                         rows use the split-KV decode kernel from this many keys on (1: always;
                         benchmarks/NOTES.md, "Short caches")
``hopper_forward``       on sm_90, the forward calls that kernels/attention_fwd_hopper.py covers
                         take that Gluon kernel (forward.py: hopper_forward; False: always
                         the Triton kernel) ...
``hopper_min_len``       ... when Lq and Lk are both at least this long (at 1k tokens it measured
                         slower than the Triton kernel, from 4k faster: benchmarks/NOTES.md)
``operators_in_eager``   route eager calls through the ``torch.ops.infoscale_triton`` operators
                         too (they cost host time; by default only torch.compile uses them)
=======================  ======================================================================

Launch plans are cached per setting in force (:func:`generation` changes with every switch), so a
plan made under one setting is never served under another.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Tuning:
    """The settings in force (see the module's docstring). Frozen: change them with :func:`override`."""

    autotune: bool = os.environ.get("INFOSCALE_TRITON_AUTOTUNE", "0") not in ("", "0")
    forward_config: dict | None = None
    backward_configs: tuple[dict, dict] | None = None
    decode_config: dict | None = None
    decode_min_keys: int = 1
    hopper_forward: bool = True
    hopper_min_len: int = 4096
    operators_in_eager: bool = False


_current = Tuning()
_generation = 0


def current() -> Tuning:
    """The settings in force."""
    return _current


def generation() -> int:
    """A number that changes whenever the settings do (launch plans are keyed on it)."""
    return _generation


def _install(settings: Tuning) -> None:
    global _current, _generation
    _current = settings
    _generation += 1


@contextlib.contextmanager
def override(**changes: object) -> Iterator[Tuning]:
    """Change some settings for the body of a ``with`` block (restored on exit, also on error);
    yields the settings in force inside. Unknown names raise TypeError."""
    known = {f.name for f in dataclasses.fields(Tuning)}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise TypeError(f"unknown tuning setting(s) {', '.join(unknown)}; the settings are {', '.join(sorted(known))}")
    previous = _current
    _install(dataclasses.replace(previous, **changes))
    try:
        yield _current
    finally:
        _install(previous)
