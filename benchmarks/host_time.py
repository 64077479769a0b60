#!/usr/bin/env python
"""Host time of eager calls (issue 13): ours against SDPA's cuDNN backend, and our CUDA-graph replays.

Points (bf16, one process, about a minute on an H200 with compiles):
  decode 4k / 32k  B=1, Hq=32, Hkv=8, D=128, one query row, a full cache of 4096 / 32768 keys, InfoScale
                   (train_len 4096): ours = infoscale_triton.decode_attention(..., temperature="infoscale");
                   cudnn = F.scaled_dot_product_attention under sdpa_kernel(CUDNN_ATTENTION) on q * t_i
                   (enable_gqa=True), as benchmarks/bench_decode.py's peer
  dense 256        B=1, H=16, L=256, D=128, causal, no temperature: ours =
                   infoscale_triton.scaled_dot_product_attention; cudnn = SDPA's cuDNN backend
  decode 4k growing  the decode point with a cache one key longer at every call (a new contiguous cache
                   each, as transformers' dynamic cache in generate()): every call a new shape; adds
                   sdpa = F.scaled_dot_product_attention's own backend choice (eager_us, host_us only)

Columns, microseconds per call:
  eager   calls issued back to back between two synchronisations: max(host cost, GPU time) per call,
          what an eager decoding loop pays (inputs rotate over enough sets to exceed L2)
  bench   triton.testing.do_bench median: how the anchors file measured "eager" (its L2 flush before each
          call hides part of the host cost)
  host    the host alone: wall time of one call with the GPU idle before it (no synchronisation inside)
  graph   do_bench of a CUDA-graph replay of the call: the GPU time (ours only, and cuDNN's for reference)
Ratios: ours / cudnn per column. --stages adds our host time split into validation, launch plan and
launches (the same call with parts skipped).

Without CUDA, --cpu-stub runs the same calls on CPU tensors through the interpreter's validation with
the kernels' launches replaced by no-ops: the Python host path alone (what benchmarks/NOTES.md
"Host path" reports for this machine), a stage breakdown, and no GPU numbers.

Results (the harness, infoscale_triton/cli/harness.py: metadata, one record per point and provider and
per stage, the ours / cudnn ratios as a summary): markdown tables on stdout and host_time_<time>.json /
.csv under --out (default benchmarks/results/; --cpu-stub runs: a temporary directory).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

import infoscale_triton
from infoscale_triton import decode, launch, splitkv
from infoscale_triton.cli import harness, peers
from infoscale_triton.cli.console import table
from infoscale_triton.temperature import TemperatureSpec, row_temperature

N_TRAIN = 4096
BENCH_WARMUP_MS, BENCH_REP_MS = 25, 200  # the "bench" and "graph" columns' do_bench
Fn = Callable[[], object]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lk", type=int, nargs="+", default=[4096, 32768], help="decode cache lengths")
    ap.add_argument("--dense-len", type=int, default=256, help="L of the small dense forward")
    ap.add_argument("--calls", type=int, default=400, help="calls per eager / host measurement")
    ap.add_argument("--stages", action="store_true", help="also split our host time into stages")
    ap.add_argument("--growing", type=int, default=128,
                    help="cache lengths of the growing-cache point (from the first --lk on)")
    ap.add_argument("--cpu-stub", action="store_true", help="no GPU: time the host path with no-op launches")
    ap.add_argument("--out", type=Path, default=None,
                    help="results directory (default benchmarks/results/; --cpu-stub: a temporary directory)")
    return ap.parse_args(argv)


# --- inputs and calls ------------------------------------------------------------------------------

def decode_calls(lk: int, device: str, dtype: torch.dtype) -> dict[str, list[Fn]]:
    b, hq, hkv, d = 1, 32, 8, 128
    n_sets = harness.input_sets_needed(2 * b * hkv * lk * d * 2)
    sets = [(torch.randn(b, hq, 1, d, device=device, dtype=dtype), torch.randn(b, hkv, lk, d, device=device, dtype=dtype),
             torch.randn(b, hkv, lk, d, device=device, dtype=dtype)) for _ in range(n_sets)]
    t = row_temperature(torch.tensor([float(lk)], dtype=torch.float64), TemperatureSpec.parse("infoscale"), N_TRAIN,
                        d).to(device=device, dtype=dtype)
    calls: dict[str, list[Fn]] = {
        "ours": [lambda s=s: infoscale_triton.decode_attention(*s, temperature="infoscale", train_len=N_TRAIN)
                 for s in sets]}
    if device == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def cudnn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(q * t, k, v, enable_gqa=True)

        calls["cudnn"] = [lambda s=s: cudnn(*s) for s in sets]
    return calls


def dense_calls(length: int, device: str, dtype: torch.dtype) -> dict[str, list[Fn]]:
    sets = [tuple(torch.randn(1, 16, length, 128, device=device, dtype=dtype) for _ in range(3)) for _ in range(4)]
    calls: dict[str, list[Fn]] = {
        "ours": [lambda s=s: infoscale_triton.scaled_dot_product_attention(*s, is_causal=True) for s in sets]}
    if device == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def cudnn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        calls["cudnn"] = [lambda s=s: cudnn(*s) for s in sets]
    return calls


# --- timing (the harness's: microseconds) ---------------------------------------------------------

def measure(point: str, calls: dict[str, list[Fn]], args: argparse.Namespace) -> list[dict]:
    rows = []
    for provider, fns in calls.items():
        for fn in fns:
            fn()  # compile, plans, cuDNN graphs: outside the timing
        harness.synchronize()
        row = {"point": point, "provider": provider, "host_us": 1e3 * harness.host_ms(fns, args.calls),
               "eager_us": 1e3 * harness.eager_ms(fns, args.calls)}
        if harness.on_gpu():
            row["bench_us"] = 1e3 * harness.time_ms(fns, BENCH_WARMUP_MS, BENCH_REP_MS)
            row["graph_us"] = 1e3 * harness.time_ms([peers.graphed(fns[0])], BENCH_WARMUP_MS, BENCH_REP_MS)
        rows.append(row)
    return rows


def growing(lk: int, steps: int, device: str, dtype: torch.dtype) -> list[dict]:
    """Decoding with a growing cache, as generate() with transformers' dynamic cache runs: each call gets a
    new contiguous cache one key longer (lk, lk + 1, ...), so every call is a new shape (for ours a new
    launch plan; Triton's compiled kernels are reused). Back-to-back calls (eager_us) and the host alone
    (host_us), each over ``steps`` lengths never seen before in that round (our per-length plans are
    dropped between rounds)."""
    b, hq, hkv, d = 1, 32, 8, 128
    q = torch.randn(b, hq, 1, d, device=device, dtype=dtype)
    caches = [(torch.randn(b, hkv, lk + i, d, device=device, dtype=dtype),
               torch.randn(b, hkv, lk + i, d, device=device, dtype=dtype)) for i in range(steps)]
    t = {n: row_temperature(torch.tensor([float(n)], dtype=torch.float64), TemperatureSpec.parse("infoscale"),
                            N_TRAIN, d).to(device=device, dtype=dtype) for n in range(lk, lk + steps)}
    calls: dict[str, Callable[[int], object]] = {
        "ours": lambda i: infoscale_triton.decode_attention(q, *caches[i], temperature="infoscale",
                                                             train_len=N_TRAIN)}
    if device == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def cudnn(i: int) -> torch.Tensor:
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(q * t[lk + i], *caches[i], enable_gqa=True)

        calls["cudnn"] = cudnn
        calls["sdpa"] = lambda i: F.scaled_dot_product_attention(q * t[lk + i], *caches[i], enable_gqa=True)
    rows = []
    for provider, fn in calls.items():
        fns = [functools.partial(fn, i) for i in range(steps)]  # one call per length, in order
        eager, host = [], []
        for r in range(4):  # round 0: compiles and warms up
            splitkv._PLANS.plans.clear()
            eager.append(1e3 * harness.eager_ms(fns, steps, rounds=1))
            splitkv._PLANS.plans.clear()
            host.append(1e3 * harness.host_ms(fns, steps))
        rows.append({"point": f"decode {lk // 1024}k growing", "provider": provider,
                     "eager_us": statistics.median(eager[1:]), "host_us": statistics.median(host[1:])})
    return rows


# --- stages ----------------------------------------------------------------------------------------

def stages(lk: int, device: str, dtype: torch.dtype, calls: int) -> list[dict]:
    """Our decode call's host time by stage, each measured as host_us of a call that stops there."""
    q = torch.randn(1, 32, 1, 128, device=device, dtype=dtype)
    k, v = (torch.randn(1, 8, lk, 128, device=device, dtype=dtype) for _ in range(2))
    opts = {"temperature": "infoscale", "train_len": N_TRAIN}
    p = decode.check_decode_inputs(q, k, v, None, True, None, "infoscale", N_TRAIN, None, None)
    parts: dict[str, Fn] = {
        "public call": lambda: infoscale_triton.decode_attention(q, k, v, **opts),
        "validation only": lambda: decode.check_decode_inputs(q, k, v, None, True, None, "infoscale", N_TRAIN, None,
                                                              None),
        "launcher (validated problem)": lambda: splitkv.decode_forward(q, k, v, p),
    }
    splitkv.decode_forward(q, k, v, p)
    key = next(reversed(splitkv._PLANS.plans))
    plan = splitkv._PLANS.plans[key]
    out = torch.empty_like(q)
    lengths = temperature = launch.dummy(q.device)
    if plan.combine is not None:
        acc, maxima, sums = launch.workspace(plan.workspace, q.device)
        parts["split launch alone"] = lambda: plan.split(q, k, v, out, acc, maxima, sums, lengths, temperature)
        parts["combine launch alone"] = lambda: plan.combine(acc, maxima, sums, out)
    else:
        parts["split launch alone (direct)"] = lambda: plan.split(q, k, v, out, lengths, lengths, lengths, lengths,
                                                                  temperature)
    parts["torch.empty (the output)"] = lambda: torch.empty_like(q)
    rows = []
    for name, fn in parts.items():
        fn()
        rows.append({"point": f"decode {lk // 1024}k", "provider": "ours", "stage": name,
                     "host_us": 1e3 * harness.host_ms([fn], calls)})
    return rows


# --- the CPU stand-in ------------------------------------------------------------------------------

def stub_launches() -> None:
    """Every kernel launch a no-op that returns a compiled-kernel stand-in, so that the Launch records
    take their fast path as on the GPU (minus Triton's C launcher)."""
    from triton.compiler import CompiledKernel

    class Stub(CompiledKernel):
        def __init__(self) -> None:
            self.function, self.packed_metadata = 0, None
            self._run = lambda *args: None

    stub = Stub()
    launch.Variant.launch = lambda self, grid, args: stub  # type: ignore[method-assign]
    launch._get_stream = lambda index: 0

    def on_cpu_as_cuda(self: launch.Launch, variant: launch.Variant, grid: tuple, scalars: tuple,
                       device: torch.device, _init=launch.Launch.__init__) -> None:
        _init(self, variant, grid, scalars, torch.device("cuda", 0))  # (a device index: the fast path's stream)

    launch.Launch.__init__ = on_cpu_as_cuda  # type: ignore[method-assign]
    kept: dict = {}

    def workspace(sizes: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
        if sizes not in kept:  # (reused per stream, as on the GPU; the CPU's rule makes new ones)
            kept[sizes] = launch._carve(sizes, device)
        return kept[sizes]

    launch.workspace = splitkv.workspace = workspace


# --- main ------------------------------------------------------------------------------------------

def cells(rows: list[dict], columns: Sequence[str]) -> list[list[str]]:
    return [[r["point"], r["provider"], *(harness.fmt(r.get(c), 1) for c in columns)] for r in rows]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available() and not args.cpu_stub:
        print("no CUDA device: pass --cpu-stub to time the host path with no-op launches", file=sys.stderr)
        return 2
    code = harness.ensure_backend(interpret=args.cpu_stub)  # --cpu-stub: the interpreter's validation
    if code is not None:
        return code
    gpu = harness.on_gpu()
    if not gpu:
        stub_launches()
    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float16)
    meta = harness.metadata(lk=args.lk, dense_len=args.dense_len, calls=args.calls, growing=args.growing,
                            stages=args.stages, cpu_stub=not gpu, train_len=N_TRAIN, dtype=str(dtype),
                            bench_warmup_ms=BENCH_WARMUP_MS, bench_rep_ms=BENCH_REP_MS)
    out = harness.ResultsFile("host_time", harness.results_dir(args.out, smoke=not gpu), meta)
    with torch.no_grad():
        for lk in args.lk:
            out.add(*measure(f"decode {lk // 1024}k", decode_calls(lk, device, dtype), args))
            torch.cuda.empty_cache() if gpu else None
        out.add(*measure(f"dense {args.dense_len}", dense_calls(args.dense_len, device, dtype), args))
        out.add(*growing(args.lk[0], args.growing, device, dtype))
        if args.stages or not gpu:
            for lk in args.lk:
                out.add(*stages(lk, device, dtype, args.calls))
    rows = [r for r in out.records if "stage" not in r]
    stage_rows = [r for r in out.records if "stage" in r]
    columns = ["eager_us", "bench_us", "host_us", "graph_us"] if gpu else ["host_us"]
    table(["point", "provider", *columns], cells(rows, columns), markdown=True)
    ratios = {}
    for point in dict.fromkeys(r["point"] for r in rows):
        ours = next(r for r in rows if r["point"] == point and r["provider"] == "ours")
        peer = next((r for r in rows if r["point"] == point and r["provider"] == "cudnn"), None)
        if peer:
            ratios[point] = {c: ours[c] / peer[c] for c in columns if c in ours and c in peer}
            print(f"{point}: ours / cudnn " + ", ".join(f"{c} {v:.2f}" for c, v in ratios[point].items()))
    if stage_rows:
        table(["point", "stage", "host_us"], [[r["point"], r["stage"], harness.fmt(r["host_us"], 1)]
                                              for r in stage_rows], markdown=True)
    out.write(ratios=ratios)
    print(f"wrote {out.json_path}, {out.csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
