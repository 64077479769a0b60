"""``python -m infoscale_triton`` (or ``infoscale-triton``): check the kernels, benchmark them, plot.

    check   the fused kernels against the float64 reference on a handful of configurations, the
            output and the gradients of q, k, v; exit code 1 on any failure
    bench   ours against torch SDPA (cuDNN, FlashAttention-2), flex_attention (and eager) over a grid
            of head dims, sequence lengths, causal or not, both modes and passes: a table, JSON, CSV
            and PNG plots under --out (infoscale_triton/bench.py)
    info    versions, the GPU, and which of our paths and of the peers run here
    plot    PNG plots from existing results JSON files (no GPU needed)
    (none)  check, then bench --quick

Without a CUDA GPU the kernels run in Triton's interpreter on the CPU, at small sizes and in
float16 / float32; the bench is then the tiny --smoke grid, whose timings say nothing about GPU speed.
The interpreter must be chosen before ``triton`` is imported, and ``python -m`` imports this package
(hence triton) before this module runs: so on a CPU-only machine the command re-runs itself with
``TRITON_INTERPRET=1``. Nothing here imports triton or the kernels at module level.

Tables and the progress bar use ``rich``, plots ``matplotlib`` (the ``cli`` extra); without them the
output is plain text and the plots are skipped, with a message.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

INTERPRET_ENV = "TRITON_INTERPRET"
DEFAULT_OUT = Path("infoscale_bench_results")
# bench's providers by default: what a user would pick instead of ours (bench_attention.py adds
# ours_notemp and eager); on CPU only ours and eager can run
GPU_PROVIDERS = ["ours", "sdpa_cudnn", "sdpa_flash", "flex"]
CPU_PROVIDERS = ["ours", "eager"]


def _interpreting() -> bool:
    return os.environ.get(INTERPRET_ENV, "0") not in ("", "0")


def _ensure_backend(argv: Sequence[str]) -> int | None:
    """On a machine without CUDA, make sure the kernels were defined for the interpreter. Returns an
    exit code when the work was done by a re-run of this process, None to go on here."""
    import torch

    if torch.cuda.is_available() or _interpreting():
        return None
    if "triton" not in sys.modules:  # nothing defined yet: setting the variable is enough
        os.environ[INTERPRET_ENV] = "1"
        return None
    # triton.jit has already built compiled-mode kernels: run again in a process that starts with it
    env = dict(os.environ, **{INTERPRET_ENV: "1"})
    return subprocess.call([sys.executable, "-m", "infoscale_triton", *argv], env=env)


# --- check --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One configuration of the kernels, checked against the float64 reference."""

    name: str
    lq: int
    lk: int
    d: int = 64
    dv: int | None = None
    b: int = 2
    hq: int = 4
    hkv: int = 4
    causal: bool = False
    temperature: str | None = "infoscale"  # a string kind, "tensor" (random per-row), or None
    cos: bool = False
    mask: str | None = None  # None, "bool" (with fully masked rows) or "float" (additive, some -inf)
    padding: str | None = None  # None, "lengths" (kv_lengths) or "mask" (a (B, 1, 1, Lk) boolean mask)
    window: tuple[int, int] | None = None


