"""The benchmark harness: what every script in benchmarks/ and ``python -m infoscale_triton bench`` share.

A benchmark script stays thin: it picks its shapes and providers and calls these. The pieces:

  backend     :func:`ensure_backend` at the top of ``main`` (no GPU, or ``interpret=True`` for a run that asks
              for the interpreter such as --smoke: re-run under Triton's interpreter, which must be chosen
              before triton is imported); :func:`on_gpu`, :func:`device`.
  providers   :mod:`.peers`: ours and what a user would run instead (SDPA cuDNN / FlashAttention-2, compiled
              flex_attention, eager), each built as ``fn()`` over prepared inputs, :func:`.peers.build`
              turning "cannot run here" into a reason; :func:`.peers.graphed` replays one from a CUDA graph.
  inputs      :func:`input_sets_needed`: how many independent input sets to rotate so that no call finds
              its inputs in L2.
  timing      :func:`first_call` (wall seconds of the first call: compiling, autotuning, cuDNN plans, shown
              apart from the timed runs as ``first_s``; also any one synchronised wall-clock call);
              :func:`time_ms` (triton.testing.do_bench median cycling over the input sets; on CPU the host
              clock; a CUDA graph's replays: ``time_ms([peers.graphed(fn)])``); host-side cost of eager
              calls: :func:`eager_ms` (calls back to back between two synchronisations: max(host cost,
              GPU time) per call) and :func:`host_ms` (one call with the device idle before it: the host
              alone); :func:`peak_mib`; :func:`fwd_bwd` (one forward + autograd.grad call);
              :func:`attention_flops`.
  failures    :func:`attempt` runs a step and returns ``(value, reason)``: out of memory or a peer's error
              is recorded in the row, never fatal.
  checks      :func:`check` fills ``err`` / ``tol`` / ``check`` of a record from the float64 reference and
              the PyTorch baseline in the input dtype (the budget of :mod:`infoscale_triton.testing`).
  results     one schema for every script: a JSON file ``{"meta": metadata(...), "results": [record, ...]}``
              (plus, at most, summaries derived from the results) and a CSV of the records with the main
              metadata columns, rewritten after every measurement (:class:`ResultsFile`) so that a run cut
              short keeps what it measured. A record is one flat dict per measurement; the usual keys are
              provider, pass, ms, first_s, tflops or gbps, peak_mib, err, tol, check ("ok" / "FAIL" / "-"),
              reason (why it could not run). Files are replaced whole (written aside, then renamed): a reader
              never sees half a file. :meth:`ResultsFile.log`: a line printed and appended to
              ``<stem>.log`` (optionally stamped with the seconds since the run's start).
              :func:`results_dir`: --smoke runs write outside the tracked benchmarks/results/ unless --out
              says otherwise. :func:`timing_text`: a record's progress line (ms alone through the
              interpreter: never a meaningless TFLOP/s or memory figure).
  torchrun    scripts run by torchrun (one process per GPU): :func:`init_ranks` (the process group: NCCL
              on GPUs, gloo on CPU through the interpreter; one clock and a deadline shared by all ranks;
              :meth:`Ranks.agree` for decisions that change which collectives run);
              :func:`torchrun_arguments` (--deadline, --collective-timeout). Only rank 0 writes or logs
              (:func:`rank`): every rank may keep a :class:`ResultsFile`; the metadata records the world
              size.
  output      :mod:`.console`: ``table(headers, rows, title)`` and ``Progress(total, name)`` (rich when
              installed, plain text otherwise; ``table(..., markdown=True)`` and ``format_markdown`` for a
              table to paste into notes); :func:`fmt` for numbers ("-" when not measured);
              :mod:`.plots` for the attention grid's PNGs.

A thin script (benchmarks/bench_sequences.py is a full one):

    from infoscale_triton.cli import harness, peers
    from infoscale_triton.cli.console import table

    def main(argv=None) -> int:
        code = harness.ensure_backend()          # no GPU: re-run under the interpreter
        if code is not None:
            return code
        args = parser().parse_args(argv)         # --smoke, --out (default None), --warmup, --rep, ...
        out = harness.ResultsFile("bench_thing", harness.results_dir(args.out, args.smoke),
                                  harness.metadata(warmup_ms=args.warmup, rep_ms=args.rep, **settings))
        for name in ("ours", "sdpa_cudnn"):
            calls = [...one fn() per input set, harness.input_sets_needed(bytes_per_set) of them...]
            built = peers.build_fn(lambda: calls[0])         # first call, timed; or the reason it cannot run
            rec = {"provider": name, "first_s": built.first_s, "reason": built.reason}
            if built.fn is not None:
                rec |= harness.check(built.out, ref64, baseline, dtype)   # err, tol, check
                rec["ms"] = harness.time_ms(calls, args.warmup, args.rep)
            print(name, harness.timing_text(rec))
            out.add(rec)                                      # JSON + CSV rewritten
        table(headers, rows, title)
        return 0

Nothing here imports triton at module level except through the package (``import infoscale_triton``
imports triton): scripts call :func:`ensure_backend` before the first kernel call.
"""

