"""Shared test helpers: random inputs in several memory layouts, temperatures and masks, a poisoned
launch of the fused forward, and the comparison against the float64 reference with an error budget
relative to plain PyTorch in the inputs' precision; the same for gradients (the public function's
autograd against autograd through the reference).

The reference itself lives in :mod:`infoscale_triton.reference`; nothing here re-implements it.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

import infoscale_triton
from infoscale_triton import reference
from infoscale_triton.backward import attention_backward
from infoscale_triton.forward import attention_forward
from infoscale_triton.reference import allowed_keys
from infoscale_triton.temperature import TemperatureSpec, row_temperature

# the error budget is the package's (infoscale_triton.testing), re-exported for the test modules
from infoscale_triton.testing import (  # noqa: F401
    BUDGET_FACTOR,
    FLOOR,
    assert_close,
    mismatch_report,
    positions,
    rel_error,
)
from infoscale_triton.validation import check_inputs

ON_GPU: bool = torch.cuda.is_available()
DEVICE: torch.device = torch.device("cuda" if ON_GPU else "cpu")
# The test matrices' dtypes. bfloat16 runs through the interpreter too (whose bf16 tl.dot multiplies raw
# bits and whose float32 -> bf16 cast truncates: the kernels work around both there, kernels/primitives.py
# dot and cast), but the CPU checks it in a few representative tests only (test_smoke.py,
# test_forward.py, test_interpreter.py), for CI time.
DTYPES: list[torch.dtype] = [torch.float16, torch.float32] + ([torch.bfloat16] if ON_GPU else [])
# Gradients: an absolute floor in units of the gradient's size without any cancellation
# (natural_gradient_norms), 4 float32 roundings: the backward's delta = rowsum(dO * O) and dP = dO . v
# cancel only up to float32 rounding, where the reference's (delta from P and dP) cancel exactly.
NATURAL_FLOOR = 2.0**-22

LAYOUTS = ("contiguous", "blhd", "last_stride2", "padded_rows", "offset", "expanded")
STRING_TEMPERATURES = ("infoscale", "logn", "infoscale_clipped", "logn_clipped")
# Per-row tensor temperatures, by the shape they are given in (all broadcast to (B, Hq, Lq)).
TENSOR_TEMPERATURES = ("tensor_bhl", "tensor_b1l", "tensor_l", "tensor_h1")
MASKS = ("bool_b11k", "bool_1hqk", "bool_qk", "bool_empty_rows", "bool_empty_batch",
         "float_qk", "float_b1qk_empty_rows", "float16_1hqk")


def randn(*shape: int, dtype: torch.dtype, std: float = 1.0,
          generator: torch.Generator | None = None) -> torch.Tensor:
    """Normal(0, std^2) drawn in float32 on the CPU (so a generator reproduces it anywhere), then cast
    and moved to the test device."""
    x = torch.randn(*shape, generator=generator, dtype=torch.float32) * std
    return x.to(device=DEVICE, dtype=dtype)


def to_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """A (B, H, L, D) tensor in another memory layout. All but ``expanded`` keep the values.

    ``blhd``: a contiguous (B, L, H, D) tensor transposed (read in place by TMA when rows are 16-byte
    aligned); ``last_stride2``: every other element of a wider buffer (non-unit last stride);
    ``padded_rows``: row stride D + 1 (rows not 16-byte aligned); ``offset``: base one element past a
    16-byte boundary; ``expanded``: the first batch entry broadcast with batch stride 0.
    """
    d = x.shape[-1]
    if layout == "contiguous":
        return x.contiguous()
    if layout == "blhd":
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "last_stride2":
        buf = x.new_zeros(*x.shape[:-1], 2 * d)
        buf[..., ::2] = x
        return buf[..., ::2]
    if layout == "padded_rows":
        buf = x.new_zeros(*x.shape[:-1], d + 1)
        buf[..., :d] = x
        return buf[..., :d]
    if layout == "offset":
        flat = x.new_zeros(x.numel() + 1)
        y = flat[1:].view(x.shape)
        y.copy_(x)
        return y
    if layout == "expanded":
        return x[:1].expand_as(x)
    raise ValueError(layout)


def make_qkv(b: int, hq: int, hkv: int, lq: int, lk: int, d: int, dv: int, dtype: torch.dtype, *,
             std: float = 2.0, layout: str | tuple[str, str, str] = "contiguous",
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random query (B, Hq, Lq, D), key (B, Hkv, Lk, D), value (B, Hkv, Lk, Dv); ``layout`` is one
    name for all three or one per tensor. Values have std 1 (the output is a mix of them)."""
    layouts = (layout,) * 3 if isinstance(layout, str) else layout
    q = randn(b, hq, lq, d, dtype=dtype, std=std, generator=generator)
    k = randn(b, hkv, lk, d, dtype=dtype, std=std, generator=generator)
    v = randn(b, hkv, lk, dv, dtype=dtype, std=1.0, generator=generator)
    return tuple(to_layout(t, lay) for t, lay in zip((q, k, v), layouts))  # type: ignore[return-value]


