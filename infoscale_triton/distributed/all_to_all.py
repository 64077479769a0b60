"""All-to-all context parallelism (DeepSpeed Ulysses): trade the sequence shards for head groups.

One all_to_all gives each rank the whole sequence (in natural order) for H/W of the heads; the
single-GPU attention runs there, so string temperatures see the real n_i without help; a second
all_to_all trades the output back. Autograd runs the reverse all_to_alls.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .layout import chunks_of


def _chunked(x: torch.Tensor, world: int, layout: str) -> tuple[torch.Tensor, int]:
    """x (B, h, L, D) in natural order viewed as (B, h, chunks, c, D), and the chunks per rank."""
    per_rank = len(chunks_of(0, world, layout))
    b, h, n, d = x.shape
    return x.view(b, h, world * per_rank, n // (world * per_rank), d), per_rank


def sequence_to_heads(x: torch.Tensor, group: dist.ProcessGroup, layout: str) -> torch.Tensor:
    """This rank's sequence shard of every head (B, H, L/W, D) -> the whole sequence, in natural order,
    of this rank's head group (B, H/W, L, D)."""
    world = dist.get_world_size(group)
    b, heads, n, d = x.shape
    h = heads // world
    # send[w] = our rows of head group w
    send = x.reshape(b, world, h, n, d).transpose(0, 1).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[w] = rank w's rows of our head group
    out = torch.empty(b, h, world * n, d, dtype=x.dtype, device=x.device)
    chunks, per_rank = _chunked(out, world, layout)
    for w in range(world):
        parts = recv[w].view(b, h, per_rank, n // per_rank, d)
        for j, c in enumerate(chunks_of(w, world, layout)):
            chunks[:, :, c].copy_(parts[:, :, j])
    return out


def heads_to_sequence(y: torch.Tensor, group: dist.ProcessGroup, layout: str) -> torch.Tensor:
    """The inverse of sequence_to_heads: (B, H/W, L, D) -> (B, H, L/W, D)."""
    world = dist.get_world_size(group)
    b, h, total, d = y.shape
    n = total // world
    chunks, per_rank = _chunked(y, world, layout)
    send = torch.empty(world, b, h, n, d, dtype=y.dtype, device=y.device)
    for w in range(world):
        parts = send[w].view(b, h, per_rank, n // per_rank, d)
        for j, c in enumerate(chunks_of(w, world, layout)):
            parts[:, :, j].copy_(chunks[:, :, c])
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[w] = head group w of our rows
    return recv.transpose(0, 1).reshape(b, world * h, n, d)


class SequenceToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup, layout: str) -> torch.Tensor:
        ctx.group, ctx.layout = group, layout
        return sequence_to_heads(x, group, layout)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:
        return heads_to_sequence(grad, ctx.group, ctx.layout), None, None


class HeadsToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: torch.Tensor, group: dist.ProcessGroup, layout: str) -> torch.Tensor:
        ctx.group, ctx.layout = group, layout
        return heads_to_sequence(y, group, layout)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:
        return sequence_to_heads(grad.contiguous(), ctx.group, ctx.layout), None, None