from __future__ import annotations

import argparse
import csv
import gc
import io
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TypeVar

import torch

from infoscale_triton import testing

INTERPRET_ENV = "TRITON_INTERPRET"
REPO = Path(__file__).resolve().parents[2]  # the checkout (for git metadata); benchmarks/ lives there
TRACKED_RESULTS = REPO / "benchmarks" / "results"
SMOKE_RESULTS = Path(tempfile.gettempdir()) / "infoscale_triton_smoke"

# torch.OutOfMemoryError appeared in torch 2.5; older versions only have the CUDA one.
OOM: type[BaseException] = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)

Call = Callable[[], object]
T = TypeVar("T")


# --- backend ------------------------------------------------------------------------------------

def interpreting() -> bool:
    """Whether TRITON_INTERPRET is set (the kernels then run in Triton's interpreter on CPU tensors)."""
    return os.environ.get(INTERPRET_ENV, "0") not in ("", "0")


def on_gpu() -> bool:
    """Compiled kernels on a CUDA device (not the interpreter)."""
    return torch.cuda.is_available() and not interpreting()


def device() -> str:
    return "cuda" if on_gpu() else "cpu"


def ensure_backend(command: Sequence[str] | None = None, interpret: bool = False) -> int | None:
    """On a machine without CUDA, or with ``interpret`` (a run that asks for the interpreter, e.g.
    --smoke), make sure the kernels are defined for the interpreter. Returns None to go on in this
    process, or the exit code of a re-run of ``command`` (default: this process's own command line) with
    TRITON_INTERPRET=1, when triton was already imported in compiled mode (as ``import infoscale_triton``
    does): triton.jit reads the variable when the kernels are defined. Under torchrun each rank re-runs
    itself with the same environment (the re-runs form the process group).
    Scripts: ``code = harness.ensure_backend(); if code is not None: return code``."""
    if interpreting() or (torch.cuda.is_available() and not interpret):
        return None
    if "triton" not in sys.modules:  # nothing defined yet: setting the variable is enough
        os.environ[INTERPRET_ENV] = "1"
        return None
    env = dict(os.environ, **{INTERPRET_ENV: "1"})
    argv = list(command) if command is not None else list(sys.orig_argv[1:])
    return subprocess.call([sys.executable, *argv], env=env)


# --- failures, memory ---------------------------------------------------------------------------

def reason(e: BaseException) -> str:
    """A one-line reason for a record: the exception's type and first line."""
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:160]}"


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def attempt(fn: Callable[[], T]) -> tuple[T | None, str]:
    """``(fn(), "")``, or ``(None, reason)`` when it fails (out of memory, a peer's error)."""
    why = ""
    try:
        return fn(), ""
    except OOM:
        why = "out of memory"
    except Exception as e:  # noqa: BLE001 - recorded, the run goes on
        why = reason(e)
    # outside the except block: the traceback (and the tensors its frames hold) is gone by now
    free_memory()
    return None, why


# --- inputs, timing -----------------------------------------------------------------------------

