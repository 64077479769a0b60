#!/usr/bin/env python
"""generate() with a Hugging Face Llama-style model: transformers' "sdpa" attention against this
package's, with the temperature off and with InfoScale on, eagerly and with a static cache under
torch.compile. Plus a small-call row: one dense forward eagerly, ours against SDPA's.

Model: built from a LlamaConfig with random weights (no downloads): 16 layers, hidden 2048, 16 query
and 8 KV heads (head dim 128), intermediate 5632, vocabulary 32000; bf16, batch 1. Prompt: 2048
random token ids; 256 greedy new tokens (--quick: 64).

Rows (impl x mode):
  impl   sdpa            attn_implementation="sdpa" (PyTorch picks its backend)
         ours            infoscale_triton.integrations.transformers.register(), no temperature
         ours_infoscale  the same with configure(temperature="infoscale", train_len=--train-len)
  mode   eager           the default dynamic cache, no compile (generate(disable_compile=True))
         static_compiled cache_implementation="static": transformers compiles the decoding forward
                         (torch.compile, its default CompileConfig: mode="reduce-overhead", CUDA graphs);
                         the prefill runs eagerly
Measured per row (after one warm-up generate, which compiles): prefill ms = generate(max_new_tokens=1)
(the prompt's forward and the first token), total ms = generate(max_new_tokens=N); decoding tokens/s =
(N - 1) / (total - prefill). Medians of --repeats runs. Ratios: ours / sdpa tokens/s per mode, and
ours_infoscale / ours. The prompt's last logits of sdpa and ours (eager, bf16) are compared with those of
a float32 copy of the model (relative error: ours should be as close as sdpa is), and the leading greedy
tokens that agree with sdpa's are counted (bf16: two correct implementations diverge at a near-tie; the
float32 logits' top-2 gap is printed, in standard deviations of the logits).

Small call: infoscale_triton.scaled_dot_product_attention(q, k, v, is_causal=True) at B 1, H 16, L 256,
D 128 against F.scaled_dot_product_attention (default backend and cuDNN), microseconds per call of
back-to-back eager calls between two synchronisations.

Time: ~2.5 minutes on an H200 with cold caches (three torch.compile graphs dominate; --modes eager
skips them). --smoke: a 2-layer model with head dim 16 on the CPU, our kernels through Triton's
interpreter, eager and static cache (CPU: no compile), a few tokens: checks that the script runs and
that ours (float32) generates sdpa's tokens; its timings mean nothing.

Results (the harness, infoscale_triton/cli/harness.py: metadata, one record per generate() row and per
small-call provider, the ratios, the float32 top-2 gap and the run's seconds as summaries): markdown
tables on stdout and bench_generate_<time>.json / .csv under --out (default benchmarks/results/; --smoke:
a temporary directory), rewritten after every row.
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

import infoscale_triton
from infoscale_triton.cli import harness
from infoscale_triton.cli.console import table
from infoscale_triton.integrations import transformers as it_hf

IMPLS = ("sdpa", "ours", "ours_infoscale")
MODES = ("eager", "static_compiled")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--new", type=int, default=256, help="greedy new tokens")
    ap.add_argument("--train-len", type=int, default=2048, help="InfoScale's N")
    ap.add_argument("--quick", action="store_true", help="64 new tokens, one timed run")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per row (median)")
    ap.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU through the interpreter")
    ap.add_argument("--out", type=Path, default=None,
                    help="results directory (default benchmarks/results/; --smoke: a temporary directory)")
    args = ap.parse_args(argv)
    if args.quick:
        args.new, args.repeats = 64, 1
    if args.smoke:
        args.layers, args.hidden, args.heads, args.kv_heads, args.intermediate, args.vocab = 2, 64, 4, 2, 128, 128
        args.prompt, args.new, args.repeats, args.train_len = 20, 4, 1, 16
        args.modes = ["eager", "static"]  # (no compile on the CPU: the static cache's path alone)
    return args


def build_model(args: argparse.Namespace, device: str, dtype: torch.dtype) -> LlamaForCausalLM:
    config = LlamaConfig(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, intermediate_size=args.intermediate,
                         vocab_size=args.vocab, max_position_embeddings=max(4096, args.prompt + args.new))
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def set_impl(model: LlamaForCausalLM, impl: str, args: argparse.Namespace) -> None:
    if impl == "sdpa":
        model.set_attn_implementation("sdpa")
        return
    model.set_attn_implementation(it_hf.register())
    if impl == "ours_infoscale":
        it_hf.configure(model.config, temperature="infoscale", train_len=args.train_len)
    else:
        it_hf.configure(model.config)


def timed_generate(model: LlamaForCausalLM, ids: torch.Tensor, new: int, mode: str) -> tuple[float, torch.Tensor]:
    """Milliseconds of one greedy generate() and its sequences."""
    kwargs: dict = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False, "use_cache": True}
    if mode == "eager":
        kwargs["disable_compile"] = True
    else:
        kwargs["cache_implementation"] = "static"  # compiled by transformers on CUDA ("static": not compiled)
        if mode == "static":
            kwargs["disable_compile"] = True
    with torch.no_grad():  # one synchronised wall-clock call
        out, seconds = harness.first_call(
            lambda: model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs))
    return seconds * 1e3, out


def first_logits(model: LlamaForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits[:, -1].float()


def measure_row(model: LlamaForCausalLM, ids: torch.Tensor, impl: str, mode: str, args: argparse.Namespace,
                reference: dict) -> dict:
    set_impl(model, impl, args)
    if mode == "static_compiled":
        torch._dynamo.reset()  # (a fresh graph per impl: no guards of the previous one)
    t_warm, _ = timed_generate(model, ids, args.new, mode)  # compiles (Triton, Inductor), CUDA graphs
    prefill = statistics.median(timed_generate(model, ids, 1, mode)[0] for _ in range(args.repeats))
    runs = [timed_generate(model, ids, args.new, mode) for _ in range(args.repeats)]
    total = statistics.median(ms for ms, _ in runs)
    tokens = runs[0][1][0, ids.shape[1]:]
    logits = first_logits(model, ids) if mode == "eager" else None
    row = {"row": "generate", "impl": impl, "mode": mode, "prefill_ms": prefill, "total_ms": total, "warmup_ms": t_warm,
           "decode_tok_s": (args.new - 1) / ((total - prefill) / 1e3) if total > prefill else float("nan")}
    if logits is not None and "float32" in reference and impl != "ours_infoscale":
        want = reference["float32"]
        row["first_logits_rel_err"] = ((logits - want).norm() / want.norm()).item()
    key = mode
    if impl == "sdpa":
        reference[key] = {"tokens": tokens}
    elif key in reference:
        ref = reference[key]
        row["tokens_as_sdpa"] = int((tokens == ref["tokens"]).int().cumprod(0).sum().item())  # leading run
        row["tokens"] = tokens.numel()
    return row


def float32_first_logits(model: LlamaForCausalLM, ids: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The prompt's last logits from a float32 copy of the model (sdpa): the reference of every impl's
    first logits, and the gap between its two largest logits in units of the logits' spread (a random
    model's logits are nearly flat: a small gap is why bf16 impls may pick different tokens)."""
    copy = type(model)(model.config).to(ids.device)
    copy.load_state_dict(model.state_dict())
    copy = copy.float().eval()
    copy.set_attn_implementation("sdpa")
    logits = first_logits(copy, ids)
    del copy
    top = logits[0].topk(2).values
    return logits, ((top[0] - top[1]) / logits[0].std()).item()


