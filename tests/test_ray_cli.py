"""`captionkit caption --engine ray` as a user types it: the same outputs as a local run."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("ray")
pytestmark = pytest.mark.ray


def caption(*args) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "captionkit", "caption", *map(str, args)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    return done


@pytest.mark.slow
@pytest.mark.timeout(1200)  # two runs, one starting Ray: minutes on a busy machine
def test_the_ray_engine_writes_what_the_local_engine_writes(blip_dir, photo_dir, tmp_path):
    common = ["--model", blip_dir, "--device", "cpu", "--dtype", "float32", "--max-new-tokens", "5",
              "-q", "-f", "captions.txt,csv"]
    caption(photo_dir, "-o", tmp_path / "local", *common)
    on_ray = caption(photo_dir, "-o", tmp_path / "ray", *common, "--engine", "ray", "--ray-workers", "1",
                     "--cpus-per-worker", "1", "--local-cpus", "2")
    assert "8 captioned" in on_ray.stderr
    local, ray = tmp_path / "local", tmp_path / "ray"
    assert (ray / "captions.txt").read_text() == (local / "captions.txt").read_text()
    assert (ray / "captions.csv").read_text().count("\n") == (local / "captions.csv").read_text().count("\n")
    # resuming on Ray: tests/test_ray.py::test_a_killed_driver_resumes_from_the_store
