"""Packed variable-length batches, in the style of FlashAttention's ``flash_attn_varlen_func``."""

from __future__ import annotations

import dataclasses
import numbers

import torch

from . import ops
from .attention import AttentionEntropy
from .dropout import draw_seed
from .empty import nothing_to_compute, zero_output, zero_stats
from .validation import broadcastable, check_bool, check_inputs, check_lengths, shape_text


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
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, AttentionEntropy]:
    r"""Fused attention over sequences packed along the token axis.

    Sequence ``s`` owns query tokens ``cu_seqlens_q[s] .. cu_seqlens_q[s+1]`` and key tokens
    ``cu_seqlens_k[s] .. cu_seqlens_k[s+1]`` and attends only within itself; every option means what it
    means in :func:`infoscale_triton.scaled_dot_product_attention` for that sequence alone (so ``n_i``
    counts the keys of row i's own sequence, and causal / window align to each sequence's
    bottom-right corner when its query and key lengths differ).

    Args:
        query: ``(Tq, Hq, D)``; key ``(Tk, Hkv, D)``; value ``(Tk, Hkv, Dv)``: float16, bfloat16 or
            float32 CUDA tensors with unit last stride. ``Hq`` a multiple of ``Hkv`` (GQA, never copied).
        cu_seqlens_q, cu_seqlens_k: int32 ``(batch + 1,)`` cumulative lengths starting at 0. Sequences
            of length 0 are allowed (``batch = 0`` too); tokens past the last offset get zeros. The
            offsets are not read on the host (that would synchronise): on the device each is clamped to
            ``[0, Tq]`` (``[0, Tk]`` for keys) and each sequence's end to at least its start, so offsets
            beyond the packed tokens never reach memory outside the tensors; such a sequence is cut at
            the last token, and an end below its start makes it empty. (Offsets that decrease and rise
            again make sequences overlap: their values are then unspecified, their accesses still
            within the tensors.)
        max_seqlen_q, max_seqlen_k: the longest query / key sequence. Give them to keep the call free of
            host synchronisation (CUDA-graph capturable); they must not be smaller than any length (as
            with FlashAttention, this is not checked: rows past them are not computed). None reads them
            from the (clamped) offsets (one synchronisation; a graph break under ``torch.compile``).
        dropout_p, is_causal, scale, window, temperature, train_len, cos_scale: as in
            :func:`infoscale_triton.scaled_dot_product_attention`. A tensor ``temperature`` broadcasts
            to ``(Tq, Hq)``.
        return_entropy: also return :class:`infoscale_triton.AttentionEntropy` with ``(Tq, Hq)`` fields
            (0 for tokens past the last offset), as in the dense function.

    Returns:
        ``(Tq, Hq, Dv)`` in the input dtype, contiguous (and the entropy with ``return_entropy``).
        Differentiable in query, key, value and a tensor temperature. With no key token (``Tk = 0``)
        every row is zeros, as are its gradients.
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{name} must be a 3-dimensional tensor (tokens, heads, head_dim), got "
                             f"{shape_text(t) if isinstance(t, torch.Tensor) else type(t).__name__}")
    heads_q, heads_kv = query.shape[1], key.shape[1]
    if (heads_q % heads_kv if heads_kv else heads_q):
        raise ValueError(f"query heads ({heads_q}) must be a multiple of key/value heads ({heads_kv})")
    # (tokens, heads, D) -> (1, heads, tokens, D) views: one packed "batch entry" for the kernels
    q4, k4, v4 = (t.unsqueeze(0).transpose(1, 2) for t in (query, key, value))
    temp4 = temperature
    if isinstance(temperature, torch.Tensor):
        if not broadcastable(tuple(temperature.shape), (query.shape[0], heads_q)):
            raise ValueError(f"temperature of shape {shape_text(temperature)} does not broadcast to "
                             f"(tokens, heads) = ({query.shape[0]}, {heads_q})")
        temp4 = torch.broadcast_to(temperature, (query.shape[0], heads_q)).transpose(0, 1).unsqueeze(0)
    p = check_inputs(q4, k4, v4, None, dropout_p, is_causal, scale, heads_q != heads_kv, temp4, train_len,
                     cos_scale, kernel=True, window=window)
    offsets = _offsets(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, query.shape[0], key.shape[0],
                       query.device)
    p = dataclasses.replace(p, **offsets)
    check_bool("return_entropy", return_entropy)
    seed = draw_seed(query.device) if p.dropout_p > 0 else None
    if nothing_to_compute(p):
        out = zero_output((query.shape[0], heads_q, value.shape[2]), query, key, value, temperature)
        return (out, AttentionEntropy(*zero_stats(out.shape[:2], query.device))) if return_entropy else out
    out, stats = ops.attention(q4, k4, v4, p, seed, return_entropy)
    out = out[0].transpose(0, 1)
    if not return_entropy:
        return out
    return out, AttentionEntropy(stats[0, 0].transpose(0, 1), stats[1, 0].transpose(0, 1))


def _offsets(cu_q: object, cu_k: object, max_q: object, max_k: object, tokens_q: int, tokens_k: int,
             device: torch.device) -> dict:
    """Problem fields for the packed layout, after checking them (``tokens_*``: Tq and Tk)."""
    for name, cu in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.shape[0] < 1:
            raise ValueError(f"{name} must be a 1-d int32 tensor (batch + 1,) of cumulative lengths, got "
                             f"{shape_text(cu) if isinstance(cu, torch.Tensor) else type(cu).__name__}")
        if cu.dtype != torch.int32:
            raise TypeError(f"{name} must be int32 (as FlashAttention's), got {cu.dtype}")
        check_lengths(name, cu, cu.shape[0], device)
    if cu_q.shape != cu_k.shape:
        raise ValueError(f"cu_seqlens_q {shape_text(cu_q)} and cu_seqlens_k {shape_text(cu_k)} must have the same "
                         "length (one entry per sequence, plus one)")
    fields = {"cu_seqlens_q": cu_q, "cu_seqlens_k": cu_k}
    for name, given, cu, tokens in (("max_seqlen_q", max_q, cu_q, tokens_q),
                                    ("max_seqlen_k", max_k, cu_k, tokens_k)):
        if given is None:
            given = int(sequence_lengths(cu, tokens).max().item()) if cu.shape[0] > 1 else 0  # one sync
        elif not isinstance(given, numbers.Integral) or isinstance(given, bool) or given < 0:
            raise ValueError(f"{name} must be an int >= 0 or None, got {given!r}")
        fields[name] = max(int(given), 1)
    return fields


def sequence_lengths(cu_seqlens: torch.Tensor, tokens: int) -> torch.Tensor:
    """Each sequence's length as the kernels see it (kernels/primitives.py: batch_extent): offsets
    clamped to [0, tokens], each end to at least its start."""
    starts = cu_seqlens[:-1].clamp(0, tokens)
    return (cu_seqlens[1:].clamp(0, tokens) - starts).clamp_min(0)
