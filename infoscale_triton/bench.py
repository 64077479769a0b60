"""Attention benchmark, forward and forward+backward: our fused InfoScale / CosScale attention against
what a user would run instead. Shared by ``python -m infoscale_triton bench`` and
``benchmarks/bench_attention.py``.

For every grid point (head dim D, sequence length N, causal or not; B * N = 16384 tokens and
H = 2048 // D heads) and every mode ("infoscale": dot-product logits with InfoScale; "cos": CosScale
s = 32 with InfoScale), all providers run on the same inputs in the same process:

  ours         infoscale_triton.scaled_dot_product_attention(temperature="infoscale")
  ours_notemp  the same kernel without a temperature (ours / ours_notemp = what InfoScale costs)
  sdpa_cudnn   F.scaled_dot_product_attention, cuDNN backend, on q * t_i (F.normalize first for cos)
  sdpa_flash   the same with the FlashAttention backend
  flex         torch.compile(flex_attention), score_mod = score * t[q_idx], causal BlockMask
  eager        the package reference in the input dtype (materialised logits; NaN when out of memory)

Passes: "fwd" times one forward on inputs that do not require grad; "fwd_bwd" times the forward on
requires-grad leaves and torch.autograd.grad of q, k, v for a fixed random dO. Each provider's
prologue (q * t_i, F.normalize) is inside the timed call and its gradient flows back to the original
q / k: that is what a user pays. Flex compiles its backward too.

Checks, before timing (a failed one is marked "!" and makes the exit code 1 when it is ours):
  output     sampled rows against the package reference in float64 (both passes);
  gradients  dq, dk, dv against autograd through the float64 reference, on the first batch entry and
             as many heads as keep one float64 N x N logits matrix per head within 2^28 elements in
             all (one head at N = 16k); above that only checked to be finite ("finite").
Error budget: twice the error of the same reference run in the input dtype, plus a small floor.

Timing: triton.testing.do_bench, median, after a first call that compiles / autotunes outside the
timing, cycling over enough input sets (each with its own leaves and dO) to exceed the L2 cache.
TFLOP/s = 4 B H N^2 D / time, halved when causal, x3.5 for fwd_bwd. Peak memory: what one call
allocates on top of the live inputs (max_memory_allocated - memory_allocated before it), MiB.

Long-context row (--long): one sequence of 131072 tokens, H = 16, D = 128, causal; ours, sdpa_cudnn,
sdpa_flash, flex (eager would need its N x N logits: not run). Gradients there are only checked to be
finite; timed over --long-rep (one fwd_bwd is ~0.5 s).

Results: tables on stdout; JSON and CSV (with GPU, versions, commit, timestamp) under --out, rewritten
after every point so that a run cut short keeps what it measured. Without CUDA, --smoke runs a tiny
grid through the Triton interpreter to test the code (its timings mean nothing).

The interpreter must be chosen before triton is imported: importers set TRITON_INTERPRET first.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TypeVar

import torch
import triton

import infoscale_triton

from . import peers, reference
from .console import Progress, table

TOKENS = 16384  # B * N: every grid point does the same number of tokens
HIDDEN = 2048  # H * D
GRIDS = {
    "full": {"d": (64, 128), "n": (1024, 4096, 16384)},
    "quick": {"d": (128,), "n": (1024, 16384)},
    "smoke": {"d": (64,), "n": (64, 128)},  # CPU interpreter: checks the script, not the speed
}
SMOKE_TOKENS, SMOKE_HIDDEN = 128, 128
# Pass -> FLOP factor relative to one forward (the anchors' convention: fwd_bwd = 3.5 forwards).
PASSES = {"fwd": 1.0, "fwd_bwd": 3.5}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
REPO = Path(__file__).resolve().parent.parent
# Gradient check: (checked heads) x N^2 float64 logits at most, i.e. 2 GiB per materialised copy.
GRAD_CHECK_LOGITS = 2**28
# Long context: the providers that can run it (eager would materialise 16 x 128k^2 logits).
LONG_PROVIDERS = ("ours", "sdpa_cudnn", "sdpa_flash", "flex")

Call = Callable[[], object]
T = TypeVar("T")


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


def add_arguments(ap: argparse.ArgumentParser, out: Path, providers_default: str, long_default: str) -> None:
    """The benchmark's options, shared by the script and ``python -m infoscale_triton bench``. The
    defaults that differ between them are resolved by the caller (--long, --providers: None until
    then; :func:`finish_args` makes them "on for the full grid" and "all"); the two strings say what
    they are, for --help."""
    ap.add_argument("--quick", action="store_true", help="subset: D=128, N in {1024, 16384}")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny grid for a CPU run through the Triton interpreter (tests the code only)")
    ap.add_argument("--d", type=int, nargs="+", default=None, help="only these head dims of the grid")
    ap.add_argument("--n", type=int, nargs="+", default=None, help="only these sequence lengths of the grid")
    ap.add_argument("--grid", action=argparse.BooleanOptionalAction, default=True,
                    help="run the grid (--no-grid with --long: the long-context row only)")
    ap.add_argument("--long", action=argparse.BooleanOptionalAction, default=None,
                    help="the long-context row, B=1 N=131072 H=16 D=128 causal (with --smoke a tiny "
                         f"stand-in); default: {long_default}")
    ap.add_argument("--providers", nargs="+", default=None, choices=list(peers.PROVIDERS), metavar="P",
                    help=f"providers to run, of {' '.join(peers.PROVIDERS)} (default: {providers_default})")
    ap.add_argument("--modes", nargs="+", default=list(peers.MODES), choices=list(peers.MODES))
    ap.add_argument("--passes", nargs="+", default=list(PASSES), choices=list(PASSES))
    ap.add_argument("--causal", nargs="+", type=int, default=[0, 1], choices=[0, 1])
    ap.add_argument("--dtype", choices=list(DTYPES), default=None,
                    help="default bfloat16 on CUDA, float32 on the CPU interpreter (its bf16 dot is wrong)")
    ap.add_argument("--warmup", type=float, default=10.0, help="do_bench warm-up, ms (default 10)")
    ap.add_argument("--rep", type=float, default=100.0, help="do_bench measuring time, ms (default 100)")
    # one fwd_bwd at 128k causal is ~70 TFLOP x 3.5, i.e. ~0.5 s: --rep would time a single call
    ap.add_argument("--long-rep", type=float, default=2000.0,
                    help="do_bench measuring time for the long-context row, ms (default 2000)")
    ap.add_argument("--check-rows", type=int, default=64, help="query rows checked per batch (default 64)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=out, help=f"results directory (default {out})")


def finish_args(args: argparse.Namespace) -> argparse.Namespace:
    """Defaults that depend on the machine or on other options."""
    if args.dtype is None:
        args.dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    if args.long is None:
        args.long = not (args.quick or args.smoke)
    if args.providers is None:
        args.providers = list(peers.PROVIDERS)
    return args


def grid(args: argparse.Namespace) -> list[Point]:
    name = "smoke" if args.smoke else "quick" if args.quick else "full"
    tokens, hidden = (SMOKE_TOKENS, SMOKE_HIDDEN) if args.smoke else (TOKENS, HIDDEN)
    points = []
    if args.grid:
        points = [Point(d, n, bool(c), tokens, hidden)
                  for d in GRIDS[name]["d"] if args.d is None or d in args.d
                  for n in GRIDS[name]["n"] if args.n is None or n in args.n
                  for c in args.causal]
    if args.long:
        points.append(SMOKE_LONG if args.smoke else LONG)
    return points


def make_inputs(p: Point, dtype: torch.dtype, device: str, n_sets: int, seed: int):
    """``n_sets`` independent (q, k, v, dout) sets, (B, H, N, D), standard normal (never zeros)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (p.b, p.h, p.n, p.d)
    return [tuple(torch.randn(shape, generator=gen, device=device, dtype=dtype) for _ in range(4))
            for _ in range(n_sets)]


