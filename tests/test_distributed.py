"""Context parallelism (infoscale_triton.distributed) on CPU: W gloo processes run the kernels through
Triton's interpreter on their shards (tests/cp_pool.py), and the shards they return, put together here,
must match the float64 reference (output and gradients, helpers' budgets) and the single-process fused
function on the full tensors: the ring within the same budget, all-to-all bit for bit (it runs the same
kernel on the same rows).

Two and three processes run by default (small shapes: the interpreter is slow). Four and eight are
marked ``slow`` and run only when selected: ``pytest tests/test_distributed.py -m slow``. Bad input
must raise the same error on every rank, and the pool must stay usable afterwards (no rank was left in
a collective).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from cp_pool import Pool
from helpers import (
    assert_grads_match_reference,
    assert_matches_reference,
    assert_within_budget,
    fused_grads,
    make_qkv,
    randn,
    reference_in,
)

from infoscale_triton.distributed import context_parallel_attention, shard_sequence
from infoscale_triton.distributed.layout import global_positions, keys_before, segments
from infoscale_triton.distributed.ring import block


def _slow(world: int) -> Any:
    return pytest.param(world, marks=pytest.mark.slow)


# The core cases run on 2 and 3 processes, the others on 2 (each process pays the interpreter); all of
# them on 4 and 8 (and the others on 3) when `-m slow` selects them.
WORLDS = [2, 3, _slow(4), _slow(8)]
WORLDS_MORE = [2, _slow(3), _slow(4), _slow(8)]
CHUNK = 9  # rows per layout chunk: shards of 9 or 18 rows against the interpreter's 32 x 16 tiles


@pytest.fixture(scope="module")
def pools() -> Any:
    started: dict[int, Pool] = {}
    yield started
    for pool in started.values():
        pool.close()


@pytest.fixture
def pool(request: pytest.FixtureRequest, pools: dict[int, Pool]) -> Pool:
    world = request.param
    if request.node.get_closest_marker("slow") and "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip(f"{world} processes: selected with -m slow")
    if world not in pools or pools[world].broken:
        pools[world] = Pool(world)
    return pools[world]


worlds = pytest.mark.parametrize("pool", WORLDS, indirect=True, ids=lambda w: f"W{w}")
worlds_more = pytest.mark.parametrize("pool", WORLDS_MORE, indirect=True, ids=lambda w: f"W{w}")


def chunks_of(rank: int, world: int, layout: str) -> tuple[int, ...]:
    """The test's own statement of the layouts (the package's is not used to check itself)."""
    return (rank, 2 * world - 1 - rank) if layout == "zigzag" else (rank,)


def join(shards: list[torch.Tensor], dim: int, layout: str) -> torch.Tensor:
    world = len(shards)
    pieces = {}
    for rank, shard in enumerate(shards):
        chunks = chunks_of(rank, world, layout)
        pieces.update(zip(chunks, shard.chunk(len(chunks), dim)))
    return torch.cat([pieces[c] for c in sorted(pieces)], dim)


def make_job(world: int, method: str, layout: str, *, is_causal: bool, dtype: torch.dtype = torch.float32,
             batch: int = 1, hq: int = 2, hkv: int = 2, d: int = 32, dv: int = 32, k_chunk: int = CHUNK,
             temperature: str | None = None, tensor_temperature: tuple[str, ...] | None = None,
             cos_scale: float | None = None, kv_lengths: str | None = None, scale: float | None = None,
             wrt: tuple[str, ...] = ("query", "key", "value")) -> dict[str, Any]:
    """Random full inputs and options; sequence lengths CHUNK (query) and ``k_chunk`` (key) rows per
    layout chunk. ``tensor_temperature``: the per-row tensor's dims among ("B", "H", "L") (L last),
    requiring grad; ``kv_lengths``: "short" (every entry sees some keys) or "empty" (the last sees
    none)."""
    chunks = 2 * world if layout == "zigzag" else world
    lq, lk = CHUNK * chunks, k_chunk * chunks
    q, k, v = make_qkv(batch, hq, hkv, lq, lk, d, dv, dtype)
    opts: dict[str, Any] = {"is_causal": is_causal, "enable_gqa": hq != hkv}
    if scale is not None:
        opts["scale"] = scale
    if cos_scale is not None:
        opts["cos_scale"] = cos_scale
    if temperature is not None:
        opts.update(temperature=temperature, train_len=lk // 3)
    if tensor_temperature is not None:
        shape = [{"B": batch, "H": hq, "L": lq}[dim] for dim in tensor_temperature]
        opts["temperature"] = (torch.rand(*shape) * 3 - 1).requires_grad_(True)
        wrt = (*wrt, "temperature")
    if kv_lengths is not None:
        lengths = torch.randint(1, lk + 1, (batch,))
        lengths[0] = lk - CHUNK - 2  # reaches into a shard but not its end
        if kv_lengths == "empty":
            lengths[-1] = 0
        opts["kv_lengths"] = lengths
    dout = randn(batch, hq, lq, dv, dtype=dtype)
    return {"method": method, "layout": layout, "opts": opts, "query": q, "key": k, "value": v,
            "dout": dout, "wrt": wrt}


def run_and_join(pool: Pool, job: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run a job that must succeed: (output, gradients), each put together from the ranks' shards."""
    results = pool.run(job)
    for rank, (_, error) in enumerate(results):
        assert error is None, f"rank {rank} raised {error[0]}: {error[1]}\n{error[2]}"
    layout = job["layout"]
    out = join([r["out"] for r, _ in results], 2, layout)
    assert torch.equal(results[0][0]["unsharded"], out), "unshard_sequence disagrees with the layout"
    grads = {name: join([r[name] for r, _ in results], 2 if name != "temperature" else -1, layout)
             for name in job["wrt"]}
    return out, grads


