"""Time every candidate launch config of the forward or the backward kernels (tuning aid, GPU).

Usage: python benchmarks/sweep_configs.py [--pass fwd|bwd] [--d 64 128 256] [--n 4096 16384] [--out DIR]
       [--shard I/N] [--compile-only]
Prints one line per (pass, D, N, causal, mode, kernel) with TFLOP/s per config; the results (one record
per config and point, the harness's schema) go to sweep_configs_<UTC>.json / .csv under --out (default
benchmarks/results/).

``--pass bwd`` times the backward alone (``autograd.grad`` of a kept forward, 2.5 forward FLOPs) and
varies one backward kernel at a time, the other at the shipped config: ``dkdv`` (the key-block kernel:
BLOCK_N resident keys, BLOCK_M streamed queries) and ``dq`` (the other way round).

Compiling dominates a cold sweep (several seconds per variant). ``--compile-only`` with ``--shard I/N``
compiles the I-th of N shares of the configs on small inputs without timing anything; N such processes
side by side fill Triton's on-disk cache (same TRITON_CACHE_DIR), and the timed run that follows finds
every kernel compiled.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys
from pathlib import Path

import torch

import infoscale_triton as it
from infoscale_triton import tuning
from infoscale_triton.cli import harness
from infoscale_triton.kernels.attention_bwd import bwd_config

MODES = {
    "none": {},
    "info": {"temperature": "infoscale", "train_len": 512},
    "cos": {"temperature": "infoscale", "train_len": 512, "cos_scale": 32.0},
}
TOKENS, WIDTH = 16384, 2048  # B * N and H * D of every point (the anchors' grid)
SMALL_N = 512  # --compile-only inputs: lengths are not specialised, so these compile what N does


def fwd_candidates(d: int, stages: list[int] | None = None, warp_spec: bool = False) -> list[dict]:
    tiles = [(64, 32), (64, 64), (128, 32), (128, 64)] if d > 128 else [(64, 64), (64, 128), (128, 64), (128, 128)]
    stages = stages or ((1, 2, 3) if d > 128 else (2, 3, 4))
    return [{"BLOCK_M": bm, "BLOCK_N": bn, "WARP_SPEC": warp_spec, "num_warps": w, "num_stages": s}
            for (bm, bn), w, s in itertools.product(tiles, (4, 8), stages)
            if not (w == 8 and bm * bn < 128 * 64)]


def bwd_candidates(d: int, kernel: str, stages: list[int] | None = None) -> list[dict]:
    """Block shapes as (resident, streamed) rows of the kernel: dkdv keeps BLOCK_N keys and streams
    BLOCK_M queries, dq the other way round."""
    if d > 128:
        pairs, default_stages = [(32, 32), (64, 32), (32, 64), (64, 64)], (1, 2)
    else:
        pairs, default_stages = [(64, 64), (128, 64), (128, 32), (64, 128), (128, 128)], (2, 3)
    stages = stages or default_stages
    out = []
    for (resident, streamed), w, s in itertools.product(pairs, (4, 8), stages):
        bm, bn = (streamed, resident) if kernel == "dkdv" else (resident, streamed)
        out.append({"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": s})
    return out


def config_name(cfg: dict) -> str:
    return f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}w{cfg['num_warps']}s{cfg['num_stages']}" + \
        ("ws" if cfg.get("WARP_SPEC") else "")


def points(a: argparse.Namespace) -> list[tuple]:
    """(d, causal, mode, kernel, config) in a fixed order (the shards split it)."""
    out = []
    for d, causal, mode in itertools.product(a.d, a.causal, a.modes):
        if a.pass_ == "fwd":
            out += [(d, causal, mode, "fwd", c) for c in fwd_candidates(d, a.stages, a.warp_spec)]
        else:
            out += [(d, causal, mode, kernel, c) for kernel in a.kernels for c in bwd_candidates(d, kernel, a.stages)]
    return out


def settings(d: int, kernel: str, cfg: dict) -> dict:
    if kernel == "fwd":
        return {"forward_config": cfg}
    dkdv, dq = bwd_config(d, d, 2, False)
    return {"backward_configs": (cfg, dq) if kernel == "dkdv" else (dkdv, cfg)}


def make_calls(d: int, n: int, causal: int, mode: str, pass_: str, n_sets: int) -> list:
    h, b = WIDTH // d, max(TOKENS // n, 1)
    opts = {"is_causal": bool(causal), **MODES[mode]}
    calls = []
    for _ in range(n_sets):
        q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=pass_ == "bwd")
                   for _ in range(3))
        if pass_ == "fwd":
            calls.append(functools.partial(it.scaled_dot_product_attention, q, k, v, **opts))
        else:
            calls.append(_backward_call(q, k, v, opts))
    return calls


def _backward_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, opts: dict):
    """The backward alone, of one forward kept for the sweep (retain_graph): the backward's launch
    plans follow the tuning settings in force at each call."""
    out = it.scaled_dot_product_attention(q, k, v, **opts)
    dout = torch.randn_like(out)
    return functools.partial(torch.autograd.grad, out, (q, k, v), dout, retain_graph=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pass", dest="pass_", choices=("fwd", "bwd"), default="fwd")
    ap.add_argument("--d", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--n", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--causal", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--modes", nargs="+", default=["info"], choices=list(MODES))
    ap.add_argument("--stages", type=int, nargs="+", default=None, help="num_stages candidates (default per D)")
    ap.add_argument("--warp-spec", action="store_true", help="forward candidates with tl.range(warp_specialize)")
    ap.add_argument("--kernels", nargs="+", default=["dkdv", "dq"], choices=("dkdv", "dq"),
                    help="the backward kernels to vary")
    ap.add_argument("--shard", default="0/1", help="I/N: the I-th of N shares of the configs")
    ap.add_argument("--compile-only", action="store_true")
    ap.add_argument("--warmup", type=float, default=25.0)
    ap.add_argument("--rep", type=float, default=100.0)
    ap.add_argument("--out", type=Path, default=None, help="results directory (default benchmarks/results/)")
    a = ap.parse_args()
    if not harness.on_gpu():
        print("sweep_configs times compiled kernels: it needs a CUDA GPU", file=sys.stderr)
        return 2
    index, shares = (int(x) for x in a.shard.split("/"))
    todo = [pt for i, pt in enumerate(points(a)) if i % shares == index]
    if a.compile_only:
        for d, causal, mode, kernel, cfg in todo:
            calls = make_calls(d, SMALL_N, causal, mode, a.pass_, 1)
            with tuning.override(**settings(d, kernel, cfg)):
                first, why = harness.attempt(functools.partial(harness.first_call, calls[0]))
            print(f"compiled {a.pass_} D={d} causal={causal} {mode} {kernel} {config_name(cfg)}: "
                  f"{'%.1f s' % first[1] if first else why.split(':')[0]}", flush=True)
        return 0
    out = harness.ResultsFile(f"sweep_configs_{a.pass_}", harness.results_dir(a.out, smoke=False),
                              harness.metadata(warmup_ms=a.warmup, rep_ms=a.rep))
    flop_pass = 1.0 if a.pass_ == "fwd" else 2.5
    for (d, causal, mode), group in itertools.groupby(todo, key=lambda pt: pt[:3]):
        group = list(group)
        for n in a.n:
            h, b = WIDTH // d, max(TOKENS // n, 1)
            n_sets = harness.input_sets_needed(3 * b * h * n * d * 2)
            calls = make_calls(d, n, causal, mode, a.pass_, n_sets)
            flops = harness.attention_flops(b, h, n, n, d, bool(causal)) * flop_pass
            res: dict[str, dict] = {}
            for _, _, _, kernel, cfg in group:
                name = config_name(cfg)
                rec = {"pass": a.pass_, "kernel": kernel, "D": d, "N": n, "B": b, "H": h, "causal": causal,
                       "mode": mode, "config": name, **cfg, "ms": None, "tflops": None, "reason": ""}
                with tuning.override(**settings(d, kernel, cfg)):
                    first, rec["reason"] = harness.attempt(functools.partial(harness.first_call, calls[0]))
                    if first is not None:  # out of resources, compile failure: recorded, the sweep goes on
                        ms, rec["reason"] = harness.attempt(functools.partial(harness.time_ms, calls, a.warmup, a.rep))
                        if ms is not None:
                            rec.update(ms=ms, first_s=first[1], tflops=flops / ms / 1e9)
                res.setdefault(kernel, {})[name] = round(rec["tflops"], 1) if rec["tflops"] else \
                    rec["reason"].split(":")[0]
                out.add(rec)
            for kernel, row in res.items():
                measured = [(v, k) for k, v in row.items() if isinstance(v, float)]
                best = max(measured) if measured else (float("nan"), "none")
                print(f"{a.pass_} D={d} N={n} causal={causal} {mode} {kernel}: best {best[1]} {best[0]:.0f} | "
                      f"{json.dumps(row)}", flush=True)
            calls = None
            harness.free_memory()
    print(f"wrote {out.json_path}, {out.csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
