#!/usr/bin/env python
"""Forward benchmark: our fused InfoScale / CosScale attention against what a user would run instead.

For every grid point (head dim D, sequence length N, causal or not; B * N = 16384 tokens and
H = 2048 // D heads) and every mode ("infoscale": dot-product logits with InfoScale; "cos": CosScale
s = 32 with InfoScale), all providers run on the same inputs in the same process:

  ours         infoscale_triton.scaled_dot_product_attention(temperature="infoscale")
  ours_notemp  the same kernel without a temperature (ours / ours_notemp = what InfoScale costs)
  sdpa_cudnn   F.scaled_dot_product_attention, cuDNN backend, on q * t_i (F.normalize first for cos)
  sdpa_flash   the same with the FlashAttention backend
  flex         torch.compile(flex_attention), score_mod = score * t[q_idx], causal BlockMask
  eager        the package reference in the input dtype (materialised logits; NaN when out of memory)

Before timing, each provider's output is checked on sampled rows against the package reference in
float64 (error budget: twice the error of the reference run in the input dtype, plus eps/4); a
failed check is marked "!" in the table and makes the exit code 1 when it is ours.

Timing: triton.testing.do_bench, median, after a first call that compiles / autotunes outside the
timing, cycling over enough input sets to exceed the L2 cache. TFLOP/s = 4 B H N^2 D / time, halved
when causal. Results: a table on stdout; JSON and CSV (with GPU, versions, commit, timestamp) under
--out. Without CUDA, --smoke runs a tiny grid through the Triton interpreter to test the script.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # No GPU: only the interpreter can run our kernels, and it must be chosen before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402

import infoscale_triton  # noqa: E402
from infoscale_triton import peers  # noqa: E402

TOKENS = 16384  # B * N: every grid point does the same number of tokens
HIDDEN = 2048  # H * D
GRIDS = {
    "full": {"d": (64, 128), "n": (1024, 4096, 16384)},
    "quick": {"d": (128,), "n": (1024, 16384)},
    "smoke": {"d": (64,), "n": (128, 256)},  # CPU interpreter: checks the script, not the speed
}
SMOKE_TOKENS, SMOKE_HIDDEN = 256, 128
# Passes and their FLOP factor (relative to one forward). "fwd_bwd" (3.5x) slots in here once the
# backward exists: give timed_fns() its case and add it to the choices.
PASSES = ("fwd",)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Point:
    d: int
    n: int
    causal: bool
    tokens: int
    hidden: int

    @property
    def b(self) -> int:
        return max(self.tokens // self.n, 1)

    @property
    def h(self) -> int:
        return self.hidden // self.d

    def label(self) -> str:
        return f"D={self.d} N={self.n} causal={int(self.causal)} B={self.b} H={self.h}"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="subset: D=128, N in {1024, 16384}")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny grid for a CPU run through the Triton interpreter (tests the script only)")
    ap.add_argument("--providers", nargs="+", default=list(peers.PROVIDERS), choices=list(peers.PROVIDERS),
                    metavar="P", help=f"providers to run (default: all of {' '.join(peers.PROVIDERS)})")
    ap.add_argument("--modes", nargs="+", default=list(peers.MODES), choices=list(peers.MODES))
    ap.add_argument("--passes", nargs="+", default=list(PASSES), choices=list(PASSES))
    ap.add_argument("--causal", nargs="+", type=int, default=[0, 1], choices=[0, 1])
    ap.add_argument("--dtype", choices=list(DTYPES), default=None,
                    help="default bfloat16 on CUDA, float32 on the CPU interpreter (its bf16 dot is wrong)")
    ap.add_argument("--warmup", type=float, default=10.0, help="do_bench warm-up, ms (default 10)")
    ap.add_argument("--rep", type=float, default=100.0, help="do_bench measuring time, ms (default 100)")
    ap.add_argument("--check-rows", type=int, default=64, help="query rows checked per batch (default 64)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("results"), help="results directory (default results/)")
    args = ap.parse_args(argv)
    if args.dtype is None:
        args.dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    return args


def grid(args: argparse.Namespace) -> list[Point]:
    name = "smoke" if args.smoke else "quick" if args.quick else "full"
    tokens, hidden = (SMOKE_TOKENS, SMOKE_HIDDEN) if args.smoke else (TOKENS, HIDDEN)
    return [Point(d, n, bool(c), tokens, hidden)
            for d in GRIDS[name]["d"] for n in GRIDS[name]["n"] for c in args.causal]


def make_inputs(p: Point, dtype: torch.dtype, device: str, n_sets: int, seed: int):
    """``n_sets`` independent (q, k, v) sets, (B, H, N, D), standard normal (never zeros)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (p.b, p.h, p.n, p.d)
    return [tuple(torch.randn(shape, generator=gen, device=device, dtype=dtype) for _ in range(3))
            for _ in range(n_sets)]


