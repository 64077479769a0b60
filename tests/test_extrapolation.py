"""The extrapolation experiment's --smoke mode end to end (benchmarks/extrapolation.py): tiny sizes, run
in a subprocess (Triton's interpreter on CPU-only machines), checking what it writes."""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "extrapolation.py"


def test_smoke_writes_every_entry(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    ckpt = tmp_path / "models.pt"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path), "--save-checkpoint",
                           str(ckpt)], env=env, check=False, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "paper's ranking" in proc.stdout

    (json_path,) = tmp_path.glob("extrapolation_*.json")
    report = json.loads(json_path.read_text())
    lengths = report["config"]["lengths"]
    seen = {(r["model"], r["temperature"], r["length"]) for r in report["results"]}
    assert seen == set(itertools.product(("dot", "cos"), ("none", "logn", "infoscale"), lengths))
    assert all(0 <= r["accuracy"] <= 1 and r["loss"] > 0 for r in report["results"])
    assert report["verdict"] and report["training"]["dot"]["steps"] > 0

    # --save-checkpoint: both models and the Config as plain data (benchmarks/entropy.py --checkpoint)
    saved = torch.load(ckpt, weights_only=True)
    assert saved["config"] == report["config"] and set(saved["models"]) == {"dot", "cos"}
    assert report["checkpoint"] == str(ckpt)

    pngs = list(tmp_path.glob("extrapolation_*.png"))
    if importlib.util.find_spec("matplotlib") is not None:
        assert len(pngs) == 1 and report["png"] == pngs[0].name
    else:
        assert not pngs and report["png"] is None
