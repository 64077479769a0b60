"""The public fused attention: a drop-in for torch.nn.functional.scaled_dot_product_attention."""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import ops, tuning
from .decode import MAX_QUERY_ROWS
from .dropout import draw_seed
from .empty import nothing_to_compute, zero_output, zero_stats
from .validation import Problem, check_bool, check_inputs


class AttentionEntropy(NamedTuple):
    """Per-row statistics of the attention probabilities, returned with ``return_entropy=True``."""

    entropy: torch.Tensor  # H_i = -sum_j p_ij ln p_ij (nats), float32
    max_prob: torch.Tensor  # max_j p_ij, float32


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
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, AttentionEntropy]:
    r"""Fused attention with an optional per-row logit temperature and cosine (CosScale) logits.

    Computes ``softmax(t_i * c * q_i . k_j + bias_ij) @ v`` over the keys row i may attend to, in one
    FlashAttention-style pass (no Lq x Lk matrix in memory).

    Shapes follow ``torch.nn.functional.scaled_dot_product_attention``: query ``(B, Hq, Lq, D)``, key
    ``(B, Hkv, Lk, D)``, value ``(B, Hkv, Lk, Dv)``; returns ``(B, Hq, Lq, Dv)`` in the input dtype.
    Any strides work; a ``(B, L, H, D)`` tensor transposed to ``(B, H, L, D)`` is read in place.

    Args:
        query, key, value: float16, bfloat16 or float32 CUDA tensors, ``16 <= D, Dv <= 256``. float32
            dots run in exact IEEE float32 unless ``torch.backends.cuda.matmul.allow_tf32`` is True,
            in which case they use Triton's TF32 (relative error ~1e-3 measured on the H100, about 5x
            PyTorch's own TF32 path).
        attn_mask: boolean (True = may attend) or additive float, broadcastable to (B, Hq, Lq, Lk). The
            bias is added after the temperature: ``t_i * c * q.k + bias``. A key whose float bias is
            ``-inf`` counts as masked for ``n_i``; finite biases (``finfo.min`` padding too) are ordinary
            biases, saturated to +-2.3e38 so that they stay finite in the kernel's exp2 domain. May be
            combined with ``is_causal``.
        dropout_p: attention dropout, in [0, 1): each probability (after the softmax, as in torch's SDPA)
            is zeroed with probability ``dropout_p`` and the kept ones are scaled by
            ``1 / (1 - dropout_p)``. Applied whenever ``dropout_p > 0`` (pass 0 in eval, as with torch).
            The mask comes from Philox inside the kernels, keyed by a seed drawn from torch's default
            generator on the inputs' device at each call: reproducible under ``torch.manual_seed``, and
            regenerated identically by the backward. ``infoscale_triton.dropout.dropout_mask`` shows it
            (debugging aid). ``dropout_p=0`` compiles the dropout code away.
        is_causal: causal mask aligned to the bottom-right when ``Lq != Lk`` (query i sees keys
            ``j <= i + Lk - Lq``, as with a KV cache)::

                Lq=2, Lk=5:   1 1 1 1 0
                              1 1 1 1 1

            A row that may attend to no key returns zeros (``Lk = 0`` too, as with torch's SDPA: zeros,
            and zero gradients; ``B``, ``Hq`` or ``Lq`` of 0 give an empty output).
        scale: ``c``; default ``1/sqrt(D)``. Must be None with ``cos_scale``.
        enable_gqa: share each key/value head among ``Hq // Hkv`` query heads (never copied).
        temperature: None; ``"infoscale"``: ``t_i = sqrt((1 - n_i^(-2/D)) / (1 - N^(-2/D)))``;
            ``"logn"``: ``t_i = ln(n_i) / ln(N)``; ``"infoscale_clipped"`` / ``"logn_clipped"``:
            ``max(1, t_i)``; or a float tensor of per-row multipliers broadcastable to (B, Hq, Lq).
            ``n_i`` is the number of keys row i may attend to after causal masking, the window,
            key padding and attn_mask.
        train_len: ``N``, the training length (int >= 2); required by the string temperatures.
        cos_scale: ``s`` for CosScale: q and k rows are L2-normalised inside the kernel and the logit is
            ``t_i * s * cos(q_i, k_j)``. A zero row has zero cosines.
        kv_lengths: key padding, an int32/int64 tensor ``(B,)``: batch entry b attends to keys
            ``j < kv_lengths[b]`` only (values are clamped to [0, Lk] on the device, never read on the
            host). Key tiles past the length are skipped, not masked. A boolean ``attn_mask`` that is
            the same for every head and query row (shape ``(B, 1, 1, Lk)``, Hugging Face's padding
            mask) takes the same path: the tiles outside its first..last True key are skipped and
            ``n_i`` is counted without a ``(Lq, Lk)`` mask in memory.
        window: sliding window ``(left, right)``, as FlashAttention's ``window_size``: query i sees keys
            ``i + Lk - Lq - left <= j <= i + Lk - Lq + right`` (-1 = unbounded on that side; combined
            with ``is_causal`` the right bound is the diagonal). Key tiles outside are skipped::

                Lq=Lk=5, window=(2, 0):   1 0 0 0 0
                                          1 1 0 0 0
                                          1 1 1 0 0
                                          0 1 1 1 0
                                          0 0 1 1 1

        return_entropy: also return :class:`AttentionEntropy`: each row's attention entropy
            ``H_i = -sum_j p_ij ln p_ij`` (nats) and largest probability ``max_j p_ij``, ``(B, Hq, Lq)``
            float32 without gradient, computed in the same pass from the running max and sums (no
            ``Lq x Lk`` matrix; +2% time at 16k tokens). They describe the softmax before dropout; a row
            that sees no key gives 0 and 0. Such calls never take the decode kernel.

    Returns:
        The output, or ``(output, AttentionEntropy(entropy, max_prob))`` with ``return_entropy``.

    Raises:
        ValueError / TypeError naming the argument for bad input.

    Gradients flow to query, key, value and a tensor ``temperature`` through the fused backward
    kernels (deterministic: no atomics, the same bits on every run). Inference calls that decode (at
    most 16 query rows against at least ``infoscale_triton.tuning``'s ``decode_min_keys`` keys, by
    default 1: any cache; no window or dropout) run the split-KV kernel of
    :func:`infoscale_triton.decode_attention`, which splits long caches across the GPU; an
    ``attn_mask`` there (Hugging Face's padding and static-cache masks) is read as the dense kernel
    reads it.
    """
    p = check_inputs(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                     temperature, train_len, cos_scale, kernel=True, kv_lengths=kv_lengths, window=window)
    grad_mode = torch.is_grad_enabled()
    needs_grad = grad_mode and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in (query, key, value, temperature))
    if grad_mode and attn_mask is not None and attn_mask.requires_grad:
        # a learned additive bias would silently get no gradient
        raise NotImplementedError("attn_mask requires grad: gradients for the mask are not supported; "
                                  "pass attn_mask.detach() or use infoscale_triton.reference")
    check_bool("return_entropy", return_entropy)
    # drawn first, before anything else random (dropout.py: how to get this call's mask)
    seed = draw_seed(query.device) if p.dropout_p > 0 else None
    if nothing_to_compute(p):
        out = zero_output((p.batch, p.heads_q, p.lq, p.head_dim_v), query, key, value, temperature)
        return (out, AttentionEntropy(*zero_stats(out.shape[:3], query.device))) if return_entropy else out
    if not needs_grad and not return_entropy and decodes(p, key, value):
        return ops.decode(query, key, value, p)
    out, stats = ops.attention(query, key, value, p, seed, return_entropy)
    return (out, AttentionEntropy(stats[0], stats[1])) if return_entropy else out



def decodes(p: Problem, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether an inference call is KV-cache decoding that the split-KV kernel (splitkv.py) serves
    better than the dense forward, whose grid would be only batch x heads programs long."""
    # with kv_lengths, causal rows of the decode kernel align to each cache's own length, here to Lk:
    # the two agree for one query row (or without causality) only
    same_rows = p.kv_lengths is None or p.lq == 1 or not p.is_causal
    return (p.lq <= MAX_QUERY_ROWS and p.lk >= tuning.current().decode_min_keys and p.window is None
            and p.dropout_p == 0 and same_rows and key.stride(-1) == 1 and value.stride(-1) == 1)
