#!/usr/bin/env python
"""Benchmark rows for what real models run: a packed variable-length batch and a sliding window, both
causal with InfoScale, forward and forward+backward, against what a user would run instead.

  varlen  32 documents of random lengths, 65536 tokens in all, H = 16, D = 128, bf16:
            ours         infoscale_triton.varlen_attention(cu_seqlens, is_causal=True, temperature="infoscale")
            sdpa_cudnn   F.scaled_dot_product_attention on the padded batch (32, H, longest, D), is_causal,
            sdpa_flash   q pre-multiplied by t_i; only the attention call is timed (padding not counted)
            flex         torch.compile(flex_attention) on the packed tokens, document + causal block mask,
                         score_mod = score * t[q_idx]
  window  one sequence of 32768 tokens, window 4096 (left 4095, right 0), causal, H = 16, D = 128:
            ours         scaled_dot_product_attention(window=(4095, 0), is_causal=True, temperature=...)
            ours_causal  the same without the window (what skipping the tiles outside it saves)
            flex         sliding-window + causal block mask, score_mod = score * t[q_idx]

TFLOP/s count the useful work only (4 H D per visible (row, key) pair for the forward, x3.5 for
forward+backward), the same for every provider, so padding and masked-out tiles show up as lost
throughput. Checks before timing: ours against the float64 reference (varlen: the three shortest
documents; window: the same path at 4096 tokens with a 1024 window) and against flex's output.
Timing: triton.testing.do_bench median, input sets rotated past the L2 cache. JSON and CSV under --out.
Without CUDA, --smoke runs tiny sizes through the Triton interpreter (checks the script, not speed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402
from bench_attention import metadata, peak_mib, time_calls  # noqa: E402

import infoscale_triton  # noqa: E402
from infoscale_triton import peers, reference  # noqa: E402
from infoscale_triton.temperature import TemperatureSpec, row_temperature  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
Fn = Callable[[], object]


def infoscale(n: torch.Tensor, d: int) -> torch.Tensor:
    return row_temperature(n.double(), TemperatureSpec.parse("infoscale"), peers.N_TRAIN, d).float()


def doc_lengths(count: int, total: int, seed: int) -> torch.Tensor:
    """``count`` random lengths >= 1 that sum to ``total``."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(count, generator=g) + 0.05
    lengths = (w / w.sum() * (total - count)).floor().long() + 1
    lengths[-1] += total - lengths.sum()
    return lengths


def fwd_bwd(fn: Callable[[], torch.Tensor], leaves: list[torch.Tensor], dout: torch.Tensor) -> Fn:
    def call() -> None:
        torch.autograd.grad(fn(), leaves, dout)
    return call


def flex_fn(block_mask, t: torch.Tensor) -> Callable[..., torch.Tensor]:
    attend = peers._compiled_flex()

    def score_mod(score, b, h, q_idx, kv_idx):
        return score * t[q_idx]

    return lambda q, k, v: attend(q, k, v, score_mod=score_mod, block_mask=block_mask)


