"""Test set-up: Triton's interpreter on CPU-only machines, one fixed kernel config, seeded inputs.

``TRITON_INTERPRET`` must be in the environment before ``triton`` is first imported (``triton.jit``
reads it when the kernels are defined), so it is set here at import time, before any test module
imports ``infoscale_triton``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import zlib
from collections.abc import Callable, Iterator

import pytest
import torch
from hypothesis import settings

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from infoscale_triton import splitkv, tuning  # only now: they import triton, define the kernels
from infoscale_triton.validation import Problem

# Property tests: few examples through the interpreter, more compiled; never a deadline (the first
# launch of a config compiles). `--hypothesis-profile NAME` picks another.
settings.register_profile("cpu", max_examples=100, deadline=None, print_blob=True)
settings.register_profile("gpu", max_examples=200, deadline=None, print_blob=True)
settings.register_profile("thorough", max_examples=500, deadline=None, print_blob=True)
settings.load_profile("gpu" if torch.cuda.is_available() else "cpu")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "autotune: keep the autotuner on (GPU only)")
    # numpy noise from inside Triton's interpreter (int() of 1-element arrays; overflow to +-inf, which
    # exp2 then takes to 0 or inf as intended). "invalid value" (a NaN made, e.g. 0 * -inf) is not
    # noise: it stays visible.
    config.addinivalue_line("filterwarnings", "ignore::DeprecationWarning:triton.runtime.interpreter")
    config.addinivalue_line("filterwarnings",
                            "ignore:(?!invalid value):RuntimeWarning:triton.runtime.interpreter")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (compiled kernels)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fixed_config(request: pytest.FixtureRequest) -> Iterator[None]:
    """Launch one fixed config per call: autotuning every shape would take far too long. Tests marked
    ``autotune`` switch the autotuner on (whatever INFOSCALE_TRITON_AUTOTUNE says)."""
    with tuning.override(autotune=request.node.get_closest_marker("autotune") is not None):
        yield


@pytest.fixture
def tune() -> Iterator[Callable[..., None]]:
    """``tune(**settings)`` changes tuning settings (infoscale_triton.tuning) for the rest of the test."""
    with contextlib.ExitStack() as stack:
        yield lambda **settings: stack.enter_context(tuning.override(**settings)) and None


@pytest.fixture(autouse=True)
def _seed(request: pytest.FixtureRequest) -> None:
    """A fresh but reproducible seed per test (its node id, mixed with $INFOSCALE_TEST_SEED to vary
    the draws); printed so that a failure report shows it."""
    base = int(os.environ.get("INFOSCALE_TEST_SEED", "0"))
    seed = (zlib.crc32(request.node.nodeid.encode()) + base) % 2**32
    print(f"torch seed {seed} (INFOSCALE_TEST_SEED={base})")
    torch.manual_seed(seed)


@pytest.fixture
def dense_only() -> Iterator[None]:
    """scaled_dot_product_attention without routing decoding-shaped inference calls (Lq <= 16, no mask,
    window or dropout) to the split-KV decode kernel: for tests whose subject is the dense kernel (the
    decode kernel has its own, tests/test_decode.py)."""
    with tuning.override(decode_min_keys=sys.maxsize):
        yield


@pytest.fixture
def decode_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Spy on the decode launcher (ops.decode looks splitkv.decode_forward up at each call): the list
    gets (Lq, Lk) per launch."""
    calls: list[tuple[int, int]] = []
    real = splitkv.decode_forward

    def spy(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, p: Problem, *args: object,
            **kwargs: object) -> torch.Tensor:
        calls.append((p.lq, p.lk))
        return real(query, key_cache, value_cache, p, *args, **kwargs)

    monkeypatch.setattr(splitkv, "decode_forward", spy)
    return calls