def timed_fns(fns: list[peers.Fn], pass_: str) -> list[peers.Fn]:
    """What one timed call does for a pass. fwd: the provider's call as built."""
    if pass_ == "fwd":
        return fns
    raise NotImplementedError(pass_)  # fwd_bwd: build with requires_grad inputs, call .backward(dout)


def run_point(p: Point, args: argparse.Namespace, device: str, progress: str) -> list[dict]:
    dtype = DTYPES[args.dtype]
    elem = torch.finfo(dtype).bits // 8
    n_sets = peers.input_sets_needed(3 * p.b * p.h * p.n * p.d * elem)
    sets = make_inputs(p, dtype, device, n_sets, args.seed)
    batches, rows = peers.sample_rows(p.b, p.n, args.check_rows, args.seed)
    records = []
    for mode in args.modes:
        # float64 reference on the sampled rows, and the same in the input dtype for the error budget
        refs, tols = {}, {}
        for temp in {peers.TEMPERATURE[name] for name in args.providers}:
            refs[temp] = peers.reference_rows(*sets[0], batches, rows, p.causal, mode, temp)
            low = peers.reference_rows(*sets[0], batches, rows, p.causal, mode, temp, dtype=dtype)
            tols[temp] = peers.tolerance(peers.rel_err(low, refs[temp]), dtype)
            del low
        for name in args.providers:
            t0 = time.perf_counter()
            temp = peers.TEMPERATURE[name]
            rec = dict(mode=mode, provider=name, **{"pass": ""}, D=p.d, N=p.n, B=p.b, H=p.h,
                       causal=int(p.causal), dtype=args.dtype, n_sets=n_sets, err=math.nan,
                       tol=tols[temp], check="-", reason="")
            fns: list[peers.Fn] = []
            for s in sets:
                built = peers.build(name, *s, p.causal, mode)
                if built.fn is None:
                    rec["reason"] = built.reason
                    fns = []
                    break
                if not fns:  # check the first set's output, then let it go
                    rec["err"] = peers.rel_err(peers.take_rows(built.out, batches, rows), refs[temp])
                    rec["check"] = "ok" if peers.passes(rec["err"], rec["tol"]) else "FAIL"
                built.out = None
                fns.append(built.fn)
            for pass_ in args.passes:
                ms, why = math.nan, rec["reason"]
                if fns:
                    try:
                        ms = peers.time_ms(timed_fns(fns, pass_), args.warmup, args.rep)
                    except peers.OOM:
                        why = "out of memory while timing"
                    except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                        why = f"{type(e).__name__} while timing: {str(e)[:120]}"
                flops = peers.attention_flops(p.b, p.h, p.n, p.n, p.d, p.causal, pass_)
                tflops = flops / (ms * 1e-3) / 1e12
                r = dict(rec, **{"pass": pass_, "ms": ms, "tflops": tflops, "reason": why})
                records.append(r)
                tail = f"NaN ({why})" if math.isnan(ms) else f"{ms:8.3f} ms {r['tflops']:7.1f} TFLOP/s"
                chk = "" if math.isnan(r["err"]) else f" err {r['err']:.1e} tol {r['tol']:.1e} {r['check']}"
                took = time.perf_counter() - t0
                print(f"{progress} {mode:9s} {pass_} {name:11s} {tail}{chk}  [{took:.1f} s]", flush=True)
            del fns
            peers.free_memory()
        del refs
    del sets
    peers.clear_flex_cache()
    peers.free_memory()
    return records


def _fmt(x: float, digits: int | None = None) -> str:
    if x is None or math.isnan(x):
        return "nan"
    if digits is None:  # TFLOP/s: whole numbers on a GPU, two significant digits for the small ones
        return f"{x:.0f}" if abs(x) >= 10 else f"{x:.2g}"
    return f"{x:.{digits}f}"


