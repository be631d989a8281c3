"""benchmarks/segment.py runs end to end (no timing is asserted: shared machines are too noisy)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_segment_benchmark_quick_runs_end_to_end(tmp_path):
    out = tmp_path / "segment.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "segment.py"), "--quick", "--out",
                           str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["settings"]["model"] == "maskrcnn" and result["settings"]["input_size"] == 160
    rows = result["contenders"]
    assert set(rows) == {"naive", "captionkit", "captionkit-full-decode"}
    assert all(row["images_per_second"] > 0 and row["ratio_to_naive"] > 0 for row in rows.values())
    # the same weights and thresholds find as many regions either way
    assert rows["naive"]["regions"] == rows["captionkit-full-decode"]["regions"] > 0