def small_call(device: str, dtype: torch.dtype, smoke: bool) -> list[dict]:
    """One dense causal forward at B 1, H 16, L 256, D 128 (smoke: L 32, D 16): us per eager call."""
    length, d = (32, 16) if smoke else (256, 128)
    sets = [tuple(torch.randn(1, 16, length, d, device=device, dtype=dtype) for _ in range(3)) for _ in range(4)]
    calls: dict[str, Callable[[tuple], object]] = {
        "ours": lambda s: infoscale_triton.scaled_dot_product_attention(*s, is_causal=True),
        "sdpa": lambda s: F.scaled_dot_product_attention(*s, is_causal=True),
    }
    if device == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def cudnn(s: tuple) -> torch.Tensor:
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(*s, is_causal=True)

        calls["sdpa_cudnn"] = cudnn
    rows = []
    n = 20 if smoke else 500
    with torch.no_grad():
        for name, fn in calls.items():
            for s in sets:
                fn(s)
            fns = [functools.partial(fn, s) for s in sets]
            us = 1e3 * harness.eager_ms(fns, n, rounds=1 if smoke else 5)
            rows.append({"row": "small_call", "provider": name, "us_per_call": us})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke:
        print("no CUDA device: pass --smoke for the CPU check (interpreter, tiny model)", file=sys.stderr)
        return 2
    code = harness.ensure_backend(interpret=args.smoke)
    if code is not None:
        return code
    gpu = harness.on_gpu()
    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    meta = harness.metadata(transformers=transformers.__version__, dtype=str(dtype), **settings)
    out = harness.ResultsFile("bench_generate", harness.results_dir(args.out, args.smoke), meta)
    started = time.perf_counter()
    model = build_model(args, device, dtype)
    ids = torch.randint(0, args.vocab, (1, args.prompt), generator=torch.Generator().manual_seed(1)).to(device)
    reference: dict = {}
    if "eager" in args.modes:
        reference["float32"], top_gap = float32_first_logits(model, ids)
        out.write(float32_top2_gap=top_gap)
    for mode in args.modes:
        for impl in ["sdpa", *[i for i in args.impls if i != "sdpa"]]:
            out.add(measure_row(model, ids, impl, mode, args, reference))
            r = out.records[-1]
            print(f"  {mode:15s} {impl:15s} prefill {r['prefill_ms']:8.1f} ms  "
                  f"decode {r['decode_tok_s']:7.1f} tok/s  (warm-up {r['warmup_ms'] / 1e3:.1f} s)",
                  flush=True)
    rows = list(out.records)
    small = small_call(device, dtype, args.smoke)
    out.add(*small)
    elapsed = time.perf_counter() - started

    ratios, body = {}, []
    for r in rows:
        base = next((x for x in rows if x["mode"] == r["mode"] and x["impl"] == "sdpa"), None)
        off = next((x for x in rows if x["mode"] == r["mode"] and x["impl"] == "ours"), None)
        vs_sdpa = r["decode_tok_s"] / base["decode_tok_s"] if base else float("nan")
        vs_off = r["decode_tok_s"] / off["decode_tok_s"] if off and r["impl"] == "ours_infoscale" else float("nan")
        ratios[f"{r['mode']}/{r['impl']}"] = {"vs_sdpa": vs_sdpa, "vs_ours_off": vs_off}
        err = r.get("first_logits_rel_err")
        same = f"{r['tokens_as_sdpa']}/{r['tokens']}" if "tokens" in r else ""
        body.append([r["mode"], r["impl"], f"{r['prefill_ms']:.1f}", f"{r['decode_tok_s']:.1f}",
                     f"{vs_sdpa:.3f}", "" if math.isnan(vs_off) else f"{vs_off:.3f}", same,
                     "" if err is None else f"{err:.1e}"])
    table(["mode", "impl", "prefill ms", "decode tok/s", "vs sdpa", "vs ours", "tokens = sdpa",
           "logits err vs float32"], body, markdown=True,
          title=f"generate(): {args.layers} layers, hidden {args.hidden}, {args.heads}/{args.kv_heads} "
                f"heads, prompt {args.prompt}, {args.new} new tokens, {str(dtype).removeprefix('torch.')}, "
                "batch 1")
    if "float32" in reference:
        print(f"float32 reference: top-2 logit gap {top_gap:.2f} standard deviations of the logits")
    print("\nsmall call (dense causal forward, eager, us per call):")
    ours_us = next(s["us_per_call"] for s in small if s["provider"] == "ours")
    for s in small:
        print(f"  {s['provider']:11s} {s['us_per_call']:7.1f} us   ours / {s['provider']} = "
              f"{ours_us / s['us_per_call']:.2f}")
    print(f"\ntotal {elapsed:.0f} s")
    out.write(ratios=ratios, seconds=elapsed)
    print(f"wrote {out.json_path}, {out.csv_path}")
    if args.smoke:
        # the check the smoke run exists for: in float32 (interpreter) ours generates sdpa's tokens
        bad = [r for r in rows if r["impl"] == "ours" and r["tokens_as_sdpa"] != r["tokens"]]
        if bad:
            print(f"ours generated other tokens than sdpa: {bad}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
