"""The row pre-pass launch (kernels/attention_rows.py): each row's scale rs_i for the backward and for
the Hopper forward, and the backward's delta_i."""

from __future__ import annotations

import torch

from .kernels.attention_rows import attention_rows_kernel
from .launch import LOG2E, Launch, cdiv, variant
from .operands import LaunchOptions
from .validation import Problem

_BLOCK_M = 64
# the options the kernel takes from launch_options' constexprs
_META = ("HEAD_D", "HEAD_DV", "BLOCK_D", "BLOCK_DV", "IS_CAUSAL", "TEMP_MODE", "CLIP", "HAS_COUNT", "COS",
         "VARLEN", "HAS_KV_RANGE", "WINDOW")


def rows_launch(p: Problem, opt: LaunchOptions, q: torch.Tensor, out: torch.Tensor | None = None,
                dout: torch.Tensor | None = None) -> Launch:
    """The pre-pass of one plan. Its pointers: (out, dout, q, delta, row_scale, temperature, count,
    *extent); with ``out`` and ``dout`` (the backward's) it also writes delta, else those three are
    unused (pass any tensor)."""
    delta = out is not None
    o_strides = (*out.stride()[:3], *dout.stride()[:3]) if delta else (0,) * 6
    constexprs = {**{n: opt.meta[n] for n in _META}, "DELTA": delta, "BLOCK_M": _BLOCK_M}
    return Launch(
        variant(attention_rows_kernel, constexprs, {}),
        (cdiv(p.rows, _BLOCK_M), p.heads_q, p.sequences),
        (*o_strides, q.stride(0), q.stride(1), q.stride(2), *opt.strides[:6],
         p.heads_q, p.lq, p.lk, p.scale * LOG2E, opt.temp_a, opt.temp_b, *opt.window),
        q.device)
