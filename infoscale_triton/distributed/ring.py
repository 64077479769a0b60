"""Ring attention: each rank keeps its query rows, the K/V shards travel around the ring.

At step s rank r holds the K/V shard of rank (r - s) mod W. It sends it on to rank r + 1 and receives
the next one from rank r - 1 (batched P2P, which NCCL runs on its own stream) while it computes one
attention block on the shard it holds; the partial results merge through each row's log-sum-exp.

Causal masks decide which block a step computes (``block``): the diagonal step is causal within the
shard; under ``"zigzag"`` the other steps need no mask at all: all local rows against the first half of
the held shard (it came from an earlier rank: only its early chunk precedes both of ours), or the second
half of the local rows against all of it (a later rank: both its chunks precede our late chunk only).
Under ``"contiguous"`` a later rank's shard is skipped.

The backward runs the same ring with the forward's merged output and log-sum-exp, which makes each
block's gradients exactly its share of the sums: dQ adds up locally, and each shard's dK/dV
accumulator travels with the shard and reaches its owner after the last step.

Sums of partial results are kept in float32 where they would otherwise be rounded more than once to the
inputs' dtype (``_Sum``): a sum of at most two kernel outputs is added in place (one rounding, as
exact as a float32 sum rounded at the end), longer ones in float32.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from ..validation import Problem
from . import local
from .layout import keys_before, segments

# P2P tags, one per tensor kind: gloo matches sends to receives by (peer, tag), in order
_TAG_KV, _TAG_GRAD = 0, 8


@dataclass(frozen=True)
class Block:
    """The part of one step's work a rank computes: local query rows x keys of the held shard."""

    rows: slice
    keys: slice
    causal: bool


