"""Predictions as a COCO instance-segmentation dataset (`instances.json`).

The file is a full COCO dataset (images, categories, annotations) whose annotations also carry a
score, so `pycocotools.coco.COCO` loads it as ground truth and `COCO.loadRes` as results, and
annotation tools (CVAT, FiftyOne) import it as it is.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

from captionkit.predictions import Prediction
from captionkit.segment import masks


class Segmented(NamedTuple):
    """One image's prediction with what COCO needs to know about the image."""

    name: str
    """The image's file name as exported (relative to the input folder)."""
    size: tuple[int, int]
    """(width, height) in pixels."""
    prediction: Prediction


@functools.cache
def coco_ids() -> dict[str, int]:
    """COCO's category id of each of its 80 class names (torchvision's list is indexed by id)."""
    from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights

    names = MaskRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]
    return {name: index for index, name in enumerate(names) if name not in ("__background__", "N/A")}


def categories(labels: Sequence[str]) -> list[dict]:
    """COCO categories for these class names: COCO's own ids when every name is a COCO class (so
    results compare with COCO's annotations), else 1..n in the order given."""
    labels = list(dict.fromkeys(labels))
    known = coco_ids()
    if labels and all(label in known for label in labels):
        return [{"id": known[label], "name": label} for label in labels]
    return [{"id": index, "name": label} for index, label in enumerate(labels, start=1)]


def dataset(images: Sequence[Segmented], classes: Sequence[str] | None = None) -> dict:
    """The COCO dataset of these images' masked regions (semantic ones left to label maps).

    `classes` lists every category (a segmenter's output classes); without it, the labels found.
    """
    masked = [[r for r in image.prediction.regions if r.mask is not None and r.kind != "semantic"]
              for image in images]
    labels = list(classes) if classes is not None else [r.label for found in masked for r in found]
    cats = categories([*labels, *(r.label for found in masked for r in found)])
    ids = {cat["name"]: cat["id"] for cat in cats}
    annotations = []
    for image_id, found in enumerate(masked, start=1):
        for region in found:
            x0, y0, x1, y1 = region.box
            annotation = {"id": len(annotations) + 1, "image_id": image_id,
                          "category_id": ids[region.label],
                          "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                          "area": masks.area(region.mask), "segmentation": region.mask, "iscrowd": 0}
            if region.score is not None:
                annotation["score"] = round(float(region.score), 6)
            if region.span is not None:
                annotation["span"] = list(region.span)
            annotations.append(annotation)
    return {"images": [{"id": i, "file_name": image.name, "width": image.size[0],
                        "height": image.size[1]} for i, image in enumerate(images, start=1)],
            "categories": cats, "annotations": annotations}
