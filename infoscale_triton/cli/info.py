"""``python -m infoscale_triton info``: versions, the device, and which of our paths and of the peers
run here.

Each of our paths is probed with one tiny call, checked against the float64 reference (budget as in
``check``: twice the error of PyTorch in the same dtype, plus a floor), so "ok" means it ran and is
right, not merely that it imports. Peers are probed the way the benchmark builds them. Import this
module only once the backend (compiled or interpreter) is chosen: it imports triton.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable

import numpy
import torch
import triton

import infoscale_triton as it
from infoscale_triton import reference, testing, tuning
from infoscale_triton.dropout import draw_seed, dropout_mask

from . import harness, peers
from .console import RICH_MISSING, rich_available, table

# One small problem for every probe: B, H, L, D (D >= 16, the kernels' minimum).
B, H, L, D = 2, 2, 64, 32
TRAIN_LEN = 32  # below L: the temperatures differ from 1
Outputs = list[torch.Tensor]
# A probe returns our outputs and a function giving the reference's outputs for the same inputs in a
# dtype (float64: the truth; the input dtype: PyTorch's own rounding error, for the budget).
Probe = Callable[[str, torch.dtype, torch.Generator], tuple[Outputs, Callable[[torch.dtype], Outputs]]]


def _qkv(shape: tuple[int, ...], device: str, dtype: torch.dtype, gen: torch.Generator) -> list[torch.Tensor]:
    return [torch.randn(shape, generator=gen).to(device=device, dtype=dtype) for _ in range(3)]


def _cast(xs: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    return [x.to(dtype) for x in xs]


def _dense(cos: bool) -> Probe:
    def probe(device: str, dtype: torch.dtype, gen: torch.Generator):
        qkv = _qkv((B, H, L, D), device, dtype, gen)
        kw = {"is_causal": True, "temperature": "infoscale", "train_len": TRAIN_LEN,
              "cos_scale": 32.0 if cos else None}
        return ([it.scaled_dot_product_attention(*qkv, **kw)],
                lambda dt: [reference.scaled_dot_product_attention(*_cast(qkv, dt), **kw)])
    return probe


def _backward(device: str, dtype: torch.dtype, gen: torch.Generator):
    qkv = _qkv((B, H, L, D), device, dtype, gen)
    dout = torch.randn(B, H, L, D, generator=gen).to(device)
    kw = {"is_causal": True, "temperature": "infoscale", "train_len": TRAIN_LEN}

    def grads(fn: Callable[..., torch.Tensor], dt: torch.dtype) -> Outputs:
        leaves = [x.detach().to(dt).requires_grad_() for x in qkv]
        return list(torch.autograd.grad(fn(*leaves, **kw), leaves, dout.to(dt)))

    return (grads(it.scaled_dot_product_attention, dtype),
            lambda dt: grads(reference.scaled_dot_product_attention, dt))


def _varlen(device: str, dtype: torch.dtype, gen: torch.Generator):
    lengths = [5, L - 5, L // 2]  # packed sequences of unequal lengths, one shorter than a block
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    qkv = _qkv((sum(lengths), H, D), device, dtype, gen)
    kw = {"is_causal": True, "temperature": "infoscale", "train_len": TRAIN_LEN}
    return ([it.varlen_attention(*qkv, cu, cu, max(lengths), max(lengths), **kw)],
            lambda dt: [reference.varlen_attention(*_cast(qkv, dt), cu, cu, **kw)])


def _decode(device: str, dtype: torch.dtype, gen: torch.Generator):
    q = torch.randn(B, H, 1, D, generator=gen).to(device=device, dtype=dtype)
    k, v = _qkv((B, H, 4 * L, D), device, dtype, gen)[:2]
    lengths = torch.tensor([L + 3, 4 * L], device=device)  # a partly filled cache
    kw = {"kv_lengths": lengths, "temperature": "infoscale", "train_len": TRAIN_LEN}
    # one query row: causal or not, it sees every valid key
    return ([it.decode_attention(q, k, v, is_causal=False, **kw)],
            lambda dt: [reference.scaled_dot_product_attention(*_cast([q, k, v], dt), **kw)])


def _dropout(device: str, dtype: torch.dtype, gen: torch.Generator):
    qkv = _qkv((B, H, L, D), device, dtype, gen)
    kw = {"is_causal": True, "dropout_p": 0.2, "temperature": "infoscale", "train_len": TRAIN_LEN}
    # the call draws its seed first from the default generator: redraw it to rebuild its mask
    state = torch.random.get_rng_state() if device == "cpu" else torch.cuda.get_rng_state()
    out = it.scaled_dot_product_attention(*qkv, **kw)
    if device == "cpu":
        torch.random.set_rng_state(state)
    else:
        torch.cuda.set_rng_state(state)
    keep = dropout_mask(draw_seed(device), (B, H, L, L), kw["dropout_p"])
    return [out], lambda dt: [reference.scaled_dot_product_attention(*_cast(qkv, dt), dropout_mask=keep, **kw)]


PATHS: dict[str, Probe] = {
    "dense forward": _dense(cos=False),
    "dense backward (dq, dk, dv)": _backward,
    "varlen (packed sequences)": _varlen,
    "decode (split-KV, KV cache)": _decode,
    "dropout": _dropout,
    "CosScale (cos_scale=32)": _dense(cos=True),
}


def probe_path(probe: Probe, device: str, dtype: torch.dtype) -> tuple[bool, str]:
    """(ok, detail): one tiny call of our path against the float64 reference."""
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    try:
        ours, ref = probe(device, dtype, gen)
        truth, low = ref(torch.float64), ref(dtype)
    except Exception as e:  # noqa: BLE001 - a path that cannot run is reported, not raised
        return False, f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:100]}"
    results = [testing.compare(o, t, lo, dtype) for o, t, lo in zip(ours, truth, low)]
    worst = max(r.error for r in results)
    took = time.perf_counter() - t0
    return all(r.ok for r in results), f"rel. err {worst:.1e} vs float64 reference [{took:.1f} s]"


def probe_peers(device: str) -> list[list[str]]:
    """Rows (peer, status, detail) for the providers the benchmark compares against."""
    rows = []
    if device != "cuda":
        return [[name, "no", "needs CUDA (the benchmark runs ours and eager on CPU)"]
                for name in ("sdpa_cudnn", "sdpa_flash", "flex")]
    q, k, v = (torch.randn(1, 2, 256, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    for name in ("sdpa_cudnn", "sdpa_flash"):
        built = peers.build(name, q, k, v, True, "infoscale")
        rows.append([name, "yes" if built.fn else "no", built.reason or "ran a bf16 causal call"])
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401

        # compiling flex takes tens of seconds: the benchmark does it, info only looks for it
        rows.append(["flex", "yes", f"torch {torch.__version__} has flex_attention (compiled by bench)"])
    except ImportError as e:
        rows.append(["flex", "no", str(e)])
    return rows


def run_info() -> int:
    """Print the report; exit code 1 if one of our paths fails its probe."""
    cuda = torch.cuda.is_available()
    gpu = harness.on_gpu()
    device = "cuda" if gpu else "cpu"
    dtype = torch.float16 if gpu else torch.float32  # the interpreter emulates bf16 (slower)
    if cuda:
        cap = torch.cuda.get_device_capability(0)
        gpu_row = f"{torch.cuda.get_device_name(0)}, compute capability {cap[0]}.{cap[1]}"
    else:
        gpu_row = "none (no CUDA device)"
    try:
        from importlib.metadata import version

        mpl = version("matplotlib")
    except Exception:  # noqa: BLE001 - PackageNotFoundError, or no metadata at all
        mpl = "not installed: no plots"
    table(["", ""], [
        ["infoscale_triton", f"{it.__version__} ({it.__file__.rsplit('/', 2)[0]})"],
        ["python", platform.python_version()],
        ["torch", f"{torch.__version__} (CUDA {torch.version.cuda})"],
        ["triton", triton.__version__],
        ["numpy", numpy.__version__],
        ["rich", "installed" if rich_available() else RICH_MISSING],
        ["matplotlib", mpl],
        ["GPU", gpu_row],
        ["kernels run on", "GPU (compiled)" if gpu else "Triton INTERPRETER on CPU (TRITON_INTERPRET=1)"],
    ], "versions and device")

    with tuning.override(autotune=False):  # one fixed config: no search for a probe
        rows, failed = [], 0
        for name, probe in PATHS.items():
            ok, detail = probe_path(probe, device, dtype)
            failed += not ok
            rows.append([name, "ok" if ok else "FAIL", detail])
    where = "compiled on the GPU" if gpu else "interpreter on CPU"
    table(["path", "status", "detail"], rows,
          f"our paths: one B={B} H={H} L={L} D={D} {str(dtype).removeprefix('torch.')} call each ({where})")
    table(["peer", "available", "detail"], probe_peers(device), "peers for `bench`")
    return 1 if failed else 0
