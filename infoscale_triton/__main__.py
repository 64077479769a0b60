"""``python -m infoscale_triton`` (or ``infoscale-triton``): check the kernels, then a short speed table.

    check   the fused kernels against the float64 reference on a handful of configurations, the
            output and the gradients of q, k, v; exit code 1 on any failure
    bench   ours against torch SDPA (cuDNN, Flash) and flex_attention at one shape, on a GPU
    (none)  check, then bench

Without a CUDA GPU the kernels run in Triton's interpreter on the CPU, at small sizes and in
float16 / float32; the bench is then interpreter-vs-reference timings, which say nothing about GPU
speed. The interpreter must be chosen before ``triton`` is imported, and ``python -m`` imports this
package (hence triton) before this module runs: so on a CPU-only machine the main job re-runs itself
with ``TRITON_INTERPRET=1``. Nothing here imports triton or the kernels at module level.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

INTERPRET_ENV = "TRITON_INTERPRET"


def _interpreting() -> bool:
    return os.environ.get(INTERPRET_ENV, "0") not in ("", "0")


def _ensure_backend(argv: Sequence[str]) -> int | None:
    """On a machine without CUDA, make sure the kernels were defined for the interpreter. Returns an
    exit code when the work was done by a re-run of this process, None to go on here."""
    import torch

    if torch.cuda.is_available() or _interpreting():
        return None
    if "triton" not in sys.modules:  # nothing defined yet: setting the variable is enough
        os.environ[INTERPRET_ENV] = "1"
        return None
    # triton.jit has already built compiled-mode kernels: run again in a process that starts with it
    env = dict(os.environ, **{INTERPRET_ENV: "1"})
    return subprocess.call([sys.executable, "-m", "infoscale_triton", *argv], env=env)


# --- check --------------------------------------------------------------------------------------

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


def cases(gpu: bool) -> list[Case]:
    """Small on the CPU (the interpreter runs every program in Python), larger on a GPU."""
    n = 512 if gpu else 128
    odd_q, odd_k = (1000, 1531) if gpu else (97, 131)
    return [
        Case("InfoScale, causal", n, n, causal=True),
        Case("InfoScale", n, n),
        Case("logn, causal", n, n, causal=True, temperature="logn"),
        Case("InfoScale clipped, causal Lq < Lk", n // 4 + 3, n, causal=True,
             temperature="infoscale_clipped"),
        Case("CosScale s=32 + InfoScale, causal", n, n, causal=True, cos=True),
        Case("CosScale s=32 + InfoScale", n, n, cos=True),
        Case("GQA 8/2 heads, InfoScale, causal", n, n, hq=8, hkv=2, causal=True),
        Case("bool mask (empty rows), InfoScale", n, n, mask="bool"),
        Case("float mask, CosScale + InfoScale, causal", n, n, causal=True, cos=True, mask="float"),
        Case("odd lengths, D=80, causal", odd_q, odd_k, d=80, causal=True),
        Case("D=59, Dv=40 (unaligned rows)", odd_q, odd_k, d=59, dv=40, cos=True),
        Case("tensor temperature, causal", n, n, causal=True, temperature="tensor"),
        Case("key padding (kv_lengths), InfoScale, causal", n, n, causal=True, padding="lengths"),
        Case("key padding mask (B,1,1,Lk), CosScale + InfoScale", n, n, cos=True, padding="mask"),
        Case(f"sliding window ({n // 8}, 0), InfoScale, causal", n, n, causal=True, window=(n // 8, 0)),
    ]


def _inputs(c: Case, dtype, device, gen):
    """Random q, k, v (std 2, never zeros), and the call's keyword arguments."""
    import torch

    def randn(*shape: int) -> torch.Tensor:
        return (2 * torch.randn(*shape, generator=gen)).to(device=device, dtype=dtype)

    q, k, v = randn(c.b, c.hq, c.lq, c.d), randn(c.b, c.hkv, c.lk, c.d), randn(c.b, c.hkv, c.lk, c.dv or c.d)
    kw: dict = dict(is_causal=c.causal, enable_gqa=c.hq != c.hkv, cos_scale=32.0 if c.cos else None)
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


