#!/usr/bin/env python
"""Benchmark rows for what real models run: a packed variable-length batch and a sliding window, both
causal with InfoScale, forward and forward+backward, against what a user would run instead.

  varlen  32 documents of random lengths, 65536 tokens in all, H = 16, D = 128, bf16:
            ours         infoscale_triton.varlen_attention(cu_seqlens, is_causal=True, temperature=...)
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
throughput. Checks before timing: ours against the float64 reference within the error budget of
infoscale_triton.testing (varlen: the three shortest documents; window: the same path at 4096 tokens
with a 1024 window), and, for information, the relative difference from flex's output.
Timing and results: the harness (infoscale_triton/cli/harness.py): the first call timed apart
("first_s", compiling), then triton.testing.do_bench median over input sets rotated past the L2 cache;
JSON and CSV under --out. Without CUDA, --smoke runs tiny sizes through the Triton interpreter (checks
the script, not speed).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import infoscale_triton
from infoscale_triton import reference, testing
from infoscale_triton.cli import harness, peers
from infoscale_triton.cli.console import table

Fn = Callable[[], object]
Builder = Callable[[tuple], Callable[[], torch.Tensor]]


def doc_lengths(count: int, total: int, seed: int) -> torch.Tensor:
    """``count`` random lengths >= 1 that sum to ``total``."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(count, generator=g) + 0.05
    lengths = (w / w.sum() * (total - count)).floor().long() + 1
    lengths[-1] += total - lengths.sum()
    return lengths


def flex_fn(block_mask, t: torch.Tensor) -> Callable[..., torch.Tensor]:
    attend = peers.compiled_flex()
    score_mod = peers.scaled_by_row(t)
    return lambda q, k, v: attend(q, k, v, score_mod=score_mod, block_mask=block_mask)


def dtype_of(device: str) -> torch.dtype:
    return torch.bfloat16 if device == "cuda" else torch.float16  # the interpreter emulates bf16 (slower)


def reference_check(name: str, out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    **opts: object) -> dict:
    """``{name}_err``, ``{name}_tol``, ``{name}_check``: ``out`` against the float64 reference of (B, H, L, D)
    q, k, v, budget from the reference in their dtype."""
    ref64 = reference.scaled_dot_product_attention(q.double(), k.double(), v.double(), **opts)
    low = reference.scaled_dot_product_attention(q, k, v, **opts)
    return harness.check(out, ref64, low, q.dtype, prefix=f"{name}_")


def varlen_row(args: argparse.Namespace, device: str) -> tuple[list[dict], dict]:
    h, d, dtype = args.heads, args.d, dtype_of(device)
    lengths = doc_lengths(args.docs, args.tokens, args.seed)
    cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32).to(device)
    longest, total = int(lengths.max()), int(lengths.sum())
    pos = torch.cat([torch.arange(n) for n in lengths.tolist()]).to(device)  # row index within its doc
    doc = torch.repeat_interleave(torch.arange(len(lengths)), lengths).to(device)
    t_tok = peers.infoscale_factors(pos + 1.0, d)  # causal: n_i = i + 1 within the document
    flops = float((4 * h * d * lengths.double() * (lengths.double() + 1) / 2).sum())
    opts = {"is_causal": True, "temperature": "infoscale", "train_len": peers.N_TRAIN}

    def make_set():
        return tuple(torch.randn(total, h, d, device=device, dtype=dtype) for _ in range(3))

    sets = [make_set() for _ in range(harness.input_sets_needed(3 * total * h * d * 2))]
    check = {}
    q, k, v = sets[0]
    ours_out = infoscale_triton.varlen_attention(q, k, v, cu, cu, longest, longest, **opts)
    # exact check on the shortest documents (the float64 reference materialises L x L per head)
    for s in lengths.argsort()[:3].tolist():
        a, b = int(cu[s]), int(cu[s + 1])
        doc_qkv = (x[a:b].transpose(0, 1)[None] for x in (q, k, v))
        check.update(reference_check(f"ref_doc{s}_len{b - a}", ours_out[a:b].transpose(0, 1)[None], *doc_qkv,
                                     **opts))

    providers: dict[str, Builder] = {
        "ours": lambda s: (lambda: infoscale_triton.varlen_attention(*s[:3], cu, cu, longest, longest,
                                                                     **opts)),
    }
    if device == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.nn.attention.flex_attention import create_block_mask

        def doc_causal(b, hh, q_idx, kv_idx):
            return (doc[q_idx] == doc[kv_idx]) & (kv_idx <= q_idx)

        block_mask = create_block_mask(doc_causal, B=None, H=None, Q_LEN=total, KV_LEN=total, device=device,
                                       _compile=True)
        flex = flex_fn(block_mask, t_tok)
        t_pad = peers.infoscale_factors(torch.arange(1, longest + 1, device=device, dtype=torch.float64),
                                        d).view(1, 1, -1, 1)
        backends = {"sdpa_cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa_flash": SDPBackend.FLASH_ATTENTION}
        for name, backend in backends.items():
            def build(s, backend=backend):
                qp, kp, vp = s

                def call():
                    with sdpa_kernel(backend):
                        return F.scaled_dot_product_attention(qp * t_pad.to(qp.dtype), kp, vp, is_causal=True)
                return call
            providers[name] = build
        providers["flex"] = lambda s: (lambda: flex(*(x.transpose(0, 1)[None] for x in s[:3])))
        flex_out = flex(*(x.transpose(0, 1)[None] for x in (q, k, v)))[0].transpose(0, 1)
        check["flex_vs_ours"] = testing.rel_error(ours_out, flex_out)

    def pad(x: torch.Tensor) -> torch.Tensor:  # (T, H, D) -> (docs, H, longest, D)
        out = x.new_zeros(len(lengths), longest, h, d)
        for s, n in enumerate(lengths.tolist()):
            out[s, :n] = x[int(cu[s]) : int(cu[s]) + n]
        return out.transpose(1, 2)

    padded_sets = {n: [tuple(pad(x) for x in s) for s in sets] for n in providers if n.startswith("sdpa")}
    return time_providers("varlen", providers, sets, padded_sets, flops, args), check


