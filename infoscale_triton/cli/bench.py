"""Attention benchmark, forward and forward+backward: our fused InfoScale / CosScale attention against
what a user would run instead. ``python -m infoscale_triton bench`` and ``benchmarks/bench_attention.py``.

For every grid point (head dim D, sequence length N, causal or not; B * N = 16384 tokens and
H = 2048 // D heads) and every mode ("infoscale": dot-product logits with InfoScale; "cos": CosScale
s = 32 with InfoScale), all providers (:mod:`.peers`) run on the same inputs in the same process:

  ours         infoscale_triton.scaled_dot_product_attention(temperature="infoscale")
  ours_notemp  the same kernel without a temperature (ours / ours_notemp = what InfoScale costs)
  sdpa_cudnn   F.scaled_dot_product_attention, cuDNN backend, on q * t_i (F.normalize first for cos)
  sdpa_flash   the same with the FlashAttention backend
  flex         torch.compile(flex_attention), score_mod = score * t[q_idx], causal BlockMask
  eager        the package reference in the input dtype (materialised logits; not run when out of memory)

Grids: "full" D in {64, 128}, N in {1024, 4096, 16384}, causal and not; "quick" (--quick) D = 128,
N in {1024, 4096}, causal, ours against SDPA cuDNN (compiling flex takes minutes on a cold machine: add it
with --providers); "smoke" (--smoke, and always without a GPU) D = 64, N in {64, 128}, 128 tokens,
through Triton's interpreter: it tests the code, its timings say nothing about GPU speed.

Passes: "fwd" times one forward on inputs that do not require grad; "fwd_bwd" times the forward on
requires-grad leaves and torch.autograd.grad of q, k, v for a fixed random dO. Each provider's
prologue (q * t_i, F.normalize) is inside the timed call and its gradient flows back to the original
q / k: that is what a user pays. Flex compiles its backward too.

Checks, before timing (a failed one is marked "!" and makes the exit code 1 when it is ours):
  output     sampled rows against the package reference in float64 (both passes);
  gradients  dq, dk, dv against autograd through the float64 reference, on the first batch entry and
             as many heads as keep one float64 N x N logits matrix per head within 2^28 elements in
             all (one head at N = 16k); above that only checked to be finite ("finite").
Error budget: infoscale_triton.testing (twice the error of the same reference run in the input dtype,
plus a small floor).

Timing (:mod:`.harness`): the first call of each provider and pass is timed on its own ("first_s": it
compiles kernels and graphs, autotunes, plans; "compile_s" = first_s minus one timed call, shown in a
table of its own), then triton.testing.do_bench, median, cycling over enough input sets (each with its
own leaves and dO) to exceed the L2 cache. TFLOP/s = 4 B H N^2 D / time, halved when causal, x3.5 for
fwd_bwd. Peak memory: what one call allocates on top of the live inputs, MiB.

Long-context row (--long): one sequence of 131072 tokens, H = 16, D = 128, causal; ours, sdpa_cudnn,
sdpa_flash, flex (eager would need its N x N logits: not run). Gradients there are only checked to be
finite; timed over --long-rep (one fwd_bwd is ~0.5 s).

Results: tables on stdout; JSON and CSV (harness.ResultsFile) under --out, rewritten after every point.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from . import harness, peers
from .console import Progress, table

TOKENS = 16384  # B * N: every grid point does the same number of tokens
HIDDEN = 2048  # H * D
SMOKE_TOKENS, SMOKE_HIDDEN = 128, 128
GRIDS = {
    "full": {"d": (64, 128), "n": (1024, 4096, 16384), "causal": (0, 1)},
    # the main job's table: few points, few kernel variants to compile (the check compiles the same ones)
    "quick": {"d": (128,), "n": (1024, 4096), "causal": (1,)},
    "smoke": {"d": (64,), "n": (64, 128), "causal": (0, 1)},  # the interpreter: tests the code, not the speed
}
# Providers by default: the full grid on a GPU runs every peer a user would pick instead of ours; the quick
# one only cuDNN (flex's first compile alone took 136 s on a cold H200); the interpreter only the reference.
PROVIDERS_FULL = ("ours", "sdpa_cudnn", "sdpa_flash", "flex")
PROVIDERS_QUICK = ("ours", "sdpa_cudnn")
PROVIDERS_CPU = ("ours", "eager")
PASSES = harness.PASSES
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Gradient check: (checked heads) x N^2 float64 logits at most, i.e. 2 GiB per materialised copy.
GRAD_CHECK_LOGITS = 2**28
# Long context: the providers that can run it (eager would materialise 16 x 128k^2 logits).
LONG_PROVIDERS = ("ours", "sdpa_cudnn", "sdpa_flash", "flex")
GRAD_NAMES = ("dq", "dk", "dv")

Call = harness.Call


@dataclass(frozen=True)
class Point:
    d: int
    n: int
    causal: bool
    tokens: int
    hidden: int
    long: bool = False  # the long-context row (own table, fewer providers, no gradient reference)

    @property
    def b(self) -> int:
        return max(self.tokens // self.n, 1)

    @property
    def h(self) -> int:
        return self.hidden // self.d

    def label(self) -> str:
        where = f"D={self.d} N={self.n} causal={int(self.causal)} B={self.b} H={self.h}"
        return "long " + where if self.long else where


LONG = Point(d=128, n=131072, causal=True, tokens=131072, hidden=2048, long=True)
SMOKE_LONG = Point(d=64, n=256, causal=True, tokens=256, hidden=128, long=True)  # exercises the code path


def add_arguments(ap: argparse.ArgumentParser, out: Path | None, out_help: str, providers_help: str) -> None:
    """The benchmark's options, shared by the script and ``python -m infoscale_triton bench``. --long,
    --providers and --causal stay None until :func:`finish_args` resolves them for the grid and machine."""
    ap.add_argument("--quick", action="store_true",
                    help="few points: D=128, N in {1024, 4096}, causal (ours vs SDPA cuDNN by default)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny grid for a CPU run through the Triton interpreter (tests the code only); "
                         "always on without a GPU")
    ap.add_argument("--d", type=int, nargs="+", default=None, help="only these head dims of the grid")
    ap.add_argument("--n", type=int, nargs="+", default=None, help="only these sequence lengths of the grid")
    ap.add_argument("--grid", action=argparse.BooleanOptionalAction, default=True,
                    help="run the grid (--no-grid with --long: the long-context row only)")
    ap.add_argument("--long", action=argparse.BooleanOptionalAction, default=None,
                    help="the long-context row, B=1 N=131072 H=16 D=128 causal (with --smoke a tiny "
                         "stand-in); default: on for the full grid of bench_attention.py, off otherwise")
    ap.add_argument("--providers", nargs="+", default=None, choices=list(peers.PROVIDERS), metavar="P",
                    help=f"providers to run, of {' '.join(peers.PROVIDERS)} (default: {providers_help})")
    ap.add_argument("--modes", nargs="+", default=list(peers.MODES), choices=list(peers.MODES))
    ap.add_argument("--passes", nargs="+", default=list(PASSES), choices=list(PASSES))
    ap.add_argument("--causal", nargs="+", type=int, default=None, choices=[0, 1],
                    help="default: 0 1 (--quick: 1)")
    ap.add_argument("--dtype", choices=list(DTYPES), default=None,
                    help="default bfloat16 on CUDA, float32 on the CPU interpreter (bfloat16 runs there too, emulated)")
    ap.add_argument("--warmup", type=float, default=10.0, help="do_bench warm-up, ms (default 10)")
    ap.add_argument("--rep", type=float, default=100.0, help="do_bench measuring time, ms (default 100)")
    # one fwd_bwd at 128k causal is ~70 TFLOP x 3.5, i.e. ~0.5 s: --rep would time a single call
    ap.add_argument("--long-rep", type=float, default=2000.0,
                    help="do_bench measuring time for the long-context row, ms (default 2000)")
    ap.add_argument("--check-rows", type=int, default=64, help="query rows checked per batch (default 64)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=out, help=f"results directory (default {out_help})")


def grid_name(args: argparse.Namespace) -> str:
    return "smoke" if args.smoke else "quick" if args.quick else "full"


def finish_args(args: argparse.Namespace, long_default: bool = False, out_default: Path | None = None
                ) -> argparse.Namespace:
    """Defaults that depend on the machine or on other options: without a GPU the smoke grid; the
    providers, causal flags and --long of the grid; the dtype; the output directory."""
    gpu = harness.on_gpu()
    args.smoke = args.smoke or not gpu
    if args.dtype is None:
        args.dtype = "bfloat16" if gpu else "float32"
    if args.long is None:
        args.long = long_default and not (args.quick or args.smoke)
    if args.providers is None:
        args.providers = list(PROVIDERS_CPU if not gpu else PROVIDERS_QUICK if args.quick else PROVIDERS_FULL)
    if args.causal is None:
        args.causal = list(GRIDS["quick" if args.quick else grid_name(args)]["causal"])
    args.out = harness.results_dir(args.out, args.smoke, out_default or harness.TRACKED_RESULTS)
    return args


def grid(args: argparse.Namespace) -> list[Point]:
    sizes = GRIDS[grid_name(args)]
    tokens, hidden = (SMOKE_TOKENS, SMOKE_HIDDEN) if args.smoke else (TOKENS, HIDDEN)
    points = []
    if args.grid:
        points = [Point(d, n, bool(c), tokens, hidden)
                  for d in sizes["d"] if args.d is None or d in args.d
                  for n in sizes["n"] if args.n is None or n in args.n
                  for c in args.causal]
    if args.long:
        points.append(SMOKE_LONG if args.smoke else LONG)
    return points


def describe(args: argparse.Namespace, points: list[Point]) -> str:
    """Which grid runs, in a sentence."""
    grid_pts = [p for p in points if not p.long]
    what = (f"grid '{grid_name(args)}'" + (" (with --quick's points)" if args.smoke and args.quick else "")
            + f": D {' '.join(map(str, sorted({p.d for p in grid_pts})))}, "
            f"N {' '.join(map(str, sorted({p.n for p in grid_pts})))}, "
            f"causal {' '.join(str(int(c)) for c in sorted({p.causal for p in grid_pts}))}"
            if grid_pts else "no grid point")
    if any(p.long for p in points):
        what += f", and the long row ({next(p for p in points if p.long).label()})"
    return what


def make_inputs(p: Point, dtype: torch.dtype, device: str, n_sets: int, seed: int):
    """``n_sets`` independent (q, k, v, dout) sets, (B, H, N, D), standard normal (never zeros)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (p.b, p.h, p.n, p.d)
    return [tuple(torch.randn(shape, generator=gen, device=device, dtype=dtype) for _ in range(4))
            for _ in range(n_sets)]


