#!/usr/bin/env python
"""Context-parallel attention on several GPUs against one GPU and PyTorch's own context parallelism.

    torchrun --nproc-per-node 2 benchmarks/bench_context_parallel.py --out results/cp --checks
    torchrun --nproc-per-node 2 benchmarks/bench_context_parallel.py --smoke     # CPU, gloo, interpreter

One sequence, H = 16, D = 128, causal, InfoScale (train_len 512), bf16, forward and forward+backward,
at 128k, 256k, 512k and 1M tokens:
  ring         infoscale_triton.distributed.context_parallel_attention(method="ring", layout="zigzag")
  all_to_all   the same with method="all_to_all" (--methods)
  one_gpu      infoscale_triton.scaled_dot_product_attention on the full sequence, on each GPU alone
  torch_cp     torch.distributed.tensor.experimental.context_parallel around F.scaled_dot_product_attention
               (cuDNN backend; --peer-backends adds flash) on q pre-multiplied by the global t_i (inside
               the timed call), on the same zigzag shards (its head-tail load balancer is this layout)
Time: the slowest rank's median over repetitions (CUDA events; one warm-up call first, which also
compiles); TFLOP/s per GPU: 4·H·N²·D/2 per forward (x3.5 forward+backward) over time and GPUs; peak
memory per GPU: max_memory_allocated during the repetitions, with only that provider's inputs live
(shards, or the full tensors for one_gpu), and the part above them.

--checks first runs benchmarks/cp_check.py's checks (tests/cp_checks.py). --deadline (seconds from the
start) guards the whole run: a measurement whose estimated time (from its FLOPs at a conservative rate)
does not fit in what is left is skipped and recorded as such; the 1M one-GPU forward+backward comes
last. Results (the harness, infoscale_triton/cli/harness.py; rank 0 writes): one record per
measurement in bench_context_parallel_<time>.json / .csv, rewritten after each, the peer checks, the
markdown table and the targets as summaries, and the printed lines in .log (--checks: cp_check_<time>.*
too) under --out (default benchmarks/results/; --smoke or no GPU: a temporary directory); the table at
the end.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from cp_checks import TRAIN_LEN, low_dtype, run_checks

import infoscale_triton
from infoscale_triton.cli import harness
from infoscale_triton.cli.console import format_markdown
from infoscale_triton.distributed import context_parallel_attention, shard_sequence
from infoscale_triton.distributed.layout import global_positions
from infoscale_triton.temperature import TemperatureSpec, row_temperature

HEADS, HEAD_DIM = 16, 128
LENGTHS = [131072, 262144, 524288, 1048576]
# for the time guard only: rates below what an H200 sustains here (fwd ~520, fwd+bwd ~430 TFLOP/s)
GUARD_RATE = {"fwd": 380e12, "fwd_bwd": 330e12}
TARGET_REP_SECONDS = 2.0  # repetitions fill about this much, at least one


def flops(n: int, pass_: str, heads: int = HEADS) -> float:
    return harness.attention_flops(1, heads, n, n, HEAD_DIM, True, pass_)


def global_temperature(n: int, rank: int, world: int, device: torch.device) -> torch.Tensor:
    """The peer's t_i for this rank's rows (zigzag), (1, 1, L_local, 1) float32: InfoScale of n_i = i + 1."""
    pos = global_positions(rank, world, "zigzag", n // world, device)
    t = row_temperature((pos + 1).double(), TemperatureSpec.parse("infoscale"), TRAIN_LEN, HEAD_DIM)
    return t.float().view(1, 1, -1, 1)


def measure(env: harness.Ranks, call: Callable[[], object], distributed: bool) -> dict:
    """Warm up, then time ``call`` (median of repetitions sized from the warm-up, the same count on
    every rank) and its peak memory."""
    sync = torch.cuda.synchronize if env.device.type == "cuda" else (lambda: None)
    dist.barrier()
    t0 = time.perf_counter()
    call()
    sync()
    warm = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=env.device)
    dist.broadcast(warm, 0)
    reps = max(1, min(10, int(TARGET_REP_SECONDS / max(warm.item(), 1e-3))))
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(reps):
        if distributed:
            dist.barrier()
        if env.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
    slowest = torch.tensor([statistics.median(times)], dtype=torch.float64, device=env.device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    result = {"seconds": slowest.item(), "reps": reps, "warmup_seconds": round(warm.item(), 3)}
    if env.device.type == "cuda":
        peak = torch.tensor([torch.cuda.max_memory_allocated(), torch.cuda.max_memory_allocated() - base],
                            dtype=torch.float64, device=env.device)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        result.update(peak_gib=peak[0].item() / 2**30, peak_above_inputs_gib=peak[1].item() / 2**30)
    return result


def fwd_bwd(forward: Callable[..., torch.Tensor], inputs: list[torch.Tensor],
            dout: torch.Tensor) -> Callable[[], None]:
    leaves = [x.detach().requires_grad_(True) for x in inputs]
    return harness.fwd_bwd(lambda: forward(*leaves), leaves, dout)


def fwd(forward: Callable[..., torch.Tensor], inputs: list[torch.Tensor]) -> Callable[[], None]:
    def call() -> None:
        with torch.no_grad():
            forward(*inputs)
    return call


def torch_cp(env: harness.Ranks, mesh: object, n: int,
             backend: str) -> tuple[contextlib.AbstractContextManager, Callable[..., torch.Tensor]]:
    """PyTorch's context parallelism on this length: (the context to run in, attention of the shards)."""
    from torch.distributed.tensor.experimental import context_parallel
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # context_parallel shards its buffers itself (head-tail = zigzag); we give it a stand-in of the
    # sequence's length and our own shards to SDPA
    positions = torch.arange(n, device=env.device)
    kind = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend]
    t = global_temperature(n, env.rank, env.world, env.device)
    stack = contextlib.ExitStack()
    stack.enter_context(context_parallel(mesh, buffers=[positions], buffer_seq_dims=[0],
                                         no_restore_buffers={positions}))
    stack.enter_context(sdpa_kernel([kind]))

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention((q * t).to(q.dtype), k, v, is_causal=True)
    return stack, attend


