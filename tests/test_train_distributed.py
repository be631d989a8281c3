"""Several processes (torch.distributed on the CPU, gloo), gradient accumulation and mixed precision."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from captionkit.errors import OptionError
from captionkit.train import CnnLstmOptions, TrainOptions, synthetic, train
from captionkit.train.curves import read_metrics

pytest.importorskip("pycocoevalcap")


pytestmark = pytest.mark.usefixtures("one_torch_thread")

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TINY = ["--image-size", "64", "--embed-dim", "16", "--attention-dim", "16", "--hidden-dim", "32",
        "--min-word-count", "1", "--dropout", "0", "--learning-rate", "3e-3", "--val-fraction", "0.2",
        "--epochs", "2", "--deterministic", "--no-progress"]


@pytest.fixture(scope="module")
def even_captions(tmp_path_factory) -> Path:
    """40 scenes with one 7-word caption each ("two red circles and a blue square", "a red circle on
    a plain background"): every batch then has as many tokens as any other, so the mean loss of two
    half batches is the mean loss of the whole batch, and two processes can match one exactly."""
    folder = synthetic.write_split(tmp_path_factory.mktemp("even"), 40, seed=5, size=64)
    for sidecar in folder.glob("*.txt"):
        sidecar.write_text(sidecar.read_text().splitlines()[2] + "\n")
    assert {len(p.read_text().split()) for p in folder.glob("*.txt")} == {7}
    return folder


def _weights(output: Path) -> dict[str, torch.Tensor]:
    return load_file(str(output / "last" / "model.safetensors"))


def assert_same_training(one: Path, other: Path) -> None:
    """Equal losses every epoch, and equal weights up to Adam's step size: Adam divides each gradient
    by its own running size, so a weight whose gradient is a near-zero sum of large terms moves by up
    to the learning rate on rounding noise alone (the order floats are summed in differs)."""
    first, second = read_metrics(one / "metrics.csv"), read_metrics(other / "metrics.csv")
    for a, b in zip(first, second, strict=True):
        assert a["step"] == b["step"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
    want, got = _weights(one), _weights(other)
    assert all(torch.allclose(want[k], got[k], atol=1e-2) for k in want)
    assert sum((want[k] - got[k]).norm() ** 2 for k in want) ** 0.5 < 0.01 * sum(
        want[k].norm() ** 2 for k in want) ** 0.5


def test_two_cpu_processes_train_like_one_process_with_both_batches(even_captions, tmp_path):
    common = ["-m", "captionkit.train", "cnn-lstm", "--dataset", "folder", "--root", str(even_captions),
              *TINY]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", *common,
                          "--output", str(tmp_path / "two"), "--batch-size", "4"],
                         env=ENV, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("best:") == 1  # only the main process reports
    one = subprocess.run([sys.executable, *common, "--output", str(tmp_path / "one"), "--batch-size", "8"],
                         env=ENV, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    summary = json.loads((tmp_path / "two" / "last" / "training.json").read_text())
    assert summary["processes"] == 2 and "gloo" in summary["backend"]
    assert_same_training(tmp_path / "one", tmp_path / "two")


def _options(root: Path, output: Path, **changes) -> TrainOptions:
    settings = {"dataset": "folder", "root": root, "output": output, "epochs": 2, "batch_size": 8,
                "learning_rate": 3e-3, "val_fraction": 0.2, "progress": False, "seed": 0}
    return TrainOptions(**{**settings, **changes})


TINY_MODEL = CnnLstmOptions(image_size=64, embed_dim=16, attention_dim=16, hidden_dim=32, min_word_count=1,
                            dropout=0.0)


def test_gradient_accumulation_adds_up_to_the_larger_batch(even_captions, tmp_path):
    whole = train(_options(even_captions, tmp_path / "whole"), TINY_MODEL)
    halves = train(_options(even_captions, tmp_path / "halves", batch_size=4, grad_accumulation=2,
                            cache_dir=tmp_path / "whole" / "cache"), TINY_MODEL)
    assert halves.history[-1]["step"] == whole.history[-1]["step"] == 8
    assert_same_training(whole.output, halves.output)


def test_bf16_autocast_trains_and_fp16_needs_a_gpu(even_captions, tmp_path, monkeypatch):
    seen = set()
    original = torch.nn.Linear.forward

    def forward(self, x):
        out = original(self, x)
        seen.add(out.dtype)
        return out

    monkeypatch.setattr(torch.nn.Linear, "forward", forward)
    result = train(_options(even_captions, tmp_path / "bf16", mixed_precision="bf16"), TINY_MODEL)
    assert torch.bfloat16 in seen  # the forward pass ran under autocast
    assert 0 < result.history[0]["train_loss"] < 10
    with pytest.raises(OptionError, match="fp16 needs a CUDA GPU"):
        train(_options(even_captions, tmp_path / "fp16", mixed_precision="fp16", device="cpu"), TINY_MODEL)
