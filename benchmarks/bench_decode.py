#!/usr/bin/env python
"""KV-cache decoding benchmark: infoscale_triton.decode_attention against what a user would run instead,
as a fraction of the GPU's measured copy bandwidth (decoding reads the whole cache once per step).

Shape (default): B=1, Hkv=8, Hq=32, D=128, bf16, Lq=1, a full cache of Lk in 4k, 32k, 128k, 256k keys
(HF layout (B, Hkv, Lk, D), contiguous). Providers, on the same inputs:

  ours         decode_attention(temperature="infoscale", train_len=N_TRAIN): t_i from n_i = Lk in-kernel
  ours_notemp  the same kernel without a temperature
  sdpa_cudnn   F.scaled_dot_product_attention under sdpa_kernel(CUDNN_ATTENTION) on q * t_i
  sdpa_flash   the same with the FLASH_ATTENTION backend
  flex         torch.compile(flex_attention), score_mod = score * t[q_idx], enable_gqa=True
  *_graph      ours / sdpa_cudnn / sdpa_flash captured in a CUDA graph and replayed: GPU time without
               the host's launch cost (a call of ours costs ~0.1 ms of Python and Triton launching,
               more than the kernels below ~64k keys)

GQA: the SDPA peers get enable_gqa=True; a backend that refuses it is retried on K/V repeated with
repeat_interleave (once, outside the timing: 4x the cache bytes read), and the note column says so.
A peer that cannot run stays in the table with the reason.

Copy: dst.copy_(src) of a --copy-mib buffer in the same run; copy GB/s = (read + written) / time.
GB/s of a provider = (K + V cache + q + out bytes) / time; "of copy" = that / copy GB/s.

Checks, before timing, at the first Lk (--check-all: every Lk): every provider's output against the
package reference in float64; budget twice the reference's own error in the input dtype plus a floor
(a failure is marked "!" and makes the exit code 1 when it is ours).

Timing: triton.testing.do_bench median (--warmup, --rep ms), cycling over enough cache copies that
together they exceed the L2 cache. GPU time: about 4 lengths x 5 providers x (warmup + rep) plus
compiles (flex compiles per length, ~10-30 s each): under ~3 minutes with the defaults; --rep and
--providers control it (--lk fewer lengths). --sweep adds our split kernel under other configs
(BLOCK_N, stages, TMA or pointer loads) and --splits other split counts, for tuning.

--short: which kernel should serve short caches (tuning's decode_min_keys, the routing of
scaled_dot_product_attention). For Lk in 16 to 4096 (--lk to change), B in 1 and 8, Lq in 1 and 4,
causal, InfoScale (N_TRAIN) and no temperature, Hkv=8, Hq=32, D=128: the dense forward launcher
(forward.attention_forward) against the decode launcher (splitkv.decode_forward) on the same validated
Problem, both without the public functions' validation. "eager": back-to-back calls, wall time per
call between two synchronisations, i.e. max(host launch cost, GPU time), what an eager decoding loop
pays; "graph": do_bench of CUDA-graph replays, the GPU time (L2 flushed). Ratio = dense / decode (> 1:
decode is faster). At most SHORT_MAX_SETS input sets rotate, so the smallest caches stay in L2. Both
outputs are checked against the float64 reference at every point. Prints one table per (B, Lq,
temperature), the smallest Lk from which decode is never slower, and writes bench_decode_short_*.json
/ .csv. About 1-2 minutes on the H100 (compiles included) with --warmup 10 --rep 40.

Results: tables on stdout; JSON and CSV (GPU, versions, commit, timestamp) under --out
(default benchmarks/results/). Without CUDA, --smoke runs tiny sizes through the Triton interpreter to
test the script (its timings mean nothing).
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import triton
from infoscale_triton.kernels.attention_decode import decode_config

import infoscale_triton
from infoscale_triton import forward, reference, splitkv, testing, tuning
from infoscale_triton.cli import harness, peers
from infoscale_triton.cli.console import table
from infoscale_triton.validation import Problem, check_inputs

N_TRAIN = peers.N_TRAIN
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
PROVIDERS = ("ours", "ours_notemp", "sdpa_cudnn", "sdpa_flash", "flex", "ours_graph", "sdpa_cudnn_graph",
             "sdpa_flash_graph")


@dataclass(frozen=True)
class Shape:
    b: int
    hkv: int
    hq: int
    d: int
    lq: int = 1


FULL = Shape(b=1, hkv=8, hq=32, d=128)
SMOKE = Shape(b=1, hkv=2, hq=8, d=32)
LENGTHS = {"full": (4096, 32768, 131072, 262144), "smoke": (64, 128)}
# --short: the grid (and its --smoke stand-in); SHORT_MAX_SETS caps the input sets (one CUDA graph each)
SHORT_LENGTHS = {"full": (16, 64, 128, 256, 512, 1024, 2048, 4096), "smoke": (16, 40)}
SHORT_BATCHES = {"full": (1, 8), "smoke": (2,)}
SHORT_QUERY_ROWS = (1, 4)
SHORT_TEMPERATURES = ("infoscale", None)
SHORT_MAX_SETS = 8
# decode counts as no slower within this fraction (timing noise): the suggested threshold's tolerance
SHORT_TOLERANCE = 0.03
# --sweep: (BLOCK_N, num_stages, TMA) for our split kernel, BLOCK_M and warps as decode_config picks
SWEEP = [(bn, stages, tma) for bn in (32, 64, 128) for stages in (2, 3, 4) for tma in (True, False)]

Fn = Callable[[], torch.Tensor]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true",
                    help="tiny sizes through the Triton interpreter (tests the script only)")
    ap.add_argument("--lk", type=int, nargs="+", default=None, help="cache lengths (default 4k 32k 128k 256k)")
    ap.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS, metavar="P",
                    help=f"providers to run (default: all of {' '.join(PROVIDERS)})")
    ap.add_argument("--dtype", choices=list(DTYPES), default=None,
                    help="default bfloat16 on CUDA, float32 on the CPU interpreter (bfloat16 runs there too, emulated)")
    ap.add_argument("--warmup", type=float, default=25.0, help="do_bench warm-up, ms (default 25)")
    ap.add_argument("--rep", type=float, default=100.0, help="do_bench measuring time, ms (default 100)")
    ap.add_argument("--copy-mib", type=int, default=1024, help="copy-bandwidth buffer, MiB (default 1024)")
    ap.add_argument("--check-all", action="store_true", help="check outputs at every length, not the first")
    ap.add_argument("--sweep", action="store_true",
                    help="also time ours_notemp under other split-kernel configs (tuning aid)")
    ap.add_argument("--splits", type=int, nargs="+", default=[],
                    help="also time ours_notemp with these num_splits (tuning aid)")
    ap.add_argument("--graph", action="store_true", help="time the --sweep / --splits rows as CUDA-graph replays")
    ap.add_argument("--short", action="store_true",
                    help="dense forward vs decode kernel on short caches (the routing threshold "
                         "tuning.decode_min_keys); --lk picks the lengths (default 16 to 4096)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None,
                    help="results directory (default benchmarks/results/; --smoke: a temporary directory)")
    args = ap.parse_args(argv)
    args.out = harness.results_dir(args.out, args.smoke)
    if args.dtype is None:
        args.dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    if args.lk is None:
        args.lk = list((SHORT_LENGTHS if args.short else LENGTHS)["smoke" if args.smoke else "full"])
    if args.smoke:
        args.copy_mib = min(args.copy_mib, 8)
    return args


# --- providers ---------------------------------------------------------------------------------
# A builder makes one timed call from one input set (q, k, v). Ours is the subject here (decode_attention,
# with the cache's lengths); the peers are the harness's (infoscale_triton/cli/peers.py), on a single
# query row: InfoScale's t_i from n_i = Lk, GQA passed as enable_gqa.

Builder = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Fn]


def _ours(temperature: str | None, num_splits: int | None = None) -> Builder:
    def build(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Fn:
        opts = {"temperature": temperature, "train_len": N_TRAIN} if temperature else {}
        return lambda: infoscale_triton.decode_attention(q, k, v, num_splits=num_splits, **opts)
    return build


def _peer(name: str) -> Builder:
    def build(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Fn:
        return peers.PROVIDERS[name](q, k, v, True, "infoscale")  # one row: causal or not, it sees every key
    return build


def _graphed(builder: Builder) -> Builder:
    """The same call replayed from a CUDA graph (peers.graphed): the GPU time without the host's launch cost."""
    return lambda q, k, v: peers.graphed(builder(q, k, v))


