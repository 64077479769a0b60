"""``python -m infoscale_triton check``: the fused kernels against the float64 reference, output and the
gradients of q, k, v, on a set of configurations, each within the error budget of
:mod:`infoscale_triton.testing`. Exit code 1 on any failure.

``--quick`` (what the main job runs) checks three cases in one dtype on a GPU: on a cold machine the
time goes to compiling kernel variants (each combination of options is one, ~10 s), so the quick cases
are the benchmark's own variants (D = 128, causal, InfoScale and CosScale: ``bench --quick`` then finds
them compiled) plus one off the fast path (odd lengths, D = 80). Without a GPU the interpreter compiles
nothing: the same cases (at D = 64, the smoke bench's) in float16 and float32.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import harness


@dataclass(frozen=True)
class Case:
    """One configuration of the kernels, checked against the float64 reference."""

    name: str
    lq: int
    lk: int
    d: int = 64
    dv: int | None = None
    b: int = 2
    hq: int = 4
    hkv: int = 4
    causal: bool = False
    temperature: str | None = "infoscale"  # a string kind, "tensor" (random per-row), or None
    cos: bool = False
    mask: str | None = None  # None, "bool" (with fully masked rows) or "float" (additive, some -inf)
    padding: str | None = None  # None, "lengths" (kv_lengths) or "mask" (a (B, 1, 1, Lk) boolean mask)
    window: tuple[int, int] | None = None
    quick: bool = False  # in the main job's quick check


def cases(gpu: bool) -> list[Case]:
    """Small on the CPU (the interpreter runs every program in Python), larger on a GPU."""
    n = 512 if gpu else 128
    odd_q, odd_k = (1000, 1531) if gpu else (97, 131)
    d_bench = 128 if gpu else 64  # the quick bench's head dim on a GPU (its kernels get compiled here)
    return [
        Case(f"InfoScale, causal, D={d_bench}", n, n, d=d_bench, causal=True, quick=True),
        Case("InfoScale", n, n),
        Case("logn, causal", n, n, causal=True, temperature="logn"),
        Case("InfoScale clipped, causal Lq < Lk", n // 4 + 3, n, causal=True,
             temperature="infoscale_clipped"),
        Case(f"CosScale s=32 + InfoScale, causal, D={d_bench}", n, n, d=d_bench, causal=True, cos=True,
             quick=True),
        Case("CosScale s=32 + InfoScale", n, n, cos=True),
        Case("GQA 8/2 heads, InfoScale, causal", n, n, hq=8, hkv=2, causal=True),
        Case("bool mask (empty rows), InfoScale", n, n, mask="bool"),
        Case("float mask, CosScale + InfoScale, causal", n, n, causal=True, cos=True, mask="float"),
        Case("odd lengths, D=80, causal", odd_q, odd_k, d=80, causal=True, quick=True),
        Case("D=59, Dv=40 (unaligned rows)", odd_q, odd_k, d=59, dv=40, cos=True),
        Case("tensor temperature, causal", n, n, causal=True, temperature="tensor"),
        Case("key padding (kv_lengths), InfoScale, causal", n, n, causal=True, padding="lengths"),
        Case("key padding mask (B,1,1,Lk), CosScale + InfoScale", n, n, cos=True, padding="mask"),
        Case(f"sliding window ({n // 8}, 0), InfoScale, causal", n, n, causal=True, window=(n // 8, 0)),
    ]


def default_dtypes(gpu: bool, quick: bool) -> list[str]:
    """bf16 and fp16 on a GPU (bf16 alone for --quick: each dtype compiles its own kernels); fp16 and
    fp32 through the interpreter (bf16 there is right but emulated: slower, and no more to learn on a CPU)."""
    if gpu:
        return ["bfloat16"] if quick else ["bfloat16", "float16"]
    return ["float16", "float32"]


def _inputs(c: Case, dtype: torch.dtype, device: str, gen: torch.Generator):
    """Random q, k, v (std 2, never zeros), and the call's keyword arguments."""
    def randn(*shape: int) -> torch.Tensor:
        return (2 * torch.randn(*shape, generator=gen)).to(device=device, dtype=dtype)

    q, k, v = randn(c.b, c.hq, c.lq, c.d), randn(c.b, c.hkv, c.lk, c.d), randn(c.b, c.hkv, c.lk, c.dv or c.d)
    kw: dict = {"is_causal": c.causal, "enable_gqa": c.hq != c.hkv, "cos_scale": 32.0 if c.cos else None}
    if c.temperature == "tensor":
        kw["temperature"] = (0.5 + torch.rand(c.b, c.hq, c.lq, generator=gen)).to(device)
    elif c.temperature is not None:
        kw.update(temperature=c.temperature, train_len=max(c.lk // 2, 2))
    if c.padding is not None:
        lengths = torch.tensor([c.lk // 3 + 1, c.lk][: c.b])  # keys [0, len_b) of each batch entry
        if c.padding == "lengths":
            kw["kv_lengths"] = lengths.to(device)
        else:
            kw["attn_mask"] = (torch.arange(c.lk) < lengths[:, None]).view(c.b, 1, 1, c.lk).to(device)
    if c.window is not None:
        kw["window"] = c.window
    if c.mask == "bool":
        m = torch.rand(c.b, 1, c.lq, c.lk, generator=gen) < 0.8
        m[:, :, :3] = False  # rows that may attend to nothing must come out as zeros
        kw["attn_mask"] = m.to(device)
    elif c.mask == "float":
        m = torch.randn(1, c.hq, c.lq, c.lk, generator=gen)
        m[torch.rand(m.shape, generator=gen) < 0.1] = float("-inf")
        kw["attn_mask"] = m.to(device=device, dtype=dtype)
    return q, k, v, kw


def _cast(kw: dict, dtype: torch.dtype) -> dict:
    """The keyword arguments with float tensors (mask, temperature) in ``dtype``."""
    return {k: (x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x)
            for k, x in kw.items()}


def run_check(dtype_names: Sequence[str] | None = None, patterns: Sequence[str] | None = None,
              quick: bool = False) -> int:
    """Check the cases whose name contains one of ``patterns`` (all by default, the quick ones with
    ``quick``; case-insensitive) in each dtype; exit code 1 on any failure, 2 if no case matches."""
    from infoscale_triton import tuning

    gpu = harness.on_gpu()
    selected = [c for c in cases(gpu) if (not quick or c.quick)
                and (not patterns or any(p.lower() in c.name.lower() for p in patterns))]
    if not selected:
        print(f"check: no case name contains any of {list(patterns or [])}; the cases are:\n  "
              + "\n  ".join(c.name for c in cases(gpu)), file=sys.stderr)
        return 2
    dtypes = [getattr(torch, n) for n in (dtype_names or default_dtypes(gpu, quick))]
    # One fixed launch config per head dim: autotuning every shape here would take minutes (the
    # benchmark checks the autotuned configs). Restored for the bench that may follow.
    with tuning.override(autotune=False):
        return _check_cases(selected, gpu, harness.device(), dtypes, quick)


def _with_grads(fn, q, k, v, kw: dict, dout):
    """fn's output and its gradients w.r.t. q, k, v for the upstream gradient ``dout``."""
    leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
    out = fn(*leaves, **kw)
    return out.detach(), torch.autograd.grad(out, leaves, dout.to(out.dtype))


def _check_cases(selected: list[Case], gpu: bool, device: str, dtypes: list, quick: bool) -> int:
    from .console import Progress, table

    where = f"GPU {torch.cuda.get_device_name(0)}" if gpu else "Triton interpreter on CPU"
    which = f"{len(selected)} quick case(s) (all: `check`)" if quick else f"{len(selected)} case(s)"
    print(f"check: fused kernels vs the float64 reference ({where}), output and gradients of q, k, v, "
          f"{which} x {' '.join(str(d).removeprefix('torch.') for d in dtypes)}; budget = 2 x error of "
          "PyTorch in the same dtype + floor (infoscale_triton.testing)", flush=True)
    gen = torch.Generator().manual_seed(1234)
    rows, failed = [], 0
    t_start = time.perf_counter()
    with Progress(len(selected) * len(dtypes), "check") as bar:
        for c in selected:
            for dtype in dtypes:
                t0 = time.perf_counter()
                ok, cells = _check_one(c, dtype, device, gen)
                took = time.perf_counter() - t0
                failed += not ok
                shape = f"{c.b}x{c.hq}/{c.hkv}x{c.lq}x{c.lk}x{c.d}" + (f"/{c.dv}" if c.dv else "")
                rows.append([c.name, str(dtype).removeprefix("torch."), shape, *cells, f"{took:.1f}"])
                bar.log(f"  {c.name} {rows[-1][1]}: {cells[-1]} [{took:.1f} s]")
                bar.advance()
    headers = ["case", "dtype", "B x Hq/Hkv x Lq x Lk x D", "out err", "torch out err", "grad err",
               "torch grad err", "result", "s"]
    table(headers, rows)
    took = time.perf_counter() - t_start
    why = (" (on a GPU mostly compiling kernel variants, kept in Triton's cache for the next run)" if gpu
           else "")
    print(f"\ncheck: {len(rows) - failed}/{len(rows)} passed" + (f", {failed} FAILED" if failed else "")
          + f" in {took:.0f} s{why}", flush=True)
    return 1 if failed else 0


def _check_one(c: Case, dtype: torch.dtype, device: str, gen: torch.Generator) -> tuple[bool, list[str]]:
    """(passed, table cells): output and gradients of case ``c`` in ``dtype`` against float64."""
    from infoscale_triton import reference, scaled_dot_product_attention, testing

    q, k, v, kw = _inputs(c, dtype, device, gen)
    dout = torch.randn(c.b, c.hq, c.lq, c.dv or c.d, generator=gen, dtype=torch.float64).to(device)
    try:
        out, grads = _with_grads(scaled_dot_product_attention, q, k, v, kw, dout)
        ref, ref_grads = _with_grads(reference.scaled_dot_product_attention, q.double(), k.double(),
                                     v.double(), _cast(kw, torch.float64), dout)
        low, low_grads = _with_grads(reference.scaled_dot_product_attention, q, k, v,
                                     _cast(kw, dtype), dout)
        result = testing.compare(out, ref, low, dtype)
        ok = result.ok
        # gradients of q, k, v: the worst of the three, each against its own budget
        g_err = g_base = 0.0
        for g, r, lo in zip(grads, ref_grads, low_grads):
            gc = testing.compare(g, r, lo, dtype)
            ok &= gc.ok
            g_err, g_base = max(g_err, gc.error), max(g_base, gc.baseline_error)
        return ok, [f"{result.error:.1e}", f"{result.baseline_error:.1e}", f"{g_err:.1e}", f"{g_base:.1e}",
                    "ok" if ok else "FAIL"]
    except Exception as e:  # noqa: BLE001 - a crash is a failed check, reported in the table
        return False, ["-", "-", "-", "-", f"FAIL ({type(e).__name__}: {str(e).splitlines()[0][:80]})"]
