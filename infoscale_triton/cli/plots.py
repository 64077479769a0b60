"""PNG plots of attention benchmark results (the JSON that ``bench`` and benchmarks/bench_attention.py
write): TFLOP/s against sequence length, one grouped bar per provider, one figure per pass, mode and
head dim with a non-causal and a causal panel, in the style of FlashAttention's README.

    python -m infoscale_triton plot benchmarks/results/bench_attention_*.json --out plots/

Needs matplotlib (the ``cli`` extra); :func:`plot_results` raises ImportError without it. Uses the
object-oriented API only (no pyplot): no GUI backend, no global state.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

# provider -> (legend label, colour); the order is the bars' order
PROVIDERS: dict[str, tuple[str, str]] = {
    "ours": ("ours (infoscale-triton)", "#d62728"),
    "ours_notemp": ("ours, no temperature", "#ff9896"),
    "sdpa_cudnn": ("SDPA cuDNN", "#2ca02c"),
    "sdpa_flash": ("SDPA FlashAttention-2", "#1f77b4"),
    "flex": ("FlexAttention (compiled)", "#9467bd"),
    "eager": ("eager PyTorch (materialised logits)", "#7f7f7f"),
}
MODES = {"infoscale": "InfoScale (dot-product logits)", "cos": "CosScale s=32 + InfoScale"}
PASSES = {"fwd": "forward", "fwd_bwd": "forward + backward"}
# what identifies one measurement: a later results file replaces an earlier one's
KEY = ("row", "mode", "pass", "provider", "D", "N", "B", "H", "causal", "dtype")


def load_results(paths: Sequence[Path]) -> tuple[list[dict], list[dict]]:
    """(records, metadata per file) of bench_attention results files; where two files measured the
    same thing, the later file's record wins."""
    merged: dict[tuple, dict] = {}
    metas = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        results = data.get("results") if isinstance(data, dict) else None
        if not isinstance(results, list) or any(not set(KEY) <= set(r) for r in results):
            raise ValueError(f"{path}: not an attention benchmark results file (bench_attention_*.json)")
        metas.append(data.get("meta", {}))
        for r in results:
            merged[tuple(r[k] for k in KEY)] = r
    return list(merged.values()), metas


def _tflops(r: dict) -> float:
    v = r.get("tflops")
    return math.nan if v is None else float(v)


