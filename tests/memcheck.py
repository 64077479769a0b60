"""An out-of-bounds check for kernels run by Triton's interpreter, which has none of its own: a load
past a tensor reads whatever the heap holds (or crashes the process), a store corrupts it.

Inside :func:`interpreter_memcheck` every load and store lane that its mask enables must lie within one
of the tensors passed to that launch: the bytes its view can reach from its data pointer with its
sizes and strides (not its whole storage, so a view into a larger, poisoned buffer counts as its own
extent). A lane outside is recorded with the launch's kernel name and is not performed (so that a bad
read cannot crash the process); the context raises at exit if any was recorded.

Relies on the interpreter's internals in Triton 3.6 (``GridExecutor._init_args_hst`` and the
``_interpreter.load`` / ``store`` primitives every load, store and tensor-descriptor access goes
through); ``pytest.skip`` where they differ.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch


def _extent(t: torch.Tensor) -> tuple[int, int] | None:
    """[first byte, end) that the view ``t`` can reach; None when it has no element."""
    if t.numel() == 0:
        return None
    lo = hi = 0
    for size, stride in zip(t.shape, t.stride()):
        reach = (size - 1) * stride
        lo, hi = lo + min(reach, 0), hi + max(reach, 0)
    base, item = t.data_ptr(), t.element_size()
    return base + lo * item, base + (hi + 1) * item


class _Checker:
    def __init__(self, real: Any) -> None:
        self.real = real
        self.extents: list[tuple[int, int]] = []
        self.kernel = ""
        self.violations: list[str] = []

    def _inside(self, ptrs: np.ndarray, mask: np.ndarray, size: int, what: str) -> np.ndarray:
        """``mask`` with the lanes outside every extent turned off (and recorded)."""
        mask = np.broadcast_to(np.asarray(mask, dtype=bool), ptrs.shape)
        if not mask.any():
            return mask
        addr = ptrs.astype(np.uint64)
        ok = np.zeros(ptrs.shape, dtype=bool)
        for lo, hi in self.extents:
            ok |= (addr >= lo) & (addr + size <= hi)
        bad = mask & ~ok
        if bad.any():
            first = int(addr[bad].ravel()[0])
            nearest = min(self.extents, key=lambda e: min(abs(first - e[0]), abs(first - e[1])), default=None)
            self.violations.append(f"{self.kernel}: {int(bad.sum())} {what} lanes out of bounds, first at "
                                   f"{first:#x} (nearest tensor [{nearest[0]:#x}, {nearest[1]:#x}))"
                                   if nearest else f"{self.kernel}: {what} with no tensor argument")
            mask = mask & ok
        return mask

    def load(self, ptrs: np.ndarray, mask: np.ndarray, other: np.ndarray, dtype: np.dtype) -> np.ndarray:
        return self.real.load(ptrs, self._inside(ptrs, mask, np.dtype(dtype).itemsize, "load"), other, dtype)

    def store(self, ptrs: np.ndarray, value: np.ndarray, mask: np.ndarray) -> None:
        return self.real.store(ptrs, value, self._inside(ptrs, mask, value.dtype.itemsize, "store"))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


@contextlib.contextmanager
def interpreter_memcheck() -> Iterator[list[str]]:
    """Check every interpreted launch in the block (see the module's docstring); yields the list of
    violations, which must be empty at exit."""
    from triton.runtime import interpreter

    executor = getattr(interpreter, "GridExecutor", None)
    if not hasattr(interpreter, "_interpreter") or not hasattr(executor, "_init_args_hst"):
        pytest.skip("this Triton's interpreter has no _interpreter / GridExecutor._init_args_hst to hook")
    checker = _Checker(interpreter._interpreter)
    real_init = executor._init_args_hst

    def init(self: Any, args_dev: Any, kwargs: dict) -> Any:
        args, kw = real_init(self, args_dev, kwargs)
        flat: list[Any] = []
        for a in (*args, *kw.values()):
            flat.extend(a if isinstance(a, tuple) else (a,))
        checker.extents = [e for a in flat if isinstance(a, torch.Tensor) and (e := _extent(a)) is not None]
        checker.kernel = getattr(self.fn, "__name__", str(self.fn))
        return args, kw

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(executor, "_init_args_hst", init)
        mp.setattr(interpreter, "_interpreter", checker)
        yield checker.violations
    assert not checker.violations, "out-of-bounds accesses:\n" + "\n".join(checker.violations[:20])
