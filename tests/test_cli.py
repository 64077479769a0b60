"""The command line, ``python -m infoscale_triton``: every subcommand at tiny sizes (on the CPU through
Triton's interpreter), the shared benchmark script, the harness's results files, and the plots from a
results file."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from infoscale_triton.cli import bench, check, console, harness, plots
from infoscale_triton.cli import main as cli

REPO = Path(__file__).resolve().parent.parent
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def _env() -> dict[str, str]:
    """This checkout first on the path; no TRITON_INTERPRET, so that the command picks the backend
    itself (on CPU: by re-running itself with the interpreter)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def test_info() -> None:
    out = subprocess.run([sys.executable, "-m", "infoscale_triton", "info"], capture_output=True, text=True,
                         env=_env(), timeout=300, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    for name in cli_paths():
        line = next(x for x in out.stdout.splitlines() if x.startswith(name))
        assert " ok " in line, line
    for text in ("torch", "triton", "python", "sdpa_cudnn", "flex"):
        assert text in out.stdout
    if not torch.cuda.is_available():
        assert "INTERPRETER" in out.stdout


def cli_paths() -> list[str]:
    from infoscale_triton.cli.info import PATHS

    return list(PATHS)


def test_check_one_case(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check", "--cases", "logn", "--dtypes", "float32"]) == 0
    out = capsys.readouterr().out
    assert "logn, causal" in out and "check: 1/1 passed" in out


def test_check_quick_cases() -> None:
    """The main job's few cases: on a GPU the benchmark's own kernel variants (D = 128, causal, both
    modes, so that `bench --quick` finds them compiled) and one off the fast path; bf16 alone there."""
    quick = [c for c in check.cases(gpu=True) if c.quick]
    (d,), (causal,) = bench.GRIDS["quick"]["d"], bench.GRIDS["quick"]["causal"]
    shared = [(c.d, c.causal, c.cos, c.temperature, c.mask, c.padding, c.window) for c in quick[:2]]
    assert shared == [(d, bool(causal), cos, "infoscale", None, None, None) for cos in (False, True)]
    assert bench.PROVIDERS_QUICK == ("ours", "sdpa_cudnn")  # flex (minutes to compile) only by flag
    assert len(quick) == 3 and quick[2].lq % 16 and quick[2].d == 80
    assert check.default_dtypes(gpu=True, quick=True) == ["bfloat16"]
    assert check.default_dtypes(gpu=False, quick=True) == ["float16", "float32"]


def test_check_unknown_case(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check", "--cases", "no such case"]) == 2
    assert "logn, causal" in capsys.readouterr().err  # lists the cases there are


def test_main_job_is_check_then_quick_bench(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(check, "run_check", lambda quick: calls.append(("check", quick)) or 0)
    monkeypatch.setattr(cli, "run_bench", lambda args: calls.append(("bench", args.quick, args.plots)) or 0)
    assert cli.main([]) == 0
    assert cli.main(["--full"]) == 0
    assert calls == [("check", True), ("bench", True, True), ("check", False), ("bench", False, True)]


def test_bench_writes_json_csv_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["bench", "--smoke", "--n", "64", "--modes", "infoscale", "--providers", "ours", "eager",
            "--out", str(tmp_path)]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "grid 'smoke': D 64, N 64, causal 0 1" in out  # says which grid it runs
    if not torch.cuda.is_available():  # interpreter times: ms only, never TFLOP/s, ratios or memory
        assert "ms per call, Triton INTERPRETER" in out
        assert "TFLOP/s " not in out.replace("no TFLOP/s", "") and "nan" not in out and "MiB" not in out
    (json_path,) = tmp_path.glob("bench_attention_*.json")
    (csv_path,) = tmp_path.glob("bench_attention_*.csv")
    data = json.loads(json_path.read_text())
    records = data["results"]
    # 2 (causal) x 2 providers x 2 passes at D=64, N=64
    assert sorted((r["provider"], r["pass"], r["causal"]) for r in records) == sorted(
        (p, s, c) for p in ("ours", "eager") for s in ("fwd", "fwd_bwd") for c in (0, 1))
    assert all(r["check"] == "ok" and r["tflops"] > 0 and (r["D"], r["N"]) == (64, 64) for r in records)
    # the first call (compiling, on a GPU) is timed apart from the timed calls
    assert all(r["first_s"] > 0 and r["compile_s"] >= 0 for r in records)
    assert data["meta"]["interpreter"] == (not torch.cuda.is_available())
    with open(csv_path) as f:
        assert len(list(csv.DictReader(f))) == len(records)
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    if not HAVE_MATPLOTLIB:  # e.g. a GPU image with only torch, triton and numpy
        assert not pngs and "matplotlib is not installed" in out
        return
    assert pngs == [f"{json_path.stem}_fwd_bwd_infoscale_d64.png", f"{json_path.stem}_fwd_infoscale_d64.png"]


def test_bench_script_without_rich_or_matplotlib(tmp_path: Path) -> None:
    """benchmarks/bench_attention.py (the same code) on a machine with only torch, triton and numpy:
    plain tables, results written."""
    script = REPO / "benchmarks" / "bench_attention.py"
    argv = [str(script), "--smoke", "--n", "64", "--causal", "1", "--modes", "cos", "--passes", "fwd",
            "--providers", "ours", "--out", str(tmp_path)]
    code = ("import runpy, sys; sys.modules.update(rich=None, matplotlib=None); "
            f"sys.argv = {argv!r}; runpy.run_path(sys.argv[0], run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(),
                         timeout=300, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "--  --  ------" in out.stdout  # peers.format_table's rule: the plain table
    (json_path,) = tmp_path.glob("bench_attention_*.json")
    assert [r["check"] for r in json.loads(json_path.read_text())["results"]] == ["ok"]


def _record(provider: str, pass_: str, n: int, causal: int, tflops: float | None, **kw: object) -> dict:
    rec = {"row": "grid", "mode": "infoscale", "provider": provider, "pass": pass_, "D": 128, "N": n,
           "B": 16384 // n, "H": 16, "causal": causal, "dtype": "bfloat16", "check": "ok", "reason": "",
           "tflops": tflops, "ms": None if tflops is None else 1.0}
    return rec | kw


def _results(path: Path, records: list[dict]) -> Path:
    meta = {"gpu": "NVIDIA H100 80GB HBM3", "timestamp": "2026-11-24T19:47:44+00:00", "interpreter": False}
    path.write_text(json.dumps({"meta": meta, "results": records}))
    return path


@pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="matplotlib is not installed (the cli / test extra)")
def test_plot_from_results_json(tmp_path: Path) -> None:
    records = [_record(p, s, n, c, 100.0 + 50 * i + n / 100)
               for i, p in enumerate(("ours", "sdpa_cudnn", "sdpa_flash", "flex"))
               for s in ("fwd", "fwd_bwd") for n in (1024, 4096) for c in (0, 1)]
    records += [_record("eager", "fwd", 1024, 0, 9.0),
                _record("eager", "fwd", 4096, 0, None, reason="out of memory"),
                _record("ours", "fwd", 131072, 1, 420.0, row="long", B=1),
                _record("sdpa_flash", "fwd", 131072, 1, 300.0, row="long", B=1, check="FAIL")]
    first = _results(tmp_path / "a.json", records)
    # a later file replaces what it measured again
    second = _results(tmp_path / "b.json", [_record("ours", "fwd", 1024, 0, 999.0)])
    merged, metas = plots.load_results([first, second])
    assert len(merged) == len(records) and len(metas) == 2
    assert next(r["tflops"] for r in merged if (r["provider"], r["pass"], r["N"], r["causal"]) ==
                ("ours", "fwd", 1024, 0)) == 999.0

    assert cli.main(["plot", str(first), str(second), "--out", str(tmp_path / "png")]) == 0
    pngs = sorted(p.name for p in (tmp_path / "png").glob("*.png"))
    assert pngs == ["attention_fwd_bwd_infoscale_d128.png", "attention_fwd_infoscale_d128.png"]
    assert (tmp_path / "png" / pngs[0]).stat().st_size > 10_000
    # one file, some providers: named after the file, next to it
    assert cli.main(["plot", str(first), "--providers", "ours", "sdpa_cudnn"]) == 0
    assert (tmp_path / "a_fwd_infoscale_d128.png").exists()


def test_plot_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    path = _results(tmp_path / "a.json", [_record("ours", "fwd", 1024, 0, 100.0)])
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    assert cli.main(["plot", str(path)]) == 1
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert not list(tmp_path.glob("*.png"))


def test_plot_rejects_other_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "decode.json"
    path.write_text(json.dumps({"meta": {}, "results": [{"provider": "ours", "ms": 1.0}]}))
    assert cli.main(["plot", str(path)]) == 2
    assert "not an attention benchmark results file" in capsys.readouterr().err


def test_results_files(tmp_path: Path) -> None:
    """The harness's one results schema: {"meta", "results", summaries...} in JSON (no NaN: null) and the
    records with the main metadata columns in CSV; smoke runs write outside the tracked results."""
    assert harness.results_dir(None, smoke=True) == harness.SMOKE_RESULTS
    assert harness.TRACKED_RESULTS not in (harness.SMOKE_RESULTS, *harness.SMOKE_RESULTS.parents)
    assert harness.results_dir(None, smoke=False) == harness.TRACKED_RESULTS
    assert harness.results_dir(tmp_path, smoke=True) == tmp_path

    out = harness.ResultsFile("bench_x", tmp_path, harness.metadata(warmup_ms=5.0))
    out.add({"provider": "ours", "ms": 1.5, "tflops": float("nan"), "config": {"BLOCK_N": 64}})
    out.write(checks={"err": float("inf")})
    meta, records = harness.load_results(out.json_path)
    assert meta["warmup_ms"] == 5.0 and meta["torch"] == torch.__version__ and "git_commit" in meta
    assert records == [{"provider": "ours", "ms": 1.5, "tflops": None, "config": {"BLOCK_N": 64}}]
    assert json.loads(out.json_path.read_text())["checks"] == {"err": None}
    with open(out.csv_path) as f:
        (row,) = csv.DictReader(f)
    assert row["provider"] == "ours" and json.loads(row["config"]) == {"BLOCK_N": 64}
    assert row["gpu"] == meta["gpu"] and row["timestamp"] == meta["timestamp"]
    (tmp_path / "other.json").write_text(json.dumps({"environment": {}, "rows": []}))
    with pytest.raises(ValueError, match="not a results file"):
        harness.load_results(tmp_path / "other.json")


def test_results_log_and_markdown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Several records at once, a log beside the results (stamped with the seconds since the start), no
    half-written file left behind, and the markdown table of the scripts that print one."""
    out = harness.ResultsFile("bench_x", tmp_path, harness.metadata(), started=time.time() - 2)
    out.add({"point": "a", "us": 1.0}, {"point": "b", "us": 2.0})
    out.log("measured")
    assert harness.load_results(out.json_path)[1] == [{"point": "a", "us": 1.0}, {"point": "b", "us": 2.0}]
    assert re.fullmatch(r"\[\s*2\.\d s\] measured\n", out.log_path.read_text())
    assert "measured" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [out.json_path.name, out.csv_path.name, out.log_path.name])
    assert console.format_markdown(["point", "us"], [["a", "1.0"], ["b", "-"]]) == (
        "| point | us |\n|---|---|\n| a | 1.0 |\n| b | - |")


def test_eager_and_host_timing_call_in_turn() -> None:
    """harness.eager_ms and host_ms cycle over the calls in order, n calls per round."""
    seen: list[int] = []
    calls = [lambda i=i: seen.append(i) for i in range(3)]
    assert harness.eager_ms(calls, 4, rounds=2) >= 0
    assert seen == [0, 1, 2, 0] * 2
    seen.clear()
    assert harness.host_ms(calls, 5) >= 0
    assert seen == [0, 1, 2, 0, 1]
