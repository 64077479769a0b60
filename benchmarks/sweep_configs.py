"""Time every candidate launch config of the forward kernel on the benchmark grid (tuning aid).

Usage (GPU): python benchmarks/sweep_configs.py --out results/ [--d 64 128] [--n 4096 16384]
Prints one line per (D, N, causal, mode) with TFLOP/s per config, and writes sweep.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os

import torch
import triton

import infoscale_triton as it
from infoscale_triton import tuning

MODES = {
    "none": {},
    "info": {"temperature": "infoscale", "train_len": 512},
    "cos": {"temperature": "infoscale", "train_len": 512, "cos_scale": 32.0},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--d", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--n", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--causal", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--modes", nargs="+", default=list(MODES))
    ap.add_argument("--bm", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--bn", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--ws", type=int, nargs="+", default=[0])
    ap.add_argument("--out", default="results")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    rows = []
    for d, n, causal in itertools.product(a.d, a.n, a.causal):
        h, b = 2048 // d, 16384 // n
        sets = [[torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3)] for _ in range(2)]
        flops = 4 * b * h * n * n * d / (2 if causal else 1)
        for mode in a.modes:
            res = {}
            for bm, bn, w, s, ws in itertools.product(a.bm, a.bn, a.warps, a.stages, a.ws):
                if bm * bn < 128 * 128 and w == 8:
                    continue
                cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "WARP_SPEC": bool(ws), "num_warps": w, "num_stages": s}

                def run() -> None:
                    for q, k, v in sets:
                        it.scaled_dot_product_attention(q, k, v, is_causal=bool(causal), **MODES[mode])

                name = f"{bm}x{bn}w{w}s{s}" + ("ws" if ws else "")
                try:
                    with tuning.override(forward_config=cfg):
                        ms = triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median") / len(sets)
                    res[name] = round(flops / ms / 1e9, 1)
                except Exception as e:  # out of resources, compile failure: record and go on
                    res[name] = f"{type(e).__name__}"
            best = max((v, k) for k, v in res.items() if isinstance(v, float))
            print(f"D={d} N={n} causal={causal} {mode}: best {best[1]} {best[0]:.0f} | {json.dumps(res)}",
                  flush=True)
            rows.append({"D": d, "N": n, "causal": causal, "mode": mode, **res})
        del sets
        torch.cuda.empty_cache()
    with open(os.path.join(a.out, "sweep.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
