"""Plain PyTorch reference: materialises the logits, readable before fast.

Same signature and semantics as :func:`infoscale_triton.scaled_dot_product_attention`; runs on any
device and in any floating dtype (float64 for checks). Memory is O(Lq * Lk) per head.
"""

from __future__ import annotations

import torch

from .empty import zero_output
from .masks import allowed_keys
from .temperature import row_temperature
from .validation import Problem, broadcastable, check_inputs

__all__ = ["scaled_dot_product_attention", "varlen_attention", "attention_entropy", "allowed_keys"]


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    """x / ||x|| along the last dim, with zero rows left at zero (their cosines are zero, not NaN)."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return torch.where(norm > 0, x / torch.where(norm > 0, norm, 1), 0)


def _check_dropout_mask(mask: object, shape: tuple[int, ...], device: torch.device) -> None:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"dropout_mask must be a boolean tensor (True = kept), got "
                        f"{getattr(mask, 'dtype', type(mask).__name__)}")
    if mask.device != device:
        raise ValueError(f"dropout_mask is on {mask.device} but query is on {device}")
    if not broadcastable(tuple(mask.shape), shape):
        raise ValueError(f"dropout_mask of shape {tuple(mask.shape)} does not broadcast to "
                         f"(batch, heads, Lq, Lk) = {shape}")


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    temperature: str | torch.Tensor | None = None,
    train_len: int | None = None,
    cos_scale: float | None = None,
    kv_lengths: torch.Tensor | None = None,
    window: tuple[int, int] | None = None,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference attention: ``softmax(t_i * c * q_i.k_j + bias_ij) @ v`` over the allowed keys.

    ``c`` is ``scale`` (default ``1/sqrt(D)``); with ``cos_scale=s`` the q and k rows are L2-normalised
    and ``c = s``. The computation runs in the inputs' dtype: pass float64 inputs for a check.

    Dropout multiplies the probabilities by ``keep / (1 - dropout_p)``. ``dropout_mask`` (boolean, True
    = kept, broadcastable to (B, Hq, Lq, Lk)) gives ``keep``, e.g. the fused kernels' own mask from
    ``infoscale_triton.dropout.dropout_mask``; without it, ``dropout_p > 0`` draws a Bernoulli mask
    from torch's generator (torch's semantics, not the kernels' bits).

    ``kv_lengths`` and ``window``: key padding and a sliding window as in the fused function
    (:func:`allowed_keys` spells out which keys each row sees).
    """
    p = check_inputs(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                     temperature, train_len, cos_scale, kernel=False, kv_lengths=kv_lengths, window=window)
    shape = (p.batch, p.heads_q, p.lq, p.lk)
    if dropout_mask is not None:
        _check_dropout_mask(dropout_mask, shape, query.device)
    probs = _probabilities(query, key, p)
    v = value.repeat_interleave(p.group, dim=1) if p.group > 1 else value
    if dropout_mask is None and p.dropout_p > 0:
        dropout_mask = torch.rand(shape, device=probs.device) >= p.dropout_p
    if dropout_mask is not None:
        probs = probs.masked_fill(~dropout_mask, 0) / (1 - p.dropout_p)
    return probs @ v


