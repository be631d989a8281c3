"""Segmentation without a model: RLE masks, label maps, COCO files, overlays and the metrics."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from captionkit.boxes import COLORS
from captionkit.errors import InputError, OptionError, OutputError
from captionkit.exporters import ExportOptions
from captionkit.options import RunOptions
from captionkit.predictions import Prediction, Region
from captionkit.segment import SegmentOptions, coco, export, labelmaps, masks, metrics, outputs, overlay
from captionkit.segment.coco import Segmented
from captionkit.store import Result


def rect(height: int, width: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def region(mask: np.ndarray, label: str, score: float | None = 0.9, **kwargs) -> Region:
    rle = masks.encode(mask)[0]
    return Region(box=masks.box(rle), label=label, score=score, mask=rle, **kwargs)


# --- masks


def test_rle_round_trip_equals_the_binary_masks():
    rng = np.random.default_rng(0)
    stack = np.stack([rng.random((37, 53)) > 0.5, np.zeros((37, 53), bool), np.ones((37, 53), bool),
                      rect(37, 53, 5, 7, 20, 30)])
    rles = masks.encode(stack)
    assert [rle["size"] for rle in rles] == [[37, 53]] * 4
    assert all(isinstance(rle["counts"], str) for rle in rles)  # JSON as it is
    for mask, rle in zip(stack, rles, strict=True):
        assert np.array_equal(masks.decode(rle), mask)
        assert np.array_equal(masks.decode(json.loads(json.dumps(rle))), mask)
        assert masks.area(rle) == mask.sum()
    assert masks.box(rles[3]) == [5.0, 7.0, 20.0, 30.0]
    assert masks.encode(rect(4, 4, 0, 0, 2, 2))[0] == masks.encode(rect(4, 4, 0, 0, 2, 2)[None])[0]
    assert masks.encode(np.zeros((0, 4, 4), bool)) == []


def test_semantic_regions_rebuild_their_label_map():
    classes = ["__background__", "cat", "dog", "cup"]
    label_map = np.zeros((6, 8), np.uint8)
    label_map[1:4, 1:3] = 1
    label_map[2:6, 5:8] = 3
    found = masks.semantic_regions(label_map, classes)
    assert [(r.label, r.kind, r.score) for r in found] == [("cat", "semantic", None),
                                                          ("cup", "semantic", None)]
    assert found[0].box == [1.0, 1.0, 3.0, 4.0]
    assert np.array_equal(masks.label_map(found, (8, 6), classes), label_map)


def test_a_map_without_a_background_class_leaves_uncovered_pixels_unlabelled():
    classes = ["wall", "sky"]
    label_map = np.array([[0, 1], [1, 1]], np.uint8)
    found = masks.semantic_regions(label_map, classes)
    assert np.array_equal(masks.label_map(found, (2, 2), classes), label_map)
    assert np.array_equal(masks.label_map(found[1:], (2, 2), classes), [[255, 1], [1, 1]])


def test_the_best_scoring_instance_owns_a_pixel():
    classes = ["background", "person", "dog"]
    weak = region(rect(10, 10, 0, 0, 8, 8), "dog", 0.4)
    strong = region(rect(10, 10, 4, 4, 10, 10), "person", 0.9)
    for order in ([weak, strong], [strong, weak]):
        label_map = masks.label_map(order, (10, 10), classes)
        assert label_map[5, 5] == 1 and label_map[1, 1] == 2 and label_map[9, 0] == 0


# --- options


def test_segment_options_validate_and_key():
    assert SegmentOptions(classes="person, dog").classes == ("person", "dog")
    assert SegmentOptions().key() == SegmentOptions().key() != SegmentOptions(threshold=0.3).key()
    for bad in ({"threshold": 1.5}, {"mask_threshold": -0.1}, {"max_instances": 0},
                {"classes": ("person", "")}, {"nms_iou": 2}):
        with pytest.raises(OptionError, match="--"):
            SegmentOptions(**bad)


# --- COCO files


@pytest.fixture
def segmented() -> list[Segmented]:
    cat = region(rect(30, 40, 2, 3, 20, 25), "cat", 0.91)
    cup = region(rect(30, 40, 25, 5, 38, 15), "cup", 0.55)
    person = region(rect(20, 20, 0, 0, 10, 20), "person", 0.8)
    sky = region(rect(20, 20, 0, 0, 20, 5), "sky", None, kind="semantic")
    return [Segmented("a.jpg", (40, 30), Prediction(regions=[cat, cup])),
            Segmented("sub/b.png", (20, 20), Prediction(regions=[person, sky])),
            Segmented("empty.jpg", (8, 8), Prediction())]


def test_instances_json_loads_with_pycocotools(segmented, tmp_path):
    path = outputs.write_instances(tmp_path / "out" / "instances.json", segmented)
    assert [p.name for p in path.parent.iterdir()] == ["instances.json"]  # no temporary left
    with contextlib.redirect_stdout(io.StringIO()):
        dataset = COCO(str(path))
        results = dataset.loadRes(json.loads(path.read_text())["annotations"])
    assert dataset.getImgIds() == [1, 2, 3]
    assert [c["name"] for c in dataset.loadCats(dataset.getCatIds())] == ["cat", "cup", "person"]
    # COCO's own ids for COCO's classes, so results compare with COCO's annotations
    assert dataset.getCatIds(catNms=["cat", "cup", "person"]) == [17, 47, 1]
    first = dataset.loadAnns(dataset.getAnnIds(imgIds=[1]))
    assert [a["bbox"] for a in first] == [[2.0, 3.0, 18.0, 22.0], [25.0, 5.0, 13.0, 10.0]]
    assert [a["score"] for a in first] == [0.91, 0.55]
    assert np.array_equal(dataset.annToMask(first[0]), rect(30, 40, 2, 3, 20, 25))
    assert dataset.loadImgs(2)[0] == {"id": 2, "file_name": "sub/b.png", "width": 20, "height": 20}
    assert len(results.getAnnIds()) == 3  # the semantic region belongs to label maps


def test_categories_outside_coco_are_numbered_in_order():
    assert coco.categories(["a cat on a mat", "cat", "a cat on a mat"]) == [
        {"id": 1, "name": "a cat on a mat"}, {"id": 2, "name": "cat"}]
    assert coco.categories(["dog", "person"]) == [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}]


def test_phrase_masks_keep_their_span(tmp_path):
    phrase = region(rect(10, 10, 0, 0, 5, 5), "a small dog", 0.7, span=(0, 11), kind="phrase")
    data = coco.dataset([Segmented("x.jpg", (10, 10), Prediction("a small dog", regions=[phrase]))])
    assert data["annotations"][0]["span"] == [0, 11]
    assert data["categories"] == [{"id": 1, "name": "a small dog"}]


# --- label maps


def test_label_maps_are_palette_pngs_with_classes_json(segmented, tmp_path):
    classes = ["background", "cat", "cup", "person", "sky"]
    written = outputs.write_label_maps(tmp_path, segmented, classes)
    assert [p.relative_to(tmp_path).as_posix() for p in written] == [
        "classes.json", "a.png", "sub/b.png", "empty.png"]
    with Image.open(tmp_path / "a.png") as image:
        assert image.mode == "P" and image.size == (40, 30)
        assert image.getpalette()[3:6] == list(labelmaps.class_color(1))
    stored = labelmaps.read(tmp_path / "sub" / "b.png")
    assert stored[2, 15] == 4 and stored[10, 5] == 3 and stored[10, 15] == 0
    assert np.array_equal(labelmaps.read(tmp_path / "a.png"),
                          masks.label_map(segmented[0].prediction.regions, (40, 30), classes))
    rows = json.loads((tmp_path / "classes.json").read_text())
    assert rows[0] == {"id": 0, "name": "background", "color": [0, 0, 0]}
    assert [row["name"] for row in rows] == classes


def test_label_map_values_are_the_recorded_class_ids_whatever_was_found():
    recorded = {"instance": ["background", "person", "cat", "cup"], "semantic": ["__background__", "sky"]}
    cup = region(rect(8, 8, 0, 0, 4, 4), "cup")
    odd = region(rect(8, 8, 0, 0, 2, 2), "zebra")  # a label the record lacks
    phrase = region(rect(8, 8, 4, 4, 8, 8), "a red cup", kind="phrase")
    unmasked = Region(box=[0, 0, 1, 1], label="dog")
    assert labelmaps.classes_by_kind([cup], recorded) == recorded
    assert labelmaps.classes_by_kind([cup, odd, phrase, unmasked], recorded) == {
        "instance": ["background", "person", "cat", "cup", "zebra"],
        "semantic": ["__background__", "sky"], "phrase": ["background", "a red cup"]}
    assert labelmaps.classes_by_kind([cup, odd], None) == {"instance": ["background", "cup", "zebra"]}


def test_masks_get_a_map_per_kind_with_the_recorded_ids(photo_dir, tmp_path):
    results = overlay_results(photo_dir)
    width, height = Image.open(results[1].path).size
    results[1].regions.append(region(rect(height, width, 0, 0, width, 30), "sky", None, kind="semantic"))
    recorded = {"instance": ["background", "person", "cup", "cat"], "semantic": ["__background__", "sky"]}
    export.write_masks(results, ExportOptions(tmp_path, label_maps=recorded))
    for kind, classes in recorded.items():
        rows = json.loads((tmp_path / "masks" / kind / "classes.json").read_text())
        assert [row["name"] for row in rows] == classes
    instance = labelmaps.read(tmp_path / "masks" / "instance" / "chelsea.png")
    assert instance[90, 60] == 3 and instance[90, 180] == 2 and instance[10, 300] == 0  # cat, cup
    semantic = labelmaps.read(tmp_path / "masks" / "semantic" / "chelsea.png")
    assert semantic[10, 60] == 1 and semantic[90, 60] == 0  # sky; the cat is not in this map
    assert not labelmaps.read(tmp_path / "masks" / "semantic" / "coffee.png").any()
    drawn = export.draw_overlays(results, tmp_path / "overlays", recorded)
    cat = labelmaps.class_color(recorded["instance"].index("cat"))
    assert tuple(np.asarray(Image.open(drawn[1]))[90, 40]) == cat


def test_images_named_alike_get_their_full_names(tmp_path):
    alike = [Segmented("photo.jpg", (4, 4), Prediction()), Segmented("photo.png", (4, 4), Prediction())]
    written = outputs.write_label_maps(tmp_path, alike, ["background"])
    assert [p.name for p in written[1:]] == ["photo.jpg.png", "photo.png.png"]


def test_an_rgb_image_is_not_a_label_map(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "rgb.png")
    with pytest.raises(InputError, match="rgb.png: a RGB image, not a label map"):
        labelmaps.read(tmp_path / "rgb.png")


def test_an_output_under_a_file_says_so(tmp_path):
    (tmp_path / "blocker").write_text("x")
    with pytest.raises((OptionError, OutputError), match="blocker"):
        outputs.save_image(Image.new("RGB", (2, 2)), tmp_path / "blocker" / "a.png")


# --- overlays


def test_overlay_fills_outlines_labels_and_colours_phrases():
    image = Image.new("RGB", (200, 120), (100, 100, 100))
    cat = region(rect(120, 200, 20, 30, 90, 110), "cat", 0.88)
    dog = region(rect(120, 200, 110, 30, 190, 110), "dog", 0.5)
    drawn = overlay.draw(image, Prediction(regions=[cat, dog]), ["background", "cat", "dog"], alpha=0.5)
    inside = np.array(labelmaps.class_color(1)) * 0.5 + 50
    assert np.allclose(np.asarray(drawn)[90, 55], inside, atol=1)  # filled at alpha
    assert tuple(np.asarray(drawn)[70, 20]) == labelmaps.class_color(1)  # outlined
    assert tuple(np.asarray(drawn)[10, 100]) == (100, 100, 100)  # untouched
    phrases = [region(rect(120, 200, 20, 30, 90, 110), "a cat", None, span=(0, 5), kind="phrase"),
               region(rect(120, 200, 110, 30, 190, 110), "a dog", None, span=(10, 15), kind="phrase")]
    captioned = overlay.draw(image, Prediction("a cat and a dog", regions=phrases))
    assert captioned.size[0] == 200 and captioned.size[1] > 120  # the caption below
    pixels = np.asarray(captioned)
    for color in COLORS[:2]:
        rgb = tuple(int(color[i:i + 2], 16) for i in (1, 3, 5))
        assert (pixels[:120] == rgb).all(-1).any()  # each phrase's outline in its colour
        assert (pixels[120:] == rgb).all(-1).any()  # and its words in the caption


def test_overlays_are_written_as_jpeg_or_png(tmp_path):
    image = Image.new("RGB", (64, 48), "white")
    prediction = Prediction(regions=[region(rect(48, 64, 5, 5, 30, 30), "cup")])
    for name in ("x.jpg", "x.png"):
        path = outputs.write_overlay(image, prediction, tmp_path / name, ["background", "cup"])
        with Image.open(path) as written:
            assert written.format == ("JPEG" if name.endswith("jpg") else "PNG")
            assert written.size == (64, 48)


def overlay_results(photo_dir) -> list[Result]:
    """coffee.png with a cup and chelsea.png with a cat then a cup: the cup comes second there."""
    results = []
    for name, labels in (("coffee", ["cup"]), ("chelsea", ["cat", "cup"])):
        path = photo_dir / f"{name}.png"
        width, height = Image.open(path).size
        found = [region(rect(height, width, 40 + 120 * i, 40, 140 + 120 * i, 140), label)
                 for i, label in enumerate(labels)]
        results.append(Result(path=path, name=path.name, status="done", regions=found))
    return results


def test_a_class_has_one_colour_in_every_overlay_and_in_the_label_maps(photo_dir, tmp_path):
    results = overlay_results(photo_dir)
    drawn = export.draw_overlays(results, tmp_path / "overlays")
    export.write_masks(results, ExportOptions(tmp_path / "out"))
    rows = json.loads((tmp_path / "out" / "masks" / "classes.json").read_text())
    color = {row["name"]: tuple(row["color"]) for row in rows}
    assert color["cup"] != color["cat"]
    coffee, chelsea = (np.asarray(Image.open(path)) for path in drawn)
    assert tuple(coffee[90, 40]) == color["cup"]  # the cup's outline, first in coffee.png
    assert tuple(chelsea[90, 160]) == color["cup"]  # and second in chelsea.png
    assert tuple(chelsea[90, 40]) == color["cat"]
    assert export.draw_overlays(results, tmp_path / "overlays") == []  # nothing changed
    results[0].regions.append(region(rect(*coffee.shape[:2], 300, 40, 340, 80), "bowl"))
    assert len(export.draw_overlays(results, tmp_path / "overlays")) == 2  # colours move: both again


def test_overlay_alpha_sets_the_fill_and_redraws(photo_dir, tmp_path):
    results = overlay_results(photo_dir)[:1]
    photo = np.asarray(Image.open(results[0].path).convert("RGB"))
    cup = labelmaps.class_color(1)
    for alpha, expected in ((0.0, photo[90, 90]), (1.0, cup)):
        [path] = export.draw_overlays(results, tmp_path, alpha=alpha)
        assert tuple(np.asarray(Image.open(path))[90, 90]) == pytest.approx(tuple(expected), abs=3)
    with pytest.raises(OptionError, match="--overlay-alpha 1.5: use a number from 0 to 1"):
        RunOptions(overlay_alpha=1.5)


# --- metrics


@pytest.fixture
def truth() -> dict:
    """Two images, three objects: masks as RLE and as a polygon, one crowd-free COCO dataset."""
    person = coco_mask.encode(np.asfortranarray(rect(60, 80, 10, 10, 40, 50).astype(np.uint8)))
    person["counts"] = person["counts"].decode()
    return {
        "images": [{"id": 7, "file_name": "one.jpg", "width": 80, "height": 60},
                   {"id": 9, "file_name": "two.jpg", "width": 80, "height": 60}],
        "categories": [{"id": 3, "name": "person"}, {"id": 5, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 3, "bbox": [10, 10, 30, 40], "area": 1200,
             "segmentation": person, "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 5, "bbox": [50, 20, 20, 20], "area": 400,
             "segmentation": [[50, 20, 70, 20, 70, 40, 50, 40]], "iscrowd": 0},
            {"id": 3, "image_id": 9, "category_id": 5, "bbox": [0, 0, 40, 30], "area": 1200,
             "segmentation": [[0, 0, 40, 0, 40, 30, 0, 30]], "iscrowd": 0}]}


@pytest.fixture
def predicted() -> list[Segmented]:
    """A near-hit person, a shifted dog, a false dog on image two and a cat nobody annotated."""
    return [Segmented("one.jpg", (80, 60), Prediction(regions=[
                region(rect(60, 80, 11, 10, 40, 52), "person", 0.9),
                region(rect(60, 80, 54, 22, 72, 40), "dog", 0.7),
                region(rect(60, 80, 0, 0, 5, 5), "cat", 0.99)])),
            Segmented("two.jpg", (80, 60), Prediction(regions=[
                region(rect(60, 80, 0, 0, 40, 30), "dog", 0.6),
                region(rect(60, 80, 45, 30, 80, 60), "dog", 0.8)]))]


def cocoeval_stats(truth: dict, results: list[dict], iou_type: str) -> list[float]:
    with contextlib.redirect_stdout(io.StringIO()):
        ground = COCO()
        ground.dataset = json.loads(json.dumps(truth))
        ground.createIndex()
        evaluation = COCOeval(ground, ground.loadRes(results), iou_type)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return list(evaluation.stats)


def test_instance_scores_equal_cocoeval(truth, predicted, tmp_path):
    path = outputs.write_instances(tmp_path / "instances.json", predicted)
    (tmp_path / "gt.json").write_text(json.dumps(truth))
    scores = metrics.evaluate_instances(path, tmp_path / "gt.json")
    assert set(scores) == {"bbox", "segm"}
    # the same results written by hand in the references' ids (the cat has no category there)
    by_hand = []
    for image_id, image in zip((7, 9), predicted, strict=True):
        for r in image.prediction.regions:
            if r.label != "cat":
                x0, y0, x1, y1 = r.box
                by_hand.append({"image_id": image_id, "category_id": {"person": 3, "dog": 5}[r.label],
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "segmentation": r.mask,
                                "score": r.score})
    for iou_type in ("bbox", "segm"):
        expected = cocoeval_stats(truth, by_hand, iou_type)
        assert list(scores[iou_type].values()) == pytest.approx(expected)
        assert list(scores[iou_type]) == list(metrics.STAT_NAMES)
    assert 0 < scores["segm"]["AP"] < 1


def test_the_references_as_predictions_score_one(truth):
    results = [{**a, "score": 1.0} for a in truth["annotations"]]
    for stats in metrics.evaluate_instances(results, truth).values():
        assert stats["AP"] == pytest.approx(1.0) and stats["AR100"] == pytest.approx(1.0)


def test_evaluation_inputs_are_checked(truth, tmp_path):
    with pytest.raises(InputError, match="missing.json: cannot read the predictions"):
        metrics.evaluate_instances(tmp_path / "missing.json", truth)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputError, match="bad.json: the references are not JSON"):
        metrics.evaluate_instances([], tmp_path / "bad.json")
    stray = coco.dataset([Segmented("three.jpg", (4, 4), Prediction())])
    with pytest.raises(InputError, match="images not in the references: three.jpg"):
        metrics.evaluate_instances(stray, truth)


def test_miou_and_pixel_accuracy_by_hand():
    classes = ["background", "cat", "dog"]
    reference = np.array([[0, 0, 1, 1],
                          [0, 0, 1, 1],
                          [2, 2, 2, 255]], np.uint8)
    predicted = np.array([[0, 1, 1, 1],
                          [0, 0, 1, 0],
                          [2, 2, 0, 2]], np.uint8)
    scores = metrics.semantic_scores([(predicted, reference)], classes)
    # 11 counted pixels (one ignored), 8 right
    assert scores["pixel_accuracy"] == pytest.approx(8 / 11)
    # background: 3 hits, union 4 + 5 - 3 = 6; cat: 3 hits, union 4 + 4 - 3 = 5; dog: 2 of 3 + 2 - 2
    assert scores["iou"] == pytest.approx({"background": 3 / 6, "cat": 3 / 5, "dog": 2 / 3})
    assert scores["miou"] == pytest.approx((3 / 6 + 3 / 5 + 2 / 3) / 3)
    # a class in neither map does not count towards the mean
    assert metrics.semantic_scores([(predicted, reference)], [*classes, "cup"])["miou"] == \
        pytest.approx(scores["miou"])


def test_label_map_folders_are_scored_by_name(segmented, tmp_path):
    classes = ["background", "cat", "cup", "person", "sky"]
    outputs.write_label_maps(tmp_path / "pred", segmented, classes)
    outputs.write_label_maps(tmp_path / "ref", segmented, classes)
    scores = metrics.evaluate_label_maps(tmp_path / "pred", tmp_path / "ref")
    assert scores["miou"] == 1.0 and scores["pixel_accuracy"] == 1.0
    (tmp_path / "ref" / "a.png").unlink()
    with pytest.raises(InputError, match="no reference label map for a.png"):
        metrics.evaluate_label_maps(tmp_path / "pred", tmp_path / "ref")
