"""Segmentation quality: COCO box and mask AP/AR (pycocotools' COCOeval) and semantic mIoU."""

from __future__ import annotations

import contextlib
import copy
import io
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from captionkit.errors import InputError
from captionkit.segment.masks import IGNORED

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _read_json(source: Path | dict | list, role: str):
    if not isinstance(source, str | Path):
        return copy.deepcopy(source)
    try:
        return json.loads(Path(source).read_text(encoding="utf-8"))
    except OSError as error:
        raise InputError(f"{source}: cannot read the {role} ({error.strerror})") from None
    except ValueError as error:
        raise InputError(f"{source}: the {role} are not JSON ({error})") from None


def evaluate_instances(predictions: Path | dict | list, references: Path | dict,
                       iou_types: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """COCO AP/AR of `predictions` against `references` (a COCO dataset), per IoU type.

    Predictions are an `instances.json` (a dataset whose annotations carry scores: its images are
    matched to the references' by file name, its categories by name) or a COCO results list
    already in the references' ids. Without `iou_types`: bbox, plus segm when every reference
    annotation has a segmentation.
    """
    from pycocotools.coco import COCO

    truth = _read_json(references, "references")
    found = _read_json(predictions, "predictions")
    if not isinstance(truth, dict) or not {"images", "annotations", "categories"} <= truth.keys():
        raise InputError(f"{references}: the references must be a COCO dataset (images, annotations, "
                         "categories)")
    results = _in_reference_ids(found, truth, predictions) if isinstance(found, dict) else found
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        ground = COCO()
        ground.dataset = truth
        ground.createIndex()
        detected = ground.loadRes(results) if results else None
    if iou_types is None:
        segm = all("segmentation" in a for a in truth["annotations"])
        iou_types = ("bbox", "segm") if segm else ("bbox",)
    return {iou_type: _scores(ground, detected, iou_type) for iou_type in iou_types}


def _in_reference_ids(found: dict, truth: dict, source) -> list[dict]:
    """An instances.json's annotations renumbered to the references' image and category ids."""
    images = {image["file_name"]: image["id"] for image in truth["images"]}
    categories = {cat["name"]: cat["id"] for cat in truth["categories"]}
    image_ids = {image["id"]: images.get(image["file_name"]) for image in found.get("images", [])}
    category_ids = {cat["id"]: categories.get(cat["name"]) for cat in found.get("categories", [])}
    unknown = sorted({image["file_name"] for image in found.get("images", [])} - images.keys())
    if unknown:
        raise InputError(f"{source}: images not in the references: {', '.join(unknown[:5])}")
    results = []
    for annotation in found.get("annotations", []):
        category = category_ids.get(annotation["category_id"])
        if category is None:
            continue  # a class the references do not annotate cannot be right or wrong
        result = {key: annotation[key] for key in ("bbox", "segmentation", "score") if key in annotation}
        result.update(image_id=image_ids[annotation["image_id"]], category_id=category)
        result.setdefault("score", 1.0)
        results.append(result)
    return results


def _scores(ground, detected, iou_type: str) -> dict[str, float]:
    from pycocotools.cocoeval import COCOeval

    if detected is None:
        return dict.fromkeys(STAT_NAMES, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluation = COCOeval(ground, detected, iou_type)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    # COCOeval reports -1 where no reference exists (say, no small objects)
    return {name: float(value) for name, value in zip(STAT_NAMES, evaluation.stats, strict=True)}


def confusion(predicted: np.ndarray, reference: np.ndarray, num_classes: int,
              ignore_index: int = IGNORED) -> np.ndarray:
    """The (reference, predicted) pixel count matrix of two label maps of one image."""
    if predicted.shape != reference.shape:
        raise InputError(f"label maps of different sizes: {predicted.shape[::-1]} predicted, "
                         f"{reference.shape[::-1]} in the reference")
    valid = (reference != ignore_index) & (reference < num_classes)
    pairs = reference[valid].astype(np.int64) * num_classes + predicted[valid].astype(np.int64)
    return np.bincount(pairs, minlength=num_classes * num_classes)[:num_classes ** 2].reshape(
        num_classes, num_classes)


def semantic_scores(pairs: Iterable[tuple[np.ndarray, np.ndarray]], classes: Sequence[str],
                    ignore_index: int = IGNORED) -> dict:
    """Pixel accuracy, mean IoU and each class's IoU over (predicted, reference) label maps.

    The mean is over classes present in a reference or a prediction; pixels the reference marks
    `ignore_index` do not count.
    """
    total = np.zeros((len(classes), len(classes)), dtype=np.int64)
    for predicted, reference in pairs:
        total += confusion(predicted, reference, len(classes), ignore_index)
    hits = np.diag(total)
    union = total.sum(0) + total.sum(1) - hits
    present = union > 0
    iou = np.where(present, hits / np.maximum(union, 1), np.nan)
    return {"pixel_accuracy": float(hits.sum() / max(total.sum(), 1)),
            "miou": float(np.nanmean(iou)) if present.any() else 0.0,
            "iou": {name: float(v) for name, v, seen in zip(classes, iou, present, strict=True) if seen}}


def evaluate_label_maps(predictions: Path, references: Path, classes: Sequence[str] | None = None) -> dict:
    """`semantic_scores` of the PNG label maps in `predictions` against those of the same name in
    `references`; classes from `predictions/classes.json` unless given."""
    from captionkit.segment import labelmaps

    if classes is None:
        rows = _read_json(Path(predictions) / "classes.json", "classes")
        classes = [row["name"] for row in rows]
    found = {p.relative_to(predictions): p for p in Path(predictions).rglob("*.png")}
    missing = [str(name) for name in found if not (Path(references) / name).is_file()]
    if not found or missing:
        raise InputError(f"{references}: no reference label map for "
                         f"{', '.join(missing[:5]) if missing else 'any prediction'} "
                         f"(label maps are matched by name)")
    return semantic_scores(((labelmaps.read(path), labelmaps.read(Path(references) / name))
                            for name, path in sorted(found.items())), classes)