def input_sets_needed(set_bytes: int, cache_bytes: int | None = None) -> int:
    """How many input sets to rotate so that together they exceed the last-level cache (at least 2:
    consecutive calls never share inputs)."""
    if cache_bytes is None:
        cache_bytes = 0  # CPU runs (the interpreter) time nothing meaningful: 2 sets
        if on_gpu():
            cache_bytes = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)
    return max(2, cache_bytes // max(set_bytes, 1) + 1)


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def first_call(fn: Callable[[], T]) -> tuple[T, float]:
    """``(fn(), wall seconds)`` with the device synchronised on both sides: the first call of a provider
    (compiling kernels or graphs, autotuning, cuDNN plans), which a user pays once per shape and process
    (Triton keeps compiled kernels on disk: a second process pays less)."""
    synchronize()
    t0 = time.perf_counter()
    out = fn()
    synchronize()  # also surfaces asynchronous launch errors here
    return out, time.perf_counter() - t0


def time_ms(calls: Sequence[Call], warmup_ms: float = 10, rep_ms: float = 100) -> float:
    """Median milliseconds per call, cycling through ``calls`` (one per input set, so that no call finds
    its inputs in L2). GPU: triton.testing.do_bench (device events). CPU (the interpreter): the host
    clock over about ``rep_ms``, at least one call; such times say nothing about GPU speed."""
    cycle = itertools.cycle(calls)

    def step() -> None:
        next(cycle)()

    if on_gpu():
        import triton.testing

        return float(triton.testing.do_bench(step, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    times: list[float] = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while not times or (time.perf_counter() < deadline and len(times) < 1000):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def eager_ms(calls: Sequence[Call], n: int, rounds: int = 5) -> float:
    """Milliseconds per call of ``n`` calls issued back to back (cycling over ``calls``) between two
    synchronisations, median of ``rounds`` rounds: max(host cost, GPU time) per call, what an eager loop
    (a decoding step's launches) pays. triton.testing.do_bench hides part of the host's cost: it flushes
    L2 before each call, and the host issues the call during the flush."""
    per_call = []
    for _ in range(rounds):
        synchronize()
        t0 = time.perf_counter()
        for i in range(n):
            calls[i % len(calls)]()
        synchronize()
        per_call.append((time.perf_counter() - t0) / n * 1e3)
    return statistics.median(per_call)


def host_ms(calls: Sequence[Call], n: int) -> float:
    """The host's own milliseconds per call: ``n`` calls (cycling over ``calls``), each timed alone with
    the device idle before it (no synchronisation inside the timing), median."""
    times = []
    for i in range(n):
        synchronize()
        t0 = time.perf_counter()
        calls[i % len(calls)]()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_mib(call: Call) -> float:
    """MiB one call allocates on top of what is live before it (inputs, other providers' state); NaN
    without compiled kernels on a GPU (not measured)."""
    if not on_gpu():
        return math.nan
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    call()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def fwd_bwd(fn: Callable[[], torch.Tensor], leaves: Sequence[torch.Tensor], dout: torch.Tensor) -> Call:
    """One timed forward + backward: ``autograd.grad(fn(), leaves, dout)``."""
    def call() -> None:
        torch.autograd.grad(fn(), list(leaves), dout)
    return call


# Pass -> FLOP factor relative to one forward (the anchors' convention: fwd_bwd = 3.5 forwards).
PASSES = {"fwd": 1.0, "fwd_bwd": 3.5}


def attention_flops(b: int, h: int, lq: int, lk: int, d: int, causal: bool, pass_: str = "fwd") -> float:
    """Matrix-product FLOPs: 4 * B * H * Lq * Lk * D for the forward (QK^T and PV), halved when causal;
    forward + backward counts 3.5 forwards."""
    return 4.0 * b * h * lq * lk * d * (0.5 if causal else 1.0) * PASSES[pass_]


# --- checks -------------------------------------------------------------------------------------

def check(out: torch.Tensor, ref64: torch.Tensor, baseline: torch.Tensor, dtype: torch.dtype,
          prefix: str = "") -> dict:
    """A record's ``{prefix}err``, ``{prefix}tol`` and ``{prefix}check`` ("ok" / "FAIL"): ``out`` against the
    float64 reference, the budget from the PyTorch ``baseline`` in ``dtype`` (infoscale_triton.testing)."""
    c = testing.compare(out, ref64, baseline, dtype)
    return {f"{prefix}err": c.error, f"{prefix}tol": c.budget, f"{prefix}check": "ok" if c.ok else "FAIL"}


# --- metadata and results -----------------------------------------------------------------------

def git(*cmd: str, repo: Path | None = None) -> str:
    """A git command's output in ``repo`` (this checkout by default), "" when git is not there."""
    try:
        return subprocess.run(["git", "-C", str(repo or REPO), *cmd], check=False, capture_output=True,
                              text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def metadata(**settings: object) -> dict:
    """The machine, the versions, the commit, the time and the command line, then ``settings`` (the
    run's options: anything a reader needs to reproduce the numbers)."""
    import triton

    import infoscale_triton

    cuda = torch.cuda.is_available()
    props = torch.cuda.get_device_properties(0) if cuda else None
    return {
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(0) if cuda else f"none (CPU {platform.machine()})",
        "gpu_memory_bytes": getattr(props, "total_memory", None),
        "l2_bytes": getattr(props, "L2_cache_size", None),
        "interpreter": interpreting(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "package_version": infoscale_triton.__version__,
        "git_commit": git("rev-parse", "HEAD") or None,
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "argv": sys.argv,
        **({"world_size": world_size()} if world_size() > 1 else {}),
        **settings,
    }


def results_dir(out: Path | None, smoke: bool, default: Path = TRACKED_RESULTS) -> Path:
    """Where a run writes: ``--out`` if given; else a temporary directory for --smoke runs (they test the
    code: their numbers must not land among the tracked results), ``default`` otherwise."""
    if out is not None:
        return out
    return SMOKE_RESULTS if smoke else default


def _clean(x: object) -> object:
    """JSON has no NaN or inf: a number that was not measured (or not finite) is null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


# metadata columns repeated on every CSV row, so that rows of several runs can be concatenated
CSV_META = ("timestamp", "gpu", "torch", "triton", "package_version", "git_commit")


class ResultsFile:
    """``<out>/<name>_<UTC stamp>.json`` and ``.csv``, in the one results schema; :meth:`write` (or
    :meth:`add`) rewrites both whole, so that a run cut short keeps what it measured; :meth:`log` adds a
    line to ``.log``. Under torch.distributed every rank keeps the records it adds, and only rank 0
    prints, logs and writes. ``started`` (a time.time()): log lines are stamped with the seconds since."""

    def __init__(self, name: str, out_dir: Path, meta: dict, started: float | None = None) -> None:
        self.meta, self.records, self.summaries = meta, [], {}
        self.started = started
        stamp = datetime.fromisoformat(meta["timestamp"]) if "timestamp" in meta else \
            datetime.now(timezone.utc)
        self.stem = Path(out_dir) / f"{name}_{stamp:%Y%m%dT%H%M%SZ}"

    @property
    def json_path(self) -> Path:
        return self.stem.with_suffix(".json")

    @property
    def csv_path(self) -> Path:
        return self.stem.with_suffix(".csv")

    @property
    def log_path(self) -> Path:
        return self.stem.with_suffix(".log")

    def log(self, line: str) -> None:
        """Print ``line`` (stamped with the seconds since ``started``, when given) and append it to the
        log file; rank 0 only."""
        if rank() != 0:
            return
        if self.started is not None:
            line = f"[{time.time() - self.started:6.1f} s] {line}"
        print(line, flush=True)
        self.stem.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("a") as f:
            f.write(line + "\n")

    def add(self, *records: dict) -> None:
        self.records.extend(records)
        self.write()

    def write(self, records: list[dict] | None = None, **summaries: object) -> None:
        """Rewrite both files with ``records`` (default: those added) and the summaries so far plus
        ``summaries`` (top-level JSON keys beside meta and results, derived from the results)."""
        if records is not None:
            self.records = records
        self.summaries.update(summaries)
        if rank() != 0:
            return
        self.stem.parent.mkdir(parents=True, exist_ok=True)
        data = {"meta": self.meta, "results": self.records, **self.summaries}
        # default=str: settings such as a Path or a dtype are written as their text
        _replace(self.json_path, lambda f: f.write(json.dumps(_clean(data), indent=1, default=str)))
        fields = list(dict.fromkeys(k for r in self.records for k in r)) + [
            c for c in CSV_META if c in self.meta]

        def write_csv(f: io.TextIOBase) -> None:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            for r in self.records:
                row = {k: json.dumps(_clean(v), default=str) if isinstance(v, (dict, list)) else v
                       for k, v in r.items()}
                w.writerow({**row, **{c: self.meta[c] for c in CSV_META if c in self.meta}})

        _replace(self.csv_path, write_csv)


def _replace(path: Path, write: Callable[[io.TextIOBase], object]) -> None:
    """Write ``path`` whole: into a file beside it, then renamed over it (a reader, or a run killed
    mid-write, never leaves half a file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as f:
        write(f)
    tmp.replace(path)


def load_results(path: Path) -> tuple[dict, list[dict]]:
    """(meta, records) of a results JSON file; ValueError if it is not in the schema."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise ValueError(f"{path}: not a results file ({{'meta': ..., 'results': [...]}})")
    return data.get("meta", {}), data["results"]


# --- torchrun -----------------------------------------------------------------------------------

def _dist():  # -> the torch.distributed module when a process group is up, else None
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def rank() -> int:
    """This process's rank in the default process group (0 outside torch.distributed)."""
    dist = _dist()
    return dist.get_rank() if dist is not None else 0


def world_size() -> int:
    dist = _dist()
    return dist.get_world_size() if dist is not None else 1


@dataclass
class Ranks:
    """A torchrun run as one of its processes sees it: its rank, the world size, its device, and one
    clock for all ranks (rank 0's start, ``time.time()``) with a deadline in seconds after it."""

    rank: int
    world: int
    device: torch.device
    started: float
    deadline: float

    def left(self) -> float:
        """Seconds left before the deadline."""
        return self.deadline - (time.time() - self.started)

    def agree(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank: decisions that change which collectives run (skipping a
        measurement when time runs out) must be the same on all of them."""
        import torch.distributed as dist

        t = torch.tensor([int(flag)], device=self.device)
        dist.broadcast(t, 0)
        return bool(t.item())


def torchrun_arguments(ap: argparse.ArgumentParser, deadline_s: float) -> None:
    """--deadline and --collective-timeout, the arguments of :func:`init_ranks`."""
    ap.add_argument("--deadline", type=float, default=deadline_s,
                    help="seconds from the start (after start-up); later work is skipped")
    ap.add_argument("--collective-timeout", type=float, default=240.0,
                    help="seconds before a stuck collective aborts the run")


def init_ranks(timeout_s: float, deadline_s: float = math.inf) -> Ranks:
    """Join torchrun's process group: NCCL with this rank's GPU (LOCAL_RANK) when the kernels are
    compiled (:func:`on_gpu`), gloo on the CPU otherwise (the interpreter). A collective stuck for
    ``timeout_s`` seconds aborts the run. Call after :func:`ensure_backend`."""
    import torch.distributed as dist

    cuda = on_gpu()
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    # device_id: NCCL binds the rank to its GPU now (and barrier() knows which one it is)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s),
                            device_id=dev if cuda else None)
    started = torch.tensor([time.time()], dtype=torch.float64, device=dev)
    dist.broadcast(started, 0)  # one clock for all ranks: rank 0's start
    return Ranks(dist.get_rank(), dist.get_world_size(), dev, float(started.item()), deadline_s)


# --- formatting ---------------------------------------------------------------------------------

def fmt(x: float | None, digits: int | None = None) -> str:
    """A number for a table: "-" when not measured (None, NaN); ``digits`` decimals, or (None) whole
    numbers from 10 and two significant digits below."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if digits is None:
        return f"{x:.0f}" if abs(x) >= 10 else f"{x:.2g}"
    return f"{x:.{digits}f}"


def timing_text(rec: dict) -> str:
    """A record's timing for a progress line: on a GPU ms, TFLOP/s, peak MiB and the first call's seconds;
    through the interpreter ms alone (its TFLOP/s and memory mean nothing); why, when it did not run."""
    if rec.get("ms") is None or math.isnan(rec["ms"]):
        return f"not run ({rec.get('reason') or 'no time'})"
    if not on_gpu():
        return f"{rec['ms']:9.1f} ms (interpreter)"
    return (f"{rec['ms']:9.3f} ms {fmt(rec.get('tflops'), 1):>7s} TFLOP/s "
            f"{fmt(rec.get('peak_mib'), 0):>6s} MiB, first call {fmt(rec.get('first_s'), 1)} s")

