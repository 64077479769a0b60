"""How a sequence is split across the ranks of a process group, and where each local row lies in it.

The sequence is cut into equal chunks. ``"zigzag"``: 2·W chunks, rank r holds chunks r and 2W-1-r, in
that order, so that under a causal mask every rank has the same work (an early chunk sees few keys, its
partner at the end many). ``"contiguous"``: W chunks, rank r holds chunk r.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LAYOUTS = ("zigzag", "contiguous")


def chunk_count(world: int, layout: str) -> int:
    return 2 * world if layout == "zigzag" else world


def chunks_of(rank: int, world: int, layout: str) -> tuple[int, ...]:
    """The chunks ``rank`` holds, in the order its shard stores them."""
    return (rank, 2 * world - 1 - rank) if layout == "zigzag" else (rank,)


@dataclass(frozen=True)
class Segment:
    """A run of a shard's rows: ``size`` rows from local row ``local`` on, global rows from ``start`` on."""

    local: int
    start: int
    size: int


def segments(rank: int, world: int, layout: str, local_len: int) -> list[Segment]:
    """The runs of consecutive global positions that make up ``rank``'s shard of ``local_len`` rows
    (increasing in both the local and the global position)."""
    chunks = chunks_of(rank, world, layout)
    size = local_len // len(chunks)
    return [Segment(i * size, c * size, size) for i, c in enumerate(chunks)]


def global_positions(rank: int, world: int, layout: str, local_len: int,
                     device: torch.device) -> torch.Tensor:
    """(local_len,) int64: the global position of each local row."""
    return torch.cat([torch.arange(s.start, s.start + s.size, device=device)
                      for s in segments(rank, world, layout, local_len)])


def keys_before(lengths: torch.Tensor, parts: list[Segment], lo: int, hi: int) -> torch.Tensor:
    """For key padding (batch entry b sees the global keys [0, lengths[b])): how many of the local keys
    [lo, hi) of a shard made of ``parts`` each batch entry sees, (B,) int32. They are a prefix of
    [lo, hi): the shard's keys increase in global position."""
    count = torch.zeros_like(lengths, dtype=torch.int64)
    for s in parts:
        a, b = max(s.local, lo), min(s.local + s.size, hi)
        if a < b:
            first = s.start + (a - s.local)  # global position of local key a
            count += (lengths.to(torch.int64) - first).clamp(0, b - a)
    return count.to(torch.int32)


def split(x: torch.Tensor, dim: int, rank: int, world: int, layout: str) -> torch.Tensor:
    """``rank``'s shard of the full ``x`` along ``dim`` (a new tensor; the length must divide)."""
    size = x.shape[dim] // chunk_count(world, layout)
    return torch.cat([x.narrow(dim, c * size, size) for c in chunks_of(rank, world, layout)], dim)


def join(shards: list[torch.Tensor], dim: int, layout: str) -> torch.Tensor:
    """The full tensor from every rank's shard (``shards[r]`` is rank r's)."""
    world = len(shards)
    pieces: dict[int, torch.Tensor] = {}
    for rank, shard in enumerate(shards):
        chunks = chunks_of(rank, world, layout)
        for c, piece in zip(chunks, shard.chunk(len(chunks), dim)):
            pieces[c] = piece
    return torch.cat([pieces[c] for c in range(chunk_count(world, layout))], dim)
