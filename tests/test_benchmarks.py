"""The benchmark harness runs end to end on tiny models, and the speed paths it measures are correct.

Correctness only: no timing is asserted (CI machines are too noisy for that).
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from captionkit.device import pick_dtype
from captionkit.models import load
from captionkit.options import GenerationOptions, LoadOptions

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
GEN = GenerationOptions(max_new_tokens=8, min_new_tokens=8)


def run_script(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(BENCHMARKS / name), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_throughput_quick_runs_end_to_end_and_compares_dtypes(tmp_path):
    """A float32 run with every kind of variant, then a bf16 run (the GPU's default) measured
    against the float32 script users run and reporting its share of float32's captions."""
    work, float32, bfloat16 = tmp_path / "work", tmp_path / "float32.json", tmp_path / "bfloat16.json"
    run_script("throughput.py", "--quick", "--no-memory", "--work", str(work), "--out", str(float32),
               "--variants", "int8,full-decode,batch-2+workers-1", cwd=tmp_path)
    result = json.loads(float32.read_text())
    assert result["settings"]["dtype"] == "float32" and result["settings"]["images"] == 3
    assert set(result["contenders"]) == {"naive", "pipeline-8", "captionkit", "captionkit-int8",
                                         "captionkit-full-decode", "captionkit-batch-2+workers-1"}
    for row in result["contenders"].values():
        assert row["images_per_second"] > 0 and "peak_rss_mb" not in row
        assert len(row["runs"]) == 1 and row["ratio_to_naive"] > 0
    # float32 captions from batches and threads are the naive loop's, word for word
    assert result["contenders"]["captionkit"]["identical_to_naive"] == 1.0
    assert result["captions"]["captionkit"] == result["captions"]["naive"]
    assert result["captions"]["captionkit-full-decode"] == result["captions"]["naive"]
    assert result["captions"]["captionkit-batch-2+workers-1"] == result["captions"]["naive"]
    assert all(result["captions"]["captionkit-int8"])
    assert result["summary"]["captionkit-int8_vs_naive"] > 0
    assert all(result["captions"]["naive"])
    summary = result["summary"]
    assert summary["matmul_peak_gflops"] > 0 and result["model"]["flops_per_image"] > 0
    assert 0 < summary["captionkit_fraction_of_peak"] < 1

    done = run_script("throughput.py", "--quick", "--dtype", "bfloat16", "--naive-dtype", "float32",
                      "--work", str(work), "--compare-to", str(float32), "--out", str(bfloat16), cwd=tmp_path)
    mixed = json.loads(bfloat16.read_text())
    assert mixed["settings"]["dtype"] == "bfloat16" and mixed["settings"]["naive_dtype"] == "float32"
    weights = {name: row["weights"] for name, row in mixed["contenders"].items()}
    assert weights == {"naive": "float32", "pipeline-8": "bfloat16", "captionkit": "bfloat16"}
    assert "bfloat16 (naive in float32)" in done.stdout and "same as float32 naive" in done.stdout
    reference = result["captions"]["naive"]
    for name, row in mixed["contenders"].items():
        same = sum(a == b for a, b in zip(mixed["captions"][name], reference, strict=True))
        assert row["identical_to_float32_naive"] == same / len(reference)
        assert row["peak_rss_mb"] > 0  # each contender's memory, measured in a process of its own
    assert mixed["contenders"]["naive"]["identical_to_float32_naive"] == 1.0


@pytest.mark.slow
def test_decode_quick_runs_end_to_end(tmp_path):
    out = tmp_path / "decode.json"
    run_script("decode.py", "--quick", "--work", str(tmp_path / "work"), "--out", str(out), cwd=tmp_path)
    result = json.loads(out.read_text())
    assert set(result["ms_per_image"]) == {"full decode", "captionkit decode", "full -> model input",
                                           "captionkit -> model input"}
    assert min(result["settings"]["captionkit_decoded_size"]) >= 384
    assert result["model_input_mean_abs_difference"] < 0.05


@pytest.mark.slow
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator settings")
def test_allocator_quick_runs_each_kind_of_setting(tmp_path):
    out = tmp_path / "allocator.json"
    # three of the five settings (a process each): captionkit's thresholds, the batch at once with
    # them lowered, and raised
    settings = ["captionkit", "batched-1mib", "kept-32mib"]
    run_script("allocator.py", "--quick", "--settings", ",".join(settings), "--work", str(tmp_path / "work"),
               "--out", str(out), cwd=tmp_path)
    rows = json.loads(out.read_text())["results"]
    assert list(rows) == settings
    for row in rows.values():
        assert row["images_per_second"] > 0 and row["peak_rss_mb"] > 0
        assert row["page_faults_per_image"] > 0
        # where memory comes from never changes a caption
        assert row["same_captions_as_first"] is True


@pytest.mark.slow
def test_levers_quick_measures_compile_in_the_dtype_asked(tmp_path):
    out = tmp_path / "compile.json"
    run_script("levers.py", "compile", "--quick", "--dtype", "bfloat16", "--work", str(tmp_path / "work"),
               "--out", str(out), cwd=tmp_path)
    result = json.loads(out.read_text())
    assert result["dtype"] == "bfloat16" and result["size"] == "tiny" and result["images"] == 4
    rows = result["results"]
    assert rows["eager"]["images_per_second"] > 0 and rows["compiled vision encoder"]["images_per_second"] > 0
    # the compile time is the first batch's excess over a steady batch of as many images (4 here)
    compiled = rows["compiled vision encoder"]["images_per_second"]
    assert rows["compile"]["compile_seconds"] == pytest.approx(
        rows["compile"]["first_batch_seconds"] - result["images"] / compiled)
    assert 0 < rows["compile"]["compile_seconds"] < rows["compile"]["first_batch_seconds"]
    assert rows["compile"]["weights"] == "bfloat16"


@pytest.mark.slow
def test_levers_quick_threads_and_streams_give_the_same_captions(tmp_path):
    out = tmp_path / "threads.json"
    run_script("levers.py", "threads", "--quick", "--work", str(tmp_path / "work"), "--out", str(out),
               cwd=tmp_path)
    rows = json.loads(out.read_text())["results"]
    assert len(rows["torch threads"]) == 3 and any("streams" in name for name in rows["torch threads"])
    for group in rows.values():
        for row in group.values():
            assert row["images_per_second"] > 0 and row["same_captions_as_first"] == 1.0


@pytest.mark.slow
@pytest.mark.parametrize(("model", "encoders"), [
    ("blip-base", ["encoder vision_model"]),
    ("blip2-opt-2.7b", ["encoder vision_model", "encoder qformer"]),
    ("vit-gpt2", ["encoder encoder"]),
    ("git-base", ["encoder git.image_encoder"]),
])
def test_breakdown_accounts_for_a_whole_batch(tmp_path, model, encoders):
    out = tmp_path / "breakdown.json"
    run_script("breakdown.py", "--quick", "--model", model, "--work", str(tmp_path / "work"),
               "--out", str(out), cwd=tmp_path)
    result = json.loads(out.read_text())
    stages = result["seconds_per_batch"]
    assert list(stages) == ["processor", *encoders, "decoder, first call",
                            "decoder, later steps (x19)", "rest", "total"]
    # every stage was seen, and the stages add up to the batch's wall time
    assert all(stages[name] > 0 for name in stages if name != "rest")
    assert stages["rest"] >= 0
    assert sum(stages[name] for name in stages if name != "total") == pytest.approx(stages["total"])
    assert result["settings"]["batch"] == 2 and "gpu_busy_share" not in result
    assert result["page_faults_per_batch"] >= 0


def test_batch_captions_equal_single_captions_in_float32(blip_dir, photos):
    captioner = load(str(blip_dir), LoadOptions(device="cpu", dtype="float32"))
    batched = [c.text for c in captioner.caption(photos, GEN)]
    single = [captioner.caption([image], GEN)[0].text for image in photos]
    assert batched == single and len(set(batched)) > 1


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_float32_and_bfloat16_paths_run(blip_dir, photos, dtype):
    captioner = load(str(blip_dir), LoadOptions(device="cpu", dtype=dtype))
    assert next(captioner.model.parameters()).dtype == getattr(torch, dtype)
    captions = captioner.caption(photos, GEN)
    assert len(captions) == len(photos) and all(c.text for c in captions)


def test_auto_dtype_is_float32_on_cpus_without_fast_bfloat16(monkeypatch):
    from captionkit import device

    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: False)
    assert pick_dtype("auto", torch.device("cpu")) is torch.float32
    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: True)
    assert pick_dtype("auto", torch.device("cpu")) is torch.bfloat16