def build_calls(name: str, pass_: str, sets: list, causal: bool, mode: str
                ) -> tuple[list[Call], object, float, str]:
    """One timed call per input set, what the first set's first call gave (fwd: the output; fwd_bwd:
    (output, (dq, dk, dv))), the wall seconds of that first call (forward and backward), and the reason
    when the provider cannot run."""
    calls: list[Call] = []
    first: object = None
    first_s = math.nan
    for i, (q, k, v, dout) in enumerate(sets):
        if pass_ == "fwd":
            built = peers.build(name, q, k, v, causal, mode)
            if built.fn is None:
                return [], None, math.nan, built.reason
            if i == 0:
                first, first_s = built.out, built.first_s
            calls.append(built.fn)
        else:
            # own leaves per set (sharing the inputs' storage): the gradient is taken w.r.t. these
            leaves = tuple(x.detach().requires_grad_() for x in (q, k, v))
            built = peers.build(name, *leaves, causal, mode)
            if built.fn is None:
                return [], None, math.nan, built.reason
            if i == 0:  # the first backward (flex compiles it here): its gradients get checked
                grad = functools.partial(torch.autograd.grad, built.out, leaves, dout)
                timed, why = harness.attempt(functools.partial(harness.first_call, grad))
                if timed is None:
                    return [], None, math.nan, f"backward: {why}"
                grads, bwd_s = timed
                first, first_s = (built.out.detach(), grads), built.first_s + bwd_s
            calls.append(harness.fwd_bwd(built.fn, leaves, dout))
        built.out = None
    return calls, first, first_s, ""