def check(pool: Pool, **case: Any) -> None:
    """One case: the joined output and gradients against the float64 reference, and against the
    single-process fused function on the full tensors."""
    job = make_job(pool.world, **case)
    out, grads = run_and_join(pool, job)
    q, k, v, dout, opts = job["query"], job["key"], job["value"], job["dout"], job["opts"]
    temperature = opts.get("temperature")
    fwd_opts = dict(opts, temperature=temperature.detach()) if isinstance(temperature, torch.Tensor) else opts
    assert_matches_reference(out, q, k, v, **fwd_opts)
    assert_grads_match_reference(grads, q, k, v, dout, **opts)

    single_out, single_grads = fused_grads(q, k, v, dout, wrt=job["wrt"], **opts)
    if job["method"] == "all_to_all":
        assert torch.equal(out, single_out), "all_to_all output differs from the single-process kernel's"
        for name in ("query", "key", "value"):
            assert torch.equal(grads[name], single_grads[name]), f"all_to_all d{name} differs"
    else:
        low = reference_in(q.dtype, q, k, v, **fwd_opts)
        assert_within_budget(out, single_out.to(torch.float64), low, what="ring vs single-process: ")


@worlds
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_ring_causal_infoscale(pool: Pool, layout: str) -> None:
    check(pool, method="ring", layout=layout, is_causal=True, temperature="infoscale")


@worlds_more
def test_ring_full_logn_float16_cross(pool: Pool) -> None:
    """Not causal, query and key of different lengths, float16 (partial outputs rounded before the merge)."""
    check(pool, method="ring", layout="zigzag", is_causal=False, dtype=torch.float16, k_chunk=5,
          temperature="logn")


@worlds_more
def test_ring_causal_padding(pool: Pool) -> None:
    """kv_lengths: blocks that see part of a shard, none of it, and a batch entry that sees no key."""
    check(pool, method="ring", layout="contiguous", is_causal=True, batch=2, temperature="infoscale_clipped",
          kv_lengths="empty")


@worlds
def test_ring_cos_scale_gqa_padding(pool: Pool) -> None:
    check(pool, method="ring", layout="zigzag", is_causal=True, hq=4, hkv=2, cos_scale=16.0,
          temperature="infoscale", kv_lengths="short")


@worlds_more
@pytest.mark.parametrize("dims", [("B", "H", "L"), ("L",)], ids=["bhl", "l"])
def test_ring_tensor_temperature(pool: Pool, dims: tuple[str, ...]) -> None:
    """A per-row tensor (sharded like the query) and its gradient, summed over the ring's steps."""
    check(pool, method="ring", layout="zigzag" if len(dims) == 3 else "contiguous", is_causal=len(dims) == 3,
          tensor_temperature=dims, dv=16)


@worlds_more
def test_ring_float16_plain(pool: Pool) -> None:
    check(pool, method="ring", layout="zigzag", is_causal=True, dtype=torch.float16, batch=2, scale=0.3)


@worlds
def test_all_to_all_causal_infoscale_gqa(pool: Pool) -> None:
    w = pool.world
    check(pool, method="all_to_all", layout="zigzag", is_causal=True, hq=2 * w, hkv=w,
          temperature="infoscale", kv_lengths="short")


@worlds_more
def test_all_to_all_tensor_temperature_cos(pool: Pool) -> None:
    w = pool.world
    check(pool, method="all_to_all", layout="contiguous", is_causal=False, hq=w, hkv=w, cos_scale=32.0,
          tensor_temperature=("B", "H", "L"), kv_lengths="empty", batch=2)


@worlds_more
def test_repeatable(pool: Pool) -> None:
    """The same inputs twice: the same bits (fixed ring order, no atomics)."""
    job = make_job(pool.world, "ring", "zigzag", is_causal=True, temperature="logn", hq=4, hkv=2)
    first, second = run_and_join(pool, job), run_and_join(pool, job)
    assert torch.equal(first[0], second[0])
    for name in first[1]:
        assert torch.equal(first[1][name], second[1][name]), f"d{name} differs between two runs"