def make_temperature(kind: str | None, b: int, hq: int, lq: int, *, train_len: int = 24,
                     generator: torch.Generator | None = None) -> dict[str, Any]:
    """Keyword arguments ``temperature`` (and ``train_len``) for a temperature kind: None, a string of
    :data:`STRING_TEMPERATURES`, or a tensor kind of :data:`TENSOR_TEMPERATURES` (values in about
    [-1.5, 2.5], negatives included)."""
    if kind is None:
        return {}
    if kind in STRING_TEMPERATURES:
        return {"temperature": kind, "train_len": train_len}
    shape = {"tensor_bhl": (b, hq, lq), "tensor_b1l": (b, 1, lq), "tensor_l": (lq,),
             "tensor_h1": (hq, 1)}[kind]
    t = torch.rand(*shape, generator=generator) * 4 - 1.5
    return {"temperature": t.to(DEVICE)}


def make_mask(kind: str | None, b: int, h: int, lq: int, lk: int, *,
              generator: torch.Generator | None = None) -> torch.Tensor | None:
    """An attn_mask of :data:`MASKS` (bool: True = may attend; float: additive, -inf = masked)."""
    if kind is None:
        return None

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator)

    if kind == "bool_b11k":  # padding: batch i sees its first lengths[i] keys (at least one)
        lengths = 1 + (rand(b) * lk).long()
        m = torch.arange(lk)[None, :] < lengths[:, None]
        mask = m[:, None, None, :]
    elif kind == "bool_1hqk":
        mask = rand(1, h, lq, lk) < 0.7
    elif kind == "bool_qk":
        mask = rand(lq, lk) < 0.5
    elif kind == "bool_empty_rows":  # about a third of the rows see no key at all
        mask = (rand(b, h, lq, lk) < 0.6) & (rand(b, h, lq, 1) < 0.65)
    elif kind == "bool_empty_batch":  # the whole last batch entry is masked out
        mask = (rand(b, 1, 1, lk) < 0.8) & (torch.arange(b) < b - 1)[:, None, None, None]
    elif kind == "float_qk":
        mask = torch.where(rand(lq, lk) < 0.3, float("-inf"), torch.randn(lq, lk, generator=generator))
    elif kind == "float_b1qk_empty_rows":
        bias = torch.randn(b, 1, lq, lk, generator=generator) * 2
        mask = torch.where((rand(b, 1, lq, lk) < 0.4) | (rand(b, 1, lq, 1) < 0.3), float("-inf"), bias)
    elif kind == "float16_1hqk":
        mask = torch.where(rand(1, h, lq, lk) < 0.2, float("-inf"), rand(1, h, lq, lk) * 3 - 1.5)
        mask = mask.half()
    else:
        raise ValueError(kind)
    return mask.to(DEVICE)


