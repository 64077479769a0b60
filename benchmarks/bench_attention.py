#!/usr/bin/env python
"""Attention benchmark: ours against cuDNN / FlashAttention-2 SDPA, flex and eager, forward and
forward+backward, with checks against the float64 reference. The code is the command line's
(``infoscale_triton/cli/bench.py``, whose docstring describes the grid, the checks and the timing);
here the full grid runs with the long-context row and every provider by default, without plots.

    python benchmarks/bench_attention.py                         # full grid + long row -> benchmarks/results/
    python benchmarks/bench_attention.py --quick --out DIR       # a few points
    python benchmarks/bench_attention.py --smoke                 # tiny, Triton interpreter on CPU
"""

import sys

from infoscale_triton.cli import bench

if __name__ == "__main__":
    sys.exit(bench.main())