def window_row(args: argparse.Namespace, device: str) -> tuple[list[dict], dict]:
    h, d, n, w, dtype = args.heads, args.d, args.window_tokens, args.window, dtype_of(device)
    rows = torch.arange(n, device=device)
    seen = torch.clamp(rows + 1, max=w)
    t = peers.infoscale_factors(seen, d)
    flops = float(4 * h * d * seen.double().sum())
    win = {"is_causal": True, "window": (w - 1, 0), "temperature": "infoscale", "train_len": peers.N_TRAIN}
    # the same path at a size the float64 reference can hold
    small, sw = min(n, 4096), max(w // 4, 1)
    qs, ks, vs = (torch.randn(1, h, small, d, device=device, dtype=dtype) for _ in range(3))
    small_opts = {**win, "window": (sw - 1, 0)}
    check = reference_check(f"ref_{small}_window{sw}",
                            infoscale_triton.scaled_dot_product_attention(qs, ks, vs, **small_opts),
                            qs, ks, vs, **small_opts)

    def make_set():
        return tuple(torch.randn(1, h, n, d, device=device, dtype=dtype) for _ in range(3))

    sets = [make_set() for _ in range(harness.input_sets_needed(3 * n * h * d * 2))]
    causal_opts = {**win, "window": None}
    providers: dict[str, Builder] = {
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
        check["flex_vs_ours"] = testing.rel_error(providers["ours"](sets[0])(), flex(*sets[0]))
    flops_of = {"ours_causal": float(4 * h * d * (rows + 1.0).sum())}
    return time_providers("window", providers, sets, {}, flops, args, flops_of), check


def time_providers(row: str, providers: dict[str, Builder], sets: list, own_sets: dict, flops: float,
                   args: argparse.Namespace, flops_of: dict | None = None) -> list[dict]:
    """Each provider's fwd and fwd_bwd over its input sets (``own_sets``: a provider's own layout of the
    same inputs): the first call timed apart, then the median; a provider that cannot run keeps its row
    with the reason."""
    records = []
    for pass_ in args.passes:
        for name, build in providers.items():
            inputs = own_sets.get(name, sets)
            rec = {"row": row, "pass": pass_, "provider": name, "ms": math.nan, "tflops": math.nan,
                   "peak_mib": math.nan, "first_s": math.nan, "compile_s": math.nan, "reason": ""}

            def calls_for(build: Builder = build, inputs: list = inputs) -> list[Fn]:
                calls = []
                for s in inputs:
                    if pass_ == "fwd":
                        calls.append(build(s))
                    else:
                        leaves = [x.detach().requires_grad_() for x in s]
                        fn = build(leaves)
                        calls.append(harness.fwd_bwd(fn, leaves, torch.randn_like(fn())))
                return calls

            useful = (flops_of or {}).get(name, flops) * harness.PASSES[pass_]
            rec["reason"] = measure(rec, calls_for, args, useful)
            records.append(rec)
            print(f"{row:7s} {pass_:8s} {name:12s} {harness.timing_text(rec)}", flush=True)
            harness.free_memory()
    for pass_ in args.passes:
        ours = next((r for r in records if r["pass"] == pass_ and r["provider"] == "ours"), None)
        for r in records:
            if r["pass"] == pass_ and ours is not None:
                r["ours_speedup"] = r["ms"] / ours["ms"]  # > 1: ours is faster (NaN when either did not run)
    return records


def measure(rec: dict, calls_for: Callable[[], list[Fn]], args: argparse.Namespace,
            useful_flops: float) -> str:
    """Fill rec's first_s, ms, compile_s, tflops, peak_mib; returns the reason when a step fails."""
    calls, why = harness.attempt(calls_for)
    if calls is None:
        return why
    first, why = harness.attempt(lambda: harness.first_call(calls[0]))
    if first is None:
        return why
    rec["first_s"] = first[1]
    ms, why = harness.attempt(lambda: harness.time_ms(calls, args.warmup, args.rep))
    if ms is None:
        return why
    rec.update(ms=ms, compile_s=max(rec["first_s"] - ms / 1e3, 0.0), tflops=useful_flops / ms / 1e9,
               peak_mib=harness.peak_mib(calls[0]))
    return ""


def print_table(records: list[dict], gpu: bool) -> None:
    if gpu:
        rows = [[r["row"], r["pass"], r["provider"], harness.fmt(r["ms"], 3), harness.fmt(r["tflops"]),
                 harness.fmt(r["peak_mib"], 0), harness.fmt(r["ours_speedup"], 2),
                 harness.fmt(r["first_s"], 1)]
                for r in records]
        table(["row", "pass", "provider", "ms", "TFLOP/s", "peak MiB", "ours/x", "first call s"], rows,
              "useful TFLOP/s (padding and masked tiles count as lost); ours/x > 1 means ours is faster")
    else:
        rows = [[r["row"], r["pass"], r["provider"], harness.fmt(r["ms"], 1)] for r in records]
        table(["row", "pass", "provider", "ms"], rows,
              "Triton INTERPRETER on CPU: ms per call, which say nothing about GPU speed")


def main(argv: list[str] | None = None) -> int:
    code = harness.ensure_backend()
    if code is not None:
        return code
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    ap.add_argument("--out", type=Path, default=None,
                    help="results directory (default benchmarks/results/; --smoke: a temporary directory)")
    args = ap.parse_args(argv)
    device = harness.device()
    args.smoke = args.smoke or device == "cpu"
    if args.smoke:
        args.docs, args.tokens, args.window_tokens, args.window, args.heads, args.d = 4, 96, 96, 24, 2, 32
        args.warmup, args.rep = 1, 1
    torch.manual_seed(args.seed)
    meta = harness.metadata(docs=args.docs, tokens=args.tokens, window_tokens=args.window_tokens,
                            window=args.window, heads=args.heads, d=args.d, warmup_ms=args.warmup,
                            rep_ms=args.rep,
                            flops="useful pairs only: 4 H D per visible (row, key), x3.5 fwd_bwd")
    out = harness.ResultsFile("bench_sequences", harness.results_dir(args.out, args.smoke), meta)
    checks = {}
    for row in args.rows:
        recs, chk = (varlen_row if row == "varlen" else window_row)(args, device)
        out.records += recs
        checks[row] = chk
        print(f"{row} checks: " + ", ".join(f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}"
                                            for k, v in chk.items()), flush=True)
        out.write(checks=checks)
    print_table(out.records, harness.on_gpu())
    print(f"\nwrote {out.json_path}, {out.csv_path}")
    bad = [f"{row}:{k}" for row, chk in checks.items() for k, v in chk.items()
           if k.endswith("_check") and v != "ok"]
    if bad:
        print("CHECK FAILED (beyond the error budget against the float64 reference):", bad)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
