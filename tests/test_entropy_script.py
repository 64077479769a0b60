"""The entropy diagnostics script (benchmarks/entropy.py) end to end at --smoke sizes, in a subprocess
(Triton's interpreter on CPU-only machines): every (input, method, length) entry, finite values, the fused
entropy against the float64 reference, the PNG; and models saved by extrapolation's checkpoint code read
back by --checkpoint."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from infoscale_triton import reference
from infoscale_triton.cli import textmodel

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "entropy.py"
TEMPERATURES = ("none", "logn", "infoscale")
# the smoke run is float32 through the interpreter: the fused entropy matches float64 to ~1e-6
TOLERANCE = 1e-4


def load_script() -> ModuleType:
    """benchmarks/entropy.py in this process (a script: loaded from its file)."""
    name = "entropy_script"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SCRIPT)
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def run_script(*args: str) -> dict:
    """Run entropy.py --smoke with args; return its JSON report."""
    out = Path(args[args.index("--out") + 1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", *args], env=env, check=False,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # e.g. numpy's "invalid value encountered in multiply" from an interpreted kernel making a NaN
    assert "RuntimeWarning" not in proc.stderr, proc.stderr[-3000:]
    assert "InfoScale keeps the attention entropy flatter" in proc.stdout
    (json_path,) = out.glob("entropy_*.json")
    return json.loads(json_path.read_text())


def check_rows(report: dict, panels: dict[str, tuple[str, ...]]) -> None:
    """Every (panel, logits, temperature, length) once, finite, bounded by ln n, checked against the
    reference within TOLERANCE."""
    lengths = report["settings"]["lengths"]
    seen = [(r["input"], r["logits"], r["temperature"], r["length"]) for r in report["results"]]
    want = {(panel, logits, t, n) for panel, kinds in panels.items()
            for logits, t, n in itertools.product(kinds, TEMPERATURES, lengths)}
    assert len(seen) == len(set(seen)) and set(seen) == want
    for r in report["results"]:
        values = [r["entropy"], r["max_prob"], r["uniform"], *r.get("entropy_layers", [])]
        assert all(math.isfinite(x) for x in values), r
        assert 0 <= r["entropy"] <= r["uniform"] + 1e-4 and 0 < r["max_prob"] <= 1, r
        ref = r["reference"]
        assert ref["status"] == "checked", r
        assert ref["rel_err_entropy"] < TOLERANCE and ref["rel_err_max_prob"] < TOLERANCE, r
    for panel in panels:
        assert report["reference_summary"][panel]["checked_up_to"] == max(lengths)


def test_smoke_writes_every_entry(tmp_path: Path) -> None:
    """Random inputs and the two models trained by the script itself (a few steps)."""
    report = run_script("--out", str(tmp_path))
    panels = {"random_d16": ("dot", "cos"), "random_d32": ("dot", "cos"), "model_dot": ("dot",),
              "model_cos": ("cos",)}
    check_rows(report, panels)
    assert report["model"]["training"]["dot"]["steps"] > 0
    assert len(report["flatness"]) == 6 and report["verdict"]

    pngs = list(tmp_path.glob("entropy_*.png"))
    if importlib.util.find_spec("matplotlib") is not None:
        assert len(pngs) == 1 and report["png"] == pngs[0].name
    else:
        assert not pngs and report["png"] is None


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    """textmodel.save_checkpoint (what extrapolation.py --save-checkpoint writes) read by entropy.py
    --checkpoint: the models are rebuilt with the saved config (layers, cos_scale) and their weights."""
    cfg = textmodel.smoke_config(textmodel.Config(cos_scale=24.0))
    states = {}
    for name in textmodel.MODELS:
        torch.manual_seed(len(name))
        states[name] = textmodel.Transformer(cfg).state_dict()
    ckpt = tmp_path / "models.pt"
    textmodel.save_checkpoint(ckpt, cfg, states, {"dot": {"steps": 0}})
    loaded_cfg, models, _ = textmodel.load_checkpoint(ckpt, torch.device("cpu"))
    assert loaded_cfg == cfg and set(models) == set(textmodel.MODELS)
    assert torch.equal(models["cos"].embed.weight, states["cos"]["embed.weight"])

    report = run_script("--no-random", "--checkpoint", str(ckpt), "--out", str(tmp_path))
    check_rows(report, {"model_dot": ("dot",), "model_cos": ("cos",)})
    assert report["model"]["config"]["cos_scale"] == 24.0
    assert report["model"]["training"]["checkpoint"] == str(ckpt)


def test_reference_guard_records_the_first_oom(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bookkeeping of the GPU's out-of-memory demonstration, without a GPU: an attempt that raises
    OutOfMemoryError is recorded as "oom" and the panel's longer lengths are skipped, other panels not."""
    guard = load_script().ReferenceGuard(torch.device("cpu"), max_length=0, oom_attempt=True)
    q, k = torch.randn(2, 1, 2, 64, 16).unbind(0)
    opts = {"is_causal": True, "temperature": "infoscale", "train_len": 16}
    h, p = reference.attention_entropy(q.double(), k.double(), **opts)
    ok = guard.check("a", q[:, :, :32], k[:, :, :32], h[..., :32].float(), p[..., :32].float(), **opts)
    assert ok["status"] == "checked" and ok["rel_err_entropy"] < 1e-6

    def out_of_memory(*args: object, **kwargs: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(guard, "_run", out_of_memory)
    assert guard.check("a", q[:, :, :32], k[:, :, :32], h, p, **opts)["status"] == "oom"
    assert guard.oom_length == {"a": 32}
    later = guard.check("a", q, k, h, p, **opts)
    assert later["status"] == "skipped" and "out of memory at 32" in later["reason"]
    monkeypatch.undo()
    assert guard.check("b", q, k, h.float(), p.float(), **opts)["status"] == "checked"
