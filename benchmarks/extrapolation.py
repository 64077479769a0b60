#!/usr/bin/env python
"""Length extrapolation on real text: train at length 64, evaluate up to 4096 (issue 6).

Data: the Python standard library's own ``*.py`` files, split by file into train and test, as byte
tokens (infoscale_triton/cli/textmodel.py holds the data, the model and the training loop). No downloads.

Model: a small pre-norm transformer with RoPE (rotations computed for any length), trained twice from
the same initial weights on the same batches, once per attention kind, both through
``infoscale_triton.scaled_dot_product_attention``:

  dot  logits q.k / sqrt(d)
  cos  CosScale logits s * cos(q, k)   (--cos-scale, default 64)

Objective: BERT-style masked language modelling (15% of the bytes; of those 80% MASK, 10% a random byte,
10% kept), bidirectional attention, as in the paper; ``--objective clm`` trains a causal next-byte model
instead. Each run stops at a step count fixed from the throughput measured on its first steps, with
the time budget (--train-seconds) as a hard stop as well; what happened is recorded.

Evaluation: the same held-out bytes (and, for MLM, the same corrupted positions) cut into windows of
64, 128, ..., 4096 tokens, for each model with three inference temperatures: none, "logn" and
"infoscale" (train_len 64). For CLM the clipped forms max(1, t) are used, so rows that see fewer than 64
keys keep the temperature they were trained with.

Outputs under --out: ``extrapolation_<UTC>.json`` (config, seeds, metrics, phase times, GPU, versions)
and ``extrapolation_<UTC>.png`` (skipped with a message if matplotlib is missing); a table on stdout and
a closing sentence on whether the paper's ranking (CosScale + InfoScale best at long lengths) holds.

  python benchmarks/extrapolation.py                      # H100: ~8 minutes
  python benchmarks/extrapolation.py --train-seconds 90   # shorter
  python benchmarks/extrapolation.py --smoke              # CPU, Triton interpreter, < 1 minute
  python benchmarks/extrapolation.py --save-checkpoint models.pt   # keep the models for entropy.py
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import torch

from infoscale_triton.cli import harness
from infoscale_triton.cli.textmodel import (
    MODELS,
    TEMPERATURES,
    Config,
    eval_set,
    evaluate,
    inference_kind,
    load_data,
    save_checkpoint,
    smoke_config,
    train_model,
)

# ------------------------------------------------------------------------------------------- report

def print_table(results: list[dict], lengths: list[int]) -> None:
    print(f"\n{'model':<6}{'temperature':<12}" + "".join(f"{n:>14}" for n in lengths))
    print(f"{'':<18}" + "".join(f"{'acc / loss':>14}" for _ in lengths))
    for model_name in MODELS:
        for temp in TEMPERATURES:
            row = {r["length"]: r for r in results if r["model"] == model_name and r["temperature"] == temp}
            if row:
                cells = "".join(f"{row[n]['accuracy']:>8.4f}/{row[n]['loss']:<5.3f}" if n in row else f"{'':>14}"
                                for n in lengths)
                print(f"{model_name:<6}{temp:<12}{cells}")


def verdict(results: list[dict], cfg: Config) -> str:
    """Whether CosScale + InfoScale has the best accuracy at long lengths (>= 16x the training length,
    else the longest), and by how much, from the numbers."""
    long = [n for n in cfg.lengths if n >= 16 * cfg.train_len] or [max(cfg.lengths)]

    def mean_acc(model_name: str, temp: str) -> float:
        accs = [r["accuracy"] for r in results
                if r["model"] == model_name and r["temperature"] == temp and r["length"] in long]
        return sum(accs) / len(accs)

    scores = {(m, t): mean_acc(m, t) for m in MODELS for t in TEMPERATURES}
    ranked = sorted(scores, key=scores.get, reverse=True)
    paper = ("cos", "infoscale")
    where = f"mean masked-token accuracy over lengths {long}" if cfg.objective == "mlm" else \
        f"mean next-token accuracy over lengths {long}"
    runner_up = ranked[1] if ranked[0] == paper else ranked[0]
    gap = 100 * (scores[paper] - scores[runner_up])
    base = 100 * (scores[paper] - scores[("dot", "none")])
    holds = "HOLDS" if ranked[0] == paper else "does NOT hold"
    return (f"The paper's ranking {holds} in this run: by {where}, CosScale + InfoScale scores "
            f"{100 * scores[paper]:.2f}%, {gap:+.2f} points against the best other combination "
            f"({'+'.join(runner_up)}, {100 * scores[runner_up]:.2f}%) and {base:+.2f} points against plain "
            f"dot-product attention without a temperature ({100 * scores[('dot', 'none')]:.2f}%); "
            f"ranking: {', '.join('+'.join(k) for k in ranked)}.")


def plot(results: list[dict], cfg: Config, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG (the JSON has every number)")
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {"none": "tab:gray", "logn": "tab:blue", "infoscale": "tab:red"}
    for model_name in MODELS:
        for temp in TEMPERATURES:
            rows = sorted((r for r in results if r["model"] == model_name and r["temperature"] == temp),
                          key=lambda r: r["length"])
            for ax, metric in zip(axes, ("accuracy", "loss")):
                ax.plot([r["length"] for r in rows], [r[metric] for r in rows], marker="o", color=colors[temp],
                        linestyle="-" if model_name == "cos" else "--", label=f"{model_name} + {temp}")
    for ax, metric in zip(axes, ("accuracy", "loss")):
        ax.set_xscale("log", base=2)
        ax.axvline(cfg.train_len, color="k", linewidth=0.5)
        ax.set_xlabel("evaluation length (tokens)")
        ax.set_ylabel(f"{'masked-token' if cfg.objective == 'mlm' else 'next-token'} {metric}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{cfg.objective.upper()} trained at length {cfg.train_len}: dot (dashed) vs "
                 f"CosScale s={cfg.cos_scale:g} (solid)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------------- main

def parse_args() -> tuple[Config, argparse.Namespace]:
    d = Config()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--objective", choices=("mlm", "clm"), default=d.objective)
    p.add_argument("--train-seconds", type=float, default=d.train_seconds,
                   help="time budget of each of the two training runs (trims the whole run)")
    p.add_argument("--max-steps", type=int, default=d.max_steps)
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--layers", type=int, default=d.layers)
    p.add_argument("--d-model", type=int, default=d.d_model)
    p.add_argument("--heads", type=int, default=d.heads)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--cos-scale", type=float, default=d.cos_scale)
    p.add_argument("--eval-tokens", type=int, default=d.eval_tokens)
    p.add_argument("--max-length", type=int, default=max(d.lengths))
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--smoke", action="store_true", help="tiny sizes (CPU interpreter, < 1 minute)")
    p.add_argument("--out", type=Path, default=None,
                   help="where the JSON, CSV and PNG go (default benchmarks/results/; --smoke: a temporary "
                        "directory)")
    p.add_argument("--save-checkpoint", type=Path, metavar="PATH",
                   help="also save both trained models and the Config into this .pt file "
                        "(benchmarks/entropy.py --checkpoint reads it)")
    a = p.parse_args()
    cfg = Config(objective=a.objective, layers=a.layers, d_model=a.d_model, heads=a.heads, batch=a.batch,
                 lr=a.lr, max_steps=a.max_steps, train_seconds=a.train_seconds, cos_scale=a.cos_scale,
                 eval_tokens=a.eval_tokens, seed=a.seed,
                 lengths=[n for n in Config().lengths if n <= a.max_length])
    return (smoke_config(cfg) if a.smoke else cfg), a


def main() -> int:
    code = harness.ensure_backend()
    if code is not None:
        return code
    cfg, args = parse_args()
    started = datetime.now(timezone.utc)
    device = torch.device(harness.device())
    phases: dict[str, float] = {}
    out = harness.ResultsFile("extrapolation", harness.results_dir(args.out, args.smoke), harness.metadata())
    png_path = out.stem.with_suffix(".png")

    t0 = time.perf_counter()
    train_tokens, test_tokens, data_info = load_data(cfg)
    train_stream, test_stream = train_tokens.to(device), test_tokens.to(device)
    eval_inputs, eval_targets = eval_set(test_stream, cfg)
    phases["data"] = time.perf_counter() - t0
    print(f"data: {data_info['files_train']} train files ({data_info['tokens_train']} bytes), "
          f"{data_info['files_test']} test files ({data_info['tokens_test']} bytes); "
          f"{eval_inputs.numel()} eval tokens per length", flush=True)

    out.summaries.update(config=asdict(cfg), seeds={"model_init": cfg.seed, "train_batches": cfg.seed + 1,
                                                    "eval_corruption": cfg.seed + 2},
                         data=data_info, training={}, phases_s=phases)
    training = out.summaries["training"]
    total_steps: int | None = None
    states: dict[str, dict] = {}
    for model_name in MODELS:
        t0 = time.perf_counter()
        # the second model trains for the steps the first one planned: equal work for both
        model, training[model_name] = train_model(model_name, cfg, train_stream, total_steps)
        total_steps = total_steps or training[model_name]["steps"]
        phases[f"train_{model_name}"] = time.perf_counter() - t0
        if args.save_checkpoint:
            states[model_name] = {k: t.detach().cpu().clone() for k, t in model.state_dict().items()}

        t0 = time.perf_counter()
        model.eval()
        for temp in TEMPERATURES:
            for length in cfg.lengths:
                kind = inference_kind(model_name, temp, cfg)
                metrics = evaluate(model, kind, eval_inputs, eval_targets, length, cfg)
                out.records.append({"model": model_name, "temperature": temp, "length": length,
                                    "temperature_arg": kind.temperature, **metrics})
        phases[f"eval_{model_name}"] = time.perf_counter() - t0
        out.write()  # partial results survive a later failure
        del model

    if args.save_checkpoint:
        save_checkpoint(args.save_checkpoint, cfg, states, training)
        out.summaries["checkpoint"] = str(args.save_checkpoint)
        print(f"saved both models to {args.save_checkpoint}")
    print_table(out.records, cfg.lengths)
    result = verdict(out.records, cfg)
    png = png_path.name if plot(out.records, cfg, png_path) else None
    phases["total"] = (datetime.now(timezone.utc) - started).total_seconds()
    out.write(verdict=result, png=png)
    print(f"\nwrote {out.json_path}" + (f" and {png_path}" if png else ""))
    print("phases (s): " + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()))
    print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