def bench(env: harness.Ranks, out: harness.ResultsFile, args: argparse.Namespace) -> None:
    opts = {"is_causal": True, "temperature": "infoscale", "train_len": TRAIN_LEN}
    dtype = low_dtype()
    lengths = [128, 256] if not harness.on_gpu() else [n for n in LENGTHS if n <= args.max_len]
    heads = args.heads
    mesh = None
    if env.device.type == "cuda" and args.peer_backends:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cuda", (env.world,))
    one_gpu_last = []  # (n, pass): measured after every length, if time is left

    def single(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return infoscale_triton.scaled_dot_product_attention(q, k, v, **opts)

    def run(n: int, provider: str, pass_: str, call: Callable[[], None], gpus: int) -> dict | None:
        est = flops(n, pass_, heads) / (GUARD_RATE[pass_] * gpus)
        # warm-up + repetitions filling TARGET_REP_SECONDS (or one) + compile/launch slack
        needed = est * (1 + max(1, TARGET_REP_SECONDS / est)) + 5
        if not env.agree(env.left() > needed + args.reserve):
            out.log(f"skip  {provider:12s} {pass_:7s} N={n}: ~{needed:.0f} s needed, {env.left():.0f} s left")
            out.add({"n": n, "provider": provider, "pass": pass_, "reason": "skipped (time)"})
            return None
        # out of memory or a peer's failure is a result (the reason), never fatal
        r, why = harness.attempt(lambda: measure(env, call, distributed=gpus > 1))
        entry = {"n": n, "provider": provider, "pass": pass_, "gpus": gpus, **(r or {"reason": why})}
        if r is not None:
            entry["tflops_per_gpu"] = flops(n, pass_, heads) / r["seconds"] / gpus / 1e12
            mem = f"{r['peak_gib']:6.1f} GiB" if "peak_gib" in r else ""
            out.log(f"{provider:12s} {pass_:7s} N={n:8d} {r['seconds'] * 1e3:10.1f} ms "
                    f"{entry['tflops_per_gpu']:6.1f} TFLOP/s/GPU {mem}")
        else:
            out.log(f"{provider:12s} {pass_:7s} N={n:8d} {why}")
        out.add(entry)
        return entry

    for n in lengths:
        g = torch.Generator(device=env.device).manual_seed(n)
        full = [torch.randn(1, heads, n, HEAD_DIM, generator=g, device=env.device, dtype=dtype)
                for _ in range(4)]  # q, k, v, dout
        if n <= args.one_gpu_max_len:
            run(n, "one_gpu", "fwd", fwd(single, full[:3]), 1)
            if n < max(lengths):
                run(n, "one_gpu", "fwd_bwd", fwd_bwd(single, full[:3], full[3]), 1)
            else:
                one_gpu_last.append(n)
        shards = [shard_sequence(x, 2) for x in full]
        del full
        if env.device.type == "cuda":
            torch.cuda.empty_cache()
        for method in args.methods:
            def ours(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, method: str = method) -> torch.Tensor:
                return context_parallel_attention(q, k, v, method=method, **opts)
            run(n, method, "fwd", fwd(ours, shards[:3]), env.world)
            run(n, method, "fwd_bwd", fwd_bwd(ours, shards[:3], shards[3]), env.world)
        if env.device.type == "cuda":
            for backend in args.peer_backends:
                name = f"torch_cp_{backend}"
                try:
                    stack, peer = torch_cp(env, mesh, n, backend)
                except Exception as e:  # noqa: BLE001
                    out.log(f"{name}: unavailable: {type(e).__name__}: {e}")
                    out.add({"n": n, "provider": name, "reason": f"{type(e).__name__}: {e}"})
                    continue
                with stack:
                    if n == lengths[0]:
                        check_peer(env, out, name, peer, shards, opts)
                    run(n, name, "fwd", fwd(peer, shards[:3]), env.world)
                    run(n, name, "fwd_bwd", fwd_bwd(peer, shards[:3], shards[3]), env.world)
        del shards
    for n in one_gpu_last:  # the largest one-GPU forward+backward: the most time for the least news
        g = torch.Generator(device=env.device).manual_seed(n)
        full = [torch.randn(1, heads, n, HEAD_DIM, generator=g, device=env.device, dtype=dtype)
                for _ in range(4)]
        run(n, "one_gpu", "fwd_bwd", fwd_bwd(single, full[:3], full[3]), 1)
        del full


def check_peer(env: harness.Ranks, out: harness.ResultsFile, name: str, peer: Callable,
               shards: list[torch.Tensor], opts: dict) -> None:
    """The peer and the ring must compute the same thing on the same shards (validates the peer's set-up:
    layout and pre-scaled q)."""
    with torch.no_grad():
        ours = context_parallel_attention(*shards[:3], **opts).double()
        theirs = peer(*shards[:3]).double()
    err = torch.stack([(theirs - ours).norm() ** 2, ours.norm() ** 2])
    dist.all_reduce(err)
    rel = (err[0] / err[1]).sqrt().item()
    out.log(f"{name} vs ring, same shards: rel. difference {rel:.2e}")
    out.write(peer_checks={**out.summaries.get("peer_checks", {}), name: {"rel_difference_vs_ring": rel}})


def summary(out: harness.ResultsFile, world: int) -> None:
    """The table and the issue's targets, from the records (rank 0)."""
    rows = [r for r in out.records if "seconds" in r]
    if not rows:
        return
    by = {(r["n"], r["provider"], r["pass"]): r for r in rows}
    providers = sorted({r["provider"] for r in rows}, key=lambda p: ("ring", "all_to_all", "one_gpu").index(p)
                       if p in ("ring", "all_to_all", "one_gpu") else 9)
    body = []
    for n in sorted({r["n"] for r in rows}):
        for pass_ in ("fwd", "fwd_bwd"):
            cells = []
            for p in providers:
                r = by.get((n, p, pass_))
                cells.append("-" if r is None else f"{r['seconds'] * 1e3:.0f} ({r['tflops_per_gpu']:.0f}, "
                                                   f"{r.get('peak_gib', float('nan')):.1f})")
            size = f"{n // 1024}k" if n >= 1024 else str(n)
            body.append([size, pass_, *cells])
    table = format_markdown(["N", "pass", *(f"{p} ms (TFLOP/s/GPU, GiB/GPU)" for p in providers)], body)
    out.log("\n" + table)

    def ratio(a: tuple, b: tuple, key: str = "seconds") -> float | None:
        return by[b][key] / by[a][key] if a in by and b in by else None

    peer = next((p for p in providers if p.startswith("torch_cp")), None)
    targets = {
        f"speedup {world} GPUs / 1 GPU, fwd_bwd 256k (>= 1.85)": ratio((262144, "ring", "fwd_bwd"),
                                                                       (262144, "one_gpu", "fwd_bwd")),
        f"ring / {peer} fwd 512k (>= 1.0)": ratio((524288, "ring", "fwd"), (524288, peer, "fwd"))
        if peer else None,
        f"ring / {peer} fwd_bwd 512k (>= 1.0)": ratio((524288, "ring", "fwd_bwd"), (524288, peer, "fwd_bwd"))
        if peer else None,
        "peak memory per GPU ring / 1 GPU, fwd_bwd 256k (<= 0.55)": (
            by[(262144, "ring", "fwd_bwd")]["peak_gib"] / by[(262144, "one_gpu", "fwd_bwd")]["peak_gib"]
            if (262144, "ring", "fwd_bwd") in by and (262144, "one_gpu", "fwd_bwd") in by
            and "peak_gib" in by[(262144, "ring", "fwd_bwd")] else None),
        "1M fwd_bwd runs on the ring": (1048576, "ring", "fwd_bwd") in by,
    }
    for k, v in targets.items():
        out.log(f"target: {k}: {v if not isinstance(v, float) else round(v, 3)}")
    out.write(table=table, targets=targets)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None,
                    help="results directory (default benchmarks/results/; --smoke: a temporary directory)")
    ap.add_argument("--smoke", action="store_true", help="CPU: gloo and the Triton interpreter, tiny sizes")
    harness.torchrun_arguments(ap, deadline_s=470.0)
    ap.add_argument("--checks", action="store_true", help="run cp_check.py's checks first")
    ap.add_argument("--all-options", action="store_true", help="with --checks: CosScale and kv_lengths too")
    ap.add_argument("--methods", nargs="+", default=["ring"], choices=["ring", "all_to_all"])
    ap.add_argument("--peer-backends", nargs="*", default=["cudnn"], choices=["cudnn", "flash"])
    ap.add_argument("--max-len", type=int, default=max(LENGTHS))
    ap.add_argument("--one-gpu-max-len", type=int, default=max(LENGTHS))
    ap.add_argument("--reserve", type=float, default=10.0, help="seconds kept free at the end")
    ap.add_argument("--heads", type=int, default=None, help=f"default {HEADS}; --smoke or no GPU: 2")
    args = ap.parse_args()
    code = harness.ensure_backend(interpret=args.smoke)
    if code is not None:
        return code
    smoke = not harness.on_gpu()  # --smoke or no GPU: the interpreter, gloo, small sizes
    if args.heads is None:
        args.heads = 2 if smoke else HEADS
    env = harness.init_ranks(args.collective_timeout, args.deadline)
    out_dir = harness.results_dir(args.out, smoke)
    meta = harness.metadata(heads=args.heads, head_dim=HEAD_DIM, train_len=TRAIN_LEN, dtype=str(low_dtype()),
                            smoke=smoke, methods=args.methods, peer_backends=args.peer_backends,
                            max_len=args.max_len, one_gpu_max_len=args.one_gpu_max_len,
                            deadline_s=args.deadline, reserve_s=args.reserve)
    ok = True
    if args.checks:
        checks = harness.ResultsFile("cp_check", out_dir, meta, started=env.started)
        ok = run_checks(env, checks, args.all_options)
    out = harness.ResultsFile("bench_context_parallel", out_dir, meta, started=env.started)
    bench(env, out, args)
    if env.rank == 0:
        summary(out, env.world)
    if env.device.type == "cuda":
        torch.cuda.synchronize()
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
