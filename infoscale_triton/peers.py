"""The attention a user could pick instead of ours, each computing the same InfoScale / CosScale math.

A provider is ``build(q, k, v, causal, mode) -> fn``: everything that can be done once (the per-row
factors, a compiled function, a block mask) happens in ``build``; ``fn()`` is what gets timed and
does everything a user must do per call (e.g. multiply q by t_i, normalise q and k).

Modes: ``"infoscale"`` is ``softmax(t_i * q.k / sqrt(D)) v``; ``"cos"`` is CosScale,
``softmax(t_i * s * cos(q_i, k_j)) v``. ``t_i`` is InfoScale with training length ``N_TRAIN`` and
``n_i`` the number of keys row i sees. Peers assume ``Lq == Lk`` (sdpa's ``is_causal`` is top-left
aligned, ours bottom-right; they agree only then).

Use :func:`build` rather than a provider directly: it makes the first (compiling, autotuning) call,
and turns "cannot run here" (no CUDA, backend unavailable, out of memory, compile failure) into a
reason string instead of an exception.
"""

from __future__ import annotations

import gc
import itertools
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import reference
from .attention import scaled_dot_product_attention
from .temperature import TemperatureSpec, row_temperature

N_TRAIN = 512  # InfoScale training length N: rows that see more than N keys get t_i > 1
COS_SCALE = 32.0  # CosScale s (the paper uses 32 to 256)
MODES = ("infoscale", "cos")

Fn = Callable[[], torch.Tensor]
Builder = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool, str], Fn]

# torch.OutOfMemoryError appeared in torch 2.5; older versions only have the CUDA one.
OOM: type[BaseException] = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


class Unavailable(RuntimeError):
    """A provider that cannot run on these inputs here; the message is the recorded reason."""


def row_factors(lq: int, lk: int, causal: bool, head_dim: int, device: torch.device) -> torch.Tensor:
    """InfoScale ``t_i`` per query row, float32 ``(Lq,)``. Causal rows see ``n_i = i + 1 + Lk - Lq``
    keys (bottom-right, as ours), the others all ``Lk``."""
    if causal:
        n = (torch.arange(1, lq + 1, dtype=torch.float64) + (lk - lq)).clamp(max=lk)
    else:
        n = torch.full((lq,), float(lk), dtype=torch.float64)
    t = row_temperature(n, TemperatureSpec.parse("infoscale"), N_TRAIN, head_dim)
    return t.to(device=device, dtype=torch.float32)


def _cos(mode: str) -> float | None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return COS_SCALE if mode == "cos" else None


def _need_cuda(q: torch.Tensor, what: str) -> None:
    if q.device.type != "cuda":
        raise Unavailable(f"{what} needs CUDA tensors")


def _same_lengths(q: torch.Tensor, k: torch.Tensor, causal: bool) -> None:
    if causal and q.shape[-2] != k.shape[-2]:
        raise Unavailable("causal peers assume Lq == Lk (their causal mask is top-left aligned)")


# --- ours ---------------------------------------------------------------------------------------

def ours(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, mode: str) -> Fn:
    """The fused kernel with InfoScale computed inside it from the row position."""
    cos = _cos(mode)
    return lambda: scaled_dot_product_attention(q, k, v, is_causal=causal, temperature="infoscale",
                                                train_len=N_TRAIN, cos_scale=cos)


def ours_notemp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, mode: str) -> Fn:
    """The same kernel without a temperature: ours / ours_notemp is what InfoScale costs."""
    cos = _cos(mode)
    return lambda: scaled_dot_product_attention(q, k, v, is_causal=causal, cos_scale=cos)


# --- torch SDPA backends ------------------------------------------------------------------------

def _sdpa(backend_name: str) -> Builder:
    def build(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, mode: str) -> Fn:
        cos = _cos(mode)
        _need_cuda(q, f"sdpa {backend_name}")
        _same_lengths(q, k, causal)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, backend_name)
        # t_i depends only on the row position: a user can precompute it. Cast to q's dtype so the
        # product stays in that dtype (the fused backends take bf16/fp16 only).
        t = row_factors(q.shape[-2], k.shape[-2], causal, q.shape[-1], q.device).to(q.dtype)[:, None]

        if cos is None:
            def fn() -> torch.Tensor:
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q * t, k, v, is_causal=causal)
        else:
            def fn() -> torch.Tensor:
                qn = F.normalize(q, dim=-1) * t
                kn = F.normalize(k, dim=-1)
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(qn, kn, v, is_causal=causal, scale=cos)
        return fn

    build.__doc__ = f"F.scaled_dot_product_attention restricted to SDPBackend.{backend_name}, on q * t_i."
    return build


