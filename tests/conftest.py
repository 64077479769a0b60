"""Test set-up: Triton's interpreter on CPU-only machines, one fixed kernel config, seeded inputs.

``TRITON_INTERPRET`` must be in the environment before ``triton`` is first imported (``triton.jit``
reads it when the kernels are defined), so it is set here at import time, before any test module
imports ``infoscale_triton``.
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch
from hypothesis import settings

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from infoscale_triton import forward  # only now: it imports triton and defines the kernels

# Property tests: few examples through the interpreter, more compiled; never a deadline (the first
# launch of a config compiles). `--hypothesis-profile NAME` picks another.
settings.register_profile("cpu", max_examples=100, deadline=None, print_blob=True)
settings.register_profile("gpu", max_examples=200, deadline=None, print_blob=True)
settings.register_profile("thorough", max_examples=500, deadline=None, print_blob=True)
settings.load_profile("gpu" if torch.cuda.is_available() else "cpu")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "autotune: keep the autotuner on (GPU only)")
    # numpy noise from inside Triton's interpreter (exp2 of -inf, int() of 1-element arrays)
    for category in ("RuntimeWarning", "DeprecationWarning"):
        config.addinivalue_line("filterwarnings", f"ignore::{category}:triton.runtime.interpreter")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (compiled kernels)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fixed_config(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Launch one fixed config per call: autotuning every shape would take far too long. Tests marked
    ``autotune`` switch the autotuner on (whatever INFOSCALE_TRITON_AUTOTUNE says)."""
    monkeypatch.setattr(forward, "AUTOTUNE", request.node.get_closest_marker("autotune") is not None)


@pytest.fixture(autouse=True)
def _seed(request: pytest.FixtureRequest) -> None:
    """A fresh but reproducible seed per test (its node id, mixed with $INFOSCALE_TEST_SEED to vary
    the draws); printed so that a failure report shows it."""
    base = int(os.environ.get("INFOSCALE_TEST_SEED", "0"))
    seed = (zlib.crc32(request.node.nodeid.encode()) + base) % 2**32
    print(f"torch seed {seed} (INFOSCALE_TEST_SEED={base})")
    torch.manual_seed(seed)
