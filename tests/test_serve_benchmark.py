"""benchmarks/serve.py runs end to end on the tiny model (no timing asserted: CI is too noisy)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "serve.py"


@pytest.mark.slow
def test_serve_benchmark_quick_runs_end_to_end(tmp_path):
    out = tmp_path / "serve.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--requests", "8", "--concurrency", "4",
                           "--tokens", "3", "--max-batch-size", "4", "--work", str(tmp_path / "work"),
                           "--out", str(out)], capture_output=True, text=True, timeout=600,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["settings"]["size"] == "tiny" and result["settings"]["tokens"] == 3
    one, batched = result["runs"]["one_at_a_time"], result["runs"]["dynamic_batching"]
    assert one["mean_batch_images"] == 1.0 and batched["max_batch_size"] == 4
    for run in (one, batched):
        assert run["requests"] == 8 and run["requests_per_second"] > 0
        assert 0 < run["p50_s"] <= run["p95_s"] and all(run["captions"])
    # float32 batches are batch-invariant: the same captions whichever way the requests ran
    assert result["summary"]["identical_captions"] is True
    assert result["summary"]["speedup_requests_per_second"] > 0