# --- flex attention -----------------------------------------------------------------------------

_FLEX: dict[object, object] = {}  # the compiled function, and score_mod / block mask per shape


def _compiled_flex() -> Callable[..., torch.Tensor]:
    if "fn" not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        # Each shape and mask compiles its own graph; the default limit (8) would silently fall back
        # to the (very slow) eager flex after a few grid points. The knob was renamed in torch 2.6.
        for knob in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 256))
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["fn"]  # type: ignore[return-value]


def _flex_parts(lq: int, lk: int, causal: bool, head_dim: int, mode: str, device: torch.device):
    """(score_mod, block_mask), cached per shape so that every input set reuses one compiled graph."""
    key = (lq, lk, causal, head_dim, mode, str(device))
    if key not in _FLEX:
        from torch.nn.attention.flex_attention import create_block_mask

        t = row_factors(lq, lk, causal, head_dim, device)
        if mode == "cos":
            # flex's score is already q.k / sqrt(D); folding s * sqrt(D) into t_i gives t_i * s * cos
            # with the default scale, so both modes share one compiled graph (half the compile time).
            t = t * (COS_SCALE * math.sqrt(head_dim))

        def score_mod(score, b, h, q_idx, kv_idx):
            return score * t[q_idx]

        block_mask = None
        if causal:
            def causal_mask(b, h, q_idx, kv_idx):
                return kv_idx <= q_idx + (lk - lq)

            # _compile: build it blockwise instead of materialising Lq x Lk booleans (16 GiB at 128k)
            block_mask = create_block_mask(causal_mask, B=None, H=None, Q_LEN=lq, KV_LEN=lk,
                                           device=device, _compile=lq * lk > 2**26)
        _FLEX[key] = (score_mod, block_mask)
    return _FLEX[key]


def flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, mode: str) -> Fn:
    """torch.compile(flex_attention) with ``score_mod = score * t[q_idx]`` and a causal block mask."""
    _cos(mode)
    _same_lengths(q, k, causal)
    attend = _compiled_flex()
    score_mod, block_mask = _flex_parts(q.shape[-2], k.shape[-2], causal, q.shape[-1], mode, q.device)
    if mode == "cos":
        return lambda: attend(F.normalize(q, dim=-1), F.normalize(k, dim=-1), v,
                              score_mod=score_mod, block_mask=block_mask)
    return lambda: attend(q, k, v, score_mod=score_mod, block_mask=block_mask)


def clear_flex_cache() -> None:
    """Drop the per-shape score_mods and block masks (the compiled function stays)."""
    for key in [k for k in _FLEX if k != "fn"]:
        del _FLEX[key]


# --- eager --------------------------------------------------------------------------------------

def eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, mode: str) -> Fn:
    """The package reference in the input dtype: materialised logits, as the paper's code does."""
    cos = _cos(mode)
    return lambda: reference.scaled_dot_product_attention(q, k, v, is_causal=causal, temperature="infoscale",
                                                          train_len=N_TRAIN, cos_scale=cos)


PROVIDERS: dict[str, Builder] = {
    "ours": ours,
    "ours_notemp": ours_notemp,
    "sdpa_cudnn": _sdpa("CUDNN_ATTENTION"),
    "sdpa_flash": _sdpa("FLASH_ATTENTION"),
    "flex": flex,
    "eager": eager,
}

# The temperature each provider computes: what its output must be checked against.
TEMPERATURE: dict[str, str | None] = {name: "infoscale" for name in PROVIDERS} | {"ours_notemp": None}


# --- building, timing, checking -----------------------------------------------------------------

@dataclass
class Built:
    """A provider ready to time (``fn``) and the output of its first call, or why it cannot run."""

    fn: Fn | None
    out: torch.Tensor | None
    reason: str = ""


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _reason(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:160]}"


def build(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, mode: str) -> Built:
    """Build provider ``name`` and call it once (compilation, autotuning and cuDNN plans happen here,
    outside any timing). Never raises for a provider that cannot run: the reason is returned."""
    reason = ""
    try:
        fn = PROVIDERS[name](q, k, v, causal, mode)
        out = fn()
        if q.device.type == "cuda":
            torch.cuda.synchronize()  # surface asynchronous launch errors here
        return Built(fn, out)
    except OOM:
        reason = "out of memory"
    except Unavailable as e:
        reason = str(e)
    except Exception as e:  # noqa: BLE001 - any failure of a peer is recorded, never fatal
        reason = _reason(e)
    # outside the except block: the traceback (and the tensors its frames hold) is gone by now
    free_memory()
    return Built(None, None, reason)


