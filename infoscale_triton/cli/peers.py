"""The providers of the benchmarks: ours and what a user could pick instead, each computing the same
InfoScale / CosScale math on (B, H, L, D) inputs.

A provider is ``build(q, k, v, causal, mode) -> fn``: everything that can be done once (the per-row
factors, a compiled function, a block mask) happens in ``build``; ``fn()`` is what gets timed and does
everything a user must do per call (e.g. multiply q by t_i, normalise q and k).

Modes: ``"infoscale"`` is ``softmax(t_i * q.k / sqrt(D)) v``; ``"cos"`` is CosScale,
``softmax(t_i * s * cos(q_i, k_j)) v``. ``t_i`` is
InfoScale with training length ``N_TRAIN`` and ``n_i`` the number of keys row i sees: causal rows are
bottom-right aligned (row i sees ``i + 1 + Lk - Lq`` keys), as ours. SDPA's ``is_causal`` is top-left
aligned, so the peers take causal only with ``Lq == Lk`` or a single query row (decoding: it sees every
key). Fewer key/value heads than query heads (GQA) are passed as ``enable_gqa``.

Use :func:`build` rather than a provider directly: it makes the first (compiling, autotuning) call, times
it, and turns "cannot run here" (no CUDA, backend unavailable, out of memory, compile failure) into a
reason string instead of an exception.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from infoscale_triton import reference
from infoscale_triton.attention import scaled_dot_product_attention
from infoscale_triton.temperature import TemperatureSpec, row_temperature

from . import harness

N_TRAIN = 512  # InfoScale training length N: rows that see more than N keys get t_i > 1
COS_SCALE = 32.0  # CosScale s (the paper uses 32 to 256)
MODES = ("infoscale", "cos")

Fn = Callable[[], torch.Tensor]
Builder = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool, str], Fn]


class Unavailable(RuntimeError):
    """A provider that cannot run on these inputs here; the message is the recorded reason."""


def infoscale_factors(n: torch.Tensor, head_dim: int) -> torch.Tensor:
    """InfoScale ``t(n)`` (training length ``N_TRAIN``) for rows that see ``n`` keys, float32, on n's
    device: what a peer multiplies q by (or its score_mod multiplies the scores by)."""
    return row_temperature(n.double(), TemperatureSpec.parse("infoscale"), N_TRAIN, head_dim).float()


def row_factors(lq: int, lk: int, causal: bool, head_dim: int, device: torch.device | str) -> torch.Tensor:
    """InfoScale ``t_i`` per query row, float32 ``(Lq,)``. Causal rows see ``n_i = i + 1 + Lk - Lq``
    keys (bottom-right, as ours), the others all ``Lk``."""
    if causal:
        n = (torch.arange(1, lq + 1, dtype=torch.float64) + (lk - lq)).clamp(max=lk)
    else:
        n = torch.full((lq,), float(lk), dtype=torch.float64)
    return infoscale_factors(n, head_dim).to(device)


def _cos(mode: str) -> float | None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return COS_SCALE if mode == "cos" else None


def _need_cuda(q: torch.Tensor, what: str) -> None:
    if q.device.type != "cuda":
        raise Unavailable(f"{what} needs CUDA tensors")


def _peer_causal(q: torch.Tensor, k: torch.Tensor, causal: bool) -> bool:
    """The ``is_causal`` a top-left aligned peer gets for our bottom-right causal attention."""
    if not causal or q.shape[-2] == 1:  # one query row (decoding) sees every key
        return False
    if q.shape[-2] != k.shape[-2]:
        raise Unavailable("causal peers need Lq == Lk (their causal mask is top-left aligned)")
    return True


def _gqa(q: torch.Tensor, k: torch.Tensor) -> bool:
    return q.shape[1] != k.shape[1]


# --- ours ---------------------------------------------------------------------------------------

def _ours(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, mode: str, temp: str | None) -> Fn:
    cos, gqa = _cos(mode), _gqa(q, k)
    opts = {"temperature": temp, "train_len": N_TRAIN} if temp else {}
    return lambda: scaled_dot_product_attention(q, k, v, is_causal=causal, cos_scale=cos, enable_gqa=gqa,
                                                **opts)


def ours(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, mode: str) -> Fn:
    """The fused kernel with InfoScale computed inside it from the row position."""
    return _ours(q, k, v, causal, mode, "infoscale")


def ours_notemp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, mode: str) -> Fn:
    """The same kernel without a temperature: ours / ours_notemp is what InfoScale costs."""
    return _ours(q, k, v, causal, mode, None)


# --- torch SDPA backends ------------------------------------------------------------------------

def _sdpa(backend_name: str) -> Builder:
    def build(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, mode: str) -> Fn:
        cos = _cos(mode)
        _need_cuda(q, f"sdpa {backend_name}")
        is_causal = _peer_causal(q, k, causal)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, backend_name)
        # t_i depends only on the row position: a user can precompute it. Cast to q's dtype so the
        # product stays in that dtype (the fused backends take bf16/fp16 only).
        t = row_factors(q.shape[-2], k.shape[-2], causal, q.shape[-1], q.device).to(q.dtype)[:, None]
        opts = {"is_causal": is_causal, "enable_gqa": _gqa(q, k)} if _gqa(q, k) else {"is_causal": is_causal}

        def make(k: torch.Tensor, v: torch.Tensor) -> Fn:
            if cos is None:
                def fn() -> torch.Tensor:
                    with sdpa_kernel(backend):
                        return F.scaled_dot_product_attention(q * t, k, v, **opts)
            else:
                def fn() -> torch.Tensor:
                    qn = F.normalize(q, dim=-1) * t
                    kn = F.normalize(k, dim=-1)
                    with sdpa_kernel(backend):
                        return F.scaled_dot_product_attention(qn, kn, v, scale=cos, **opts)
            return fn

        fn = make(k, v)
        if not _gqa(q, k):
            return fn
        # a backend that refuses enable_gqa runs on K/V repeated per query head (once, outside the timing),
        # reading group x the bytes: the note says so
        try:
            fn()
            fn.note = "enable_gqa=True"  # type: ignore[attr-defined]
            return fn
        except RuntimeError as e:
            refusal = harness.reason(e)
        group = q.shape[1] // k.shape[1]
        opts.pop("enable_gqa")
        fn = make(k.repeat_interleave(group, 1), v.repeat_interleave(group, 1))
        fn.note = f"K/V repeated x{group} (enable_gqa refused: {refusal})"  # type: ignore[attr-defined]
        return fn

    build.__doc__ = f"F.scaled_dot_product_attention restricted to SDPBackend.{backend_name}, on q * t_i."
    return build


# --- flex attention -----------------------------------------------------------------------------

_FLEX: dict[object, object] = {}  # the compiled function, and score_mod / block mask per shape


def compiled_flex() -> Callable[..., torch.Tensor]:
    """``torch.compile(flex_attention)``, compiled once per process (each shape and mask adds a graph)."""
    if "fn" not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        # Each shape and mask compiles its own graph; the default limit (8) would silently fall back
        # to the (very slow) eager flex after a few grid points. The knob was renamed in torch 2.6.
        for knob in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 256))
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["fn"]  # type: ignore[return-value]


def scaled_by_row(t: torch.Tensor) -> Callable:
    """A flex ``score_mod`` multiplying row ``q_idx``'s scores by ``t[q_idx]``."""
    def score_mod(score, b, h, q_idx, kv_idx):
        return score * t[q_idx]
    return score_mod


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

        block_mask = None
        if causal and lq > 1:
            def causal_mask(b, h, q_idx, kv_idx):
                return kv_idx <= q_idx + (lk - lq)

            # _compile: build it blockwise instead of materialising Lq x Lk booleans (16 GiB at 128k)
            block_mask = create_block_mask(causal_mask, B=None, H=None, Q_LEN=lq, KV_LEN=lk,
                                           device=device, _compile=lq * lk > 2**26)
        _FLEX[key] = (scaled_by_row(t), block_mask)
    return _FLEX[key]


def flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, mode: str) -> Fn:
    """torch.compile(flex_attention) with ``score_mod = score * t[q_idx]`` and a causal block mask."""
    _cos(mode)
    _need_cuda(q, "flex")
    _peer_causal(q, k, causal)
    attend = compiled_flex()
    score_mod, block_mask = _flex_parts(q.shape[-2], k.shape[-2], causal, q.shape[-1], mode, q.device)
    opts = {"score_mod": score_mod, "block_mask": block_mask, "enable_gqa": _gqa(q, k)}
    if mode == "cos":
        return lambda: attend(F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, **opts)
    return lambda: attend(q, k, v, **opts)


def clear_flex_cache() -> None:
    """Drop the per-shape score_mods and block masks (the compiled function stays)."""
    for key in [k for k in _FLEX if k != "fn"]:
        del _FLEX[key]


# --- eager --------------------------------------------------------------------------------------

def eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, mode: str) -> Fn:
    """The package reference in the input dtype: materialised logits, as the paper's code does."""
    cos, gqa = _cos(mode), _gqa(q, k)
    return lambda: reference.scaled_dot_product_attention(q, k, v, is_causal=causal, temperature="infoscale",
                                                          train_len=N_TRAIN, cos_scale=cos, enable_gqa=gqa)


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


# --- building -----------------------------------------------------------------------------------

@dataclass
class Built:
    """A provider ready to time (``fn``), the output of its first call and that call's wall seconds
    (compiling, autotuning, plans: :func:`harness.first_call`), or why it cannot run."""

    fn: Callable[[], object] | None
    out: object = None
    first_s: float = math.nan
    reason: str = ""
    note: str = ""  # how it ran, when that needs saying (e.g. K/V repeated for a backend without GQA)


def build_fn(make: Callable[[], Callable[[], object]]) -> Built:
    """``fn = make()`` and its first call (timed), or the reason it cannot run. Never raises for a provider
    that cannot run here (Unavailable, out of memory, any error of a peer)."""
    why = ""
    try:
        fn = make()
        out, seconds = harness.first_call(fn)
        return Built(fn, out, seconds, note=getattr(fn, "note", ""))
    except harness.OOM:
        why = "out of memory"
    except Unavailable as e:
        why = str(e)
    except Exception as e:  # noqa: BLE001 - any failure of a peer is recorded, never fatal
        why = harness.reason(e)
    # outside the except block: the traceback (and the tensors its frames hold) is gone by now
    harness.free_memory()
    return Built(None, reason=why)


def build(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, mode: str) -> Built:
    """Provider ``name`` on these inputs, built and called once (see :func:`build_fn`)."""
    return build_fn(lambda: PROVIDERS[name](q, k, v, causal, mode))


def graphed(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """``fn`` captured in a CUDA graph and replayed: the GPU time without the host's launch cost (how a
    decoding loop runs in practice: vLLM, transformers' static cache under torch.compile). Call ``fn`` once
    before (compile, plans happen outside the capture)."""
    if not torch.cuda.is_available():
        raise Unavailable("CUDA graphs need CUDA")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay() -> torch.Tensor:
        graph.replay()
        return out
    return replay


# --- checking on sampled rows -------------------------------------------------------------------

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
        qs, ks, vs, attn_mask=mask, temperature=temperature, enable_gqa=_gqa(q, k),
        train_len=N_TRAIN if temperature else None, cos_scale=_cos(mode))
