"""The fused backward (not yet public) against autograd through the float64 reference."""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICE, make_mask, make_qkv

from infoscale_triton import reference
from infoscale_triton.backward import attention_backward
from infoscale_triton.forward import attention_forward
from infoscale_triton.validation import check_inputs

CASES = [
    # (hq, hkv, lq, lk, d, dv, causal, temperature, cos_scale, mask)
    (2, 2, 37, 37, 32, 32, False, None, None, None),
    (2, 2, 37, 37, 32, 32, True, "infoscale", None, None),
    (4, 2, 33, 50, 48, 32, True, "logn_clipped", None, None),
    (2, 1, 50, 20, 32, 40, True, "tensor", None, None),
    (2, 2, 29, 29, 32, 32, True, "infoscale", 32.0, None),
    (4, 2, 21, 45, 16, 16, False, "tensor", 64.0, None),
    (2, 2, 25, 30, 32, 32, False, "infoscale", None, "bool_qk"),
    (2, 2, 25, 30, 32, 32, True, "tensor", 32.0, "float_b1qk_empty_rows"),
    (2, 2, 17, 17, 80, 80, True, "logn", None, "bool_empty_rows"),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_gradients_match_reference(case: tuple) -> None:
    hq, hkv, lq, lk, d, dv, causal, temperature, cos_scale, mask = case
    q, k, v = make_qkv(2, hq, hkv, lq, lk, d, dv, torch.float32)
    attn_mask = make_mask(mask, 2, hq, lq, lk)
    temp = temperature
    if temperature == "tensor":
        temp = (torch.rand(2, hq, 1, device=DEVICE) * 1.5 + 0.25).requires_grad_(True)
    opts = dict(is_causal=causal, enable_gqa=hq != hkv, temperature=temp,
                train_len=16 if isinstance(temp, str) else None, cos_scale=cos_scale)
    p = check_inputs(q, k, v, attn_mask, 0.0, causal, None, hq != hkv, temp, opts["train_len"], cos_scale,
                     kernel=True)
    out, lse = attention_forward(q, k, v, p)
    dout = torch.randn_like(out)
    dq, dk, dv_, dt = attention_backward(q, k, v, out, lse, dout, p)

    leaves = [x.detach().double().requires_grad_(True) for x in (q, k, v)]
    ref_temp = temp.detach().double().requires_grad_(True) if isinstance(temp, torch.Tensor) else temp
    ref_mask = attn_mask.double() if attn_mask is not None and attn_mask.is_floating_point() else attn_mask
    ref = reference.scaled_dot_product_attention(*leaves, attn_mask=ref_mask, **dict(opts, temperature=ref_temp))
    wanted = leaves + ([ref_temp] if isinstance(temp, torch.Tensor) else [])
    grads = torch.autograd.grad(ref, wanted, dout.double())
    got = [dq, dk, dv_] + ([dt] if isinstance(temp, torch.Tensor) else [])
    for name, g, r in zip(("dq", "dk", "dv", "dt"), got, grads):
        assert torch.isfinite(g).all(), f"{name} not finite"
        err = ((g.double() - r).norm() / r.norm().clamp_min(1e-30)).item()
        assert err < 1e-4, f"{name}: relative error {err:.2e}"


def test_autograd_function_trains_a_layer() -> None:
    """Through FusedAttention: gradients reach q/k/v projections and a temperature parameter, and a few
    SGD steps on a small attention layer lower its loss."""
    from infoscale_triton.autograd import FusedAttention

    torch.manual_seed(0)
    b, h, n, d = 2, 2, 24, 16
    x = torch.randn(b, n, h * d, device=DEVICE)
    target = torch.randn(b, h, n, d, device=DEVICE)
    proj = torch.nn.Linear(h * d, 3 * h * d).to(DEVICE)
    temp = torch.ones(h, 1, device=DEVICE, requires_grad=True)
    opt = torch.optim.SGD([*proj.parameters(), temp], lr=0.5)

    def loss_fn() -> torch.Tensor:
        q, k, v = proj(x).view(b, n, 3, h, d).permute(2, 0, 3, 1, 4)  # (B, H, L, D) views, strided
        p = check_inputs(q, k, v, None, 0.0, True, None, False, temp, None, 32.0, kernel=True)
        out = FusedAttention.apply(q, k, v, temp, p)
        return ((out - target) ** 2).mean()

    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        assert temp.grad is not None and torch.isfinite(temp.grad).all()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