BUILDERS: dict[str, Builder] = {"ours": _ours("infoscale"), "ours_notemp": _ours(None),
                                "sdpa_cudnn": _peer("sdpa_cudnn"), "sdpa_flash": _peer("sdpa_flash"),
                                "flex": _peer("flex")}
for _name in ("ours", "sdpa_cudnn", "sdpa_flash"):
    BUILDERS[_name + "_graph"] = _graphed(BUILDERS[_name])


def build(builder: Builder, sets: list[tuple[torch.Tensor, ...]]) -> tuple[list[Fn], peers.Built]:
    """One call per input set, and the first set's first call (its output, its wall time, or the reason the
    provider cannot run: peers.build_fn), outside any timing."""
    fns: list[Fn] = []

    def make() -> Fn:
        fns.extend(builder(*s) for s in sets)
        return fns[0]

    built = peers.build_fn(make)
    return (fns if built.fn is not None else []), built


# --- measuring ---------------------------------------------------------------------------------

@dataclass
class Row:
    lk: int
    provider: str
    ms: float = float("nan")
    gbps: float = float("nan")
    of_copy: float = float("nan")
    first_s: float = float("nan")  # the first call's wall seconds (compiling, plans), not in ms
    err: float = float("nan")
    tol: float = float("nan")
    ok: bool | None = None  # None: not checked
    note: str = ""
    reason: str = ""
    config: dict = field(default_factory=dict)


