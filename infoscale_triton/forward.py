"""Host side of the fused forward: prepares descriptors' operands, picks a config, launches."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton

from .kernels.attention_fwd import attention_fwd_autotuned, attention_fwd_kernel, fwd_config
from .kernels.norms import unit_rows_kernel
from .reference import allowed_keys
from .temperature import MODE_NONE, MODE_TENSOR, kernel_constants
from .validation import Problem, interpreter_active

LOG2E = 1.4426950408889634

# Launch configs come from a table measured on the H100 (kernels/attention_fwd.py: fwd_config).
# INFOSCALE_TRITON_AUTOTUNE=1 searches the candidates per shape instead (first call of each shape is
# slow). Never inside a CUDA-graph capture: timing there would be captured too, so a capture takes the
# table's config.
AUTOTUNE = os.environ.get("INFOSCALE_TRITON_AUTOTUNE", "0") not in ("", "0")
# A fixed launch config (BLOCK_M, BLOCK_N, WARP_SPEC, num_warps, num_stages) that bypasses both the
# autotuner and the default: set by benchmarks/sweep_configs.py to time each candidate.
CONFIG_OVERRIDE: dict | None = None


def _ensure_allocator() -> None:
    """Device-side TMA descriptors need scratch memory from Triton's allocator. Install a torch-backed
    one unless the caller already set their own."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        device = "cpu" if interpreter_active() else "cuda"

        def alloc(size: int, alignment: int, stream) -> torch.Tensor:
            return torch.empty(size, dtype=torch.int8, device=device)

        triton.set_allocator(alloc)


def _tma_ready(t: torch.Tensor) -> bool:
    """TMA needs a unit last stride, a 16-byte aligned base and 16-byte multiples for the row stride
    (always used by the descriptor) and the batch/head strides (unused where that extent is 1)."""
    size = t.element_size()
    if t.stride(-1) != 1 or t.data_ptr() % 16 or (t.stride(2) * size) % 16:
        return False
    return all((t.stride(i) * size) % 16 == 0 for i in (0, 1) if t.shape[i] > 1)


