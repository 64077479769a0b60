#!/usr/bin/env python
"""Attention entropy against context length, 64 to 128k tokens (issue 6).

For each query row, H_i = -sum_j p_ij ln p_ij (nats) and max_j p_ij come from the fused forward itself
(``infoscale_triton.scaled_dot_product_attention(..., return_entropy=True)``, no L x L matrix), for three
inference temperatures: none, "logn" and "infoscale" (unclipped; --temperatures picks others).
ln(n), the entropy of uniform attention over the n keys a row sees, is the reference line.

Random inputs (panels "random_d64", "random_d128"): q, k ~ N(0, 1) iid, B = 1, 8 heads, head dim D,
causal attention, train_len N = 512. Every length takes the prefix of the same draw (seed + D), so the
lengths differ only in how many keys the rows see. Dot-product logits q.k / sqrt(D) are then ~N(0, 1);
CosScale logits s cos(q, k) (s = --cos-scale, 32) are ~N(0, s^2 / D). The value is random with
Dv = 16 (only the entropy is wanted). Reported: the mean over heads of the last --last-rows (64) rows,
which see about L keys ("entropy"), and the mean over every row ("entropy_all_rows").

Trained model (panels "model_dot", "model_cos"): the two RoPE transformers of
benchmarks/extrapolation.py (MLM, bidirectional, train length 64; the code is in
infoscale_triton/cli/textmodel.py), from --checkpoint (written by ``extrapolation.py --save-checkpoint``)
or trained here for --train-seconds each. The held-out stdlib bytes (extrapolation's test split and MLM
corruption) are cut into windows of each length; every layer's
attention runs with the inference temperature and reports its entropy. Reported: the mean over rows,
heads and windows, per layer ("entropy_layers") and over the layers ("entropy").

Reference check: where it fits, ``infoscale_triton.reference.attention_entropy`` (eager, float64, L x L
logits) on the same inputs (random: all heads; model: the first window) gives the relative error of the
fused entropy and max probability. On a GPU the reference is tried at every length until it first runs
out of memory (caught, recorded as "oom" with its estimated size); longer lengths are skipped, while the
fused path goes on to the longest length.

Timing: random inputs, the wall time of one fused call after a warm-up call (GPU); model, the wall time
of the forward passes over the eval tokens at that length, after a one-window warm-up, without the
reference checks.

Outputs under --out: ``entropy_<UTC>.json`` (settings, seeds, GPU and versions, every row, reference
errors, timings, the verdict) and ``entropy_<UTC>.png`` (one panel per input; skipped with a message if
matplotlib is missing); tables on stdout and a closing sentence on whether InfoScale keeps the entropy
flatter than no temperature beyond train_len.

Expected times (H100, estimated, not yet measured): the fused calls take well under a second per
method in all (a causal 128k x 8 heads x D 128 forward is ~0.1 s), the model passes and the reference
checks some seconds each; most of a first run goes to Triton compiling ~36 kernel variants (cached on
disk for the next run).

  python benchmarks/extrapolation.py --save-checkpoint models.pt   # the models, once (~8 minutes)
  python benchmarks/entropy.py --checkpoint models.pt   # H100: ~2-3 minutes cold, ~1 minute cached
  python benchmarks/entropy.py --train-seconds 60       # trains the models here: + 2 x 60 s
  python benchmarks/entropy.py --no-model               # random inputs only: < 1 minute
  python benchmarks/entropy.py --smoke                  # CPU, Triton interpreter, < 1 minute
"""

from __future__ import annotations

import argparse
import functools
import gc
import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import torch

import infoscale_triton
from infoscale_triton import reference, testing
from infoscale_triton.cli import harness, textmodel
from infoscale_triton.cli.console import table

GIB = 2**30
# The float64 reference's peak memory per logit (B * H * Lq * Lk) until one is measured on the GPU:
# about six live (B, H, Lq, Lk) float64 tensors.
REF_BYTES_PER_LOGIT = 48.0