def make_sets(shape: Shape, lk: int, dtype: torch.dtype, device: str, seed: int,
              max_sets: int | None = None) -> list[tuple[torch.Tensor, ...]]:
    """Enough independent (q, k, v) sets that together they exceed the last-level cache (at most
    ``max_sets``)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    kv_bytes = 2 * shape.b * shape.hkv * lk * shape.d * torch.empty((), dtype=dtype).element_size()
    n_sets = min(harness.input_sets_needed(kv_bytes), max_sets or math.inf)

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(size, generator=gen, device=device, dtype=dtype)

    return [(randn(shape.b, shape.hq, shape.lq, shape.d), randn(shape.b, shape.hkv, lk, shape.d),
             randn(shape.b, shape.hkv, lk, shape.d)) for _ in range(n_sets)]


def moved_bytes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    """K + V cache read, q read, out written (out has q's size at Dv = D)."""
    return (k.numel() + v.numel() + 2 * q.numel()) * q.element_size()


def copy_gbps(mib: int, warmup: float, rep: float) -> float:
    src = torch.empty(mib * 2**20, dtype=torch.uint8, device=harness.device()).random_()
    dst = torch.empty_like(src)
    ms = harness.time_ms([lambda: dst.copy_(src)], warmup, rep)
    return 2 * mib * 2**20 / (ms * 1e6)


def reference_error(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype,
                    temperature: str | None, is_causal: bool = False) -> tuple[float, float]:
    """(error, budget): the output against the float64 reference, the budget from the reference in
    ``dtype`` (infoscale_triton.testing). Causal rows are the cache's last Lq positions (bottom-right), as
    in decoding."""
    opts = {"enable_gqa": True, "is_causal": is_causal, "temperature": temperature,
            "train_len": N_TRAIN if temperature else None}
    ref64 = reference.scaled_dot_product_attention(q.double(), k.double(), v.double(), **opts)
    low = reference.scaled_dot_product_attention(q, k, v, **opts)
    c = testing.compare(out, ref64, low, dtype)
    return c.error, c.budget


def check(row: Row, out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype,
          temperature: str | None) -> None:
    """The provider's output against the float64 reference (and the reference in ``dtype`` for the budget)."""
    row.err, row.tol = reference_error(out, q, k, v, dtype, temperature)
    row.ok = testing.within_budget(row.err, row.tol)


def measure(name: str, sets: list, lk: int, copy: float, args: argparse.Namespace, do_check: bool,
            builder: Builder | None = None, config: dict | None = None) -> Row:
    """Build (BUILDERS[name] unless ``builder``), check if asked, time. ``name`` labels the row; what
    it computes is InfoScale unless it starts with ours_notemp."""
    row = Row(lk, name, config=config or {})
    fns, built = build(builder or BUILDERS[name], sets)
    row.note, row.reason, row.first_s = built.note, built.reason, built.first_s
    if not fns:
        return row
    if do_check:
        check(row, built.out, *sets[0], DTYPES[args.dtype], None if name.startswith("ours_notemp") else "infoscale")
    del built
    row.ms = harness.time_ms(fns, args.warmup, args.rep)
    row.gbps = moved_bytes(*sets[0]) / (row.ms * 1e6)
    row.of_copy = row.gbps / copy
    return row


def tuning_rows(sets: list, lk: int, copy: float, args: argparse.Namespace) -> list[Row]:
    """ours_notemp under --sweep configs and --splits counts (tuning's decode_config / num_splits)."""
    rows = []
    q = sets[0][0]
    rows_per_head = q.shape[1] // sets[0][1].shape[1] * q.shape[2]
    width = max(triton.next_power_of_2(q.shape[-1]), 16)
    base = decode_config(width, width, rows_per_head, q.element_size(), interpret=not torch.cuda.is_available())
    wrap = _graphed if args.graph else (lambda b: b)  # --graph: time the GPU alone
    tag = "_graph" if args.graph else ""
    for bn, stages, tma in SWEEP if args.sweep else []:
        cfg = dict(base, BLOCK_N=bn, num_stages=stages, TMA=tma)
        with tuning.override(decode_config=cfg):
            rows.append(measure(f"ours_notemp{tag}[BN={bn},s={stages},{'tma' if tma else 'ptr'}]", sets, lk,
                                copy, args, False, wrap(BUILDERS["ours_notemp"]), cfg))
    for splits in args.splits:
        rows.append(measure(f"ours_notemp{tag}[splits={splits}]", sets, lk, copy, args, False,
                            wrap(_ours(None, splits)), {"num_splits": splits}))
    return rows


# --- --short: the dense forward against the decode kernel on short caches -----------------------

@dataclass
class ShortRow:
    """One (B, Lq, Lk, temperature) point: microseconds per call of each launcher, eager and replayed
    from a CUDA graph, and each output's error against the float64 reference."""
    b: int
    lq: int
    lk: int
    temperature: str
    splits: int = 0  # decode_forward's split count (> 1: a second launch, the combine)
    dense_us: float = float("nan")
    decode_us: float = float("nan")
    dense_graph_us: float = float("nan")
    decode_graph_us: float = float("nan")
    dense_err: float = float("nan")
    decode_err: float = float("nan")
    tol: float = float("nan")
    ok: bool | None = None
    reason: str = ""


def short_problem(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, temperature: str | None) -> Problem:
    """The validated Problem that scaled_dot_product_attention would hand to either launcher."""
    return check_inputs(q, k, v, None, 0.0, True, None, True, temperature, N_TRAIN if temperature else None,
                        None, kernel=True)


def short_launchers(temperature: str | None) -> dict[str, Builder]:
    """Builders of the two launchers on one input set (validation outside the timed call)."""
    def dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Fn:
        p = short_problem(q, k, v, temperature)
        return lambda: forward.attention_forward(q, k, v, p)[0]

    def decoding(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Fn:
        p = short_problem(q, k, v, temperature)
        return lambda: splitkv.decode_forward(q, k, v, p)

    return {"dense": dense, "decode": decoding}


def decode_splits(q: torch.Tensor, p: Problem) -> int:
    """The split count decode_forward picks for this problem."""
    width, width_v = (max(triton.next_power_of_2(d), 16) for d in (p.head_dim, p.head_dim_v))
    return splitkv.split_plan(p, width, width_v, q.element_size(), q.device)[2]


def back_to_back_ms(fns: Sequence[Fn], warmup_ms: float, rep_ms: float) -> float:
    """Milliseconds per call of calls issued back to back (cycling over ``fns``) between two
    synchronisations: max(host launch cost, GPU time) per call, what an eager decoding loop pays.
    Median over 5 rounds of about ``rep_ms / 5`` each (one round on the CPU, where the interpreter's
    times mean nothing). (do_bench hides the host's cost: it flushes L2 before each call, and the host
    launches the call during the flush.)"""
    cycle = itertools.cycle(fns)
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rounds = 5 if cuda else 1

    def per_call(n: int) -> float:
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            next(cycle)()
        sync()
        return (time.perf_counter() - t0) * 1e3 / n

    estimate = per_call(3 if cuda else 1)
    if warmup_ms > 0:
        per_call(max(1, int(warmup_ms / estimate)))
    n = max(1, int(rep_ms / rounds / estimate))
    return statistics.median(per_call(n) for _ in range(rounds))


def measure_short(b: int, lq: int, lk: int, temperature: str | None, shape: Shape, args: argparse.Namespace,
                  seed: int) -> ShortRow:
    """Both launchers at one point: checked, timed eagerly and (CUDA only) as graph replays."""
    row = ShortRow(b, lq, lk, temperature or "none")
    dtype = DTYPES[args.dtype]
    sets = make_sets(Shape(b, shape.hkv, shape.hq, shape.d, lq), lk, dtype, harness.device(), seed,
                     SHORT_MAX_SETS)
    q, k, v = sets[0]
    row.splits = decode_splits(q, short_problem(q, k, v, temperature))
    errors, tols = {}, []
    for name, builder in short_launchers(temperature).items():
        fns, built = build(builder, sets)
        if not fns:
            row.reason = f"{name}: {built.reason}"
            return row
        errors[name], tol = reference_error(built.out, q, k, v, dtype, temperature, is_causal=True)
        tols.append(tol)
        setattr(row, f"{name}_us", 1e3 * back_to_back_ms(fns, args.warmup, args.rep))
        graphed, built = build(_graphed(builder), sets)
        if graphed:
            setattr(row, f"{name}_graph_us", 1e3 * harness.time_ms(graphed, args.warmup, args.rep))
        elif torch.cuda.is_available():  # (no graphs on the CPU: nothing to report there)
            row.reason = f"{name}_graph: {built.reason}"
        del fns, graphed, built
    row.dense_err, row.decode_err, row.tol = errors["dense"], errors["decode"], max(tols)
    row.ok = all(testing.within_budget(e, row.tol) for e in errors.values())
    return row


def suggested_threshold(rows: list[ShortRow], mode: str) -> str:
    """The smallest measured Lk from which decode is never slower than dense (within SHORT_TOLERANCE)
    at any measured point of that length or longer, in ``mode`` ("" eager, "_graph"); "1" when that is
    the shortest length measured (route every decoding call)."""
    if all(math.isnan(getattr(r, f"decode{mode}_us")) for r in rows):
        return "- (not measured)"
    lengths = sorted({r.lk for r in rows})
    slower = {r.lk for r in rows
              if not getattr(r, f"decode{mode}_us") <= (1 + SHORT_TOLERANCE) * getattr(r, f"dense{mode}_us")}
    from_lk = next((lk for lk in lengths if not any(s >= lk for s in slower)), None)
    if from_lk is None:
        return f"none measured (decode slower at {max(slower)})"
    return "1" if from_lk == lengths[0] else str(from_lk)


def short_table(rows: list[ShortRow], title: str) -> None:
    body = [[r.lk, r.splits, harness.fmt(r.dense_us, 1), harness.fmt(r.decode_us, 1),
             harness.fmt(r.dense_us / r.decode_us, 2), harness.fmt(r.dense_graph_us, 1),
             harness.fmt(r.decode_graph_us, 1), harness.fmt(r.dense_graph_us / r.decode_graph_us, 2),
             _err(r.dense_err) + ("" if r.ok is not False else "!"), _err(r.decode_err), r.reason] for r in rows]
    table(["Lk", "splits", "dense us", "decode us", "dense/decode", "dense graph us", "decode graph us",
           "graph dense/decode", "dense err", "decode err", "reason"], body, title)


def _err(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.1e}"


def main_short(args: argparse.Namespace) -> int:
    """--short: every (B, Lq, temperature) group over the lengths; a table per group, then the suggested
    tuning's decode_min_keys for eager calls and for graph replays."""
    grid = "smoke" if args.smoke else "full"
    shape = SMOKE if args.smoke else FULL
    shape_meta = {**asdict(shape), "b": list(SHORT_BATCHES[grid]), "lq": list(SHORT_QUERY_ROWS),
                  "causal": True, "max_sets": SHORT_MAX_SETS}
    out = harness.ResultsFile("bench_decode_short", args.out, settings(args, math.nan, shape_meta))
    rows: list[ShortRow] = []
    groups = itertools.product(SHORT_BATCHES[grid], SHORT_QUERY_ROWS, SHORT_TEMPERATURES)
    for i, (b, lq, temperature) in enumerate(groups):
        group = [measure_short(b, lq, lk, temperature, shape, args, args.seed + 100 * i + j)
                 for j, lk in enumerate(args.lk)]
        rows += group
        short_table(group, f"B={b} Hkv={shape.hkv} Hq={shape.hq} D={shape.d} Lq={lq} causal, "
                           f"temperature={temperature}, {args.dtype}" + INTERPRETER_NOTE)
        harness.free_memory()
        out.write([asdict(r) for r in rows])  # rewritten after every group: a cut run keeps its rows
    for mode, what in (("", "eager (back-to-back calls)"), ("_graph", "graph replays (GPU time)")):
        print(f"decode no slower than dense (within {SHORT_TOLERANCE:.0%}) from Lk = "
              f"{suggested_threshold(rows, mode)}: {what}")
    print(f"\nresults: {out.json_path}, {out.csv_path}")
    return 1 if any(r.ok is False or r.reason for r in rows) else 0


# --- output ------------------------------------------------------------------------------------

INTERPRETER_NOTE = "" if harness.on_gpu() else " (Triton INTERPRETER on CPU: the times say nothing about GPU speed)"


def settings(args: argparse.Namespace, copy: float, shape: dict) -> dict:
    """The results' metadata: the harness's and this run's options."""
    return harness.metadata(dtype=args.dtype, shape=shape, copy_gbps=copy, copy_mib=args.copy_mib,
                            warmup_ms=args.warmup, rep_ms=args.rep,
                            first_s="wall time of the first call (compiling, plans), not in ms")


def print_table(rows: list[Row], title: str) -> None:
    gpu = harness.on_gpu()
    body = [[r.lk, r.provider + ("" if r.ok is not False else " !"), harness.fmt(r.ms * 1e3, 1)]
            + ([harness.fmt(r.gbps, 0), harness.fmt(100 * r.of_copy, 1), harness.fmt(r.first_s, 1)] if gpu else [])
            + [_err(r.err), r.reason or r.note] for r in rows]
    headers = ["Lk", "provider", "us"] + (["GB/s", "% copy", "first call s"] if gpu else []) + ["rel err",
                                                                                                "note / reason"]
    table(headers, body, title)


def main(argv: Sequence[str] | None = None) -> int:
    code = harness.ensure_backend()
    if code is not None:
        return code
    args = parse_args(argv)
    shape = SMOKE if args.smoke else FULL
    if not harness.on_gpu() and not args.smoke:
        print("no CUDA device: run with --smoke to test the script through the Triton interpreter")
        return 2
    if args.short:
        return main_short(args)
    dtype = DTYPES[args.dtype]
    copy = copy_gbps(args.copy_mib, args.warmup, args.rep)
    harness.free_memory()  # the copy buffers
    if harness.on_gpu():
        print(f"copy bandwidth ({args.copy_mib} MiB, read + write): {copy:.0f} GB/s", flush=True)
    out = harness.ResultsFile("bench_decode", args.out, settings(args, copy, asdict(shape)))
    rows: list[Row] = []
    failed = False
    for i, lk in enumerate(args.lk):
        sets = make_sets(shape, lk, dtype, harness.device(), args.seed + i)
        point = [measure(name, sets, lk, copy, args, args.check_all or i == 0) for name in args.providers]
        point += tuning_rows(sets, lk, copy, args)
        failed |= any(r.ok is False or r.reason for r in point if r.provider in ("ours", "ours_notemp"))
        rows += point
        print_table(point, f"B={shape.b} Hkv={shape.hkv} Hq={shape.hq} D={shape.d} Lq={shape.lq} Lk={lk} "
                           f"{args.dtype}" + INTERPRETER_NOTE)
        del sets
        harness.free_memory()
        out.write([asdict(r) for r in rows])  # rewritten after every length: a cut run keeps its rows
    print(f"\nresults: {out.json_path}, {out.csv_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