def _tma_operand(t: torch.Tensor) -> torch.Tensor:
    """The tensor itself when TMA can read it in place (any (B, L, H, D) transpose of a contiguous
    tensor with 16-byte rows can); otherwise a copy with its rows padded to 16 bytes."""
    if _tma_ready(t):
        return t
    per16 = 16 // t.element_size()
    d = t.shape[-1]
    padded = t.new_empty(*t.shape[:-1], -(-d // per16) * per16)
    padded[..., :d].copy_(t)
    return padded[..., :d]


def _bucket(n: int) -> int:
    return min(max(triton.next_power_of_2(n), 64), 16384)


def unit_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x / ||x|| along the last dim as a contiguous tensor of x's dtype, and 1/||x|| as float32
    (both 0 for zero rows)."""
    b, h, n, d = x.shape
    unit = torch.empty(b, h, n, d, dtype=x.dtype, device=x.device)
    inv = torch.empty(b, h, n, dtype=torch.float32, device=x.device)
    block_l = 64
    unit_rows_kernel[(triton.cdiv(n, block_l), h, b)](
        x, inv, unit, *x.stride(), h, n, HEAD_D=d, BLOCK_L=block_l, BLOCK_D=triton.next_power_of_2(d),
    )
    return unit, inv


def _broadcast_strides(t: torch.Tensor, shape: tuple[int, ...]) -> tuple[int, ...]:
    return t.expand(shape).stride()


@dataclass
class LaunchOptions:
    """What the forward and backward kernels share: the per-row temperature and mask operands (with
    (B, Hq, Lq[, Lk]) broadcast strides), where each sequence lives, and the constexpr options."""

    pointers: tuple  # Temp, Count, Mask
    strides: tuple  # their 3 + 3 + 4 strides
    extent: tuple  # CuQ, CuK, KvRange
    temp_a: float
    temp_b: float
    window: tuple[int, int]  # win_left, win_right (a bound that never binds for -1)
    meta: dict


def _key_only(mask: torch.Tensor, p: Problem) -> bool:
    """A boolean mask that is the same for every head and query row: key padding, (B, 1, 1, Lk)."""
    if mask.dtype != torch.bool:
        return False
    return _broadcast_strides(mask, (p.batch, p.heads_q, p.lq, p.lk))[1:3] == (0, 0)


def _row_key_bounds(p: Problem, kv_lo: torch.Tensor, kv_hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[lo_i, hi_i) of primitives.visible_keys for every row, (B, Lq) int64, from (B, 1) key ranges."""
    diag = torch.arange(p.lq, device=kv_lo.device)[None, :] + (p.lk - p.lq)
    lo, hi = kv_lo.expand(-1, p.lq), kv_hi.expand(-1, p.lq)
    if p.is_causal:
        hi = torch.minimum(hi, diag + 1)
    if p.window is not None:
        left, right = p.window
        if left >= 0:
            lo = torch.maximum(lo, diag - left)
        if right >= 0:
            hi = torch.minimum(hi, diag + right + 1)
    return lo, hi


def _key_padding(p: Problem, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Key padding as the kernels take it: (B, 2) int32 ranges [first, end) of the keys that may be
    seen (from kv_lengths and/or a key-only boolean mask: tiles outside are skipped), and, when a
    string temperature needs n_i under a key-only mask, its counts (B, Lq) from a prefix sum over the
    keys, without a (Lq, Lk) mask in memory. Both None when neither is given."""
    mask = p.attn_mask if p.attn_mask is not None and _key_only(p.attn_mask, p) else None
    if p.kv_lengths is None and mask is None:
        return None, None
    b = p.batch
    lo = torch.zeros(b, 1, dtype=torch.int64, device=device)
    hi = torch.full((b, 1), p.lk, dtype=torch.int64, device=device)
    if p.kv_lengths is not None:
        hi = p.kv_lengths.to(torch.int64).clamp(0, p.lk).view(b, 1)
    counts = None
    if mask is not None:
        keys = mask.expand(b, 1, 1, p.lk).reshape(b, p.lk)
        some = keys.any(-1, keepdim=True)
        first = keys.to(torch.uint8).argmax(-1, keepdim=True)
        end = p.lk - keys.flip(-1).to(torch.uint8).argmax(-1, keepdim=True)
        lo = torch.where(some, torch.maximum(lo, first), hi)
        hi = torch.where(some, torch.minimum(hi, end), hi)
        if p.temperature is not None:
            prefix = torch.nn.functional.pad(keys.to(torch.int32).cumsum(-1, dtype=torch.int32), (1, 0))
            row_lo, row_hi = _row_key_bounds(p, lo, hi)
            row_lo = row_lo.clamp(0, p.lk)
            row_hi = torch.maximum(row_hi.clamp(0, p.lk), row_lo)
            counts = (prefix.gather(1, row_hi) - prefix.gather(1, row_lo)).to(torch.int32)
    return torch.cat([lo, hi], 1).to(torch.int32), counts


def launch_options(p: Problem, dtype: torch.dtype, dummy: torch.Tensor) -> LaunchOptions:
    """``dummy`` stands in for pointer arguments whose feature is off."""
    device, attn_mask, temperature = dummy.device, p.attn_mask, p.temperature_tensor
    kv_range, key_counts = _key_padding(p, device) if not p.varlen else (None, None)
    # per-row temperature: its kind, the tensor or the counts n_i when a mask decides them
    temp_mode, clip, temp_t, count_t = MODE_NONE, False, dummy, dummy
    temp_strides = count_strides = (0, 0, 0)
    if temperature is not None:
        temp_mode, temp_t = MODE_TENSOR, temperature
        temp_strides = _broadcast_strides(temperature, (p.batch, p.heads_q, p.lq))
    elif p.temperature is not None:
        temp_mode, clip = p.temperature.mode, p.temperature.clipped
        if key_counts is not None:
            count_t = key_counts.view(p.batch, 1, p.lq)
        elif attn_mask is not None:
            count_t = allowed_keys(attn_mask, p.is_causal, p.lq, p.lk, device, window=p.window,
                                   kv_lengths=p.kv_lengths).sum(-1, dtype=torch.int32)
        if count_t is not dummy:
            count_strides = _broadcast_strides(count_t, (p.batch, p.heads_q, p.lq))
    temp_a, temp_b = kernel_constants(p.temperature, p.train_len, p.head_dim)

    mask_mode, mask_t, mask_strides = 0, dummy, (0, 0, 0, 0)
    if attn_mask is not None:
        mask_mode = 1 if attn_mask.dtype == torch.bool else 2
        mask_t = attn_mask.view(torch.uint8) if mask_mode == 1 else attn_mask
        mask_strides = _broadcast_strides(mask_t, (p.batch, p.heads_q, p.lq, p.lk))

    extent = (dummy, dummy, dummy)
    if p.varlen:
        extent = (p.cu_seqlens_q, p.cu_seqlens_k, dummy)
    elif kv_range is not None:
        extent = (dummy, dummy, kv_range)
    # a window bound of -1 becomes one no row can reach
    unbounded = p.lq + p.lk + 1
    left, right = p.window if p.window is not None else (-1, -1)
    window = (left if left >= 0 else unbounded, right if right >= 0 else unbounded)

    # float32 dots: exact IEEE unless the user allowed TF32 for matmuls
    dot_prec = "tf32" if dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32 else "ieee"
    meta = dict(
        HEAD_D=p.head_dim, HEAD_DV=p.head_dim_v,
        BLOCK_D=max(triton.next_power_of_2(p.head_dim), 16),
        BLOCK_DV=max(triton.next_power_of_2(p.head_dim_v), 16),
        IS_CAUSAL=p.is_causal, TEMP_MODE=temp_mode, CLIP=clip, HAS_COUNT=count_t is not dummy,
        COS=p.cos_scale is not None, MASK_MODE=mask_mode, DOT_PREC=dot_prec, DROPOUT=p.dropout_p > 0,
        VARLEN=p.varlen, HAS_KV_RANGE=kv_range is not None, WINDOW=p.window is not None,
    )
    return LaunchOptions((temp_t, count_t, mask_t), (*temp_strides, *count_strides, *mask_strides),
                         extent, temp_a, temp_b, window, meta)


def dropout_args(p: Problem, seed: torch.Tensor | None, dummy: torch.Tensor) -> tuple:
    """The kernels' (Seed, dropout_p, 1 / (1 - dropout_p)) arguments. With dropout on, ``seed`` is the
    call's dropout.draw_seed tensor (the forward and its backward must get the same one)."""
    if p.dropout_p == 0:
        return dummy, 0.0, 1.0
    if seed is None or seed.dtype != torch.int64 or seed.numel() != 1 or seed.device != dummy.device:
        raise ValueError(f"dropout_p={p.dropout_p} needs the call's seed: a one-element int64 tensor on "
                         f"{dummy.device} (infoscale_triton.dropout.draw_seed), got {seed!r}")
    return seed, p.dropout_p, 1.0 / (1.0 - p.dropout_p)


def kernel_key(key: torch.Tensor, p: Problem) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The K the attention kernels read and, under CosScale, 1/||k_j|| (float32): the unit rows from
    the pre-pass (q is normalised inside the kernels, from the tile they load anyway). Without
    CosScale, key itself and None."""
    return unit_rows(key) if p.cos_scale is not None else (key, None)


def new_output(p: Problem, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The forward's output (B, Hq, Lq, Dv): contiguous, or for packed sequences token-major like the
    packed inputs and zeroed (tokens of no sequence, past cu_seqlens_q[-1], get zeros). ops.py's fake
    forward allocates it here too, so that compiled graphs see the real strides."""
    if p.varlen:
        return torch.zeros(p.batch, p.lq, p.heads_q, p.head_dim_v, dtype=dtype, device=device).transpose(1, 2)
    return torch.empty(p.batch, p.heads_q, p.lq, p.head_dim_v, dtype=dtype, device=device)


def new_row_stats(p: Problem, device: torch.device) -> torch.Tensor:
    """Row statistics for the backward, float32: the log-sum-exp in base 2 (1, B, Hq, Lq); under an
    additive mask two planes, the row max and log2 of the row sum (kernels/attention_fwd.py: why).
    Zeroed for packed sequences, whose tokens past cu_seqlens_q[-1] get no program (an operator's
    output must not depend on what the memory held)."""
    planes = 2 if p.attn_mask is not None and p.attn_mask.dtype != torch.bool else 1
    alloc = torch.zeros if p.varlen else torch.empty
    return alloc(planes, p.batch, p.heads_q, p.lq, dtype=torch.float32, device=device)


def new_entropy_stats(p: Problem, device: torch.device) -> torch.Tensor:
    """Where the forward writes each row's entropy and largest probability: (2, B, Hq, Lq) float32,
    zeroed for packed sequences (tokens of no sequence get no program; they read 0 and 0)."""
    alloc = torch.zeros if p.varlen else torch.empty
    return alloc(2, p.batch, p.heads_q, p.lq, dtype=torch.float32, device=device)


def attention_forward(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, p: Problem, out: torch.Tensor | None = None,
    unit_key: torch.Tensor | None = None, seed: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. Returns the output (B, Hq, Lq, Dv) in the input dtype and the row
    statistics the backward needs, float32: the log-sum-exp in base 2 as (1, B, Hq, Lq) (+inf for rows
    that see no key), or under an additive mask (2, B, Hq, Lq), the row max and log2 of the row sum.
    ``out``, if given, is written in place (tests pass a NaN-poisoned one to catch unwritten elements).
    Under CosScale,
    ``unit_key`` is kernel_key's result if the caller already has it (the attention operator keeps it for
    the backward). With ``p.dropout_p > 0``, ``seed`` (dropout.draw_seed) picks the dropout mask; the
    log-sum-exp is that of the undropped probabilities. ``entropy``, if given ((2, B, Hq, Lq) float32),
    receives each row's attention entropy in nats and its largest probability (undropped; 0 and 0 for
    rows that see no key), computed in the same pass."""
    _ensure_allocator()
    if p.cos_scale is not None:
        key = unit_key if unit_key is not None else kernel_key(key, p)[0]
    q, k, v = (_tma_operand(t) for t in (query, key, value))
    out = new_output(p, q.dtype, q.device) if out is None else out
    lse = new_row_stats(p, q.device)
    opt = launch_options(p, q.dtype, lse)
    seed, dropout_p, dropout_scale = dropout_args(p, seed, lse)
    args = (
        q, k, v, out, lse[0], lse[-1], *opt.pointers, seed, *opt.extent,
        *((entropy[0], entropy[1]) if entropy is not None else (lse, lse)),
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        *opt.strides,
        p.heads_q, p.lq, p.lk, p.group, p.scale * LOG2E, opt.temp_a, opt.temp_b, dropout_p, dropout_scale,
        *opt.window, _bucket(p.rows), _bucket(p.keys),
    )
    meta = dict(opt.meta, SIGNED=opt.meta["TEMP_MODE"] == MODE_TENSOR or p.scale < 0, ENTROPY=entropy is not None)
    block_d, block_dv = meta["BLOCK_D"], meta["BLOCK_DV"]
    interpret = interpreter_active()
    if (AUTOTUNE and not interpret and CONFIG_OVERRIDE is None
            and not (q.is_cuda and torch.cuda.is_current_stream_capturing())):
        grid = lambda c: (triton.cdiv(p.rows, c["BLOCK_M"]), p.heads_q, p.sequences)  # noqa: E731
        attention_fwd_autotuned[grid](*args, **meta)
    else:
        cfg = CONFIG_OVERRIDE or fwd_config(block_d, block_dv, p.keys, q.element_size(), interpret,
                                            dropout=p.dropout_p > 0)
        grid = (triton.cdiv(p.rows, cfg["BLOCK_M"]), p.heads_q, p.sequences)
        attention_fwd_kernel[grid](*args, **meta, **cfg)
    return out, lse
