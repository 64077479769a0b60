#!/usr/bin/env python
"""Context parallelism on several GPUs: correctness in bf16 against the float64 reference and the
single-GPU kernel, bitwise repeatability, and a short FSDP2 + context-parallel training run.

    torchrun --nproc-per-node 2 benchmarks/cp_check.py --out results/cp     # GPUs (NCCL)
    torchrun --nproc-per-node 2 benchmarks/cp_check.py --smoke              # CPU: gloo, Triton interpreter

The checks are in tests/cp_checks.py (with the tests' budgets, tests/helpers.py); this script runs them.
Checks (each rank gets the same full inputs from a seeded generator, keeps its shard, and the shards of
the output and gradients are put together again with unshard_sequence):
  * short (8k tokens, 4 query and 2 key/value heads): output and dq, dk, dv (and a tensor temperature's
    gradient) against autograd through the float64 reference, with the package's budgets
    (tests/helpers.py): ring zigzag InfoScale, ring contiguous logn, ring tensor temperature,
    all-to-all zigzag InfoScale; ``--all-options`` adds CosScale and kv_lengths (more kernel variants
    to compile).
  * long (64k to 256k tokens, causal InfoScale, ring zigzag): output and dq on sampled rows against the
    float64 reference (each row's keys as an explicit mask); dk and dv against the single-GPU kernel on
    the full tensors: they differ only by rounding the partial sums of two ring steps to bf16 (two
    roundings of 2^-9 each), so ||ring - single|| <= 2^-7 ||single||.
  * repeatability: the ring forward and backward twice on the same inputs give the same bits.
  * training: a small transformer (2 blocks, RoPE at global positions, attention through the ring with
    InfoScale) sharded with FSDP2 (fully_shard) and its sequence with context parallelism: the first
    step's loss and gradients equal the same model's on one device without either (within bf16), and
    the loss falls over the steps.

Every check's result goes, as it finishes, to the harness's results (infoscale_triton/cli/harness.py;
rank 0 writes): cp_check_<time>.json / .csv (one record per check, rewritten after each) and .log
under --out (default benchmarks/results/; --smoke or no GPU: a temporary directory); a failing check
is recorded and the others still run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from cp_checks import TRAIN_LEN, low_dtype, run_checks

from infoscale_triton.cli import harness


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None,
                    help="results directory (default benchmarks/results/; --smoke: a temporary directory)")
    ap.add_argument("--smoke", action="store_true", help="CPU: gloo and the Triton interpreter, tiny sizes")
    harness.torchrun_arguments(ap, deadline_s=470.0)
    ap.add_argument("--all-options", action="store_true", help="also CosScale and kv_lengths (more compiles)")
    args = ap.parse_args()
    code = harness.ensure_backend(interpret=args.smoke)
    if code is not None:
        return code
    env = harness.init_ranks(args.collective_timeout, args.deadline)
    meta = harness.metadata(train_len=TRAIN_LEN, dtype=str(low_dtype()), all_options=args.all_options,
                            deadline_s=args.deadline)
    out = harness.ResultsFile("cp_check", harness.results_dir(args.out, smoke=not harness.on_gpu()), meta,
                              started=env.started)
    ok = run_checks(env, out, args.all_options)
    out.log("all checks passed" if ok else "SOME CHECKS FAILED")
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