@dataclass
class Settings:
    lengths: list[int] = field(default_factory=lambda: [64 * 2**i for i in range(12)])  # 64 .. 131072
    heads: int = 8
    head_dims: list[int] = field(default_factory=lambda: [64, 128])
    value_dim: int = 16  # the kernels' smallest head dim
    train_len: int = 512  # N of the random-input temperatures
    cos_scale: float = 32.0
    temperatures: list[str] = field(default_factory=lambda: ["none", "logn", "infoscale"])
    last_rows: int = 64
    seed: int = 0
    dtype: str = "bfloat16"
    ref_max_length: int = 0  # 0: up to the first out-of-memory (GPU)
    oom_attempt: bool = True
    random: bool = True
    model: bool = True
    checkpoint: str | None = None
    train_seconds: float = 60.0
    model_tokens: int = 131072


def smoke_settings(base: Settings) -> Settings:
    """Tiny sizes for the Triton interpreter on CPU: checks the script, not the science."""
    return replace(base, lengths=[32, 64, 128], heads=2, head_dims=[16, 32], train_len=32, last_rows=8,
                   dtype="float32", ref_max_length=128, model_tokens=128)


# ------------------------------------------------------------------------------------ fused entropy

def call_kwargs(logits: str, temperature: str, train_len: int, cos_scale: float) -> dict:
    """The scaled_dot_product_attention keywords of one method."""
    return {"cos_scale": cos_scale if logits == "cos" else None,
            "temperature": None if temperature == "none" else temperature,
            "train_len": None if temperature == "none" else train_len}


# ------------------------------------------------------------------------------- reference, guarded