def attempt(fn: Callable[[], T]) -> tuple[T | None, str]:
    """``(fn(), "")``, or ``(None, reason)`` when it fails (out of memory, a peer's error)."""
    reason = ""
    try:
        return fn(), ""
    except peers.OOM:
        reason = "out of memory"
    except Exception as e:  # noqa: BLE001 - recorded, the run goes on
        reason = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:140]}"
    # outside the except block: the traceback (and the tensors its frames hold) is gone by now
    peers.free_memory()
    return None, reason


def fwd_bwd_call(fn: peers.Fn, leaves: tuple[torch.Tensor, ...], dout: torch.Tensor) -> Call:
    def call() -> None:
        torch.autograd.grad(fn(), leaves, dout)
    return call


def build_calls(name: str, pass_: str, sets: list, causal: bool, mode: str) -> tuple[list[Call], object, str]:
    """One timed call per input set, what the first set's first call gave (fwd: the output; fwd_bwd:
    (output, (dq, dk, dv))), and the reason when the provider cannot run."""
    calls: list[Call] = []
    first: object = None
    for i, (q, k, v, dout) in enumerate(sets):
        if pass_ == "fwd":
            built = peers.build(name, q, k, v, causal, mode)
            if built.fn is None:
                return [], None, built.reason
            first = built.out if i == 0 else first
            calls.append(built.fn)
        else:
            # own leaves per set (sharing the inputs' storage): the gradient is taken w.r.t. these
            leaves = tuple(x.detach().requires_grad_() for x in (q, k, v))
            built = peers.build(name, *leaves, causal, mode)
            if built.fn is None:
                return [], None, built.reason
            if i == 0:  # the first backward (flex compiles it here): its gradients get checked
                grads, why = attempt(functools.partial(torch.autograd.grad, built.out, leaves, dout))
                if grads is None:
                    return [], None, f"backward: {why}"
                first = (built.out.detach(), grads)
            calls.append(fwd_bwd_call(built.fn, leaves, dout))
        built.out = None
    return calls, first, ""


