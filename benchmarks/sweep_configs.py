"""Time every candidate launch config of the forward kernel on the benchmark grid (tuning aid, GPU).

Usage: python benchmarks/sweep_configs.py [--out DIR] [--d 64 128] [--n 4096 16384]
Prints one line per (D, N, causal, mode) with TFLOP/s per config; the results (one record per config and
point, the harness's schema) go to sweep_configs_<UTC>.json / .csv under --out (default
benchmarks/results/).
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

MODES = {
    "none": {},
    "info": {"temperature": "infoscale", "train_len": 512},
    "cos": {"temperature": "infoscale", "train_len": 512, "cos_scale": 32.0},
}


def main() -> int:
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
    ap.add_argument("--warmup", type=float, default=25.0)
    ap.add_argument("--rep", type=float, default=100.0)
    ap.add_argument("--out", type=Path, default=None, help="results directory (default benchmarks/results/)")
    a = ap.parse_args()
    if not harness.on_gpu():
        print("sweep_configs times compiled kernels: it needs a CUDA GPU", file=sys.stderr)
        return 2
    out = harness.ResultsFile("sweep_configs", harness.results_dir(a.out, smoke=False),
                              harness.metadata(warmup_ms=a.warmup, rep_ms=a.rep))
    for d, n, causal in itertools.product(a.d, a.n, a.causal):
        h, b = 2048 // d, 16384 // n
        n_sets = harness.input_sets_needed(3 * b * h * n * d * 2)
        sets = [[torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
                for _ in range(n_sets)]
        flops = harness.attention_flops(b, h, n, n, d, bool(causal))
        for mode in a.modes:
            res = {}
            for bm, bn, w, s, ws in itertools.product(a.bm, a.bn, a.warps, a.stages, a.ws):
                if bm * bn < 128 * 128 and w == 8:
                    continue
                cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "WARP_SPEC": bool(ws), "num_warps": w, "num_stages": s}
                opts = {"is_causal": bool(causal), **MODES[mode]}
                calls = [functools.partial(it.scaled_dot_product_attention, q, k, v, **opts)
                         for q, k, v in sets]
                name = f"{bm}x{bn}w{w}s{s}" + ("ws" if ws else "")
                rec = {"D": d, "N": n, "B": b, "H": h, "causal": causal, "mode": mode, "config": name,
                       "BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": s, "WARP_SPEC": bool(ws),
                       "ms": None, "tflops": None, "reason": ""}
                with tuning.override(forward_config=cfg):
                    first, rec["reason"] = harness.attempt(functools.partial(harness.first_call, calls[0]))
                    if first is not None:  # out of resources, compile failure: recorded, the sweep goes on
                        timed = functools.partial(harness.time_ms, calls, a.warmup, a.rep)
                        ms, rec["reason"] = harness.attempt(timed)
                        if ms is not None:
                            rec.update(ms=ms, first_s=first[1], tflops=flops / ms / 1e9)
                res[name] = round(rec["tflops"], 1) if rec["tflops"] else rec["reason"].split(":")[0]
                out.add(rec)
            measured = [(v, k) for k, v in res.items() if isinstance(v, float)]
            best = max(measured) if measured else (float("nan"), "none")
            print(f"D={d} N={n} causal={causal} {mode}: best {best[1]} {best[0]:.0f} | {json.dumps(res)}",
                  flush=True)
        sets = None
        harness.free_memory()
    print(f"wrote {out.json_path}, {out.csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