def test_fused_blip_vision_attention_matches_transformers(blip_dir, photos):
    from transformers import BlipForConditionalGeneration

    captioner = load(str(blip_dir), LoadOptions(device="cpu", dtype="float32"))
    eager = BlipForConditionalGeneration.from_pretrained(blip_dir).eval()
    pixels = captioner.processor(images=photos, return_tensors="pt").pixel_values
    with torch.inference_mode():
        fused_out = captioner.model.vision_model(pixel_values=pixels)[0]
        eager_out = eager.vision_model(pixel_values=pixels)[0]
    assert "forward" in vars(captioner.model.vision_model.encoder.layers[0].self_attn)
    torch.testing.assert_close(fused_out, eager_out, rtol=1e-4, atol=1e-4)


def test_blip_vision_encoder_on_the_cpu_takes_one_image_at_a_time(blip_fp32, photos):
    vision = blip_fp32.model.vision_model
    pixels = blip_fp32.processor(images=photos, return_tensors="pt").pixel_values
    rows_per_call = []
    hook = vision.embeddings.register_forward_hook(
        lambda module, args, output: rows_per_call.append(len(output)))
    try:
        with torch.inference_mode():
            batch = vision(pixel_values=pixels, output_hidden_states=True)
            assert rows_per_call == [1] * len(photos)
            alone = [vision(pixel_values=row, output_hidden_states=True) for row in pixels.split(1)]
    finally:
        hook.remove()
    # the batch's features are each image's own, exactly, hidden states of every layer included
    assert batch.last_hidden_state.shape[0] == len(photos) > 1
    for key in ("last_hidden_state", "pooler_output"):
        assert torch.equal(batch[key], torch.cat([one[key] for one in alone]))
    assert len(batch.hidden_states) == len(alone[0].hidden_states)
    for layer, states in enumerate(batch.hidden_states):
        assert torch.equal(states, torch.cat([one.hidden_states[layer] for one in alone]))


