#!/usr/bin/env python
"""Attention benchmark: ours against cuDNN / FlashAttention-2 SDPA, flex and eager, forward and
forward+backward, with checks against the float64 reference. The measuring code lives in
``infoscale_triton/bench.py`` (shared with ``python -m infoscale_triton bench``, which adds plots);
its docstring describes the grid, the checks and the timing.

    python benchmarks/bench_attention.py --out results/          # full grid + long-context row, GPU
    python benchmarks/bench_attention.py --smoke                 # tiny, Triton interpreter on CPU
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # No GPU: only the interpreter can run our kernels, and it must be chosen before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from infoscale_triton import bench

# re-exported: benchmarks/bench_sequences.py imports them from here
from infoscale_triton.bench import metadata, peak_mib, time_calls  # noqa: F401


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_arguments(ap, out=Path("results"), providers_default="all",
                        long_default="on for the full grid, off with --quick / --smoke")
    return bench.finish_args(ap.parse_args(argv))


def main(argv: Sequence[str] | None = None) -> int:
    return bench.run(parse_args(argv))[0]


if __name__ == "__main__":
    sys.exit(main())