def _n_label(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def _value_label(v: float) -> str:
    return f"{v:.0f}" if v >= 10 else f"{v:.2g}"


def _missing_label(r: dict) -> str:
    reason = r.get("reason") or ""
    return "not run" if reason.startswith("not run") else "OOM" if "out of memory" in reason else "n/a"


def plot_results(records: Sequence[dict], metas: Sequence[dict], out_dir: Path, prefix: str = "attention",
                 providers: Sequence[str] | None = None) -> list[Path]:
    """Write one PNG per (pass, mode, head dim) of ``records`` into ``out_dir``; returns their paths.
    Long-context records join the causal panel of their head dim. ``providers``: only these."""
    from matplotlib.figure import Figure  # ImportError without matplotlib: the caller says so

    recs = [r for r in records if providers is None or r["provider"] in providers]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for key in sorted({(r["pass"], r["mode"], r["D"]) for r in recs},
                      key=lambda k: (list(PASSES).index(k[0]) if k[0] in PASSES else 9, k[1], k[2])):
        sel = [r for r in recs if (r["pass"], r["mode"], r["D"]) == key]
        panels = sorted({r["causal"] for r in sel})  # non-causal, causal: whichever were measured
        fig = Figure(figsize=(1 + 6 * len(panels), 5.4), dpi=110)
        _draw(fig, sel, key, panels, metas)
        path = out_dir / f"{prefix}_{key[0]}_{key[1]}_d{key[2]}.png"
        fig.savefig(path, facecolor="white")
        paths.append(path)
    return paths


def _draw(fig, sel: list[dict], key: tuple, panels: list[int], metas: Sequence[dict]) -> None:
    pass_, mode, d = key
    names = [p for p in PROVIDERS if any(r["provider"] == p for r in sel)]
    names += sorted({r["provider"] for r in sel} - set(names))  # unknown providers last, grey
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    top = max((v for r in sel if math.isfinite(v := _tflops(r))), default=1.0)
    failed = False
    for ax, causal in zip(axes, panels):
        rs = [r for r in sel if r["causal"] == causal]
        ns = sorted({r["N"] for r in rs})
        width = 0.84 / len(names)
        for i, name in enumerate(names):
            by_n = {r["N"]: r for r in rs if r["provider"] == name}
            xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(ns))]
            vals = [_tflops(by_n[n]) if n in by_n else math.nan for n in ns]
            label, color = PROVIDERS.get(name, (name, "#bcbd22"))
            bars = ax.bar(xs, [0 if math.isnan(v) else v for v in vals], width, label=label, color=color,
                          edgecolor="white", linewidth=0.5)
            labels = []
            for bar, n, v in zip(bars, ns, vals):
                r = by_n.get(n)
                if r is not None and r.get("check") == "FAIL":
                    bar.set_hatch("///")  # measured, but its output failed the reference check
                    failed = True
                if math.isnan(v):
                    labels.append("")
                    if r is not None:
                        ax.text(bar.get_x() + bar.get_width() / 2, top * 0.01, _missing_label(r), rotation=90,
                                ha="center", va="bottom", fontsize=7, color="#555555")
                else:
                    labels.append(_value_label(v) + ("!" if r.get("check") == "FAIL" else ""))
            # numbers on top of the bars, turned when the bars are narrow
            ax.bar_label(bars, labels=labels, padding=2, fontsize=7 if len(names) > 3 else 8,
                         rotation=90 if len(names) * len(ns) > 16 else 0)
        ax.set_xticks(range(len(ns)), [_n_label(n) for n in ns])
        ax.set_xlabel("sequence length N")
        ax.set_title("causal" if causal else "non-causal", fontsize=11)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        ax.spines[["top", "right"]].set_visible(False)
    axes[0].set_ylabel("speed (TFLOP/s)")
    axes[0].set_ylim(0, top * 1.18)  # room for the numbers
    handles, labels = axes[0].get_legend_handles_labels()
    ncol = min(len(names), 3 * len(panels))
    fig.legend(handles, labels, loc="lower center", ncol=ncol, frameon=False, fontsize=9)
    fig.suptitle(f"{MODES.get(mode, mode)}: {PASSES.get(pass_, pass_)}, head dim {d}", fontsize=13,
                 fontweight="bold", y=0.98)
    subtitle = _subtitle(sel, metas, failed)
    fig.text(0.5, 0.93, subtitle, ha="center", va="top", fontsize=9, color="#333333")
    # the suptitle is laid out by tight_layout, the subtitle is not: lower the panels per extra line
    legend_rows = -(-len(names) // ncol)
    fig.tight_layout(rect=(0, 0.025 + 0.045 * legend_rows, 1, 0.95 - 0.04 * subtitle.count("\n")))


def _subtitle(sel: list[dict], metas: Sequence[dict], failed: bool) -> str:
    """GPU, dtype, date, the batch shape and what the marks mean."""
    gpus = list(dict.fromkeys(m.get("gpu", "?") for m in metas))
    dates = sorted({(m.get("timestamp") or "?")[:10] for m in metas})
    dtypes = sorted({r["dtype"] for r in sel})
    tokens = Counter(r["B"] * r["N"] for r in sel).most_common(1)[0][0]
    other = sorted({(r["N"], r["B"]) for r in sel if r["B"] * r["N"] != tokens})
    shape = f"B x N = {_n_label(tokens)} tokens" + "".join(f", N = {_n_label(n)}: B = {b}" for n, b in other)
    heads = sorted({r["H"] for r in sel})
    parts = [" / ".join(gpus), ", ".join(dtypes), " to ".join(dict.fromkeys([dates[0], dates[-1]])), shape,
             f"H = {'/'.join(map(str, heads))}"]
    text = ",  ".join(parts) + "\nFLOPs: 4·B·H·N²·D per forward, halved when causal"
    text += "; forward + backward counts 3.5 forwards" if sel[0]["pass"] == "fwd_bwd" else ""
    if any(m.get("interpreter") for m in metas):
        text += "\nTriton INTERPRETER on CPU: these timings say nothing about GPU speed"
    if failed:
        text += "\nhatched, ! = failed the check against the float64 reference"
    return text