def print_tables(records: list[dict], providers: list[str]) -> None:
    """Per pass and mode: TFLOP/s per provider ('!' = failed check), ours / each peer, ours' error."""
    peers_ = [p for p in providers if p != "ours"]
    for pass_ in dict.fromkeys(r["pass"] for r in records):
        for mode in dict.fromkeys(r["mode"] for r in records):
            sel = [r for r in records if r["pass"] == pass_ and r["mode"] == mode]
            keys = list(dict.fromkeys((r["D"], r["N"], r["causal"]) for r in sel))
            headers = ["D", "N", "causal"] + providers
            headers += [f"ours/{q}" for q in peers_ if "ours" in providers]
            headers += ["ours err", "check"] if "ours" in providers else []
            rows = []
            for key in keys:
                by = {r["provider"]: r for r in sel if (r["D"], r["N"], r["causal"]) == key}
                row = list(key)
                for q in providers:
                    r = by.get(q)
                    row.append(_fmt(r["tflops"]) + ("!" if r and r["check"] == "FAIL" else "") if r else "-")
                if "ours" in providers:
                    ours = by["ours"]["tflops"]
                    row += [_fmt(ours / by[q]["tflops"], 2) if q in by else "-" for q in peers_]
                    row += [f"{by['ours']['err']:.1e}", by["ours"]["check"]]
                rows.append(row)
            print(f"\n{pass_} / {mode}: TFLOP/s (higher is better); ours/x > 1 means ours is faster")
            print(peers.format_table(headers, rows), flush=True)
    reasons: dict[str, list[str]] = {}
    for r in records:
        if r["reason"]:
            where = f"{r['mode']} D={r['D']} N={r['N']} causal={r['causal']}"
            reasons.setdefault(f"{r['provider']}: {r['reason']}", []).append(where)
    if reasons:
        print("\nnan = could not run:")
        for why, where in reasons.items():
            print(f"  {why}  [{where[0]}" + (f" and {len(where) - 1} more]" if len(where) > 1 else "]"))
    if any(r["check"] == "FAIL" for r in records):
        print("\n! = output differs from the float64 reference beyond the error budget "
              "(err/tol in the JSON)")


def metadata(args: argparse.Namespace, started: datetime) -> dict:
    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(REPO), *cmd], capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    cuda = torch.cuda.is_available()
    props = torch.cuda.get_device_properties(0) if cuda else None
    return {
        "timestamp": started.isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(0) if cuda else f"none (CPU {platform.machine()})",
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
        "flops": "4*B*H*N^2*D per forward, halved when causal",
    }


def write_results(records: list[dict], meta: dict, out_dir: Path, started: datetime) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"bench_forward_{started:%Y%m%dT%H%M%SZ}"
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


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        print("No CUDA device: the grid is for a GPU. Use --smoke for a tiny interpreter run.",
              file=sys.stderr)
        return 2
    if device == "cpu" and args.dtype == "bfloat16":
        print("warning: the Triton interpreter's bf16 dot is wrong; ours will fail its check", flush=True)
    started = datetime.now(timezone.utc)
    meta = metadata(args, started)
    points = grid(args)
    print(f"bench_forward: {meta['gpu']}, torch {meta['torch']}, triton {meta['triton']}, "
          f"infoscale_triton {meta['package_version']} ({(meta['git_commit'] or '?')[:10]}), {args.dtype}, "
          f"{len(points)} points x {len(args.modes)} modes x {len(args.providers)} providers", flush=True)
    t_start = time.perf_counter()
    records: list[dict] = []
    for i, p in enumerate(points):
        records += run_point(p, args, device, f"[{i + 1}/{len(points)} {p.label()}]")
    meta["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    print_tables(records, args.providers)
    json_path, csv_path = write_results(records, meta, args.out, started)
    print(f"\n{len(records)} results in {meta['elapsed_s']} s -> {json_path}, {csv_path}", flush=True)
    ours_failed = any(r["check"] == "FAIL" and r["provider"].startswith("ours") for r in records)
    return 1 if ours_failed else 0


if __name__ == "__main__":
    sys.exit(main())