def block(rank: int, source: int, world: int, layout: str, is_causal: bool, lq: int, lk: int) -> Block | None:
    """What ``rank`` computes against ``source``'s K/V shard, or None when none of its rows sees a key
    there. Causal shards have lq == lk, so the shard's own causal mask (aligned bottom-right, which is
    then the diagonal) is the global one restricted to it."""
    rows, keys = slice(0, lq), slice(0, lk)
    if not is_causal:
        return Block(rows, keys, False)
    if source == rank:
        return Block(rows, keys, True)
    if layout == "contiguous":
        return Block(rows, keys, False) if source < rank else None
    if source < rank:
        return Block(rows, slice(0, lk // 2), False)
    return Block(slice(lq // 2, lq), keys, False)


@dataclass(frozen=True)
class Ring:
    """One call's ring: who is where, and the local problem each block is a slice of."""

    group: dist.ProcessGroup
    rank: int
    world: int
    layout: str
    p: Problem  # this rank's shards as one problem (its temperature: see ``temperature``)
    dtype: torch.dtype  # the inputs'
    kv_lengths: torch.Tensor | None  # global key padding
    # per local row, broadcastable to (B, Hq, Lq): the user's tensor temperature, or the string
    # temperature's t_i computed from the global n_i; None without a temperature
    temperature: torch.Tensor | None

    @property
    def next(self) -> int:
        return dist.get_global_rank(self.group, (self.rank + 1) % self.world)

    @property
    def prev(self) -> int:
        return dist.get_global_rank(self.group, (self.rank - 1) % self.world)

    def source(self, step: int, rank: int | None = None) -> int:
        """Whose shard ``rank`` (this one by default) holds at ``step``."""
        return ((self.rank if rank is None else rank) - step) % self.world

    def block(self, source: int, rank: int | None = None) -> Block | None:
        rank = self.rank if rank is None else rank
        return block(rank, source, self.world, self.layout, self.p.is_causal, self.p.lq, self.p.lk)

    def block_problem(self, blk: Block, source: int) -> Problem:
        """The problem of one block: its rows' temperatures as a tensor (the global t_i), and the
        global key padding as a prefix length of the block's keys."""
        lengths = None
        if self.kv_lengths is not None:
            parts = segments(source, self.world, self.layout, self.p.lk)
            lengths = keys_before(self.kv_lengths, parts, blk.keys.start, blk.keys.stop)
        temperature = None
        if self.temperature is not None:
            temperature = self.temperature.expand(self.p.batch, self.p.heads_q, self.p.lq)[..., blk.rows]
        return replace(self.p, lq=blk.rows.stop - blk.rows.start, lk=blk.keys.stop - blk.keys.start,
                       is_causal=blk.causal, temperature=None, train_len=None, temperature_tensor=temperature,
                       kv_lengths=lengths)

    def contributions(self, source: int) -> list[bool]:
        """Along ``source``'s dK/dV accumulator's path (its owner, then ranks source + 1, + 2, ...):
        whether each rank adds a block's gradients to it."""
        return [self.block(source, (source + i) % self.world) is not None for i in range(self.world)]

    def accumulator_dtype(self, source: int, position: int) -> torch.dtype:
        """The dtype of ``source``'s dK/dV accumulator after the rank at ``position`` of its path."""
        adds = self.contributions(source)
        return _Sum.dtype(sum(adds[:position + 1]), sum(adds), self.dtype)

    def exchange(self, tensors: list[torch.Tensor], incoming: list[tuple[torch.Size, torch.dtype]],
                 tag: int) -> tuple[list[torch.Tensor], list]:
        """Send ``tensors`` to the next rank and receive ``incoming`` (shapes, dtypes) from the previous
        one, asynchronously: (the receive buffers, the works to wait on before reading them)."""
        device = tensors[0].device
        received = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in incoming]
        ops = []
        for i, (t, r) in enumerate(zip(tensors, received)):
            ops.append(dist.P2POp(dist.isend, t, self.next, self.group, tag + i))
            ops.append(dist.P2POp(dist.irecv, r, self.prev, self.group, tag + i))
        return received, dist.batch_isend_irecv(ops)


def _wait(pending: tuple[list[torch.Tensor], list]) -> list[torch.Tensor]:
    received, works = pending
    for w in works:
        w.wait()
    return received


def _like(tensors: list[torch.Tensor]) -> list[tuple[torch.Size, torch.dtype]]:
    return [(t.shape, t.dtype) for t in tensors]


class _Sum:
    """A sum of partial results over some row range each: the first term is kept as the kernel returned
    it; when there are more than two terms, the sum runs in float32 from the second on."""

    def __init__(self, terms: int) -> None:
        self.terms, self.seen, self.value = terms, 0, None

    @staticmethod
    def dtype(seen: int, terms: int, dtype: torch.dtype) -> torch.dtype:
        return torch.float32 if terms > 2 and seen >= 2 else dtype

    def add(self, part: torch.Tensor, rows: slice) -> None:
        self.seen += 1
        if self.value is None:
            self.value = part  # the diagonal block: every row
            return
        self.value = self.value.to(self.dtype(self.seen, self.terms, self.value.dtype))
        self.value[:, :, rows].add_(part)


def _merge(acc: torch.Tensor, acc_lse: torch.Tensor, part: torch.Tensor, part_lse: torch.Tensor) -> None:
    """acc (B, H, L, Dv) float32 and its log2-sum-exp acc_lse (B, H, L) become the softmax over both key
    sets, in place: acc = acc 2^(a - m) + part 2^(b - m) with m = log2(2^a + 2^b). Rows that saw no
    key carry lse +inf (the kernels' convention) and weigh nothing; rows seeing no key in either stay 0
    with +inf."""
    inf = float("inf")
    a = torch.where(acc_lse == inf, -inf, acc_lse)
    b = torch.where(part_lse == inf, -inf, part_lse)
    top = torch.maximum(a, b)
    top = torch.where(top == -inf, 0.0, top)
    wa, wb = torch.exp2(a - top), torch.exp2(b - top)
    total = wa + wb
    seen = total > 0
    scale = torch.where(seen, total, 1.0)
    acc.mul_((wa / scale).unsqueeze(-1)).addcmul_(part, (wb / scale).unsqueeze(-1))
    acc_lse.copy_(torch.where(seen, top + torch.log2(scale), inf))


def ring_forward(ring: Ring, q: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's output rows and their log2-sum-exp over all keys of the sequence (1, B, Hq, Lq);
    ``k`` is local.key_operand's."""
    held = [k.contiguous(), v.contiguous()]
    blocks = [(step, ring.block(ring.source(step))) for step in range(ring.world)]
    out, lse = None, None
    for step, blk in blocks:
        pending = ring.exchange(held, _like(held), _TAG_KV) if step < ring.world - 1 else None
        if blk is not None:
            hk, hv = (t[:, :, blk.keys] for t in held)
            problem = ring.block_problem(blk, ring.source(step))
            part, part_lse = local.block_forward(q[:, :, blk.rows], hk, hv, problem)
            if out is None:
                out, lse = part, part_lse  # step 0: the diagonal block, every row
            else:
                if out.dtype != torch.float32:
                    out = out.float()
                _merge(out[:, :, blk.rows], lse[0, ..., blk.rows], part, part_lse[0])
        if pending is not None:
            held = _wait(pending)
    return out.to(q.dtype), lse


def ring_backward(ring: Ring, q: torch.Tensor, k: torch.Tensor, key_inv: torch.Tensor | None, v: torch.Tensor,
                  out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor,
                  temperature_grad: bool) -> tuple[torch.Tensor, ...]:
    """(dq, dk, dv, dt): the gradients for this rank's shards; dt per local row (B, Hq, Lq) float32 when
    ``temperature_grad``. ``k``/``key_inv``: local.key_operand's; ``out``/``lse``: ring_forward's."""
    held = [k.contiguous(), v.contiguous()] + ([key_inv.contiguous()] if key_inv is not None else [])
    blocks = [(step, ring.source(step), ring.block(ring.source(step))) for step in range(ring.world)]
    dq = _Sum(sum(blk is not None for _, _, blk in blocks))
    dt = torch.zeros(q.shape[:3], dtype=torch.float32, device=q.device) if temperature_grad else None
    incoming = None  # the dK/dV accumulator on its way from the previous rank
    kv_shapes = [(k.shape, k.dtype), (v.shape, v.dtype)]
    for step, source, blk in blocks:
        pending = ring.exchange(held, _like(held), _TAG_KV) if step < ring.world - 1 else None
        grads = None
        if blk is not None:
            rows, keys = blk.rows, blk.keys
            whole_rows = rows.stop - rows.start == q.shape[2]
            hk, hv = (t[:, :, keys] for t in held[:2])
            # (the kernels index 1/||k|| as a contiguous (B, Hkv, Lk) array)
            hinv = held[2][:, :, keys].contiguous() if key_inv is not None else None
            row_lse = lse if whole_rows else lse[..., rows].contiguous()
            grads = local.block_backward(q[:, :, rows], hk, hv, out[:, :, rows], row_lse, dout[:, :, rows],
                                         ring.block_problem(blk, source), hinv, temperature_grad)
            dq.add(grads[0], rows)
            if dt is not None:
                dt[..., rows] += grads[3]
        if step == 0:
            acc = [grads[1], grads[2]]  # the diagonal block: every key
        else:
            acc = _wait(incoming)
            if grads is not None:
                dtype = ring.accumulator_dtype(source, step)
                acc = [a.to(dtype) for a in acc]
                acc[0][:, :, blk.keys].add_(grads[1])
                acc[1][:, :, blk.keys].add_(grads[2])
        # on to the next rank; the previous one sends the accumulator of the shard we hold next (after
        # the last step: our own, complete)
        prev_source = (source - 1) % ring.world
        dtype = ring.accumulator_dtype(prev_source, step)
        incoming = ring.exchange(acc, [(s, dtype) for s, _ in kv_shapes], _TAG_GRAD)
        del acc, grads
        if pending is not None:
            held = _wait(pending)
    dk, dv = _wait(incoming)
    return dq.value.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dt


class RingAttention(torch.autograd.Function):
    """ring_forward / ring_backward under autograd, differentiable in q, k, v and a tensor temperature
    (``ring.temperature`` is then that tensor)."""

    @staticmethod
    def forward(ctx, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                temperature: torch.Tensor | None, ring: Ring) -> torch.Tensor:
        k, key_inv = local.key_operand(key, ring.p)
        out, lse = ring_forward(ring, query, k, value)
        ctx.ring = ring
        ctx.save_for_backward(query, k, key_inv, value, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor) -> tuple:
        query, k, key_inv, value, out, lse = ctx.saved_tensors
        ring: Ring = ctx.ring
        temperature_grad = ctx.needs_input_grad[3]
        dq, dk, dv, dt = ring_backward(ring, query, k, key_inv, value, out, lse, dout, temperature_grad)
        if dt is not None:
            t = ring.temperature
            dt = dt.sum_to_size(t.shape).to(t.dtype)
        return dq, dk, dv, dt, None