def time_ms(fns: Sequence[Fn], warmup_ms: float = 10, rep_ms: float = 100) -> float:
    """Median milliseconds per call, cycling through ``fns`` (one per input set, so that no call finds
    its inputs in L2). CUDA: triton.testing.do_bench (device events). CPU: the host clock."""
    cycle = itertools.cycle(fns)

    def step() -> None:
        next(cycle)()

    if torch.cuda.is_available() and not _interpreting():
        import triton.testing

        return float(triton.testing.do_bench(step, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    step()  # warm-up (caches, thread pools)
    times: list[float] = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 1000):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _interpreting() -> bool:
    from .validation import interpreter_active

    return interpreter_active()


def input_sets_needed(set_bytes: int, cache_bytes: int | None = None) -> int:
    """How many input sets to rotate so that together they exceed the last-level cache (at least 2:
    consecutive calls never share inputs)."""
    if cache_bytes is None:
        cache_bytes = 0  # CPU runs (the interpreter) time nothing meaningful: 2 sets
        if torch.cuda.is_available():
            cache_bytes = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)
    return max(2, cache_bytes // max(set_bytes, 1) + 1)


def attention_flops(b: int, h: int, lq: int, lk: int, d: int, causal: bool, pass_: str = "fwd") -> float:
    """Matrix-product FLOPs: 4 * B * H * Lq * Lk * D for the forward (QK^T and PV), halved when causal;
    forward + backward counts 3.5 forwards."""
    f = 4.0 * b * h * lq * lk * d * (0.5 if causal else 1.0)
    return f * {"fwd": 1.0, "fwd_bwd": 3.5}[pass_]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN if ``out`` has any NaN or inf (so it never passes)."""
    out64, ref64 = out.double(), ref.double()
    if not torch.isfinite(out64).all():
        return float("nan")
    norm = torch.linalg.vector_norm
    return (norm(out64 - ref64) / norm(ref64).clamp_min(1e-300)).item()


# The atol-like part of the error budget, in relative-error units (as in tests/helpers.py).
ERR_FLOOR: dict[torch.dtype, float] = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-3}


def tolerance(baseline_err: float, dtype: torch.dtype) -> float:
    """Error budget: twice the error of the same math done by PyTorch in ``dtype`` (its rounding is
    what any low-precision kernel is up against), plus a small floor."""
    return 2.0 * baseline_err + ERR_FLOOR.get(dtype, 1e-5)


def passes(err: float, tol: float) -> bool:
    return math.isfinite(err) and err <= tol  # NaN never passes


def sample_rows(n_batch: int, lq: int, count: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(batches, rows) to check a large output on: the first and last batch, and the first, middle and
    last rows plus random ones (causal rows differ most at both ends)."""
    batches = torch.tensor(sorted({0, n_batch - 1}))
    fixed = sorted({0, 1, lq // 2, lq - 1} & set(range(lq)))
    gen = torch.Generator().manual_seed(seed)
    others = [r for r in torch.randperm(lq, generator=gen).tolist() if r not in fixed]
    return batches, torch.tensor(sorted(fixed + others[: max(count - len(fixed), 0)]))


def take_rows(x: torch.Tensor, batches: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return x[batches.to(x.device)][:, :, rows.to(x.device)]


def reference_rows(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batches: torch.Tensor, rows: torch.Tensor,
    causal: bool, mode: str, temperature: str | None, dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """The package reference for the given query rows of the given batches (all heads and keys), in
    ``dtype``. The causal mask goes in as an explicit boolean mask, so that each row's n_i (counted by
    the reference from its mask) is its full-length value, not that of a shorter query."""
    qs = take_rows(q, batches, rows).to(dtype)
    idx = batches.to(k.device)
    ks, vs = k[idx].to(dtype), v[idx].to(dtype)
    mask = None
    if causal:
        lq, lk = q.shape[-2], k.shape[-2]
        r = rows.to(q.device)
        mask = torch.arange(lk, device=q.device)[None, :] <= (r[:, None] + lk - lq)
    return reference.scaled_dot_product_attention(
        qs, ks, vs, attn_mask=mask, temperature=temperature,
        train_len=N_TRAIN if temperature else None, cos_scale=_cos(mode))


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain left/right-aligned text table (no dependency): numbers right, text left."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [all(_numberlike(r[i]) for r in cells[1:]) for i in range(len(headers))]

    def line(r: list[str]) -> str:
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(r, widths, numeric)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])


def _numberlike(s: str) -> bool:
    try:
        float(s.rstrip("!x%"))
        return True
    except ValueError:
        return s in ("-", "")