class ReferenceGuard:
    """Runs the eager float64 reference where it may fit and compares the fused entropy with it.

    On a GPU each panel tries the reference at every length (up to --ref-max-length) until it first runs
    out of memory; that error is caught and recorded, and longer lengths of the panel are skipped. On a
    CPU an out-of-memory kills the process instead of raising, so the reference only runs where its
    estimated size fits in half of the available memory."""

    def __init__(self, device: torch.device, max_length: int, oom_attempt: bool) -> None:
        self.device, self.max_length, self.oom_attempt = device, max_length, oom_attempt
        self.bytes_per_logit = REF_BYTES_PER_LOGIT
        self.measured = False
        self.oom_length: dict[str, int] = {}  # panel -> first length that ran out of memory

    def free_bytes(self) -> float:
        if self.device.type == "cuda":
            return float(torch.cuda.mem_get_info()[0])
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2
        except (ValueError, OSError, AttributeError):
            return 4.0 * GIB

    def check(self, panel: str, q: torch.Tensor, k: torch.Tensor, entropy: torch.Tensor,
              max_prob: torch.Tensor, **kwargs: object) -> dict:
        """Compare the fused (entropy, max_prob) of q, k (B, H, L, D) with the reference's; kwargs are the
        attention's (is_causal, cos_scale, temperature, train_len)."""
        length = q.shape[2]
        logits = q.shape[0] * q.shape[1] * length * k.shape[2]
        estimate = logits * self.bytes_per_logit
        free = self.free_bytes()
        record: dict = {"heads": q.shape[1], "estimated_bytes": int(estimate), "free_bytes": int(free)}
        skipped = {**record, "status": "skipped"}
        if self.max_length and length > self.max_length:
            return {**skipped, "reason": f"longer than --ref-max-length {self.max_length}"}
        if length >= self.oom_length.get(panel, math.inf):
            return {**skipped, "reason": f"out of memory at {self.oom_length[panel]} already"}
        if estimate > free and not (self.device.type == "cuda" and self.oom_attempt):
            return {**skipped, "reason": "the estimate exceeds the free memory"}
        start = time.perf_counter()
        try:
            want = self._run(q, k, logits, **kwargs)
        except torch.OutOfMemoryError:
            want = None
        if want is None:
            gc.collect()  # only now, out of the except clause, are the failed attempt's tensors unreferenced
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # so that the next estimate compares with what is really free
        seconds = time.perf_counter() - start
        if want is None:
            self.oom_length[panel] = length
            return {**record, "status": "oom", "seconds": seconds}
        record.update(status="checked", seconds=seconds, rel_err_entropy=testing.rel_error(entropy, want[0]),
                      rel_err_max_prob=testing.rel_error(max_prob, want[1]),
                      max_abs_err_entropy=(entropy.double() - want[0]).abs().max().item())
        if kwargs.get("cos_scale") is not None and q.dtype in (torch.float16, torch.bfloat16):
            # Under CosScale the kernels read the unit keys rounded to the input dtype (as F.normalize in
            # that dtype would give them) and take them as they are (not renormalised): the reference
            # on those same keys, as dot products s * q_hat . k_rounded, leaves the kernel's own error.
            unit_k = torch.nn.functional.normalize(k.double(), dim=-1).to(q.dtype)
            unit_q = torch.nn.functional.normalize(q.double(), dim=-1)
            rounded = self._run(unit_q, unit_k, logits, **{**kwargs, "cos_scale": None,
                                                           "scale": kwargs["cos_scale"]})
            record["rel_err_entropy_rounded_unit_keys"] = testing.rel_error(entropy, rounded[0])
        return record

    def _run(self, q: torch.Tensor, k: torch.Tensor, logits: int,
             **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference in float64, measuring its peak memory per logit on a GPU for later estimates."""
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        with torch.autocast(self.device.type, enabled=False):  # the model runs under autocast
            entropy, max_prob = reference.attention_entropy(q.double(), k.double(), **kwargs)
        if cuda:
            per_logit = (torch.cuda.max_memory_allocated() - base) / logits
            # the latest (largest) run: small runs overstate it with fixed allocations
            self.bytes_per_logit = per_logit
            self.measured = True
        return entropy, max_prob


# ------------------------------------------------------------------------------------ random inputs

def random_qkv(head_dim: int, s: Settings, device: torch.device) -> tuple[torch.Tensor, ...]:
    """q, k ~ N(0, 1), v ~ N(0, 1) of the longest length, (1, H, L, D); shorter lengths take prefixes."""
    g = torch.Generator(device=device).manual_seed(s.seed + head_dim)
    shape = (1, s.heads, max(s.lengths))
    dtype = getattr(torch, s.dtype)
    return tuple(torch.randn(*shape, d, generator=g, device=device).to(dtype)
                 for d in (head_dim, head_dim, s.value_dim))


def causal_uniform(length: int, rows: int) -> tuple[float, float]:
    """Mean ln(n) of a causal attention's last `rows` rows and of all its rows (row i sees i + 1 keys)."""
    ln_n = torch.arange(1, length + 1, dtype=torch.float64).log()
    return ln_n[-rows:].mean().item(), ln_n.mean().item()


def random_panel(head_dim: int, s: Settings, guard: ReferenceGuard, device: torch.device) -> list[dict]:
    panel = f"random_d{head_dim}"
    q_all, k_all, v_all = random_qkv(head_dim, s, device)
    rows = []
    for logits in ("dot", "cos"):
        for temp in s.temperatures:
            kwargs = {"is_causal": True, **call_kwargs(logits, temp, s.train_len, s.cos_scale)}
            for length in s.lengths:
                q, k, v = (t[:, :, :length] for t in (q_all, k_all, v_all))
                if device.type == "cuda":  # compile outside the timing
                    infoscale_triton.scaled_dot_product_attention(q, k, v, return_entropy=True, **kwargs)
                textmodel.sync(device)
                start = time.perf_counter()
                _, ent = infoscale_triton.scaled_dot_product_attention(q, k, v, return_entropy=True, **kwargs)
                textmodel.sync(device)
                seconds = time.perf_counter() - start
                last = min(s.last_rows, length)
                uniform_last, uniform_all = causal_uniform(length, last)
                rows.append({
                    "input": panel, "logits": logits, "temperature": temp, "length": length,
                    "entropy": ent.entropy[..., -last:].mean().item(),
                    "entropy_all_rows": ent.entropy.mean().item(),
                    "max_prob": ent.max_prob[..., -last:].mean().item(),
                    "max_prob_all_rows": ent.max_prob.mean().item(),
                    "uniform": uniform_last, "uniform_all_rows": uniform_all, "fused_ms": 1e3 * seconds,
                    "reference": guard.check(panel, q, k, ent.entropy, ent.max_prob, **kwargs)})
    return rows


# ------------------------------------------------------------------------------------ trained model

class LayerStats:
    """Per-layer sums of the row entropy and largest probability, filled by the probed attention."""

    def __init__(self, layers: int, device: torch.device) -> None:
        self.entropy = torch.zeros(layers, dtype=torch.float64, device=device)
        self.max_prob = torch.zeros(layers, dtype=torch.float64, device=device)
        self.rows = [0] * layers
        self.reference: list[dict | None] = [None] * layers
        self.reference_seconds = 0.0

    def add(self, layer: int, ent: infoscale_triton.AttentionEntropy) -> None:
        self.entropy[layer] += ent.entropy.double().sum()
        self.max_prob[layer] += ent.max_prob.double().sum()
        self.rows[layer] += ent.entropy.numel()


def probed_attend(layer: int, stats: LayerStats, guard: ReferenceGuard | None, panel: str, q: torch.Tensor,
                  k: torch.Tensor, v: torch.Tensor, kind: textmodel.AttentionKind) -> torch.Tensor:
    """textmodel.Block.attend with return_entropy: the same attention call, its entropy kept, and the
    first window checked against the reference once per layer."""
    kwargs = {"is_causal": kind.causal, "cos_scale": kind.cos_scale, "temperature": kind.temperature,
              "train_len": kind.train_len}
    out, ent = infoscale_triton.scaled_dot_product_attention(q, k, v, return_entropy=True, **kwargs)
    stats.add(layer, ent)
    if guard is not None and stats.reference[layer] is None:
        start = time.perf_counter()
        stats.reference[layer] = guard.check(panel, q[:1], k[:1], ent.entropy[:1], ent.max_prob[:1], **kwargs)
        textmodel.sync(q.device)
        stats.reference_seconds += time.perf_counter() - start
    return out


@contextmanager
def probe(model: textmodel.Transformer, guard: ReferenceGuard | None, panel: str) -> Iterator[LayerStats]:
    """Swap each block's attend for probed_attend (an instance attribute over the method) while inside."""
    stats = LayerStats(len(model.blocks), next(model.parameters()).device)
    for layer, block in enumerate(model.blocks):
        block.attend = functools.partial(probed_attend, layer, stats, guard, panel)
    try:
        yield stats
    finally:
        for block in model.blocks:
            del block.attend


@torch.no_grad()
def model_length(model: textmodel.Transformer, kind: textmodel.AttentionKind, inputs: torch.Tensor, length: int,
                 cfg: textmodel.Config, guard: ReferenceGuard, panel: str) -> dict:
    """Entropy per layer over the eval tokens cut into windows of `length`, in batches of
    cfg.eval_batch_tokens tokens (as textmodel.evaluate)."""
    device = inputs.device
    x = inputs.view(-1, length)
    batch = max(1, cfg.eval_batch_tokens // length)
    if device.type == "cuda":
        with probe(model, None, panel), textmodel.autocast(device):  # compile outside the timing
            model(x[:1], kind)
        textmodel.sync(device)
    start = time.perf_counter()
    with probe(model, guard, panel) as stats:
        for i in range(0, x.shape[0], batch):
            with textmodel.autocast(device):
                model(x[i:i + batch], kind)
        textmodel.sync(device)
    seconds = time.perf_counter() - start - stats.reference_seconds
    layers = (stats.entropy / torch.tensor(stats.rows, device=device)).tolist()
    max_prob = (stats.max_prob / torch.tensor(stats.rows, device=device)).tolist()
    return {"entropy": sum(layers) / len(layers), "entropy_layers": layers,
            "max_prob": sum(max_prob) / len(max_prob), "max_prob_layers": max_prob,
            # a CLM checkpoint's rows are causal: row i sees i + 1 keys
            "uniform": causal_uniform(length, length)[1] if kind.causal else math.log(length),
            "windows": x.shape[0], "forward_ms": 1e3 * seconds,
            "reference_layers": stats.reference,
            "reference": worst_reference(stats.reference)}


def worst_reference(records: list[dict | None]) -> dict:
    """One record for the layers: the worst errors if every layer was checked, else the first other."""
    records = [r for r in records if r is not None]
    others = [r for r in records if r["status"] != "checked"]
    if others or not records:
        return others[0] if others else {"status": "skipped", "reason": "no attention call"}
    keys = ("rel_err_entropy", "rel_err_max_prob", "max_abs_err_entropy", "estimated_bytes",
            "rel_err_entropy_rounded_unit_keys")
    worst = {key: max(r[key] for r in records) for key in keys if key in records[0]}
    return {**records[0], **worst}


def train_models(cfg: textmodel.Config, stream: torch.Tensor) -> tuple[dict, dict]:
    """Both models trained with the experiment's own functions (textmodel) (equal steps for both, as there)."""
    models, training, steps = {}, {}, None
    for name in textmodel.MODELS:
        models[name], training[name] = textmodel.train_model(name, cfg, stream, steps)
        models[name].eval()
        steps = steps or training[name]["steps"]
    return models, training


def model_panels(s: Settings, guard: ReferenceGuard, device: torch.device,
                 smoke: bool) -> tuple[list[dict], dict]:
    """The trained models' rows, from --checkpoint or trained here for s.train_seconds each."""
    if s.checkpoint:
        cfg, models, training = textmodel.load_checkpoint(Path(s.checkpoint), device)
        training = {"checkpoint": s.checkpoint, **training}
        print(f"models from {s.checkpoint}: {cfg.layers} layers, d_model {cfg.d_model}, {cfg.heads} heads, "
              f"train length {cfg.train_len}, cos_scale {cfg.cos_scale:g}", flush=True)
    else:
        cfg = textmodel.Config(train_seconds=s.train_seconds)
        cfg = textmodel.smoke_config(cfg) if smoke else cfg
    train_tokens, test_tokens, data_info = textmodel.load_data(cfg)
    if not s.checkpoint:
        models, training = train_models(cfg, train_tokens.to(device))
    # extrapolation's held-out bytes and MLM corruption: the same tokens at every length
    lengths = s.lengths
    tokens = math.ceil(s.model_tokens / max(lengths)) * max(lengths)
    eval_cfg = replace(cfg, lengths=lengths, eval_tokens=tokens)
    inputs, _ = textmodel.eval_set(test_tokens.to(device), eval_cfg)
    if inputs.numel() < max(lengths):
        raise SystemExit(f"the test split has {test_tokens.numel()} tokens, fewer than {max(lengths)}")
    rows = []
    for name, model in models.items():
        panel = f"model_{name}"
        for temp in s.temperatures:
            kind = textmodel.inference_kind(name, temp, cfg)
            for length in lengths:
                metrics = model_length(model, kind, inputs, length, cfg, guard, panel)
                rows.append({"input": panel, "logits": name, "temperature": temp, "length": length,
                             "temperature_arg": kind.temperature, **metrics})
    info = {"config": asdict(cfg), "training": training, "data": data_info, "eval_tokens": inputs.numel(),
            "eval_corruption_seed": cfg.seed + 2}
    return rows, info


# ------------------------------------------------------------------------------------------- report

def panel_train_len(panel: str, s: Settings, model_cfg: dict | None) -> int:
    return model_cfg["train_len"] if panel.startswith("model_") and model_cfg else s.train_len


def print_tables(rows: list[dict], lengths: list[int]) -> None:
    for panel in dict.fromkeys(r["input"] for r in rows):
        sel = [r for r in rows if r["input"] == panel]
        shown = [n for n in lengths if any(r["length"] == n for r in sel)]
        body = []
        for logits, temp in dict.fromkeys((r["logits"], r["temperature"]) for r in sel):
            by_len = {r["length"]: r for r in sel if r["logits"] == logits and r["temperature"] == temp}
            body.append([f"{logits} {temp}", *(f"{by_len[n]['entropy']:.3f}" for n in shown)])
        uniform = {r["length"]: r["uniform"] for r in sel}
        body.append(["ln n (uniform)", *(f"{uniform[n]:.3f}" for n in shown)])
        what = "last rows, causal" if panel.startswith("random") else "mean over layers and rows"
        table(["method", *map(str, shown)], body, title=f"{panel}: entropy in nats ({what})")


def reference_summary(rows: list[dict], longest: int) -> dict:
    """Per panel: the longest checked length, the worst errors, where the reference ran out of memory."""
    summary = {}
    for panel in dict.fromkeys(r["input"] for r in rows):
        refs = [(r["length"], r["reference"]) for r in rows if r["input"] == panel]
        checked = [(n, ref) for n, ref in refs if ref["status"] == "checked"]
        oom = [(n, ref) for n, ref in refs if ref["status"] == "oom"]
        summary[panel] = {
            "checked_up_to": max((n for n, _ in checked), default=None),
            "max_rel_err_entropy": max((ref["rel_err_entropy"] for _, ref in checked), default=None),
            "max_rel_err_max_prob": max((ref["rel_err_max_prob"] for _, ref in checked), default=None),
            "max_rel_err_entropy_rounded_unit_keys": max(
                (ref["rel_err_entropy_rounded_unit_keys"] for _, ref in checked
                 if "rel_err_entropy_rounded_unit_keys" in ref), default=None),
            "oom_at": min((n for n, _ in oom), default=None),
            "oom_estimated_bytes": min((ref["estimated_bytes"] for _, ref in oom), default=None),
            "fused_up_to": longest}
    return summary


def reference_lines(summary: dict) -> list[str]:
    lines = []
    for panel, r in summary.items():
        checked = (f"ran up to L = {r['checked_up_to']} (worst relative error: entropy "
                   f"{r['max_rel_err_entropy']:.1e}, max prob {r['max_rel_err_max_prob']:.1e})"
                   if r["checked_up_to"] else "not run")
        if r.get("max_rel_err_entropy_rounded_unit_keys") is not None:
            checked += (f" [CosScale entropy against the reference on the kernel's rounded unit keys: "
                        f"{r['max_rel_err_entropy_rounded_unit_keys']:.1e}]")
        oom = (f"; first out of memory at L = {r['oom_at']} (~{r['oom_estimated_bytes'] / GIB:.0f} GiB "
               f"estimated)"
               if r["oom_at"] else "")
        lines.append(f"{panel}: float64 eager reference {checked}{oom}; the fused path answered up to "
                     f"L = {r['fused_up_to']}")
    return lines


def flatness(rows: list[dict], s: Settings, model_cfg: dict | None) -> list[dict]:
    """Per panel and logits: each temperature's entropy change from train_len (or the first length past
    it) to the longest length, next to ln(L_max / N), the change of uniform attention."""
    cases = []
    for panel, logits in dict.fromkeys((r["input"], r["logits"]) for r in rows):
        sel = [r for r in rows if r["input"] == panel and r["logits"] == logits]
        lengths = sorted({r["length"] for r in sel})
        n = panel_train_len(panel, s, model_cfg)
        start = next((m for m in lengths if m >= n), None)
        if start is None or start == lengths[-1]:
            continue
        at = {(r["temperature"], r["length"]): r["entropy"] for r in sel}
        delta = {t: at[(t, lengths[-1])] - at[(t, start)] for t in s.temperatures}
        cases.append({"input": panel, "logits": logits, "from": start, "to": lengths[-1], "delta": delta,
                      "uniform_delta": math.log(lengths[-1] / start)})
    return cases


def verdict(cases: list[dict]) -> str:
    if not cases or "none" not in cases[0]["delta"] or "infoscale" not in cases[0]["delta"]:
        return "No verdict: it needs lengths past train_len and the temperatures none and infoscale."
    flatter = [c for c in cases if abs(c["delta"]["infoscale"]) < abs(c["delta"]["none"])]
    detail = "; ".join(
        f"{c['input']} {c['logits']} {c['from']}->{c['to']}: "
        + ", ".join(f"{t} {d:+.2f}" for t, d in c["delta"].items()) + f" (ln ratio {c['uniform_delta']:.2f})"
        for c in cases)
    word = "in every case" if len(flatter) == len(cases) else f"in {len(flatter)} of {len(cases)} cases"
    return (f"Beyond train_len, InfoScale keeps the attention entropy flatter than no temperature {word} "
            f"(change in nats from train_len to the longest length: {detail}).")


def panel_title(panel: str, s: Settings, model_cfg: dict | None) -> str:
    if panel.startswith("random_d"):
        return (f"random q, k, D = {panel.removeprefix('random_d')}, {s.heads} heads\n"
                f"causal, last {s.last_rows} rows; CosScale s = {s.cos_scale:g}")
    logits = f"CosScale s = {model_cfg['cos_scale']:g}" if panel == "model_cos" else "dot product"
    return (f"trained {model_cfg['objective'].upper()}, {model_cfg['layers']} layer(s) x {model_cfg['heads']} "
            f"heads\n{logits}; mean over layers and rows")


def plot(rows: list[dict], s: Settings, model_cfg: dict | None, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG (the JSON has every number)")
        return False
    panels = list(dict.fromkeys(r["input"] for r in rows))
    cols = min(len(panels), 2)
    grid_rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(grid_rows, cols, figsize=(5.5 * cols, 4.2 * grid_rows + 0.4), squeeze=False)
    colors = {"none": "tab:gray", "logn": "tab:blue", "infoscale": "tab:red"}
    styles = {"dot": ("-", "o"), "cos": (":", "s")}
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, panel in zip(axes.flat, panels):
        sel = sorted((r for r in rows if r["input"] == panel), key=lambda r: r["length"])
        for logits, temp in dict.fromkeys((r["logits"], r["temperature"]) for r in sel):
            line = [r for r in sel if r["logits"] == logits and r["temperature"] == temp]
            style, marker = styles[logits]
            ax.plot([r["length"] for r in line], [r["entropy"] for r in line], linestyle=style, marker=marker,
                    markersize=3, color=colors.get(temp), label=f"{logits} + {temp}")
        uniform = {r["length"]: r["uniform"] for r in sel}
        ax.plot(list(uniform), list(uniform.values()), "k--", linewidth=0.8, label="ln n (uniform)")
        ax.axvline(panel_train_len(panel, s, model_cfg), color="k", linewidth=0.5)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length L (tokens)")
        ax.set_ylabel("attention entropy (nats)")
        ax.set_title(panel_title(panel, s, model_cfg), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Attention entropy against context length (vertical line: train_len)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------------- main

def parse_args() -> tuple[Settings, argparse.Namespace]:
    d = Settings()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--min-length", type=int, default=min(d.lengths),
                   help="shortest length; the lengths are min, 2 min, 4 min, ... up to --max-length")
    p.add_argument("--max-length", type=int, default=max(d.lengths), help="longest length")
    p.add_argument("--heads", type=int, default=d.heads, help="heads of the random inputs")
    p.add_argument("--head-dims", type=int, nargs="+", default=d.head_dims, help="D of the random inputs")
    p.add_argument("--train-len", type=int, default=d.train_len,
                   help="N of the random inputs' temperatures (the model uses its own training length)")
    p.add_argument("--cos-scale", type=float, default=d.cos_scale,
                   help="s of the random inputs' CosScale logits (the model uses its own)")
    p.add_argument("--temperatures", nargs="+", default=d.temperatures, metavar="T",
                   choices=("none", *infoscale_triton.TEMPERATURE_CHOICES),
                   help=f"inference temperatures, of: none {' '.join(infoscale_triton.TEMPERATURE_CHOICES)} "
                        f"(default: {' '.join(d.temperatures)})")
    p.add_argument("--last-rows", type=int, default=d.last_rows,
                   help="random inputs: the causal rows averaged for the headline entropy (the last ones)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                   help="random inputs' dtype (default bfloat16 on a GPU, float32 on CPU: the "
                        "interpreter's bfloat16 dots are wrong)")
    p.add_argument("--seed", type=int, default=d.seed, help="random inputs of head dim D use seed + D")
    p.add_argument("--ref-max-length", type=int, default=d.ref_max_length,
                   help="longest length checked against the eager float64 reference (0: on a GPU until it "
                        "runs out of memory; on CPU where its estimate fits)")
    p.add_argument("--no-oom-attempt", action="store_true",
                   help="on a GPU, skip the reference where its estimate exceeds the free memory instead of "
                        "trying it once and catching the out-of-memory error")
    model = p.add_mutually_exclusive_group()
    model.add_argument("--checkpoint", type=Path, metavar="PATH",
                       help="the two trained models (benchmarks/extrapolation.py --save-checkpoint PATH)")
    model.add_argument("--no-model", action="store_true", help="random inputs only")
    p.add_argument("--no-random", action="store_true", help="the trained models only")
    p.add_argument("--train-seconds", type=float, default=d.train_seconds,
                   help="without --checkpoint: training time of each of the two models")
    p.add_argument("--model-tokens", type=int, default=d.model_tokens,
                   help="held-out tokens run through the model at each length (rounded up to a multiple of "
                        "the longest length)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (CPU interpreter, < 1 minute)")
    p.add_argument("--out", type=Path, default=None,
                   help="where the JSON, CSV and PNG go (default benchmarks/results/; --smoke: a temporary "
                        "directory)")
    a = p.parse_args()
    lengths = [a.min_length * 2**i for i in range(64) if a.min_length * 2**i <= a.max_length]
    dtype = a.dtype or ("bfloat16" if torch.cuda.is_available() else "float32")
    s = Settings(lengths=lengths, heads=a.heads, head_dims=a.head_dims, train_len=a.train_len,
                 cos_scale=a.cos_scale, temperatures=a.temperatures, last_rows=a.last_rows, seed=a.seed,
                 dtype=dtype, ref_max_length=a.ref_max_length, oom_attempt=not a.no_oom_attempt,
                 random=not a.no_random, model=not a.no_model, train_seconds=a.train_seconds,
                 checkpoint=str(a.checkpoint) if a.checkpoint else None, model_tokens=a.model_tokens)
    if a.smoke:
        s = smoke_settings(s)
    if not s.lengths:
        p.error("no length between --min-length and --max-length")
    if not (s.random or s.model):
        p.error("--no-random and --no-model leave nothing to run")
    return s, a


def main() -> int:
    code = harness.ensure_backend()
    if code is not None:
        return code
    s, args = parse_args()
    started = datetime.now(timezone.utc)
    device = torch.device(harness.device())
    out = harness.ResultsFile("entropy", harness.results_dir(args.out, args.smoke), harness.metadata())
    png_path = out.stem.with_suffix(".png")
    guard = ReferenceGuard(device, s.ref_max_length, s.oom_attempt)
    phases: dict[str, float] = {}
    out.summaries.update(settings=asdict(s), phases_s=phases,
                         seeds={f"random_d{d}": s.seed + d for d in s.head_dims} if s.random else {})

    for head_dim in s.head_dims if s.random else []:
        t0 = time.perf_counter()
        print(f"random inputs, D = {head_dim}: {len(s.lengths)} lengths x {2 * len(s.temperatures)} methods",
              flush=True)
        out.records += random_panel(head_dim, s, guard, device)
        phases[f"random_d{head_dim}"] = time.perf_counter() - t0
        out.write()  # partial results survive a later failure
    if s.model:
        t0 = time.perf_counter()
        rows, out.summaries["model"] = model_panels(s, guard, device, args.smoke)
        out.records += rows
        phases["model"] = time.perf_counter() - t0

    results = out.records
    model_cfg = out.summaries.get("model", {}).get("config")
    print_tables(results, s.lengths)
    summary = reference_summary(results, max(s.lengths))
    cases = flatness(results, s, model_cfg)
    result = verdict(cases)
    png = png_path.name if plot(results, s, model_cfg, png_path) else None
    phases["total"] = (datetime.now(timezone.utc) - started).total_seconds()
    out.write(reference_summary=summary, flatness=cases, verdict=result, png=png,
              reference_bytes_per_logit=guard.bytes_per_logit if guard.measured else None)
    print()
    print("\n".join(reference_lines(summary)))
    print(f"\nwrote {out.json_path}" + (f" and {png_path}" if png else ""))
    print("phases (s): " + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()))
    print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