def run_fused(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              **opts: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused forward writing into a NaN-poisoned output: returns (out, lse). ``opts`` are the
    keyword arguments of ``scaled_dot_product_attention`` (dropout_p aside)."""
    mask, causal = opts.get("attn_mask"), opts.get("is_causal", False)
    temperature, train_len, cos_scale = opts.get("temperature"), opts.get("train_len"), opts.get("cos_scale")
    p = check_inputs(query, key, value, mask, 0.0, causal, opts.get("scale"), opts.get("enable_gqa", False),
                     temperature, train_len, cos_scale, kernel=True, kv_lengths=opts.get("kv_lengths"),
                     window=opts.get("window"))
    poisoned = torch.full((p.batch, p.heads_q, p.lq, p.head_dim_v), float("nan"), dtype=query.dtype,
                          device=query.device)
    out, lse = attention_forward(query, key, value, p, out=poisoned)
    assert out.data_ptr() == poisoned.data_ptr(), "attention_forward did not write into out="
    return out, lse[0]  # the log-sum-exp, or under an additive mask the row max (+inf on empty rows too)


def reference_in(dtype: torch.dtype, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 **opts: Any) -> torch.Tensor:
    """The reference computed in ``dtype`` (inputs cast to it), returned in float64."""
    q, k, v = (t.to(dtype) for t in (query, key, value))
    return reference.scaled_dot_product_attention(q, k, v, **opts).to(torch.float64)


def empty_rows(query: torch.Tensor, key: torch.Tensor, **opts: Any) -> torch.Tensor:
    """Boolean (B, Hq, Lq): rows that may attend to no key."""
    b, hq, lq, _ = query.shape
    lk = key.shape[2]
    allowed = allowed_keys(opts.get("attn_mask"), opts.get("is_causal", False), lq, lk, query.device,
                           window=opts.get("window"), kv_lengths=opts.get("kv_lengths"))
    return ~allowed.any(-1).expand(b, hq, lq)


def assert_matches_reference(out: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                             value: torch.Tensor, lse: torch.Tensor | None = None, **opts: Any) -> None:
    """Check the fused output against the float64 reference with the same options.

    Budget: ``2 * err(reference in the inputs' dtype) + FLOOR[dtype]`` in relative error. Also: no NaN
    or inf anywhere (the reference is always finite), rows that see no key are exactly zero, and the
    log-sum-exp (if given) is +inf exactly on those rows.
    """
    dtype = query.dtype
    ref64 = reference_in(torch.float64, query, key, value, **opts)
    assert torch.isfinite(ref64).all(), "the float64 reference itself is not finite: bad test input"
    empty = empty_rows(query, key, **opts)
    assert not torch.isnan(out).any(), mismatch_report(out, ref64, "NaN in the output", FLOOR[dtype])
    if empty.any():
        got = out[empty]
        assert (got == 0).all(), (f"rows that see no key must be exactly zero, got nonzero/NaN at "
                                  f"{positions((out != 0).any(-1) & empty, 8)}")
    if ref64.norm() > 0:  # (else every row is empty: checked exactly above)
        assert_within_budget(out, ref64, reference_in(dtype, query, key, value, **opts))
    if lse is not None:
        bad = (torch.isinf(lse) & (lse > 0)) != empty
        assert not bad.any(), f"lse must be +inf exactly on empty rows; wrong at {positions(bad, 8)}"
        assert not torch.isnan(lse).any(), f"NaN in lse at {positions(torch.isnan(lse), 8)}"


def assert_within_budget(out: torch.Tensor, ref64: torch.Tensor, low: torch.Tensor,
                         dtype: torch.dtype | None = None, what: str = "") -> None:
    """``out`` within the error budget of ``ref64`` given the reference ``low`` computed in ``dtype``
    (the inputs' precision, by default out's): :func:`infoscale_triton.testing.assert_close`."""
    assert_close(out, ref64, low, dtype, what)


def check_fused(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **opts: Any) -> torch.Tensor:
    """Run the poisoned fused forward and compare it with the reference; returns the output."""
    out, lse = run_fused(query, key, value, **opts)
    assert_matches_reference(out, query, key, value, lse=lse, **opts)
    return out


# ---------------------------------------------------------------------------------------------------
# Gradients: the public function's autograd against autograd through the reference.

QKV = ("query", "key", "value")


def fused_grads(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dout: torch.Tensor, *,
                wrt: tuple[str, ...] = QKV, **opts: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output and gradients of the public function for the upstream gradient ``dout``: with respect to
    the inputs named in ``wrt`` (fresh leaves that keep the inputs' strides) and to a tensor
    ``temperature`` if it requires grad. Returns (out, {name: gradient})."""
    inputs = {name: x.detach().requires_grad_(name in wrt) for name, x in zip(QKV, (query, key, value))}
    names = [name for name in QKV if name in wrt]
    temperature = opts.get("temperature")
    if isinstance(temperature, torch.Tensor):
        leaf = temperature.detach().requires_grad_(temperature.requires_grad)
        opts = dict(opts, temperature=leaf)
        if leaf.requires_grad:
            inputs["temperature"] = leaf
            names.append("temperature")
    out = infoscale_triton.scaled_dot_product_attention(inputs["query"], inputs["key"], inputs["value"],
                                                        **opts)
    assert out.requires_grad, "the output of inputs that require grad does not require grad"
    grads = torch.autograd.grad(out, [inputs[name] for name in names], dout)
    return out.detach(), dict(zip(names, grads))


def reference_grads_in(dtype: torch.dtype, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       dout: torch.Tensor, names: tuple[str, ...] | list[str],
                       **opts: Any) -> dict[str, torch.Tensor]:
    """Gradients (in float64) of the reference computed in ``dtype``: query, key, value and dout cast to
    it; a tensor temperature is a float64 leaf for the float64 reference and keeps its own dtype
    otherwise (the reference casts it to the logits' dtype)."""
    leaves = {name: x.detach().to(dtype).requires_grad_(name in names)
              for name, x in zip(QKV, (query, key, value))}
    temperature = opts.get("temperature")
    if isinstance(temperature, torch.Tensor):
        t = temperature.detach().to(torch.float64 if dtype == torch.float64 else temperature.dtype)
        leaves["temperature"] = t.requires_grad_("temperature" in names)
        opts = dict(opts, temperature=leaves["temperature"])
    out = reference.scaled_dot_product_attention(leaves["query"], leaves["key"], leaves["value"], **opts)
    wanted = [leaves[name] for name in names]
    grads = torch.autograd.grad(out, wanted, dout.to(dtype), allow_unused=True)
    return {name: (torch.zeros_like(x) if g is None else g).to(torch.float64)
            for name, x, g in zip(names, wanted, grads)}


def structural_zeros(query: torch.Tensor, key: torch.Tensor, temperature_shape: tuple[int, ...] | None,
                     **opts: Any) -> dict[str, torch.Tensor]:
    """Boolean masks of the gradient elements that are exactly zero whatever the inputs: dq rows (and
    temperature elements) whose rows see no key, dk/dv rows of keys that no query row sees."""
    b, hq, lq, _ = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    empty = empty_rows(query, key, **opts)  # (B, Hq, Lq)
    allowed = allowed_keys(opts.get("attn_mask"), opts.get("is_causal", False), lq, lk, query.device,
                           window=opts.get("window"), kv_lengths=opts.get("kv_lengths"))
    seen = allowed.expand(b, hq, lq, lk).any(2).reshape(b, hkv, hq // hkv, lk).any(2)  # (B, Hkv, Lk)
    zeros = {"query": empty[..., None], "key": ~seen[..., None], "value": ~seen[..., None]}
    if temperature_shape is not None:  # an element is zero if every row it broadcasts to is empty
        zeros["temperature"] = (~empty).to(torch.float64).sum_to_size(temperature_shape) == 0
    return zeros


def natural_gradient_norms(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dout: torch.Tensor,
                           names: list[str] | tuple[str, ...], **opts: Any) -> dict[str, float]:
    """The size each gradient would have without any cancellation, in float64: every sum of the chain
    rule taken over its terms' absolute values (dP_ij = sum_d |dO_id| |v_jd|, dZ = P (dP + P.dP) for
    P (dP - delta), and so on), the scale of a float32 rounding error in it. A gradient much smaller
    than this (a very sharp softmax, or one key per row, where dZ is exactly zero) has a meaningless
    relative error: ``NATURAL_FLOOR`` times this norm is its absolute floor. The probabilities come from
    the reference itself (value = the identity, so that its output is P)."""
    b, hq, lq, d = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    group = hq // hkv
    temperature = opts.get("temperature")
    ref_opts = opts
    if isinstance(temperature, torch.Tensor):
        ref_opts = dict(opts, temperature=temperature.detach().double())
    q, k, v, do = (x.detach().to(torch.float64) for x in (query, key, value, dout))
    eye = torch.eye(lk, dtype=torch.float64, device=q.device).expand(b, hkv, lk, lk)
    probs = reference.scaled_dot_product_attention(q, k, eye, **ref_opts)  # (B, Hq, Lq, Lk)
    p = check_inputs(query, key, value, opts.get("attn_mask"), 0.0, opts.get("is_causal", False),
                     opts.get("scale"), opts.get("enable_gqa", False), temperature, opts.get("train_len"),
                     opts.get("cos_scale"), kernel=False, kv_lengths=opts.get("kv_lengths"),
                     window=opts.get("window"))
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    inv_q = inv_k = None
    if p.cos_scale is not None:
        qn, kn = (torch.linalg.vector_norm(x, dim=-1, keepdim=True) for x in (q, k))
        inv_q, inv_k = (torch.where(n > 0, 1 / torch.where(n > 0, n, 1), 0) for n in (qn, kn))
        q, k = q * inv_q, k * inv_k
    if isinstance(temperature, torch.Tensor):
        t = temperature.detach().to(torch.float64).abs().expand(b, hq, lq)
    elif temperature is not None:
        n = allowed_keys(opts.get("attn_mask"), p.is_causal, lq, lk, q.device).sum(-1).to(torch.float64)
        t = row_temperature(n, TemperatureSpec.parse(temperature), p.train_len, d).abs().expand(b, hq, lq)
    else:
        t = torch.ones(b, hq, lq, dtype=torch.float64, device=q.device)
    a = (abs(p.scale) * t)[..., None]  # the logit's factor on q.k (unit rows under CosScale)
    dp = do.abs() @ v.abs().transpose(-2, -1)  # every sum over its terms' absolute values
    dz = probs * (dp + (probs * dp).sum(-1, keepdim=True))
    out: dict[str, float] = {}
    for name in names:
        if name == "query":
            g = a * (dz @ k.abs()) * (1 if inv_q is None else inv_q)
        elif name == "key":
            g = (dz.transpose(-2, -1) @ (a * q.abs())).view(b, hkv, group, lk, d).sum(2)
            g = g * (1 if inv_k is None else inv_k.view(b, hkv, group, lk, 1)[:, :, 0])
        elif name == "value":
            g = (probs.transpose(-2, -1) @ do.abs()).view(b, hkv, group, lk, -1).sum(2)
        else:  # dt_i = c sum_j dZ_ij (q_i . k_j), summed over the rows it broadcasts to
            g = abs(p.scale) * (dz * (q.abs() @ k.abs().transpose(-2, -1))).sum(-1)
            g = g.sum_to_size(temperature.shape)
        out[name] = g.norm().item()
    return out


def kernel_grads_with_float32_output(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                     dout: torch.Tensor, **opts: Any) -> dict[str, torch.Tensor]:
    """The fused forward and backward kernels called directly (not through autograd), with the backward
    given the output in float32 (the float64 reference's, rounded once) instead of the inputs' dtype:
    isolates what the backward's delta = rowsum(dO * O) inherits from the output's rounding."""
    temperature = opts.get("temperature")
    p = check_inputs(query, key, value, opts.get("attn_mask"), 0.0, opts.get("is_causal", False),
                     opts.get("scale"), opts.get("enable_gqa", False), temperature, opts.get("train_len"),
                     opts.get("cos_scale"), kernel=True, kv_lengths=opts.get("kv_lengths"),
                     window=opts.get("window"))
    _, lse = attention_forward(query, key, value, p)
    fwd_opts = dict(opts, temperature=temperature.detach()) if isinstance(temperature, torch.Tensor) else opts
    out32 = reference_in(torch.float64, query, key, value, **fwd_opts).to(torch.float32)
    temp_grad = isinstance(temperature, torch.Tensor) and temperature.requires_grad
    dq, dk, dv, dt = attention_backward(query, key, value, out32, lse, dout, p, temperature_grad=temp_grad)
    return {"query": dq, "key": dk, "value": dv, "temperature": dt}


def assert_grads_match_reference(grads: dict[str, torch.Tensor], query: torch.Tensor, key: torch.Tensor,
                                 value: torch.Tensor, dout: torch.Tensor, output_rounding: bool = False,
                                 **opts: Any) -> None:
    """Check fused gradients (as :func:`fused_grads` returns them) against autograd through the float64
    reference with the same options and upstream gradient ``dout``.

    Each gradient: the shape and dtype of its input, finite, exactly zero where it must be (rows that
    see no key: dq and the temperature's gradient; keys that no row sees: dk, dv), and relative error
    ``||g - ref|| / ||ref||`` within ``BUDGET_FACTOR x`` the error of the reference's own gradient
    computed in the inputs' dtype, plus ``FLOOR[dtype]``. Where the softmax's cancellation makes the
    reference much smaller than its terms (one key per row: dZ = P (dP - delta) is exactly zero; a very
    sharp softmax), a relative error means little: the same budget in absolute terms plus
    ``NATURAL_FLOOR`` times the gradient's uncancelled size (:func:`natural_gradient_norms`) is
    accepted. The kernels' dP - delta cancels only up to float32 rounding (delta is read from the
    output), the reference's exactly.

    ``output_rounding`` (the property test): a float16 / bfloat16 dq, dk or dt over budget passes (with
    a warning) if the same kernels given the output in float32 meet the budget
    (:func:`kernel_grads_with_float32_output`).
    """
    fallback: dict[str, torch.Tensor] | None = None
    natural: dict[str, float] = {}

    def natural_norm(name: str) -> float:  # computed once, on the first gradient that needs it
        if not natural:
            natural.update(natural_gradient_norms(query, key, value, dout, names, **opts))
        return natural[name]

    dtype = query.dtype
    names = list(grads)
    ref64 = reference_grads_in(torch.float64, query, key, value, dout, names, **opts)
    low = reference_grads_in(dtype, query, key, value, dout, names, **opts)
    temperature = opts.get("temperature")
    inputs = {"query": query, "key": key, "value": value, "temperature": temperature}
    zeros = structural_zeros(query, key, tuple(temperature.shape) if "temperature" in grads else None, **opts)
    for name in names:
        g, r = grads[name], ref64[name]
        what = f"d{name}: "
        assert g.shape == inputs[name].shape and g.dtype == inputs[name].dtype, (
            f"{what}got {tuple(g.shape)} {g.dtype} for an input of {tuple(inputs[name].shape)} "
            f"{inputs[name].dtype}")
        assert torch.isfinite(r).all(), f"{what}the float64 reference is not finite: bad test input"
        assert torch.isfinite(g).all(), mismatch_report(g, r, f"{what}not finite", FLOOR[dtype])
        must_be_zero = zeros[name].expand(g.shape)
        if must_be_zero.any():
            bad = must_be_zero & (g != 0)
            assert not bad.any(), (f"{what}must be exactly zero (rows that see no key / keys no row "
                                   f"sees), nonzero at {positions(bad, 8)}")
        if r.norm() == 0 and must_be_zero.all():
            continue  # checked exactly above
        try:
            _check_grad_error(g, r, low[name], dtype, natural_norm, name, what)
        except AssertionError as failure:
            if not output_rounding or name == "value" or dtype == torch.float32:
                raise
            # FlashAttention's delta = rowsum(dO * O) reads the output as returned, rounded to the dtype
            # (as PyTorch's own fused backward does). On a few very sharp rows that rounding alone can
            # exceed the budget (test_backward.py::test_sharp_rows_output_rounding): the same kernels
            # given the output in float32 must then meet it, and dv (which does not read O) must come
            # out the same.
            if fallback is None:
                fallback = kernel_grads_with_float32_output(query, key, value, dout, **opts)
                if "value" in grads:
                    assert torch.equal(fallback["value"], grads["value"]), (
                        "dv differs between the public function and its kernels called directly")
            try:
                _check_grad_error(fallback[name], r, low[name], dtype, natural_norm, name,
                                  what + "(output given in float32) ")
            except AssertionError as again:
                raise AssertionError(f"{failure}\n\nand with the output given to the backward in float32:\n"
                                     f"{again}") from None
            warnings.warn(f"{what}over budget only through the output's rounding to {dtype} (the kernels "
                          f"given it in float32 meet the budget): {str(failure).splitlines()[0]}",
                          stacklevel=2)


def _check_grad_error(g: torch.Tensor, r: torch.Tensor, low: torch.Tensor, dtype: torch.dtype,
                      natural_norm: Any, name: str, what: str) -> None:
    """The relative budget (:func:`assert_within_budget`) or, where the softmax's cancellation makes the
    reference much smaller than its terms, the same budget in absolute terms plus ``NATURAL_FLOOR``
    times the gradient's uncancelled size."""
    failure: AssertionError | None = None
    if r.norm() > 0:
        try:
            assert_within_budget(g, r, low, dtype, what)
            return
        except AssertionError as e:
            failure = e
    natural = natural_norm(name)
    diff = (g.to(torch.float64) - r).norm().item()
    budget = (BUDGET_FACTOR * (low - r).norm().item() + FLOOR[dtype] * r.norm().item()
              + NATURAL_FLOOR * natural)
    if diff <= budget:
        return
    raise AssertionError((f"{failure}\n" if failure else "") + (
        f"{what}||g - ref|| = {diff:.3e} > {budget:.3e} (= {BUDGET_FACTOR:g} x ||{dtype} reference - ref|| "
        f"+ {FLOOR[dtype]:g} x ||ref|| ({r.norm().item():.3e}) + {NATURAL_FLOOR:.2e} x the norm without "
        f"cancellation ({natural:.3e}))"))


def check_fused_grads(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                      wrt: tuple[str, ...] = QKV, dout_layout: str = "contiguous",
                      generator: torch.Generator | None = None, output_rounding: bool = False,
                      **opts: Any) -> dict[str, torch.Tensor]:
    """Forward and backward through the public function with a random upstream gradient (std 1, in the
    layout ``dout_layout``): the output against the reference (:func:`assert_matches_reference`) and
    the gradients (:func:`assert_grads_match_reference`). A tensor temperature gets a gradient if it
    requires grad; ``output_rounding``: see :func:`assert_grads_match_reference`. Returns the gradients."""
    b, hq, lq, _ = query.shape
    dout = to_layout(randn(b, hq, lq, value.shape[-1], dtype=query.dtype, generator=generator), dout_layout)
    out, grads = fused_grads(query, key, value, dout, wrt=wrt, **opts)
    temperature = opts.get("temperature")
    fwd_opts = dict(opts, temperature=temperature.detach()) if isinstance(temperature, torch.Tensor) else opts
    assert_matches_reference(out, query, key, value, **fwd_opts)
    assert_grads_match_reference(grads, query, key, value, dout, output_rounding=output_rounding, **opts)
    return grads