def time_calls(calls: list[Call], warmup_ms: float, rep_ms: float) -> float:
    """Median ms per call on a GPU (peers.time_ms: do_bench cycling over the input sets). Through the
    interpreter a time means nothing: one call on the host clock keeps the smoke run short."""
    if torch.cuda.is_available():
        return peers.time_ms(calls, warmup_ms, rep_ms)
    t0 = time.perf_counter()
    calls[0]()
    return (time.perf_counter() - t0) * 1e3


def peak_mib(call: Call) -> float:
    """MiB one call allocates on top of what is live before it (inputs, other providers' state)."""
    if not torch.cuda.is_available():
        return math.nan
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    call()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def check_heads(p: Point) -> int:
    """Heads of the first batch entry whose gradients are checked; 0: too large, finite-only check."""
    return 0 if p.long else min(p.h, GRAD_CHECK_LOGITS // (p.n * p.n))


def reference_grads(s: tuple, heads: int, causal: bool, mode: str, temp: str | None,
                    dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """(dq, dk, dv) of the package reference on batch entry 0, heads [0, heads), in ``dtype``."""
    q, k, v, dout = (x[:1, :heads].to(dtype, copy=True) for x in s)
    leaves = tuple(x.requires_grad_() for x in (q, k, v))
    out = reference.scaled_dot_product_attention(
        *leaves, is_causal=causal, temperature=temp, train_len=peers.N_TRAIN if temp else None,
        cos_scale=peers.COS_SCALE if mode == "cos" else None)
    return torch.autograd.grad(out, leaves, dout)


GRAD_NAMES = ("dq", "dk", "dv")


def check_result(rec: dict, pass_: str, first: object, fwd_ref: tuple, grad_ref: tuple | None,
                 heads: int, batches: torch.Tensor, rows: torch.Tensor) -> None:
    """Fill rec's err / tol (output), err_d* / tol_d* (gradients) and check."""
    ref_rows, tol = fwd_ref
    out, grads = (first, None) if pass_ == "fwd" else first
    rec["err"] = peers.rel_err(peers.take_rows(out, batches, rows), ref_rows)
    rec["tol"] = tol
    ok = peers.passes(rec["err"], tol)
    if grads is not None:
        if grad_ref is None:  # too large for the reference: NaN / inf is all we can catch
            finite = all(bool(torch.isfinite(g).all()) for g in grads)
            rec["check"] = "finite" if ok and finite else "FAIL"
            return
        refs, tols = grad_ref
        for g_name, g, r, t in zip(GRAD_NAMES, grads, refs, tols):
            rec[f"err_{g_name}"] = peers.rel_err(g[:1, :heads], r)
            rec[f"tol_{g_name}"] = t
            ok = ok and peers.passes(rec[f"err_{g_name}"], t)
    rec["check"] = "ok" if ok else "FAIL"


def point_providers(p: Point, args: argparse.Namespace) -> list[str]:
    """The providers run at ``p`` (eager stays in the long row: its record says why it is not run)."""
    return [x for x in args.providers if not p.long or x in LONG_PROVIDERS + ("eager",)]


def run_point(p: Point, args: argparse.Namespace, device: str,
              on_record: Callable[[dict, float], None]) -> list[dict]:
    """Every (mode, provider, pass) record of one grid point; ``on_record(rec, seconds)`` after each."""
    dtype = DTYPES[args.dtype]
    elem = torch.finfo(dtype).bits // 8
    n_sets = peers.input_sets_needed(4 * p.b * p.h * p.n * p.d * elem)
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
            ref = peers.reference_rows(*sets[0][:3], batches, rows, p.causal, mode, temp)
            low = peers.reference_rows(*sets[0][:3], batches, rows, p.causal, mode, temp, dtype=dtype)
            fwd_refs[temp] = (ref, peers.tolerance(peers.rel_err(low, ref), dtype))
            if heads:
                ref_g = reference_grads(sets[0], heads, p.causal, mode, temp, torch.float64)
                low_g = reference_grads(sets[0], heads, p.causal, mode, temp, dtype)
                grad_refs[temp] = (ref_g, [peers.tolerance(peers.rel_err(lo, r), dtype)
                                           for lo, r in zip(low_g, ref_g)])
            del low
            peers.free_memory()
        for name in providers:
            for pass_ in args.passes:
                t0 = time.perf_counter()
                rec = dict(row="long" if p.long else "grid", mode=mode, provider=name, **{"pass": pass_},
                           D=p.d, N=p.n, B=p.b, H=p.h, causal=int(p.causal), dtype=args.dtype,
                           n_sets=n_sets, grad_heads=heads if pass_ == "fwd_bwd" else 0,
                           err=math.nan, tol=math.nan, check="-", reason="",
                           **{f"{x}_{g}": math.nan for x in ("err", "tol") for g in GRAD_NAMES},
                           ms=math.nan, tflops=math.nan, peak_mib=math.nan)
                if p.long and name == "eager":
                    rec["reason"] = "not run at 128k: materialised logits (out of memory from 16k)"
                else:
                    measure(rec, p, args, name, pass_, sets, mode, fwd_refs, grad_refs, batches, rows, rep)
                records.append(rec)
                on_record(rec, time.perf_counter() - t0)
                peers.free_memory()  # the provider's calls and outputs are gone: hand their memory back
        del fwd_refs, grad_refs
    del sets
    peers.clear_flex_cache()
    peers.free_memory()
    return records


def measure(rec: dict, p: Point, args: argparse.Namespace, name: str, pass_: str, sets: list, mode: str,
            fwd_refs: dict, grad_refs: dict, batches: torch.Tensor, rows: torch.Tensor, rep: float) -> None:
    """Build, check, measure the peak memory of one call, then time: fills rec."""
    temp = peers.TEMPERATURE[name]
    calls, first, rec["reason"] = build_calls(name, pass_, sets, p.causal, mode)
    if not calls:
        peers.free_memory()
        return
    check_result(rec, pass_, first, fwd_refs[temp], grad_refs.get(temp), rec["grad_heads"],
                 batches, rows)
    del first
    ms, (mib, why) = None, attempt(lambda: peak_mib(calls[0]))
    if mib is not None:
        rec["peak_mib"] = mib
        ms, why = attempt(lambda: time_calls(calls, args.warmup, rep))
    if ms is None:
        rec["reason"] = f"while measuring: {why}"
    else:
        rec["ms"] = ms
        flops = peers.attention_flops(p.b, p.h, p.n, p.n, p.d, p.causal) * PASSES[pass_]
        rec["tflops"] = flops / (ms * 1e-3) / 1e12


def record_line(progress: str, r: dict, took: float) -> str:
    """One line per measured record: time, TFLOP/s, peak memory, errors against their budgets."""
    if math.isnan(r["ms"]):
        tail = f"NaN ({r['reason']})"
    else:
        tail = f"{r['ms']:9.3f} ms {r['tflops']:7.1f} TFLOP/s {_fmt(r['peak_mib'], 0):>6s} MiB"
    chk = ""
    if not math.isnan(r["err"]):
        chk = f" err {r['err']:.1e}/{r['tol']:.1e}"
        if not math.isnan(r["err_dq"]):
            chk += " grad " + " ".join(f"{g} {r['err_' + g]:.1e}/{r['tol_' + g]:.1e}" for g in GRAD_NAMES)
        chk += f" {r['check']}"
    return f"{progress} {r['mode']:9s} {r['pass']:7s} {r['provider']:11s} {tail}{chk}  [{took:.1f} s]"


def _fmt(x: float | None, digits: int | None = None) -> str:
    if x is None or math.isnan(x):
        return "nan"
    if digits is None:  # TFLOP/s: whole numbers on a GPU, two significant digits for the small ones
        return f"{x:.0f}" if abs(x) >= 10 else f"{x:.2g}"
    return f"{x:.{digits}f}"


def ours_err(r: dict) -> float:
    """The error shown for a record: the output's (fwd), the worst gradient's by err/tol (fwd_bwd)."""
    grads = [(r[f"err_{g}"], r[f"tol_{g}"]) for g in GRAD_NAMES if not math.isnan(r[f"err_{g}"])]
    if not grads:
        return r["err"]
    return max(grads, key=lambda et: et[0] / et[1] if math.isfinite(et[0]) else math.inf)[0]


def _mark(r: dict | None) -> str:
    return "!" if r and r["check"] == "FAIL" else ""


def print_tables(records: list[dict], providers: list[str]) -> None:
    """Per pass and mode: TFLOP/s per provider ('!' = failed check), ours / each peer, ours' error;
    per pass: peak MiB per call; then the long-context row."""
    grid_recs = [r for r in records if r["row"] == "grid"]
    peers_ = [p for p in providers if p != "ours"]
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
                row += [_fmt(by[q]["tflops"]) + _mark(by[q]) if q in by else "-" for q in providers]
                if "ours" in by:
                    ours = by["ours"]["tflops"]
                    row += [_fmt(ours / by[q]["tflops"], 2) if q in by else "-" for q in peers_]
                    row += [_fmt_err(ours_err(by["ours"])), by["ours"]["check"]]
                rows.append(row)
            table(headers, rows, f"{pass_} / {mode}: TFLOP/s (higher is better; fwd_bwd counts 3.5 "
                                 "forwards); ours/x > 1 means ours is faster")
    for pass_ in dict.fromkeys(r["pass"] for r in grid_recs):
        sel = [r for r in grid_recs if r["pass"] == pass_]
        if all(math.isnan(r["peak_mib"]) for r in sel):
            print(f"\n{pass_}: no peak memory (measured on CUDA only)")
            continue
        keys = list(dict.fromkeys((r["mode"], r["D"], r["N"], r["causal"]) for r in sel))
        rows = []
        for key in keys:
            by = {r["provider"]: r for r in sel if (r["mode"], r["D"], r["N"], r["causal"]) == key}
            rows.append(list(key) + [_fmt(by[q]["peak_mib"], 0) if q in by else "-" for q in providers])
        table(["mode", "D", "N", "causal"] + providers, rows,
              f"{pass_}: peak memory of one call, MiB above the live inputs (lower is better)")
    print_long(records)
    print_notes(records)


def _fmt_err(x: float) -> str:
    return "nan" if math.isnan(x) else f"{x:.1e}"


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
        ratio = "-" if o is None or r is o else _fmt(r["ms"] / o["ms"], 2)
        rows.append([r["mode"], r["pass"], r["provider"], _fmt(r["ms"], 1), _fmt(r["tflops"]) + _mark(r),
                     _fmt(r["peak_mib"], 0), ratio, r["check"]])
    table(["mode", "pass", "provider", "ms", "TFLOP/s", "peak MiB", "ours/x", "check"], rows, title)


def print_notes(records: list[dict]) -> None:
    reasons: dict[str, list[str]] = {}
    for r in records:
        if r["reason"]:
            where = f"{r['mode']} {r['pass']} D={r['D']} N={r['N']} causal={r['causal']}"
            reasons.setdefault(f"{r['provider']}: {r['reason']}", []).append(where)
    if reasons:
        print("\nnan = could not run:")
        for why, where in reasons.items():
            print(f"  {why}  [{where[0]}" + (f" and {len(where) - 1} more]" if len(where) > 1 else "]"))
    heads = sorted({(r["N"], r["grad_heads"]) for r in records if r["pass"] == "fwd_bwd"})
    if heads:
        print("\ngradients checked on batch entry 0 and the first heads: "
              + ", ".join(f"N={n}: {h} head(s)" if h else f"N={n}: finite only" for n, h in heads))
    if any(r["check"] == "FAIL" for r in records):
        print("\n! = output or gradients differ from the float64 reference beyond the error budget, or "
              "are not finite (err/tol in the JSON)")


def git(*cmd: str, repo: Path | None = None) -> str:
    """A git command's output in ``repo`` (this checkout by default), "" when git is not there."""
    try:
        return subprocess.run(["git", "-C", str(repo or REPO), *cmd], check=False, capture_output=True,
                              text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def metadata(args: argparse.Namespace, started: datetime) -> dict:
    cuda = torch.cuda.is_available()
    props = torch.cuda.get_device_properties(0) if cuda else None
    return {
        "timestamp": started.isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(0) if cuda else f"none (CPU {platform.machine()})",
        "gpu_memory_bytes": getattr(props, "total_memory", None),
        "l2_bytes": getattr(props, "L2_cache_size", None),
        "interpreter": os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "package_version": infoscale_triton.__version__,
        "git_commit": git("rev-parse", "HEAD") or None,
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "argv": sys.argv,
        "train_len": peers.N_TRAIN,
        "cos_scale": peers.COS_SCALE,
        "warmup_ms": args.warmup,
        "rep_ms": args.rep,
        "long_rep_ms": args.long_rep,
        "flops": "4*B*H*N^2*D per forward, halved when causal; fwd_bwd counts 3.5 forwards",
        "peak_mib": "max_memory_allocated during one call minus memory_allocated before it (inputs live)",
        "grad_check": f"batch entry 0, heads*N^2 <= {GRAD_CHECK_LOGITS} (grad_heads); 0 = finite only",
    }


def write_results(records: list[dict], meta: dict, out_dir: Path, started: datetime) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"bench_attention_{started:%Y%m%dT%H%M%SZ}"
    # JSON has no NaN: missing numbers are null
    clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
             for r in records]
    with open(stem.with_suffix(".json"), "w") as f:
        json.dump({"meta": meta, "results": clean}, f, indent=1)
    cols = ["timestamp", "gpu", "torch", "triton", "package_version", "git_commit"]
    fields = list(dict.fromkeys(k for r in records for k in r)) + cols
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in records:
            w.writerow({**r, **{c: meta[c] for c in cols}})
    return stem.with_suffix(".json"), stem.with_suffix(".csv")


def run(args: argparse.Namespace, name: str = "bench_attention") -> tuple[int, list[dict], dict, Path | None]:
    """Measure the grid of ``args`` (see :func:`add_arguments`, after :func:`finish_args`), print the
    tables, write JSON and CSV under ``args.out``. Returns (exit code, records, metadata, JSON path):
    exit code 1 when ours failed a check, 2 when nothing could run."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        print("No CUDA device: the grid is for a GPU. Use --smoke for a tiny interpreter run.",
              file=sys.stderr)
        return 2, [], {}, None
    if device == "cpu" and args.dtype == "bfloat16":
        print("warning: the Triton interpreter's bf16 dot is wrong; ours will fail its check", flush=True)
    started = datetime.now(timezone.utc)
    meta = metadata(args, started)
    points = grid(args)
    if not points:
        print("nothing to run: the grid filters left no point and --long is off", file=sys.stderr)
        return 2, [], meta, None
    total = sum(len(args.modes) * len(point_providers(p, args)) * len(args.passes) for p in points)
    print(f"{name}: {meta['gpu']}, torch {meta['torch']}, triton {meta['triton']}, "
          f"infoscale_triton {meta['package_version']} ({(meta['git_commit'] or '?')[:10]}), {args.dtype}, "
          f"{len(points)} points x {len(args.modes)} modes x {len(args.providers)} providers x "
          f"passes {' '.join(args.passes)}: {total} measurements", flush=True)
    t_start = time.perf_counter()
    records: list[dict] = []
    with Progress(total, name) as bar:
        for i, p in enumerate(points):
            def on_record(rec: dict, took: float, label: str = p.label(), i: int = i) -> None:
                bar.log(record_line(f"[{i + 1}/{len(points)} {label}]", rec, took))
                bar.advance(f"{name} {label}")

            records += run_point(p, args, device, on_record)
            meta["elapsed_s"] = round(time.perf_counter() - t_start, 1)
            json_path, csv_path = write_results(records, meta, args.out, started)  # a cut-short run keeps these
    print_tables(records, args.providers)
    print(f"\n{len(records)} results in {meta['elapsed_s']} s -> {json_path}, {csv_path}", flush=True)
    ours_failed = any(r["check"] == "FAIL" and r["provider"].startswith("ours") for r in records)
    return (1 if ours_failed else 0), records, meta, json_path
