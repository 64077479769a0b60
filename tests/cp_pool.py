"""A pool of W worker processes joined by a gloo process group, for the context-parallel tests.

Starting a process that imports torch and Triton costs seconds, so each world size gets one pool for the
whole session: the test sends every worker the same job (full input tensors and options), each worker
shards them, runs ``context_parallel_attention`` and its backward, and sends back its shards of the
output and gradients (or the error it raised). Workers run the kernels through Triton's interpreter
(TRITON_INTERPRET=1 comes from conftest through the environment).

A job that does not finish within ``timeout`` seconds (a rank stuck in a collective) fails the test and
ends the pool's processes.
"""

from __future__ import annotations

import os
import queue
import tempfile
import traceback
from datetime import timedelta
from typing import Any

import torch
import torch.multiprocessing as mp

# A job: {"method", "layout", "opts": keyword arguments (tensors full-length), "query", "key", "value",
# "dout", "wrt": names of the inputs to differentiate, "change": {rank: names of EDITS}, for bad input}.
Job = dict[str, Any]


def _drop_rows(shards: dict[str, torch.Tensor], opts: dict[str, Any], n: int) -> None:
    for name in ("query", "key", "value", "dout"):
        shards[name] = shards[name][:, :, :-n]


# Edits of one rank's shards or options after sharding (bad-input tests).
EDITS = {
    "two_rows_fewer": lambda shards, opts: _drop_rows(shards, opts, 2),
    "one_row_fewer": lambda shards, opts: _drop_rows(shards, opts, 1),
    "kv_lengths_of_three": lambda shards, opts: opts.update(kv_lengths=torch.zeros(3, dtype=torch.int64)),
    "is_causal_flipped": lambda shards, opts: opts.update(is_causal=not opts.get("is_causal", False)),
}


def _serve(rank: int, world: int, store_path: str, jobs: Any, results: Any) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
        while (job := jobs.get()) is not None:
            try:
                results.put((rank, run_job(job, rank, world), None))
            except Exception as e:  # noqa: BLE001 -- sent to the test, which decides
                results.put((rank, None, (type(e).__name__, str(e), traceback.format_exc())))
    finally:
        dist.destroy_process_group()


def run_job(job: Job, rank: int, world: int) -> dict[str, torch.Tensor]:
    """One rank's part of a job: returns its shards of the output and of the gradients, and (rank 0)
    the output unsharded by unshard_sequence."""
    from infoscale_triton.distributed import context_parallel_attention, shard_sequence, unshard_sequence

    layout = job["layout"]
    if "shard" in job:  # only shard_sequence(job["shard"], 2)
        return {"shard": shard_sequence(job["shard"], 2, layout=layout)}
    opts = dict(job["opts"])
    shards = {name: shard_sequence(job[name], 2, layout=layout) for name in ("query", "key", "value", "dout")}
    temperature = opts.get("temperature")
    if isinstance(temperature, torch.Tensor):  # per row: its last dimension is the query's rows
        shards["temperature"] = shard_sequence(temperature, -1, layout=layout)
    for edit in job.get("change", {}).get(rank, ()):
        EDITS[edit](shards, opts)
    if "temperature" in shards:
        opts["temperature"] = shards["temperature"]
    leaves = {name: shards[name].requires_grad_(name in job["wrt"]) for name in job["wrt"]}
    out = context_parallel_attention(shards["query"], shards["key"], shards["value"], method=job["method"],
                                     layout=layout, **opts)
    result = {"out": out.detach()}
    if leaves:
        grads = torch.autograd.grad(out, list(leaves.values()), shards["dout"])
        result.update(zip(leaves, grads))
    full = unshard_sequence(out, 2, layout=layout)
    if rank == 0:
        result["unsharded"] = full
    return result


class Pool:
    """W gloo workers; ``run`` sends them one job and returns each rank's result, in rank order."""

    def __init__(self, world: int, timeout: float = 300.0) -> None:
        self.world, self.timeout = world, timeout
        ctx = mp.get_context("spawn")
        fd, self._store = tempfile.mkstemp(prefix="cp_store_")
        os.close(fd)
        os.unlink(self._store)  # the file store creates it
        self._jobs = [ctx.Queue() for _ in range(world)]
        self._results = ctx.Queue()
        self._procs = [ctx.Process(target=_serve, args=(r, world, self._store, self._jobs[r], self._results),
                                   daemon=True) for r in range(world)]
        for p in self._procs:
            p.start()
        self.broken: str | None = None

    def run(self, job: Job) -> list[tuple[dict[str, torch.Tensor] | None, tuple[str, str, str] | None]]:
        """[(result, error)] per rank: error is (exception type name, message, traceback) or None."""
        if self.broken:
            raise RuntimeError(f"the pool of {self.world} workers is unusable: {self.broken}")
        for q in self._jobs:
            q.put(job)
        got: dict[int, tuple] = {}
        try:
            while len(got) < self.world:
                rank, result, error = self._results.get(timeout=self.timeout)
                got[rank] = (result, error)
        except queue.Empty:
            missing = sorted(set(range(self.world)) - set(got))
            self.broken = f"ranks {missing} gave no answer in {self.timeout:.0f} s"
            self.close()
            raise AssertionError(f"{self.broken} (a rank stuck in a collective?)") from None
        return [got[r] for r in range(self.world)]

    def close(self) -> None:
        for q in self._jobs:
            try:
                q.put(None)
            except (ValueError, OSError):
                pass
        for p in self._procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        if os.path.exists(self._store):
            os.unlink(self._store)