def varlen_row(args: argparse.Namespace, device: str) -> tuple[list[dict], dict]:
    h, d, dtype = args.heads, args.d, torch.bfloat16 if device == "cuda" else torch.float16
    lengths = doc_lengths(args.docs, args.tokens, args.seed)
    cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32).to(device)
    longest, total = int(lengths.max()), int(lengths.sum())
    pos = torch.cat([torch.arange(n) for n in lengths.tolist()]).to(device)  # row index within its doc
    doc = torch.repeat_interleave(torch.arange(len(lengths)), lengths).to(device)
    t_tok = infoscale(pos + 1.0, d)  # causal: n_i = i + 1 within the document
    flops = float((4 * h * d * lengths.double() * (lengths.double() + 1) / 2).sum())
    opts = dict(is_causal=True, temperature="infoscale", train_len=peers.N_TRAIN)

    def make_set():
        return tuple(torch.randn(total, h, d, device=device, dtype=dtype) for _ in range(3))

    sets = [make_set() for _ in range(peers.input_sets_needed(3 * total * h * d * 2))]
    check = {}
    q, k, v = sets[0]
    ours_out = infoscale_triton.varlen_attention(q, k, v, cu, cu, longest, longest, **opts)
    # exact check on the shortest documents (the float64 reference materialises L x L per head)
    for s in lengths.argsort()[:3].tolist():
        a, b = int(cu[s]), int(cu[s + 1])
        r = reference.scaled_dot_product_attention(*(x[a:b].double().transpose(0, 1)[None] for x in (q, k, v)),
                                                   **opts)[0].transpose(0, 1)
        check[f"ref_doc{s}_len{b - a}"] = peers.rel_err(ours_out[a:b], r)

    from torch.nn.attention.flex_attention import create_block_mask

    def doc_causal(b, hh, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (kv_idx <= q_idx)

    block_mask = None
    if device == "cuda":
        block_mask = create_block_mask(doc_causal, B=None, H=None, Q_LEN=total, KV_LEN=total, device=device,
                                       _compile=True)
    flex = flex_fn(block_mask, t_tok) if device == "cuda" else None

    def pad(x: torch.Tensor) -> torch.Tensor:  # (T, H, D) -> (docs, H, longest, D)
        out = x.new_zeros(len(lengths), longest, h, d)
        for s, n in enumerate(lengths.tolist()):
            out[s, :n] = x[int(cu[s]) : int(cu[s]) + n]
        return out.transpose(1, 2)

    t_pad = infoscale(torch.arange(1, longest + 1, device=device, dtype=torch.float64), d).view(1, 1, -1, 1)
    providers: dict[str, Callable[[tuple], Callable[[], torch.Tensor]]] = {
        "ours": lambda s: (lambda: infoscale_triton.varlen_attention(s[0], s[1], s[2], cu, cu, longest, longest,
                                                                     **opts)),
    }
    if device == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for name, backend in (("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa_flash", SDPBackend.FLASH_ATTENTION)):
            def build(s, backend=backend):
                qp, kp, vp = s

                def call():
                    with sdpa_kernel(backend):
                        return F.scaled_dot_product_attention(qp * t_pad.to(qp.dtype), kp, vp, is_causal=True)
                return call
            providers[name] = build
        providers["flex"] = lambda s: (lambda: flex(*(x.transpose(0, 1)[None] for x in s[:3])))
        check["flex_vs_ours"] = peers.rel_err(ours_out, flex(*(x.transpose(0, 1)[None] for x in (q, k, v)))[0]
                                              .transpose(0, 1))
    padded_sets = {n: [tuple(pad(x) for x in s) for s in sets] for n in providers if n.startswith("sdpa")}
    return _time_providers("varlen", providers, sets, padded_sets, flops, args), check


def window_row(args: argparse.Namespace, device: str) -> tuple[list[dict], dict]:
    h, d, n, w = args.heads, args.d, args.window_tokens, args.window
    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    rows = torch.arange(n, device=device)
    seen = torch.clamp(rows + 1, max=w)
    t = infoscale(seen.double(), d)
    flops = float(4 * h * d * seen.double().sum())
    win = dict(is_causal=True, window=(w - 1, 0), temperature="infoscale", train_len=peers.N_TRAIN)
    check = {}
    # the same path at a size the float64 reference can hold
    small, sw = min(n, 4096), max(w // 4, 1)
    qs, ks, vs = (torch.randn(1, h, small, d, device=device, dtype=dtype) for _ in range(3))
    small_opts = dict(win, window=(sw - 1, 0))
    check[f"ref_{small}_window{sw}"] = peers.rel_err(
        infoscale_triton.scaled_dot_product_attention(qs, ks, vs, **small_opts),
        reference.scaled_dot_product_attention(qs.double(), ks.double(), vs.double(), **small_opts))

    def make_set():
        return tuple(torch.randn(1, h, n, d, device=device, dtype=dtype) for _ in range(3))

    sets = [make_set() for _ in range(peers.input_sets_needed(3 * n * h * d * 2))]
    causal_opts = dict(win, window=None)
    providers = {
        "ours": lambda s: (lambda: infoscale_triton.scaled_dot_product_attention(s[0], s[1], s[2], **win)),
        "ours_causal": lambda s: (lambda: infoscale_triton.scaled_dot_product_attention(s[0], s[1], s[2],
                                                                                        **causal_opts)),
    }
    if device == "cuda":
        from torch.nn.attention.flex_attention import create_block_mask

        def sliding(b, hh, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (q_idx - kv_idx < w)

        bm = create_block_mask(sliding, B=None, H=None, Q_LEN=n, KV_LEN=n, device=device, _compile=True)
        flex = flex_fn(bm, t)
        providers["flex"] = lambda s: (lambda: flex(s[0], s[1], s[2]))
        q, k, v = sets[0]
        check["flex_vs_ours"] = peers.rel_err(providers["ours"](sets[0])(), flex(q, k, v))
    flops_of = {"ours_causal": float(4 * h * d * (rows + 1.0).sum())}
    return _time_providers("window", providers, sets, {}, flops, args, flops_of), check


def _time_providers(row: str, providers: dict, sets: list, own_sets: dict, flops: float,
                    args: argparse.Namespace, flops_of: dict | None = None) -> list[dict]:
    """Time each provider's fwd and fwd_bwd over its input sets (``own_sets``: a provider's own layout
    of the same inputs)."""
    records = []
    for pass_ in args.passes:
        for name, build in providers.items():
            inputs = own_sets.get(name, sets)
            calls = []
            for s in inputs:
                if pass_ == "fwd":
                    calls.append(build(s))
                else:
                    leaves = [x.detach().requires_grad_() for x in s]
                    fn = build(leaves)
                    calls.append(fwd_bwd(fn, leaves, torch.randn_like(fn())))
            rec = {"row": row, "pass": pass_, "provider": name}
            try:
                calls[0]()  # compile / warm up outside the timing
                rec["ms"] = time_calls(calls, args.warmup, args.rep)
                rec["peak_mib"] = peak_mib(calls[0])
                useful = (flops_of or {}).get(name, flops)
                rec["tflops"] = useful * (3.5 if pass_ == "fwd_bwd" else 1.0) / rec["ms"] / 1e9
            except Exception as e:  # a peer that cannot run stays in the table with its reason
                rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            records.append(rec)
            print(f"{row:7s} {pass_:8s} {name:12s} " + (f"{rec['ms']:9.3f} ms {rec['tflops']:7.1f} TFLOP/s "
                  f"{rec['peak_mib']:8.0f} MiB" if "ms" in rec else rec["error"]), flush=True)
            peers.free_memory()
    for pass_ in args.passes:
        ours = next((r for r in records if r["pass"] == pass_ and r["provider"] == "ours" and "ms" in r), None)
        for r in records:
            if r["pass"] == pass_ and ours and "ms" in r:
                r["ours_speedup"] = r["ms"] / ours["ms"]  # > 1: ours is faster
    return records


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", nargs="+", default=["varlen", "window"], choices=["varlen", "window"])
    ap.add_argument("--passes", nargs="+", default=["fwd", "fwd_bwd"], choices=["fwd", "fwd_bwd"])
    ap.add_argument("--docs", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--window-tokens", type=int, default=32768)
    ap.add_argument("--window", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=float, default=25)
    ap.add_argument("--rep", type=float, default=200)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CPU interpreter: tests the script)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.smoke or device == "cpu":
        args.docs, args.tokens, args.window_tokens, args.window, args.heads, args.d = 4, 96, 96, 24, 2, 32
        args.warmup, args.rep = 1, 1
    torch.manual_seed(args.seed)
    started = datetime.now(timezone.utc)
    records, checks = [], {}
    for row in args.rows:
        recs, chk = (varlen_row if row == "varlen" else window_row)(args, device)
        records += recs
        checks[row] = chk
        print(f"{row} checks (relative error): " + ", ".join(f"{k} {v:.2e}" for k, v in chk.items()), flush=True)
    meta = metadata(argparse.Namespace(warmup=args.warmup, rep=args.rep, long_rep=None), started)
    meta.update(docs=args.docs, tokens=args.tokens, window_tokens=args.window_tokens, window=args.window,
                heads=args.heads, d=args.d, flops="useful pairs only: 4 H D per visible (row, key), x3.5 fwd_bwd")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"bench_sequences_{started:%Y%m%dT%H%M%SZ}.json"
    clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in records]
    path.write_text(json.dumps({"meta": meta, "checks": checks, "results": clean}, indent=1))
    print(f"wrote {path}")
    bad = [f"{row}:{k}" for row, chk in checks.items() for k, v in chk.items()
           if k.startswith("ref") and not (v < 2e-2)]
    if bad:
        print("CHECK FAILED:", bad)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
