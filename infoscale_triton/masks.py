"""Which keys each query row may see: the one definition that the reference computes with and the
fused path counts ``n_i`` from (for a string temperature under an ``attn_mask``)."""

from __future__ import annotations

import torch


def allowed_keys(
    attn_mask: torch.Tensor | None, is_causal: bool, lq: int, lk: int, device: torch.device,
    *, window: tuple[int, int] | None = None, kv_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean ``(..., Lq, Lk)``: True where query i may attend to key j.

    Causal and the window are bottom-right aligned: query i sees keys ``j <= i + lk - lq`` (causal)
    and ``i + lk - lq - left <= j <= i + lk - lq + right`` (window, -1 = no bound). ``kv_lengths``
    (B,) keeps keys ``j < kv_lengths[b]`` (clamped to [0, lk]). A float mask forbids the keys whose
    bias is ``-inf``.
    """
    i = torch.arange(lq, device=device)[:, None] + (lk - lq)  # the diagonal's key for each row
    j = torch.arange(lk, device=device)[None, :]
    allowed = torch.ones(lq, lk, dtype=torch.bool, device=device)
    if is_causal:
        allowed = allowed & (j <= i)
    if window is not None:
        left, right = window
        if left >= 0:
            allowed = allowed & (j >= i - left)
        if right >= 0:
            allowed = allowed & (j <= i + right)
    if kv_lengths is not None:
        allowed = allowed & (j < kv_lengths.clamp(0, lk).view(-1, 1, 1, 1))
    if attn_mask is not None:
        mask_allowed = attn_mask if attn_mask.dtype == torch.bool else attn_mask != float("-inf")
        allowed = allowed & mask_allowed
    return allowed
