"""Argument checks that every rank passes or fails together, so that no rank is left waiting in a
collective that another rank never reaches.

Each rank checks its own arguments, then one small all_gather (which every rank reaches, whatever its
arguments) carries each rank's verdict and the facts that must agree across ranks (shard shapes, dtype,
options). When any rank failed, or the facts differ, every rank raises the same error, naming the
argument and the rank. That gather is the only communication before the checks are done; reading its
result waits for the device once per call.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.distributed as dist

# The gathered payload: a verdict (0 ok, 1 ValueError, 2 TypeError), the message's length and bytes,
# then FIELD_SLOTS int64 per fact (its length, then its values).
MESSAGE_BYTES = 1024
FIELD_SLOTS = 8
_ERRORS: tuple[type[Exception], ...] = (ValueError, TypeError)


def process_group(group: object) -> dist.ProcessGroup:
    """The process group to use: ``group``, the default one for None, or a 1-D DeviceMesh's."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("group: torch.distributed is not initialised; call torch.distributed."
                         "init_process_group first (torchrun sets up its environment)")
    from torch.distributed.device_mesh import DeviceMesh

    if group is None:
        return dist.group.WORLD
    if isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise ValueError(f"group: a DeviceMesh must be 1-D here (pass mesh['cp'] of a larger one), got "
                             f"{group.ndim} dimensions")
        return group.get_group()
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be None, a ProcessGroup or a 1-D DeviceMesh, got {type(group).__name__}")
    if dist.get_rank(group) < 0:
        raise ValueError("group: this rank is not a member of the process group it was given")
    return group


def communication_device(group: dist.ProcessGroup) -> torch.device:
    """Where this group's collectives take tensors: the CPU for gloo, else the current CUDA device."""
    backend = str(dist.get_backend(group))
    if "gloo" in backend or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def check_device(name: str, t: torch.Tensor, group: dist.ProcessGroup) -> None:
    """``t`` lives where this rank's communication can reach it without a copy."""
    backend = str(dist.get_backend(group))
    if t.is_cuda:
        current = torch.cuda.current_device()
        if t.device.index != current:
            raise ValueError(f"{name} is on {t.device} but this rank's current device is cuda:{current}; "
                             "call torch.cuda.set_device(local_rank) and keep each rank's tensors there")
        if "nccl" not in backend:
            raise ValueError(f"{name} is on {t.device} but the process group's backend is {backend!r}; "
                             "CUDA tensors need NCCL")
    elif t.device.type == "cpu":
        if "gloo" not in backend:
            raise ValueError(f"{name} is on the CPU but the process group's backend is {backend!r}; "
                             "CPU tensors need gloo")
    else:
        raise ValueError(f"{name} is on {t.device}; it must be on this rank's CUDA device (or the CPU with "
                         "gloo)")


class Fact(NamedTuple):
    """Something every rank must pass the same: ``argument``, ``what`` of it, as ints."""

    argument: str
    what: str
    values: tuple[int, ...]
    is_float: bool = False  # values is one float's bits (float_fact)


def float_fact(argument: str, what: str, x: float | None) -> Fact:
    """A float (or None) as a fact: its IEEE bits travel as an int64."""
    bits = () if x is None else struct.unpack("<q", struct.pack("<d", float(x)))
    return Fact(argument, what, bits, True)


def shape_of(x: object) -> tuple[int, ...]:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else ()


def agree(group: dist.ProcessGroup, local_checks: Callable[[], object],
          facts: Sequence[Fact]) -> object:
    """Run ``local_checks`` (which raises ValueError/TypeError on bad input), then make every rank
    agree: raise on every rank if any rank's checks failed or a fact differs between ranks (the same
    error everywhere, naming the argument and the rank). Returns local_checks' result."""
    result, error = None, None
    try:
        result = local_checks()
    except _ERRORS as e:
        error = e
    payload = torch.zeros(3 + MESSAGE_BYTES + FIELD_SLOTS * len(facts), dtype=torch.int64)
    if error is not None:
        message = str(error).encode()[:MESSAGE_BYTES]
        payload[0] = 2 if isinstance(error, TypeError) else 1
        payload[1] = len(message)
        payload[3:3 + len(message)] = torch.tensor(list(message), dtype=torch.int64)
    for i, (_, _, values, _) in enumerate(facts):
        if len(values) >= FIELD_SLOTS:
            raise AssertionError(f"fact of {len(values)} values")  # a programming error, same on every rank
        base = 3 + MESSAGE_BYTES + FIELD_SLOTS * i
        payload[base] = len(values)
        payload[base + 1:base + 1 + len(values)] = torch.tensor(values, dtype=torch.int64)

    world = dist.get_world_size(group)
    device = communication_device(group)
    gathered = [torch.empty_like(payload, device=device) for _ in range(world)]
    dist.all_gather(gathered, payload.to(device), group=group)
    table = torch.stack(gathered).cpu()

    failed = [r for r in range(world) if table[r, 0] != 0]
    if failed:
        r = failed[0]
        message = bytes(table[r, 3:3 + int(table[r, 1])].tolist()).decode(errors="replace")
        kind = _ERRORS[int(table[r, 0]) - 1]
        raise kind(f"{message} (rank {r} of the group; every rank raises this)") from error
    for i, fact in enumerate(facts):
        base = 3 + MESSAGE_BYTES + FIELD_SLOTS * i
        column = table[:, base:base + FIELD_SLOTS]
        for r in range(1, world):
            if not torch.equal(column[r], column[0]):
                first, other = (_decode(column[j], fact.is_float) for j in (0, r))
                name, what = fact.argument, fact.what
                raise ValueError(f"{name}: {what} differs across ranks: rank 0 has {first}, rank {r} has "
                                 f"{other}; every rank must pass the same")
    return result


def _decode(slots: torch.Tensor, is_float: bool) -> object:
    values = tuple(slots[1:1 + int(slots[0])].tolist())
    if is_float:
        return struct.unpack("<d", struct.pack("<q", values[0]))[0] if values else None
    return values