def _cast(kw: dict, dtype) -> dict:
    """The keyword arguments with float tensors (mask, temperature) in ``dtype``."""
    import torch

    return {k: (x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x)
            for k, x in kw.items()}


def run_check(dtype_names: Sequence[str] | None = None) -> int:
    import torch

    import infoscale_triton.forward as forward

    gpu = torch.cuda.is_available() and not _interpreting()
    device = "cuda" if gpu else "cpu"
    names = dtype_names or (["bfloat16", "float16"] if gpu else ["float16", "float32"])
    dtypes = [getattr(torch, n) for n in names]
    # One fixed launch config per head dim: autotuning every shape here would take minutes (the
    # benchmark checks the autotuned configs). Restored for the bench that may follow.
    autotune, forward.AUTOTUNE = forward.AUTOTUNE, False
    try:
        return _check_cases(gpu, device, dtypes)
    finally:
        forward.AUTOTUNE = autotune


def _with_grads(fn, q, k, v, kw: dict, dout):
    """fn's output and its gradients w.r.t. q, k, v for the upstream gradient ``dout``."""
    import torch

    leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
    out = fn(*leaves, **kw)
    return out.detach(), torch.autograd.grad(out, leaves, dout.to(out.dtype))


def _check_cases(gpu: bool, device: str, dtypes: list) -> int:
    import torch

    from infoscale_triton import peers, reference, scaled_dot_product_attention

    where = f"GPU {torch.cuda.get_device_name(0)}" if gpu else "Triton interpreter on CPU"
    print(f"check: fused kernels vs the float64 reference ({where}), output and gradients of q, k, v; "
          "budget = 2 x error of PyTorch in the same dtype + floor", flush=True)
    gen = torch.Generator().manual_seed(1234)
    rows, failed = [], 0
    for c in cases(gpu):
        for dtype in dtypes:
            t0 = time.perf_counter()
            q, k, v, kw = _inputs(c, dtype, device, gen)
            dout = torch.randn(c.b, c.hq, c.lq, c.dv or c.d, generator=gen, dtype=torch.float64).to(device)
            try:
                out, grads = _with_grads(scaled_dot_product_attention, q, k, v, kw, dout)
                ref, ref_grads = _with_grads(reference.scaled_dot_product_attention, q.double(), k.double(),
                                             v.double(), _cast(kw, torch.float64), dout)
                low, low_grads = _with_grads(reference.scaled_dot_product_attention, q, k, v,
                                             _cast(kw, dtype), dout)
                err, base = peers.rel_err(out, ref), peers.rel_err(low, ref)
                ok = peers.passes(err, peers.tolerance(base, dtype))
                # gradients of q, k, v: the worst of the three, each against its own budget
                g_err = g_base = 0.0
                for g, r, lo in zip(grads, ref_grads, low_grads):
                    e, e_low = peers.rel_err(g, r), peers.rel_err(lo, r)
                    ok &= peers.passes(e, peers.tolerance(e_low, dtype))
                    g_err, g_base = max(g_err, e), max(g_base, e_low)
                cells = [f"{err:.1e}", f"{base:.1e}", f"{g_err:.1e}", f"{g_base:.1e}", "ok" if ok else "FAIL"]
            except Exception as e:  # noqa: BLE001 - a crash is a failed check, reported in the table
                ok = False
                cells = ["-", "-", "-", "-", f"FAIL ({type(e).__name__}: {str(e).splitlines()[0][:80]})"]
            failed += not ok
            shape = f"{c.b}x{c.hq}/{c.hkv}x{c.lq}x{c.lk}x{c.d}" + (f"/{c.dv}" if c.dv else "")
            rows.append([c.name, str(dtype).removeprefix("torch."), shape, *cells])
            print(f"  {c.name} {rows[-1][1]}: {cells[-1]} [{time.perf_counter() - t0:.1f} s]", flush=True)
    print()
    headers = ["case", "dtype", "B x Hq/Hkv x Lq x Lk x D", "out err", "torch out err", "grad err",
               "torch grad err", "result"]
    print(peers.format_table(headers, rows))
    print(f"\ncheck: {len(rows) - failed}/{len(rows)} passed" + (f", {failed} FAILED" if failed else ""),
          flush=True)
    return 1 if failed else 0


