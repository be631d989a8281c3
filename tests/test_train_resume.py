"""A training run killed with SIGKILL and resumed ends with the weights of a run never interrupted."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from captionkit.train import synthetic

pytest.importorskip("pycocoevalcap")

TRAIN = [sys.executable, "-m", "captionkit.train", "cnn-lstm"]
# One thread: the same kernels in every process, so equal inputs give equal floats.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# Dropout draws from the RNG, so resuming must restore it too, not only the weights.
TINY = ["--image-size", "64", "--embed-dim", "16", "--attention-dim", "16", "--hidden-dim", "32",
        "--min-word-count", "1", "--dropout", "0.3", "--batch-size", "8", "--learning-rate", "3e-3",
        "--val-fraction", "0.25", "--deterministic", "--no-progress", "--patience", "5"]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    return synthetic.write_dataset(tmp_path_factory.mktemp("scenes"), train=24, test=2, size=64).train


def _command(root: Path, output: Path, epochs: int) -> list[str]:
    return [*TRAIN, "--dataset", "folder", "--root", str(root), "--output", str(output),
            "--epochs", str(epochs), *TINY]


def _losses(output: Path) -> list[tuple[str, ...]]:
    """metrics.csv without the timing columns."""
    with open(output / "metrics.csv", newline="") as file:
        return [(r["epoch"], r["train_loss"], r["val_loss"], r["BLEU-4"], r["CIDEr-D"], r["learning_rate"])
                for r in csv.DictReader(file)]


def test_sigkill_then_resume_gives_the_uninterrupted_weights(scenes, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = subprocess.run(_command(scenes, straight, 3), env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr

    proc = subprocess.Popen(_command(scenes, killed, 3), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not (killed / "metrics.csv").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # during epoch 2: epoch 1's checkpoint is all that counts
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert len(_losses(killed)) < 3

    resumed = subprocess.run([*TRAIN, "--resume", str(killed)], env=ENV, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    want, got = load_file(str(straight / "last" / "model.safetensors")), load_file(
        str(killed / "last" / "model.safetensors"))
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert _losses(killed) == _losses(straight)
    assert (killed / "best" / "model.safetensors").read_bytes() == (
        straight / "best" / "model.safetensors").read_bytes()


def test_ctrl_c_says_how_to_go_on_and_exits_130(scenes, tmp_path):
    output = tmp_path / "run"
    # Ctrl-C's default action, even where the tests run in the background (which ignores it)
    proc = subprocess.Popen(_command(scenes, output, 3), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while not (output / "train.json").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)  # training has begun: the run's options are recorded
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "interrupted; continue with --resume"