def cases(gpu: bool) -> list[Case]:
    """Small on the CPU (the interpreter runs every program in Python), larger on a GPU."""
    n = 512 if gpu else 128
    odd_q, odd_k = (1000, 1531) if gpu else (97, 131)
    return [
        Case("InfoScale, causal", n, n, causal=True),
        Case("InfoScale", n, n),
        Case("logn, causal", n, n, causal=True, temperature="logn"),
        Case("InfoScale clipped, causal Lq < Lk", n // 4 + 3, n, causal=True,
             temperature="infoscale_clipped"),
        Case("CosScale s=32 + InfoScale, causal", n, n, causal=True, cos=True),
        Case("CosScale s=32 + InfoScale", n, n, cos=True),
        Case("GQA 8/2 heads, InfoScale, causal", n, n, hq=8, hkv=2, causal=True),
        Case("bool mask (empty rows), InfoScale", n, n, mask="bool"),
        Case("float mask, CosScale + InfoScale, causal", n, n, causal=True, cos=True, mask="float"),
        Case("odd lengths, D=80, causal", odd_q, odd_k, d=80, causal=True),
        Case("D=59, Dv=40 (unaligned rows)", odd_q, odd_k, d=59, dv=40, cos=True),
        Case("tensor temperature, causal", n, n, causal=True, temperature="tensor"),
        Case("key padding (kv_lengths), InfoScale, causal", n, n, causal=True, padding="lengths"),
        Case("key padding mask (B,1,1,Lk), CosScale + InfoScale", n, n, cos=True, padding="mask"),
        Case(f"sliding window ({n // 8}, 0), InfoScale, causal", n, n, causal=True, window=(n // 8, 0)),
    ]


def _inputs(c: Case, dtype, device, gen):
    """Random q, k, v (std 2, never zeros), and the call's keyword arguments."""
    import torch

    def randn(*shape: int) -> torch.Tensor:
        return (2 * torch.randn(*shape, generator=gen)).to(device=device, dtype=dtype)

    q, k, v = randn(c.b, c.hq, c.lq, c.d), randn(c.b, c.hkv, c.lk, c.d), randn(c.b, c.hkv, c.lk, c.dv or c.d)
    kw: dict = {"is_causal": c.causal, "enable_gqa": c.hq != c.hkv, "cos_scale": 32.0 if c.cos else None}
    if c.temperature == "tensor":
        kw["temperature"] = (0.5 + torch.rand(c.b, c.hq, c.lq, generator=gen)).to(device)
    elif c.temperature is not None:
        kw.update(temperature=c.temperature, train_len=max(c.lk // 2, 2))
    if c.padding is not None:
        lengths = torch.tensor([c.lk // 3 + 1, c.lk][: c.b])  # keys [0, len_b) of each batch entry
        if c.padding == "lengths":
            kw["kv_lengths"] = lengths.to(device)
        else:
            kw["attn_mask"] = (torch.arange(c.lk) < lengths[:, None]).view(c.b, 1, 1, c.lk).to(device)
    if c.window is not None:
        kw["window"] = c.window
    if c.mask == "bool":
        m = torch.rand(c.b, 1, c.lq, c.lk, generator=gen) < 0.8
        m[:, :, :3] = False  # rows that may attend to nothing must come out as zeros
        kw["attn_mask"] = m.to(device)
    elif c.mask == "float":
        m = torch.randn(1, c.hq, c.lq, c.lk, generator=gen)
        m[torch.rand(m.shape, generator=gen) < 0.1] = float("-inf")
        kw["attn_mask"] = m.to(device=device, dtype=dtype)
    return q, k, v, kw


def _cast(kw: dict, dtype) -> dict:
    """The keyword arguments with float tensors (mask, temperature) in ``dtype``."""
    import torch

    return {k: (x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x)
            for k, x in kw.items()}


def run_check(dtype_names: Sequence[str] | None = None, patterns: Sequence[str] | None = None) -> int:
    """Check the cases whose name contains one of ``patterns`` (all by default; case-insensitive) in
    each dtype; exit code 1 on any failure, 2 if no case matches."""
    import torch

    from infoscale_triton import tuning

    gpu = torch.cuda.is_available() and not _interpreting()
    device = "cuda" if gpu else "cpu"
    selected = [c for c in cases(gpu) if not patterns or any(p.lower() in c.name.lower() for p in patterns)]
    if not selected:
        print(f"check: no case name contains any of {list(patterns or [])}; the cases are:\n  "
              + "\n  ".join(c.name for c in cases(gpu)), file=sys.stderr)
        return 2
    names = dtype_names or (["bfloat16", "float16"] if gpu else ["float16", "float32"])
    dtypes = [getattr(torch, n) for n in names]
    # One fixed launch config per head dim: autotuning every shape here would take minutes (the
    # benchmark checks the autotuned configs). Restored for the bench that may follow.
    with tuning.override(autotune=False):
        return _check_cases(selected, gpu, device, dtypes)


def _with_grads(fn, q, k, v, kw: dict, dout):
    """fn's output and its gradients w.r.t. q, k, v for the upstream gradient ``dout``."""
    import torch

    leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
    out = fn(*leaves, **kw)
    return out.detach(), torch.autograd.grad(out, leaves, dout.to(out.dtype))


def _check_cases(selected: list[Case], gpu: bool, device: str, dtypes: list) -> int:
    import torch

    from infoscale_triton.console import Progress, table

    where = f"GPU {torch.cuda.get_device_name(0)}" if gpu else "Triton interpreter on CPU"
    print(f"check: fused kernels vs the float64 reference ({where}), output and gradients of q, k, v; "
          "budget = 2 x error of PyTorch in the same dtype + floor", flush=True)
    gen = torch.Generator().manual_seed(1234)
    rows, failed = [], 0
    with Progress(len(selected) * len(dtypes), "check") as bar:
        for c in selected:
            for dtype in dtypes:
                t0 = time.perf_counter()
                ok, cells = _check_one(c, dtype, device, gen)
                failed += not ok
                shape = f"{c.b}x{c.hq}/{c.hkv}x{c.lq}x{c.lk}x{c.d}" + (f"/{c.dv}" if c.dv else "")
                rows.append([c.name, str(dtype).removeprefix("torch."), shape, *cells])
                bar.log(f"  {c.name} {rows[-1][1]}: {cells[-1]} [{time.perf_counter() - t0:.1f} s]")
                bar.advance()
    headers = ["case", "dtype", "B x Hq/Hkv x Lq x Lk x D", "out err", "torch out err", "grad err",
               "torch grad err", "result"]
    table(headers, rows)
    print(f"\ncheck: {len(rows) - failed}/{len(rows)} passed" + (f", {failed} FAILED" if failed else ""),
          flush=True)
    return 1 if failed else 0


def _check_one(c: Case, dtype, device: str, gen) -> tuple[bool, list[str]]:
    """(passed, table cells): output and gradients of case ``c`` in ``dtype`` against float64."""
    import torch

    from infoscale_triton import peers, reference, scaled_dot_product_attention

    q, k, v, kw = _inputs(c, dtype, device, gen)
    dout = torch.randn(c.b, c.hq, c.lq, c.dv or c.d, generator=gen, dtype=torch.float64).to(device)
    try:
        out, grads = _with_grads(scaled_dot_product_attention, q, k, v, kw, dout)
        ref, ref_grads = _with_grads(reference.scaled_dot_product_attention, q.double(), k.double(),
                                     v.double(), _cast(kw, torch.float64), dout)
        low, low_grads = _with_grads(reference.scaled_dot_product_attention, q, k, v,
                                     _cast(kw, dtype), dout)
        err, base = peers.rel_err(out, ref), peers.rel_err(low, ref)
        ok = peers.passes(err, peers.tolerance(base, dtype))
        # gradients of q, k, v: the worst of the three, each against its own budget
        g_err = g_base = 0.0
        for g, r, lo in zip(grads, ref_grads, low_grads):
            e, e_low = peers.rel_err(g, r), peers.rel_err(lo, r)
            ok &= peers.passes(e, peers.tolerance(e_low, dtype))
            g_err, g_base = max(g_err, e), max(g_base, e_low)
        return ok, [f"{err:.1e}", f"{base:.1e}", f"{g_err:.1e}", f"{g_base:.1e}", "ok" if ok else "FAIL"]
    except Exception as e:  # noqa: BLE001 - a crash is a failed check, reported in the table
        return False, ["-", "-", "-", "-", f"FAIL ({type(e).__name__}: {str(e).splitlines()[0][:80]})"]


# --- bench, info, plot -------------------------------------------------------------------------

def run_bench(args: argparse.Namespace) -> int:
    """The peer benchmark of infoscale_triton/bench.py on the grid of ``args``, then its plots."""
    import torch

    from infoscale_triton import bench

    gpu = torch.cuda.is_available() and not _interpreting()
    if not gpu:
        print("bench: no CUDA GPU, so the tiny --smoke grid through the Triton INTERPRETER on CPU, "
              "ours vs the eager reference; these timings say nothing about GPU speed.", flush=True)
        args.smoke = True
    if args.providers is None:
        args.providers = GPU_PROVIDERS if gpu else CPU_PROVIDERS
    code, records, meta, json_path = bench.run(bench.finish_args(args), name="bench")
    if records and not args.plots:
        print("plots skipped (--no-plots)")
    elif records:
        _plot(records, [meta], args.out, json_path.stem, str(json_path))
    return code


def _plot(records: list[dict], metas: list[dict], out: Path, prefix: str, source: str,
          providers: Sequence[str] | None = None) -> bool:
    """Write the PNGs; without matplotlib say how to make them later. False if none was written."""
    from infoscale_triton import plots

    try:
        paths = plots.plot_results(records, metas, out, prefix, providers)
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib, or the `cli` extra). "
              f"Elsewhere: python -m infoscale_triton plot {source} --out DIR", flush=True)
        return False
    print("plots: " + (", ".join(str(p) for p in paths) if paths else "none (no records)"), flush=True)
    return bool(paths)


def run_plot(args: argparse.Namespace) -> int:
    from infoscale_triton import plots

    try:
        records, metas = plots.load_results(args.results)
    except (OSError, ValueError) as e:
        print(f"plot: {e}", file=sys.stderr)
        return 2
    out = args.out or args.results[0].parent
    prefix = args.prefix or (args.results[0].stem if len(args.results) == 1 else "attention")
    source = " ".join(map(str, args.results))
    return 0 if _plot(records, metas, out, prefix, source, args.providers) else 1


# --- entry point --------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m infoscale_triton", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command")
    chk = sub.add_parser("check", help="kernels vs the float64 reference; exit code 1 on any failure")
    chk.add_argument("--dtypes", nargs="+", choices=["float16", "bfloat16", "float32"],
                     help="default: bfloat16 float16 on a GPU; float16 float32 on CPU (the "
                          "interpreter's bf16 dot is wrong)")
    chk.add_argument("--cases", nargs="+", metavar="TEXT",
                     help="only the cases whose name contains one of these (case-insensitive), e.g. logn")

    from infoscale_triton import bench, peers

    bn = sub.add_parser("bench", help="ours vs cuDNN / FlashAttention-2 SDPA and flex over a grid: table, "
                                      "JSON, CSV, PNG plots", description=BENCH_HELP,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_arguments(bn, out=DEFAULT_OUT, long_default="off",
                        providers_default=f"{' '.join(GPU_PROVIDERS)} on a GPU, {' '.join(CPU_PROVIDERS)} on CPU")
    bn.set_defaults(long=False)
    bn.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True,
                    help="write PNG plots next to the JSON (needs matplotlib; default on)")
    sub.add_parser("info", help="versions, GPU, and which paths and peers run here (tiny probes)")
    pl = sub.add_parser("plot", help="PNG plots from existing results JSON (bench_attention_*.json)")
    pl.add_argument("results", type=Path, nargs="+",
                    help="results JSON files; where several measured the same point, the last one wins")
    pl.add_argument("--out", type=Path, default=None, help="directory for the PNGs (default: the first "
                                                           "JSON's directory)")
    pl.add_argument("--prefix", default=None, help="file name prefix (default: the JSON's name, or "
                                                    "'attention' for several files)")
    pl.add_argument("--providers", nargs="+", choices=list(peers.PROVIDERS), metavar="P",
                    help="only these providers' bars")
    return ap


BENCH_HELP = """The peer benchmark of infoscale_triton/bench.py (also benchmarks/bench_attention.py): every
provider on the same inputs, output and gradients checked against the float64 reference, then timed
(triton.testing.do_bench median); TFLOP/s tables with ours/x ratios, JSON + CSV + PNG plots under --out.
Grid: D in {64, 128}, N in {1024, 4096, 16384}, B*N = 16384 tokens, H*D = 2048, causal and not, modes
infoscale and cos, passes fwd and fwd_bwd. Without a GPU: the --smoke grid through the interpreter."""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = _parser()
    args = ap.parse_args(argv)  # before any re-run, so that --help and errors cost nothing
    if args.command == "plot":  # no kernels: no backend to choose
        return run_plot(args)

    code = _ensure_backend(argv)
    if code is not None:
        return code
    if _interpreting():
        import torch

        why = "TRITON_INTERPRET is set" if torch.cuda.is_available() else "no CUDA GPU found"
        print(f"{why}: running the kernels in Triton's INTERPRETER on CPU (TRITON_INTERPRET=1), at small "
              "sizes, in float16/float32.", flush=True)
    if args.command == "info":
        from infoscale_triton.info import run_info

        return run_info()
    if args.command == "check":
        return run_check(args.dtypes, args.cases)
    if args.command == "bench":
        return run_bench(args)
    # the main job: everything checked, then the quick grid of the benchmark
    status = run_check()
    return run_bench(ap.parse_args(["bench", "--quick"])) or status


if __name__ == "__main__":
    sys.exit(main())