@pytest.mark.slow
def test_matmuls_quick_times_every_kernel_and_counts_the_encoder_flops_right(tmp_path):
    import importlib.util

    from transformers import BlipVisionConfig, BlipVisionModel

    spec = importlib.util.spec_from_file_location("matmuls", BENCHMARKS / "matmuls.py")
    matmuls = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(matmuls)  # puts benchmarks/ on sys.path for its own `common`
    common = matmuls.common
    out = tmp_path / "matmuls.json"
    run_script("matmuls.py", "--quick", "--naive", "0.5", "--out", str(out), cwd=tmp_path)
    result = json.loads(out.read_text())
    for table in ("encoder_one_image", "decoder_step_batch_16"):
        for row in result[table].values():
            assert row["kernels"]["F.linear (MKL sgemm)"]["gflops"] > 0  # what captionkit runs
    assert result["float32_bound"]["seconds_per_image_at_target"] == pytest.approx(1 / 3)
    # the formula against torch's own count, on one full-width BLIP-base encoder layer
    config = BlipVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=1,
                              num_attention_heads=12, image_size=384, patch_size=16)
    model = BlipVisionModel(config).eval()
    counted = common.count_flops(lambda: model(torch.zeros(1, 3, 384, 384)))
    assert matmuls.encoder_flops(layers=1) == counted


def test_score_quick_compares_threads_with_todays_loading(tmp_path):
    out = tmp_path / "score.json"
    run_script("score.py", "--quick", "--work", str(tmp_path / "work"), "--out", str(out), cwd=tmp_path)
    result = json.loads(out.read_text())
    assert result["settings"]["images"] == 4 and result["identical_scores"] is True
    assert set(result["contenders"]) == {"today", "threads"}
    assert all(row["images_per_second"] > 0 and len(row["runs"]) == 1
               for row in result["contenders"].values())
    assert result["contenders"]["today"]["vs_today"] == 1.0


def test_ray_overhead_times_the_first_batch_and_the_steady_rate_after_it(monkeypatch, tmp_path):
    import sqlite3

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import ray_overhead

    for name, times in (("one", [5.0, 5.0]), ("three", [5.0, 5.0, 6.0, 7.0, 7.0])):
        (tmp_path / name).mkdir()
        with sqlite3.connect(tmp_path / name / "captionkit.db") as db:
            db.execute("CREATE TABLE results (updated REAL)")
            db.executemany("INSERT INTO results VALUES (?)", [(t,) for t in times])
            db.execute("CREATE TABLE runs (started REAL)")
            db.execute("INSERT INTO runs VALUES (1.5)")
    assert ray_overhead.steady_rate(tmp_path / "one") is None
    assert ray_overhead.first_batch_seconds(tmp_path / "three") == 3.5
    assert ray_overhead.steady_rate(tmp_path / "three") == 1.5  # 3 images after the first batch, in 2 s
    assert ray_overhead.steady_ratio({"local": [3.0], "ray": [None]}) is None
    assert ray_overhead.steady_ratio({"local": [3.0, 1.0], "ray": [1.0, 1.0]}) == 2.0


def test_ray_overlap_takes_the_models_time_out_of_the_hosts_rate(monkeypatch, tmp_path):
    import sqlite3

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import ray_overlap

    # batches of 2 recorded at 5, 6 and 8 s; the model took 0.25 s per image of the later two
    rows = [(5.0, 0.1), (5.0, 0.1), (6.0, 0.25), (6.0, 0.25), (8.0, 0.25), (8.0, 0.25)]
    with sqlite3.connect(tmp_path / "captionkit.db") as db:
        db.execute("CREATE TABLE results (updated REAL, seconds REAL)")
        db.executemany("INSERT INTO results VALUES (?, ?)", rows)
    assert ray_overlap.feeding_rate(tmp_path) == 4 / (3.0 - 1.0)


def test_the_accelerator_stand_in_holds_each_batch_to_its_time(monkeypatch, blip_fp32, photos):
    import time

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import ray_overlap

    stand_in = ray_overlap.Accelerator(blip_fp32, seconds_per_image=0.2)
    options = GenerationOptions(max_new_tokens=3)
    started = time.perf_counter()
    held = stand_in.caption(photos[:3], options)
    assert time.perf_counter() - started >= 0.6
    assert [p.text for p in held] == [p.text for p in blip_fp32.caption(photos[:3], options)]
    assert stand_in.identity() == blip_fp32.identity()