def check_heads(p: Point) -> int:
    """Heads of the first batch entry whose gradients are checked; 0: too large, finite-only check."""
    return 0 if p.long else min(p.h, GRAD_CHECK_LOGITS // (p.n * p.n))


def reference_grads(s: tuple, heads: int, causal: bool, mode: str, temp: str | None,
                    dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """(dq, dk, dv) of the package reference on batch entry 0, heads [0, heads), in ``dtype``."""
    from infoscale_triton import reference

    q, k, v, dout = (x[:1, :heads].to(dtype, copy=True) for x in s)
    leaves = tuple(x.requires_grad_() for x in (q, k, v))
    out = reference.scaled_dot_product_attention(
        *leaves, is_causal=causal, temperature=temp, train_len=peers.N_TRAIN if temp else None,
        cos_scale=peers.COS_SCALE if mode == "cos" else None)
    return torch.autograd.grad(out, leaves, dout)


def check_result(rec: dict, pass_: str, first: object, fwd_ref: tuple, grad_ref: tuple | None,
                 heads: int, batches: torch.Tensor, rows: torch.Tensor, dtype: torch.dtype) -> None:
    """Fill rec's err / tol / check (output) and err_d* / tol_d* (gradients): each against the float64
    reference with the budget of its baseline (the reference in ``dtype``)."""
    ref_rows, low_rows = fwd_ref
    out, grads = (first, None) if pass_ == "fwd" else first
    rec.update(harness.check(peers.take_rows(out, batches, rows), ref_rows, low_rows, dtype))
    ok = rec["check"] == "ok"
    if grads is not None:
        if grad_ref is None:  # too large for the reference: NaN / inf is all we can catch
            finite = all(bool(torch.isfinite(g).all()) for g in grads)
            rec["check"] = "finite" if ok and finite else "FAIL"
            return
        refs, lows = grad_ref
        for g_name, g, r, lo in zip(GRAD_NAMES, grads, refs, lows):
            c = harness.check(g[:1, :heads], r, lo, dtype, prefix=f"{g_name}_")
            rec[f"err_{g_name}"], rec[f"tol_{g_name}"] = c[f"{g_name}_err"], c[f"{g_name}_tol"]
            ok = ok and c[f"{g_name}_check"] == "ok"
    rec["check"] = "ok" if ok else "FAIL"


def point_providers(p: Point, args: argparse.Namespace) -> list[str]:
    """The providers run at ``p`` (eager stays in the long row: its record says why it is not run)."""
    return [x for x in args.providers if not p.long or x in LONG_PROVIDERS + ("eager",)]


def run_point(p: Point, args: argparse.Namespace, device: str,
              on_record: Callable[[dict, float], None]) -> list[dict]:
    """Every (mode, provider, pass) record of one grid point; ``on_record(rec, seconds)`` after each."""
    dtype = DTYPES[args.dtype]
    elem = torch.finfo(dtype).bits // 8
    n_sets = harness.input_sets_needed(4 * p.b * p.h * p.n * p.d * elem)
    sets = make_inputs(p, dtype, device, n_sets, args.seed)
    batches, rows = peers.sample_rows(p.b, p.n, args.check_rows, args.seed)
    heads = check_heads(p) if "fwd_bwd" in args.passes else 0
    providers = point_providers(p, args)
    rep = args.long_rep if p.long else args.rep
    records = []
    for mode in args.modes:
        # float64 references (sampled output rows; gradients of a sub-problem) and, for the error
        # budget, the same in the input dtype
        fwd_refs, grad_refs = {}, {}
        for temp in {peers.TEMPERATURE[name] for name in providers}:
            fwd_refs[temp] = tuple(peers.reference_rows(*sets[0][:3], batches, rows, p.causal, mode, temp,
                                                        dtype=dt) for dt in (torch.float64, dtype))
            if heads:
                grad_refs[temp] = tuple(reference_grads(sets[0], heads, p.causal, mode, temp, dt)
                                        for dt in (torch.float64, dtype))
            harness.free_memory()
        for name in providers:
            for pass_ in args.passes:
                t0 = time.perf_counter()
                rec = dict(row="long" if p.long else "grid", mode=mode, provider=name, **{"pass": pass_},
                           D=p.d, N=p.n, B=p.b, H=p.h, causal=int(p.causal), dtype=args.dtype,
                           n_sets=n_sets, grad_heads=heads if pass_ == "fwd_bwd" else 0,
                           err=math.nan, tol=math.nan, check="-", reason="",
                           **{f"{x}_{g}": math.nan for x in ("err", "tol") for g in GRAD_NAMES},
                           ms=math.nan, tflops=math.nan, peak_mib=math.nan, first_s=math.nan,
                           compile_s=math.nan)
                if p.long and name == "eager":
                    rec["reason"] = "not run at 128k: materialised logits (out of memory from 16k)"
                else:
                    measure(rec, p, args, name, pass_, sets, mode, fwd_refs, grad_refs, batches, rows, rep)
                records.append(rec)
                on_record(rec, time.perf_counter() - t0)
                harness.free_memory()  # the provider's calls and outputs are gone: hand their memory back
        del fwd_refs, grad_refs
    del sets
    peers.clear_flex_cache()
    harness.free_memory()
    return records


def measure(rec: dict, p: Point, args: argparse.Namespace, name: str, pass_: str, sets: list, mode: str,
            fwd_refs: dict, grad_refs: dict, batches: torch.Tensor, rows: torch.Tensor, rep: float) -> None:
    """Build (the first call timed apart), check, measure the peak memory of one call, time: fills rec."""
    temp = peers.TEMPERATURE[name]
    calls, first, rec["first_s"], rec["reason"] = build_calls(name, pass_, sets, p.causal, mode)
    if not calls:
        harness.free_memory()
        return
    check_result(rec, pass_, first, fwd_refs[temp], grad_refs.get(temp), rec["grad_heads"],
                 batches, rows, DTYPES[args.dtype])
    del first
    ms, (mib, why) = None, harness.attempt(lambda: harness.peak_mib(calls[0]))
    if mib is not None:
        rec["peak_mib"] = mib
        ms, why = harness.attempt(lambda: harness.time_ms(calls, args.warmup, rep))
    if ms is None:
        rec["reason"] = f"while measuring: {why}"
    else:
        rec["ms"] = ms
        rec["compile_s"] = max(rec["first_s"] - ms / 1e3, 0.0)
        rec["tflops"] = harness.attention_flops(p.b, p.h, p.n, p.n, p.d, p.causal, pass_) / (ms * 1e-3) / 1e12


# --- output -------------------------------------------------------------------------------------

def record_line(progress: str, r: dict, took: float) -> str:
    """One line per measured record: time (GPU: TFLOP/s and peak memory), errors against their budgets."""
    tail = harness.timing_text(r)
    chk = ""
    if not math.isnan(r["err"]):
        chk = f" err {r['err']:.1e}/{r['tol']:.1e}"
        if not math.isnan(r["err_dq"]):
            chk += " grad " + " ".join(f"{g} {r['err_' + g]:.1e}/{r['tol_' + g]:.1e}" for g in GRAD_NAMES)
        chk += f" {r['check']}"
    return f"{progress} {r['mode']:9s} {r['pass']:7s} {r['provider']:11s} {tail}{chk}  [{took:.1f} s]"


def ours_err(r: dict) -> float:
    """The error shown for a record: the output's (fwd), the worst gradient's by err/tol (fwd_bwd)."""
    grads = [(r[f"err_{g}"], r[f"tol_{g}"]) for g in GRAD_NAMES if not math.isnan(r[f"err_{g}"])]
    if not grads:
        return r["err"]
    return max(grads, key=lambda et: et[0] / et[1] if math.isfinite(et[0]) else math.inf)[0]


def _mark(r: dict | None) -> str:
    return "!" if r and r["check"] == "FAIL" else ""


def _fmt_err(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.1e}"


def print_tables(records: list[dict], providers: list[str], gpu: bool) -> None:
    """Per pass and mode: TFLOP/s per provider ('!' = failed check), ours / each peer, ours' error (without
    a GPU: ms per call of the interpreter, no ratios); per pass: peak MiB per call; the long-context row;
    the first calls (compile time)."""
    grid_recs = [r for r in records if r["row"] == "grid"]
    peers_ = [p for p in providers if p != "ours"] if gpu else []
    metric, digits = ("tflops", None) if gpu else ("ms", 1)
    for pass_ in dict.fromkeys(r["pass"] for r in grid_recs):
        for mode in dict.fromkeys(r["mode"] for r in grid_recs):
            sel = [r for r in grid_recs if r["pass"] == pass_ and r["mode"] == mode]
            keys = list(dict.fromkeys((r["D"], r["N"], r["causal"]) for r in sel))
            headers = ["D", "N", "causal"] + providers
            headers += [f"ours/{q}" for q in peers_ if "ours" in providers]
            err_name = "ours grad err" if pass_ == "fwd_bwd" else "ours err"
            headers += [err_name, "check"] if "ours" in providers else []
            rows = []
            for key in keys:
                by = {r["provider"]: r for r in sel if (r["D"], r["N"], r["causal"]) == key}
                row = list(key)
                row += [harness.fmt(by[q][metric], digits) + _mark(by[q]) if q in by else "-"
                        for q in providers]
                if "ours" in by:
                    ours = by["ours"]["tflops"]
                    row += [harness.fmt(ours / by[q]["tflops"], 2) if q in by else "-" for q in peers_]
                    row += [_fmt_err(ours_err(by["ours"])), by["ours"]["check"]]
                rows.append(row)
            if gpu:
                title = (f"{pass_} / {mode}: TFLOP/s (higher is better; fwd_bwd counts 3.5 forwards); "
                         "ours/x > 1 means ours is faster")
            else:
                title = (f"{pass_} / {mode}: ms per call, Triton INTERPRETER on CPU (says nothing about GPU "
                         "speed: no TFLOP/s, no ratios)")
            table(headers, rows, title)
    if gpu:
        print_memory(grid_recs, providers)
    else:
        print("\npeak memory: measured on CUDA only")
    print_long(records)
    if gpu:
        print_first_calls(records, providers)
    print_notes(records)


def print_memory(grid_recs: list[dict], providers: list[str]) -> None:
    for pass_ in dict.fromkeys(r["pass"] for r in grid_recs):
        sel = [r for r in grid_recs if r["pass"] == pass_]
        keys = list(dict.fromkeys((r["mode"], r["D"], r["N"], r["causal"]) for r in sel))
        rows = []
        for key in keys:
            by = {r["provider"]: r for r in sel if (r["mode"], r["D"], r["N"], r["causal"]) == key}
            rows.append(list(key) + [harness.fmt(by[q]["peak_mib"], 0) if q in by else "-"
                                     for q in providers])
        table(["mode", "D", "N", "causal"] + providers, rows,
              f"{pass_}: peak memory of one call, MiB above the live inputs (lower is better)")


def print_first_calls(records: list[dict], providers: list[str]) -> None:
    """Per provider: the seconds its first calls took beyond one timed call (compiling kernels and graphs,
    autotuning, cuDNN plans), which the timings above leave out."""
    rows = []
    for name in providers:
        sel = [r for r in records if r["provider"] == name and not math.isnan(r["compile_s"])]
        if not sel:
            continue
        worst = max(sel, key=lambda r: r["compile_s"])
        where = f"{worst['mode']} {worst['pass']} D={worst['D']} N={worst['N']} causal={worst['causal']}"
        rows.append([name, len(sel), f"{sum(r['compile_s'] for r in sel):.1f}", f"{worst['compile_s']:.1f}",
                     where])
    if rows:
        table(["provider", "first calls", "total s", "largest s", "largest at"], rows,
              "first calls: compile / autotune / plan time, not in the timings above (Triton caches compiled "
              "kernels on disk: a second run pays less; ours may have been compiled by `check` already)")


def print_long(records: list[dict]) -> None:
    sel = [r for r in records if r["row"] == "long"]
    if not sel:
        return
    r0 = sel[0]
    title = (f"long context: B={r0['B']} N={r0['N']} H={r0['H']} D={r0['D']} causal={r0['causal']} "
             f"{r0['dtype']}; ours/x = x's time / ours' (> 1: ours is faster)")
    ours = {(r["mode"], r["pass"]): r for r in sel if r["provider"] == "ours"}
    order = {x: i for i, x in enumerate(dict.fromkeys(r[k] for k in ("mode", "pass") for r in sel))}
    rows = []
    for r in sorted(sel, key=lambda r: (order[r["mode"]], order[r["pass"]])):  # stable: providers in order
        o = ours.get((r["mode"], r["pass"]))
        ratio = "-" if o is None or r is o else harness.fmt(r["ms"] / o["ms"], 2)
        rows.append([r["mode"], r["pass"], r["provider"], harness.fmt(r["ms"], 1),
                     harness.fmt(r["tflops"]) + _mark(r), harness.fmt(r["peak_mib"], 0), ratio, r["check"]])
    table(["mode", "pass", "provider", "ms", "TFLOP/s", "peak MiB", "ours/x", "check"], rows, title)


def print_notes(records: list[dict]) -> None:
    reasons: dict[str, list[str]] = {}
    for r in records:
        if r["reason"]:
            where = f"{r['mode']} {r['pass']} D={r['D']} N={r['N']} causal={r['causal']}"
            reasons.setdefault(f"{r['provider']}: {r['reason']}", []).append(where)
    if reasons:
        print("\n- = could not run:")
        for why, where in reasons.items():
            print(f"  {why}  [{where[0]}" + (f" and {len(where) - 1} more]" if len(where) > 1 else "]"))
    heads = sorted({(r["N"], r["grad_heads"]) for r in records if r["pass"] == "fwd_bwd"})
    if heads:
        print("\ngradients checked on batch entry 0 and the first heads: "
              + ", ".join(f"N={n}: {h} head(s)" if h else f"N={n}: finite only" for n, h in heads))
    if any(r["check"] == "FAIL" for r in records):
        print("\n! = output or gradients differ from the float64 reference beyond the error budget, or "
              "are not finite (err/tol in the JSON)")


def run(args: argparse.Namespace, name: str = "bench_attention") -> tuple[int, list[dict], dict, Path | None]:
    """Measure the grid of ``args`` (see :func:`add_arguments`, after :func:`finish_args`), print the
    tables, write JSON and CSV under ``args.out``. Returns (exit code, records, metadata, JSON path):
    exit code 1 when ours failed a check, 2 when nothing could run."""
    gpu = harness.on_gpu()
    if not gpu and not args.smoke:
        print("No CUDA device: the grid is for a GPU. Use --smoke for a tiny interpreter run.",
              file=sys.stderr)
        return 2, [], {}, None
    points = grid(args)
    meta = harness.metadata(grid=grid_name(args), quick=args.quick, train_len=peers.N_TRAIN,
                            cos_scale=peers.COS_SCALE, warmup_ms=args.warmup, rep_ms=args.rep,
                            long_rep_ms=args.long_rep,
                            flops="4*B*H*N^2*D per forward, halved when causal; fwd_bwd counts 3.5 forwards",
                            peak_mib="max_memory_allocated during one call minus memory_allocated before it",
                            first_s="wall time of the first call (forward, and backward for fwd_bwd): "
                                    "compiling, autotuning, plans; compile_s = first_s - ms / 1000",
                            grad_check=f"batch entry 0, heads*N^2 <= {GRAD_CHECK_LOGITS} (grad_heads); "
                                       "0 = finite only")
    if not points:
        print("nothing to run: the grid filters left no point and --long is off", file=sys.stderr)
        return 2, [], meta, None
    total = sum(len(args.modes) * len(point_providers(p, args)) * len(args.passes) for p in points)
    print(f"{name}: {meta['gpu']}, torch {meta['torch']}, triton {meta['triton']}, "
          f"infoscale_triton {meta['package_version']} ({(meta['git_commit'] or '?')[:10]}), {args.dtype}; "
          f"{describe(args, points)}; modes {' '.join(args.modes)}, passes {' '.join(args.passes)}, "
          f"providers {' '.join(args.providers)}: {total} measurements", flush=True)
    if not gpu:
        print(f"{name}: no GPU, so the tiny smoke grid through the Triton INTERPRETER on CPU; its timings "
              "say nothing about GPU speed (no TFLOP/s or memory is reported)", flush=True)
    # one file name whatever the caller: `plot` reads bench_attention_*.json
    results = harness.ResultsFile("bench_attention", args.out, meta)
    t_start = time.perf_counter()
    device = harness.device()
    with Progress(total, name) as bar:
        for i, p in enumerate(points):
            def on_record(rec: dict, took: float, label: str = p.label(), i: int = i) -> None:
                bar.log(record_line(f"[{i + 1}/{len(points)} {label}]", rec, took))
                bar.advance(f"{name} {label}")

            records = run_point(p, args, device, on_record)
            meta["elapsed_s"] = round(time.perf_counter() - t_start, 1)
            results.write(results.records + records)  # a cut-short run keeps these
    print_tables(results.records, args.providers, gpu)
    print(f"\n{len(results.records)} results in {meta['elapsed_s']} s -> {results.json_path}, "
          f"{results.csv_path}", flush=True)
    ours_failed = any(r["check"] == "FAIL" and r["provider"].startswith("ours") for r in results.records)
    return (1 if ours_failed else 0), results.records, meta, results.json_path


def main(argv: Sequence[str] | None = None) -> int:
    """benchmarks/bench_attention.py: the full grid with the long-context row and every provider by
    default."""
    code = harness.ensure_backend()
    if code is not None:
        return code
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap, out=None, out_help="benchmarks/results/; --smoke: a temporary directory",
                  providers_help="all on a GPU (--quick: ours sdpa_cudnn), ours eager without one")
    args = ap.parse_args(argv)
    if args.providers is None and harness.on_gpu() and not args.quick:
        args.providers = list(peers.PROVIDERS)
    return run(finish_args(args, long_default=True))[0]