def attention_entropy(
    query: torch.Tensor,
    key: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    temperature: str | torch.Tensor | None = None,
    train_len: int | None = None,
    cos_scale: float | None = None,
    kv_lengths: torch.Tensor | None = None,
    window: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row attention entropy ``H_i = -sum_j p_ij ln p_ij`` (nats) and the largest probability
    ``max_j p_ij``, each ``(B, Hq, Lq)``, of the attention that :func:`scaled_dot_product_attention`
    computes with the same arguments (before dropout). Rows that see no key give 0 and 0."""
    p = check_inputs(query, key, key, attn_mask, 0.0, is_causal, scale, enable_gqa, temperature, train_len,
                     cos_scale, kernel=False, kv_lengths=kv_lengths, window=window)
    probs = _probabilities(query, key, p)
    plogp = torch.where(probs > 0, probs * torch.log(torch.where(probs > 0, probs, 1)), 0)
    largest = probs.amax(-1) if p.lk > 0 else probs.new_zeros(probs.shape[:-1])  # (amax of no element fails)
    return -plogp.sum(-1), largest


def _probabilities(query: torch.Tensor, key: torch.Tensor, p: Problem) -> torch.Tensor:
    """softmax over the allowed keys of ``t_i * c * q_i.k_j + bias_ij``, (B, Hq, Lq, Lk); rows with no
    allowed key are zeros."""
    q, k = query, key
    if p.group > 1:
        k = k.repeat_interleave(p.group, dim=1)
    if p.cos_scale is not None:
        q, k = _unit_rows(q), _unit_rows(k)
    logits = p.scale * (q @ k.transpose(-2, -1))  # (B, Hq, Lq, Lk)

    attn_mask = p.attn_mask
    allowed = allowed_keys(attn_mask, p.is_causal, p.lq, p.lk, q.device, window=p.window,
                           kv_lengths=p.kv_lengths)
    allowed = allowed.expand(logits.shape)
    if p.temperature_tensor is not None:
        t = p.temperature_tensor.to(logits.dtype).expand(p.batch, p.heads_q, p.lq)
    elif p.temperature is not None:
        # count and evaluate t in at least float32: bf16 cannot even hold n = 1001
        work = torch.promote_types(logits.dtype, torch.float32)
        n = allowed.sum(-1).to(work)
        t = row_temperature(n, p.temperature, p.train_len, p.head_dim).to(logits.dtype)
    else:
        t = None
    if t is not None:
        logits = logits * t.unsqueeze(-1)
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        logits = logits + attn_mask.to(logits.dtype)

    logits = logits.masked_fill(~allowed, float("-inf"))
    # Rows with no allowed key: softmax would give NaN; they output zeros instead.
    empty = ~allowed.any(-1, keepdim=True)
    return torch.softmax(logits.masked_fill(empty, 0), dim=-1).masked_fill(empty, 0)


def varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    *,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    window: tuple[int, int] | None = None,
    temperature: str | torch.Tensor | None = None,
    train_len: int | None = None,
    cos_scale: float | None = None,
) -> torch.Tensor:
    """Reference for :func:`infoscale_triton.varlen_attention`: the dense reference on each sequence
    (packed ``(T, H, D)`` tensors; tokens past the last offset and rows that see no key get zeros).
    Offsets are clamped as the fused function documents: to [0, T], each end to at least its start."""
    # zeros that are differentiable even if no sequence is written below (no key token, say)
    out = zero_output((query.shape[0], query.shape[1], value.shape[-1]), query, key, value, temperature)
    for s in range(len(cu_seqlens_q) - 1):
        (q0, q1), (k0, k1) = (_clamped_extent(cu, s, x.shape[0])
                              for cu, x in ((cu_seqlens_q, query), (cu_seqlens_k, key)))
        if q1 == q0 or k1 == k0:
            continue
        q, k, v = (x[a:b].transpose(0, 1).unsqueeze(0) for x, a, b in
                   ((query, q0, q1), (key, k0, k1), (value, k0, k1)))
        temp = temperature
        if isinstance(temperature, torch.Tensor):
            temp = torch.broadcast_to(temperature, query.shape[:2])[q0:q1].transpose(0, 1).unsqueeze(0)
        o = scaled_dot_product_attention(q, k, v, None, dropout_p, is_causal, scale, q.shape[1] != k.shape[1],
                                         temperature=temp, train_len=train_len, cos_scale=cos_scale,
                                         window=window)
        out[q0:q1] = o[0].transpose(0, 1)
    return out


def _clamped_extent(cu_seqlens: torch.Tensor, s: int, tokens: int) -> tuple[int, int]:
    start = min(max(int(cu_seqlens[s]), 0), tokens)
    return start, min(max(int(cu_seqlens[s + 1]), start), tokens)