# --- bench --------------------------------------------------------------------------------------

def run_bench(mode: str = "infoscale") -> int:
    import torch

    from infoscale_triton import peers

    gpu = torch.cuda.is_available() and not _interpreting()
    if gpu:
        providers = ["ours", "sdpa_cudnn", "sdpa_flash", "flex"]
        b, h, n, d, dtype = 4, 16, 4096, 128, torch.bfloat16
        note = f"{torch.cuda.get_device_name(0)}, bf16, triton.testing.do_bench median"
    else:
        providers = ["ours", "eager"]
        b, h, n, d, dtype = 1, 2, 128, 64, torch.float32
        note = ("Triton INTERPRETER on CPU vs the PyTorch reference, float32, host clock.\n"
                "  These numbers say nothing about GPU speed: run `python -m infoscale_triton bench` "
                "on a GPU.")
    print(f"\nbench ({mode}): B={b} H={h} N={n} D={d}; {note}", flush=True)
    gen = torch.Generator(device="cuda" if gpu else "cpu").manual_seed(0)
    device = "cuda" if gpu else "cpu"
    set_bytes = 3 * b * h * n * d * torch.finfo(dtype).bits // 8
    sets = [tuple(torch.randn(b, h, n, d, generator=gen, device=device, dtype=dtype) for _ in range(3))
            for _ in range(peers.input_sets_needed(set_bytes))]
    rows = []
    threads = torch.get_num_threads()
    if not gpu:
        # the interpreter runs on one thread: so does the reference (and small shared CPUs then avoid
        # OpenMP stalls, seen at 40 ms per call on a 2-core machine)
        torch.set_num_threads(1)
    for causal in (False, True):
        flops = peers.attention_flops(b, h, n, n, d, causal)
        ms_ours = float("nan")
        for name in providers:
            built = [peers.build(name, *s, causal, mode) for s in sets]
            bad = next((x.reason for x in built if x.fn is None), "")
            ms = float("nan") if bad else peers.time_ms([x.fn for x in built], warmup_ms=10, rep_ms=100)
            del built
            peers.free_memory()
            ms_ours = ms if name == "ours" else ms_ours
            ratio = "-" if name == "ours" else f"{ms / ms_ours:.2f}"  # time ratio = ours/x in TFLOP/s
            tf = flops / (ms * 1e-3) / 1e12
            rows.append([int(causal), name, f"{ms:.3f}", f"{tf:.3g}", ratio, bad])
            print(f"  causal={int(causal)} {name}: {ms:.3f} ms" + (f" ({bad})" if bad else ""), flush=True)
    torch.set_num_threads(threads)
    print()
    print(peers.format_table(["causal", "provider", "ms", "TFLOP/s", "ours/x", "note"], rows))
    return 0


# --- entry point --------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m infoscale_triton", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command")
    chk = sub.add_parser("check", help="kernels vs the float64 reference; exit code 1 on any failure")
    chk.add_argument("--dtypes", nargs="+", choices=["float16", "bfloat16", "float32"],
                     help="default: bfloat16 float16 on a GPU; float16 float32 on CPU (the "
                          "interpreter's bf16 dot is wrong)")
    bn = sub.add_parser("bench", help="a short speed table: ours vs sdpa_cudnn / sdpa_flash / flex")
    bn.add_argument("--mode", choices=["infoscale", "cos"], default="infoscale")
    args = ap.parse_args(argv)  # before any re-run, so that --help and errors cost nothing

    code = _ensure_backend(argv)
    if code is not None:
        return code
    if _interpreting():
        import torch

        why = "TRITON_INTERPRET is set" if torch.cuda.is_available() else "no CUDA GPU found"
        print(f"{why}: running the kernels in Triton's INTERPRETER on CPU (TRITON_INTERPRET=1), at small "
              "sizes, in float16/float32.", flush=True)
    status = 0
    if args.command in (None, "check"):
        status = run_check(getattr(args, "dtypes", None))
    if args.command in (None, "bench"):
        run_bench(getattr(args, "mode", "infoscale"))
    return status


if __name__ == "__main__":
    sys.exit(main())
