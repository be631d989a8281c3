"""benchmarks/train.py runs end to end on a tiny dataset (structure only: no score is asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("pycocoevalcap")

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "train.py"


@pytest.mark.slow  # two architectures trained and scored: 15 s on a quiet machine, minutes on a busy one
def test_train_benchmark_quick(tmp_path):
    out = tmp_path / "train.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--work", str(tmp_path / "work"),
                           "--out", str(out), "--curves", str(tmp_path / "curves")],
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["architectures"]) == {"cnn-lstm", "clipcap"}
    cnn = result["architectures"]["cnn-lstm"]
    assert set(cnn["scores"]) == {"cnn-lstm (beams 1)", "cnn-lstm (beams 3)", "nearest neighbour (map)"}
    assert "nearest neighbour (pooled)" in result["architectures"]["clipcap"]["scores"]
    training = cnn["training"]
    assert training["epochs_run"] == 2 and training["images_per_s"] > 0
    assert training["uncached_epoch_seconds"] > training["epoch_seconds"]
    assert {p.name for p in (tmp_path / "curves").iterdir()} == {"train_cnn_lstm.png", "train_clipcap.png"}
    assert "| cnn-lstm (beams 1) |" in done.stdout


@pytest.mark.slow  # a tiny BLIP trained one epoch in a subprocess
def test_train_benchmark_blip_records_speed_only(tmp_path):
    """`--only blip` trains BLIP-base's architecture with random weights: a speed, and no scores."""
    out = tmp_path / "train.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--only", "blip", "--epochs", "1",
                           "--work", str(tmp_path / "work"), "--out", str(out)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    blip = json.loads(out.read_text())["architectures"]["blip"]
    assert blip["scores"] == {} and blip["weights"] == "random (speed only)"
    assert blip["training"]["epochs_run"] == 1 and blip["training"]["images_per_s"] > 0
    assert "| blip" not in done.stdout