def errors_of(pool: Pool, job: dict[str, Any]) -> list[tuple[str, str]]:
    results = pool.run(job)
    return [(e[0], e[1]) if e is not None else ("no error", "") for _, e in results]


BAD_INPUT = {
    # what, job changes, expected words in the message
    "shapes_differ": ({"change": {-1: ["two_rows_fewer"]}}, ["query", "differs across ranks"]),
    "zigzag_odd": ({"change": {"all": ["one_row_fewer"]}}, ["query", "zigzag", "not divisible"]),
    "one_rank_bad_kv_lengths": ({"change": {1: ["kv_lengths_of_three"]}}, ["kv_lengths", "rank 1"]),
    "option_differs": ({"change": {0: ["is_causal_flipped"]}}, ["is_causal", "differs across ranks"]),
    "all_to_all_heads": ({"method": "all_to_all", "heads": "W+1"}, ["heads", "divisible"]),
    "unknown_method": ({"method": "star"}, ["method"]),
}


@worlds
@pytest.mark.parametrize("kind", list(BAD_INPUT))
def test_bad_input_raises_on_every_rank(pool: Pool, kind: str) -> None:
    """Each rank raises the same ValueError naming the argument; then the pool still works (no rank is
    stuck in a collective): the next test's job runs on it."""
    changes, words = BAD_INPUT[kind]
    w = pool.world
    hq = w + 1 if changes.get("heads") == "W+1" else 2
    job = make_job(w, changes.get("method", "ring"), "zigzag", is_causal=True, hq=hq, hkv=hq, wrt=())
    job["change"] = {}
    for who, edits in changes.get("change", {}).items():
        for rank in range(w) if who == "all" else [who % w]:
            job["change"][rank] = edits
    errors = errors_of(pool, job)
    kinds = {e[0] for e in errors}
    assert kinds == {"ValueError"}, f"expected a ValueError on every rank, got {errors}"
    messages = {e[1] for e in errors}
    assert len(messages) == 1, f"ranks raised different messages: {messages}"
    message = messages.pop()
    for word in words:
        assert word in message, f"{word!r} not in the message: {message}"


@worlds_more
def test_shard_sequence_indivisible(pool: Pool) -> None:
    w = pool.world
    job = {"layout": "zigzag", "shard": torch.zeros(1, 2, 2 * w + 1, 4)}
    errors = errors_of(pool, job)
    assert all(kind == "ValueError" and "x:" in msg and str(2 * w) in msg for kind, msg in errors), errors


def test_uninitialised_group() -> None:
    """No process group: a ValueError naming ``group`` (the same on every rank: none can communicate)."""
    q = torch.randn(1, 2, 8, 32)
    with pytest.raises(ValueError, match="group: torch.distributed is not initialised"):
        context_parallel_attention(q, q, q)
    with pytest.raises(ValueError, match="group: torch.distributed is not initialised"):
        shard_sequence(q, 2)


# ---------------------------------------------------------------------------------------------------
# The plan, without processes: which (row, key) pairs the ring's blocks cover, and the key padding.


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_ring_blocks_cover_each_pair_once(world: int, layout: str, is_causal: bool) -> None:
    """Over all ranks and steps, the blocks (with their own bottom-right causal mask) cover every
    (query, key) pair the global mask allows exactly once, and no other."""
    local = 2 * 3
    n = local * world
    seen = torch.zeros(n, n, dtype=torch.int64)
    for rank in range(world):
        rows = global_positions(rank, world, layout, local, torch.device("cpu"))
        for step in range(world):
            source = (rank - step) % world
            blk = block(rank, source, world, layout, is_causal, local, local)
            if blk is None:
                continue
            keys = global_positions(source, world, layout, local, torch.device("cpu"))
            r, k = rows[blk.rows], keys[blk.keys]
            mask = torch.ones(len(r), len(k), dtype=torch.bool)
            if blk.causal:
                mask = torch.ones_like(mask).tril(len(k) - len(r))
            seen[r[:, None].expand_as(mask)[mask], k[None, :].expand_as(mask)[mask]] += 1
    expected = torch.ones(n, n, dtype=torch.int64)
    if is_causal:
        expected = expected.tril()
    assert torch.equal(seen, expected)


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_key_padding_per_block(layout: str) -> None:
    """keys_before: the keys of a shard's slice below each global length, against counting them."""
    world, local = 3, 8
    n = world * local
    lengths = torch.arange(n + 1)
    for source in range(world):
        keys = global_positions(source, world, layout, local, torch.device("cpu"))
        parts = segments(source, world, layout, local)
        for lo, hi in ((0, local), (0, local // 2), (local // 2, local)):
            got = keys_before(lengths, parts, lo, hi)
            want = (keys[lo:hi][None, :] < lengths[:, None]).sum(1)
            assert torch.equal(got.long(), want), (source, lo, hi)
            # and they are the first ones of the slice (the kernels take a prefix length)
            assert torch.all(keys[lo:hi].diff() > 0)
