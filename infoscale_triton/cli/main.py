"""``python -m infoscale_triton`` (or ``infoscale-triton``): check the kernels, benchmark them, plot.

    (none)  the main job: `check --quick`, then `bench --quick` (the verdict, then ours against SDPA
            cuDNN at a few points; on a cold GPU the time goes to compiling a few kernel variants);
            --full: every check case in both dtypes, then the full grid against every peer
    check   the fused kernels against the float64 reference on a set of configurations, the output and
            the gradients of q, k, v; exit code 1 on any failure
    bench   ours against torch SDPA (cuDNN, FlashAttention-2) and flex_attention (and eager) over a grid
            of head dims, sequence lengths, causal or not, both modes and passes: a table, JSON, CSV and
            PNG plots under --out; compile time is reported apart from the timed calls
    info    versions, the GPU, and which of our paths and of the peers run here
    plot    PNG plots from existing results JSON files (no GPU needed)

Without a CUDA GPU the kernels run in Triton's interpreter on the CPU, at small sizes and in
float16 / float32; the bench is then the tiny smoke grid, whose timings say nothing about GPU speed.
The interpreter must be chosen before ``triton`` is imported, and ``python -m`` imports this package
(hence triton) before this module runs: so on a CPU-only machine the command re-runs itself with
``TRITON_INTERPRET=1`` (harness.ensure_backend).

Tables and the progress bar use ``rich``, plots ``matplotlib`` (the ``cli`` extra); without them the
output is plain text and the plots are skipped, with a message.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from . import harness

DEFAULT_OUT = Path("infoscale_bench_results")


def run_bench(args: argparse.Namespace) -> int:
    """The attention benchmark (cli/bench.py) on the grid of ``args``, then its plots."""
    from . import bench

    code, records, meta, json_path = bench.run(bench.finish_args(args, out_default=DEFAULT_OUT), name="bench")
    if records and not args.plots:
        print("plots skipped (--no-plots)")
    elif records:
        _plot(records, [meta], args.out, json_path.stem, str(json_path))
    return code


def _plot(records: list[dict], metas: list[dict], out: Path, prefix: str, source: str,
          providers: Sequence[str] | None = None) -> bool:
    """Write the PNGs; without matplotlib say how to make them later. False if none was written."""
    from . import plots

    try:
        paths = plots.plot_results(records, metas, out, prefix, providers)
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib, or the `cli` extra). "
              f"Elsewhere: python -m infoscale_triton plot {source} --out DIR", flush=True)
        return False
    print("plots: " + (", ".join(str(p) for p in paths) if paths else "none (no records)"), flush=True)
    return bool(paths)


def run_plot(args: argparse.Namespace) -> int:
    from . import plots

    try:
        records, metas = plots.load_results(args.results)
    except (OSError, ValueError) as e:
        print(f"plot: {e}", file=sys.stderr)
        return 2
    out = args.out or args.results[0].parent
    prefix = args.prefix or (args.results[0].stem if len(args.results) == 1 else "attention")
    source = " ".join(map(str, args.results))
    return 0 if _plot(records, metas, out, prefix, source, args.providers) else 1


def run_main_job(ap: argparse.ArgumentParser, full: bool) -> int:
    """`check --quick` then `bench --quick` (or, with ``full``, every check case and the full grid)."""
    from .check import run_check

    t0 = time.perf_counter()
    status = run_check(quick=not full)
    bench_args = ap.parse_args(["bench"] if full else ["bench", "--quick"])
    code = run_bench(bench_args) or status
    print(f"\nmain job: {'all checks passed' if status == 0 else 'a CHECK FAILED (see above)'}, "
          f"{time.perf_counter() - t0:.0f} s in all.")
    if not full:
        print("More: `python -m infoscale_triton --full` (every check case, the full grid against cuDNN, "
              "FlashAttention-2 and flex; tens of minutes on a cold GPU); `python -m infoscale_triton bench "
              "--quick --providers ours sdpa_cudnn flex` adds FlexAttention (its first compile takes "
              "minutes).")
    return code


BENCH_HELP = """The attention benchmark (infoscale_triton/cli/bench.py, also benchmarks/bench_attention.py):
every provider on the same inputs, output and gradients checked against the float64 reference, the first
call timed apart (compiling), then timed (triton.testing.do_bench median); TFLOP/s tables with ours/x
ratios, a compile-time table, JSON + CSV + PNG plots under --out. Grids: full (default) D in {64, 128},
N in {1024, 4096, 16384}, causal and not, ours vs cuDNN, FlashAttention-2 and flex; --quick D = 128,
N in {1024, 4096}, causal, ours vs cuDNN; B*N = 16384 tokens, H*D = 2048, modes infoscale and cos, passes
fwd and fwd_bwd. Without a GPU: the smoke grid through the interpreter (--quick: causal only)."""


def _parser() -> argparse.ArgumentParser:
    from . import bench, peers

    ap = argparse.ArgumentParser(prog="python -m infoscale_triton", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true",
                    help="main job: every check case in both dtypes, then the full benchmark grid")
    sub = ap.add_subparsers(dest="command")
    chk = sub.add_parser("check", help="kernels vs the float64 reference; exit code 1 on any failure")
    chk.add_argument("--quick", action="store_true",
                     help="the main job's few cases (on a GPU in bfloat16 only: few kernels to compile)")
    chk.add_argument("--dtypes", nargs="+", choices=["float16", "bfloat16", "float32"],
                     help="default: bfloat16 float16 on a GPU (--quick: bfloat16); float16 float32 on CPU "
                          "(bfloat16 runs there too, emulated)")
    chk.add_argument("--cases", nargs="+", metavar="TEXT",
                     help="only the cases whose name contains one of these (case-insensitive), e.g. logn")

    bn = sub.add_parser("bench", help="ours vs cuDNN / FlashAttention-2 SDPA and flex over a grid: table, "
                                      "JSON, CSV, PNG plots", description=BENCH_HELP,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_arguments(bn, out=DEFAULT_OUT, out_help=str(DEFAULT_OUT),
                        providers_help=f"{' '.join(bench.PROVIDERS_FULL)} on a GPU (--quick: "
                                       f"{' '.join(bench.PROVIDERS_QUICK)}), {' '.join(bench.PROVIDERS_CPU)} "
                                       "on CPU")
    bn.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True,
                    help="write PNG plots next to the JSON (needs matplotlib; default on)")
    sub.add_parser("info", help="versions, GPU, and which paths and peers run here (tiny probes)")
    pl = sub.add_parser("plot", help="PNG plots from existing results JSON (bench_*.json)")
    pl.add_argument("results", type=Path, nargs="+",
                    help="results JSON files; where several measured the same point, the last one wins")
    pl.add_argument("--out", type=Path, default=None, help="directory for the PNGs (default: the first "
                                                           "JSON's directory)")
    pl.add_argument("--prefix", default=None, help="file name prefix (default: the JSON's name, or "
                                                    "'attention' for several files)")
    pl.add_argument("--providers", nargs="+", choices=list(peers.PROVIDERS), metavar="P",
                    help="only these providers' bars")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = _parser()
    args = ap.parse_args(argv)  # before any re-run, so that --help and errors cost nothing
    if args.command == "plot":  # no kernels: no backend to choose
        return run_plot(args)

    code = harness.ensure_backend(["-m", "infoscale_triton", *argv])
    if code is not None:
        return code
    if harness.interpreting():
        import torch

        why = "TRITON_INTERPRET is set" if torch.cuda.is_available() else "no CUDA GPU found"
        print(f"{why}: running the kernels in Triton's INTERPRETER on CPU (TRITON_INTERPRET=1), at small "
              "sizes, in float16/float32.", flush=True)
    if args.command == "info":
        from .info import run_info

        return run_info()
    if args.command == "check":
        from .check import run_check

        return run_check(args.dtypes, args.cases, args.quick)
    if args.command == "bench":
        return run_bench(args)
    return run_main_job(ap, args.full)
