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

Results: a table on stdout and host_time_<time>.json under --out (default ./results-host-time).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

import torch

CPU_STUB = "--cpu-stub" in sys.argv
if CPU_STUB or not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch.nn.functional as F

import infoscale_triton
from infoscale_triton import decode, launch, splitkv
from infoscale_triton.temperature import TemperatureSpec, row_temperature

N_TRAIN = 4096
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
    ap.add_argument("--out", default="results-host-time", help="directory for the JSON")
    return ap.parse_args(argv)


# --- inputs and calls ------------------------------------------------------------------------------

def _sets_needed(set_bytes: int) -> int:
    l2 = torch.cuda.get_device_properties(0).L2_cache_size if torch.cuda.is_available() and not CPU_STUB else 0
    return max(2, l2 // max(set_bytes, 1) + 1)


def decode_calls(lk: int, device: str, dtype: torch.dtype) -> dict[str, list[Fn]]:
    b, hq, hkv, d = 1, 32, 8, 128
    n_sets = _sets_needed(2 * b * hkv * lk * d * 2)
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


# --- timing ----------------------------------------------------------------------------------------

def _sync() -> None:
    if torch.cuda.is_available() and not CPU_STUB:
        torch.cuda.synchronize()


def eager_us(fns: list[Fn], calls: int) -> float:
    """Back-to-back calls between two synchronisations, median of 5 rounds."""
    rounds = []
    for _ in range(5):
        _sync()
        t0 = time.perf_counter()
        for i in range(calls):
            fns[i % len(fns)]()
        _sync()
        rounds.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(rounds)


def host_us(fns: list[Fn], calls: int) -> float:
    """One call at a time with the GPU idle before it: the host's own time, median."""
    times = []
    for i in range(calls):
        _sync()
        t0 = time.perf_counter()
        fns[i % len(fns)]()
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def bench_us(fn: Fn) -> float:
    import triton.testing

    return 1e3 * float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))


def graph_us(fn: Fn) -> float:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return bench_us(graph.replay)


def _cycle(fns: list[Fn]) -> Fn:
    state = {"i": 0}

    def step() -> None:
        state["i"] += 1
        fns[state["i"] % len(fns)]()
    return step


def measure(point: str, calls: dict[str, list[Fn]], args: argparse.Namespace) -> list[dict]:
    rows = []
    gpu = torch.cuda.is_available() and not CPU_STUB
    for provider, fns in calls.items():
        for fn in fns:
            fn()  # compile, plans, cuDNN graphs: outside the timing
        _sync()
        row = {"point": point, "provider": provider, "host_us": host_us(fns, args.calls),
               "eager_us": eager_us(fns, args.calls)}
        if gpu:
            row["bench_us"] = bench_us(_cycle(fns))
            row["graph_us"] = graph_us(fns[0])
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
        eager, host = [], []
        for r in range(4):  # round 0: compiles and warms up
            splitkv._PLANS.plans.clear()
            _sync()
            t0 = time.perf_counter()
            for i in range(steps):
                fn(i)
            _sync()
            eager.append((time.perf_counter() - t0) / steps * 1e6)
            splitkv._PLANS.plans.clear()
            times = []
            for i in range(steps):
                _sync()
                t0 = time.perf_counter()
                fn(i)
                times.append((time.perf_counter() - t0) * 1e6)
            host.append(statistics.median(times))
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
        rows.append({"point": f"decode {lk // 1024}k", "stage": name, "host_us": host_us([fn], calls)})
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

def table(rows: list[dict], columns: Sequence[str]) -> str:
    lines = ["| point | provider | " + " | ".join(columns) + " |", "|---" * (len(columns) + 2) + "|"]
    for r in rows:
        cells = [f"{r[c]:.1f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in columns]
        lines.append(f"| {r['point']} | {r['provider']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    gpu = torch.cuda.is_available() and not args.cpu_stub
    if not gpu:
        if not args.cpu_stub:
            print("no CUDA device: pass --cpu-stub to time the host path with no-op launches", file=sys.stderr)
            return 2
        stub_launches()
    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float16)
    rows = []
    with torch.no_grad():
        for lk in args.lk:
            rows += measure(f"decode {lk // 1024}k", decode_calls(lk, device, dtype), args)
            torch.cuda.empty_cache() if gpu else None
        rows += measure(f"dense {args.dense_len}", dense_calls(args.dense_len, device, dtype), args)
        rows += growing(args.lk[0], args.growing, device, dtype)
        stage_rows = [r for lk in args.lk for r in stages(lk, device, dtype, args.calls)] \
            if args.stages or not gpu else []
    columns = ["eager_us", "bench_us", "host_us", "graph_us"] if gpu else ["host_us"]
    print(table(rows, columns))
    ratios = {}
    for point in dict.fromkeys(r["point"] for r in rows):
        ours = next(r for r in rows if r["point"] == point and r["provider"] == "ours")
        peer = next((r for r in rows if r["point"] == point and r["provider"] == "cudnn"), None)
        if peer:
            ratios[point] = {c: ours[c] / peer[c] for c in columns if c in ours and c in peer}
            print(f"{point}: ours / cudnn " + ", ".join(f"{c} {v:.2f}" for c, v in ratios[point].items()))
    if stage_rows:
        print("\n| point | stage | host_us |\n|---|---|---|")
        for r in stage_rows:
            print(f"| {r['point']} | {r['stage']} | {r['host_us']:.1f} |")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = out_dir / f"host_time_{stamp}.json"
    meta = {"device": torch.cuda.get_device_name(0) if gpu else "cpu (stubbed launches)", "torch": torch.__version__,
            "time": stamp, "cpu_stub": not gpu}
    path.write_text(json.dumps({"meta": meta, "rows": rows, "ratios": ratios, "stages": stage_rows}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
