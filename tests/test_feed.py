"""benchmarks/feed.py runs end to end on the CPU, and its numbers mean what they say.

Correctness only: no timing is asserted (CI machines are too noisy for that).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def feed(*args: str, cwd: Path, ok: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(BENCHMARKS / "feed.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600, check=False)
    assert (done.returncode == 0) == ok, done.stderr[-3000:]
    return done


def test_files_quick_makes_the_processors_inputs_per_core(tmp_path):
    out = tmp_path / "files.json"
    feed("files", "--quick", "--work", str(tmp_path / "work"), "--out", str(out), cwd=tmp_path)
    result = json.loads(out.read_text())
    assert result["settings"]["torch_threads"] == 1
    photos = result["settings"]["sets"]["photos"]
    assert photos["megapixels_min"] >= 0.3 and photos["megapixels_max"] <= 1.0
    assert result["settings"]["sets"]["12mp"]["megapixels_min"] == 12.0
    for image_set in ("12mp", "photos"):
        rows = result[image_set]
        decoders = rows.pop("decoders")
        assert set(rows) == {"decode", "today", "threads"}, "nvjpeg only with --device cuda"
        assert {"pillow_draft", "pillow_draft_fastest_idct", "opencv_reduced",
                "torchvision_full"} <= set(decoders)
        assert decoders["fastest_decode_alone_vs_today"] == pytest.approx(
            decoders[decoders["fastest"]] / rows["today"]["images_per_second_per_core"])
        assert all(row["images_per_second_per_core"] > 0 and row["images_per_second_wall"] > 0
                   for row in rows.values())
        for name in ("today", "threads"):
            # the decoding threads' inputs are the processor's, bit for bit
            assert rows[name]["max_abs_vs_processor_same_decode"] == 0.0
            # what each adds to the decode both share
            assert rows[name]["preprocess_ms_per_image"] == pytest.approx(
                1000 / rows[name]["images_per_second_per_core"]
                - 1000 / rows["decode"]["images_per_second_per_core"])
        assert rows["today"]["per_core_vs_today"] == rows["today"]["preprocessing_vs_today"] == 1.0
    # draft decoding shows against a full decode of the 12 MP JPEGs; the quick set's two photos
    # (720x480 and 800x600) are too small to be drafted
    assert 0 < result["12mp"]["threads"]["max_abs_vs_processor_full_decode"] < 0.5
    assert result["photos"]["threads"]["max_abs_vs_processor_full_decode"] == 0.0
    photo = sorted((tmp_path / "work" / "feed-photos").iterdir())[0]
    assert Image.open(photo).format == "JPEG"


def test_pipeline_quick_compares_captions_with_todays_path(tmp_path):
    out = tmp_path / "pipeline.json"
    work = str(tmp_path / "work")
    feed("pipeline", "--quick", "--work", work, "--out", str(out), cwd=tmp_path)
    result = json.loads(out.read_text())
    rows = result["contenders"]
    assert set(rows) == {"today", "threads"} and result["settings"]["dtype"] == "float32"
    assert rows["threads"]["identical_to_today"] == 1.0 and rows["today"]["vs_today"] == 1.0
    assert all(row["images_per_cpu_second"] > 0 and row["gpu_utilization"] is None for row in rows.values())
    assert result["captions"]["threads"] == result["captions"]["today"]
    assert len(set(result["captions"]["today"])) > 1, "random-weight captions that differ per image"
    skipped = tmp_path / "no-model.json"
    feed("pipeline", "--quick", "--no-model", "--work", work, "--out", str(skipped), cwd=tmp_path)
    assert set(json.loads(skipped.read_text())["captions"]["today"]) == {"-"}


def test_pipeline_refuses_the_cuda_contenders_on_a_cpu(tmp_path):
    done = feed("pipeline", "--quick", "--contenders", "today,graphs", "--work", str(tmp_path / "work"),
                cwd=tmp_path, ok=False)
    assert "need --device cuda" in done.stderr


def test_gpu_script_is_valid_bash_and_names_its_feed_part(tmp_path):
    script = BENCHMARKS / "gpu.sh"
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    usage = subprocess.run(["bash", str(script), str(tmp_path), "nonsense"], capture_output=True,
                           text=True, check=False)
    assert usage.returncode == 2 and "|feed|feed-families" in usage.stderr
