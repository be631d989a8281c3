"""Binary masks as COCO run-length encodings (pycocotools), and label maps as regions.

Every mask is kept at the size of the image it belongs to; RLE `counts` are ASCII strings so that
regions travel through JSON, the store and HTTP unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pycocotools import mask as coco_mask

from captionkit.predictions import Region

BACKGROUND_NAMES = frozenset({"__background__", "background"})
IGNORED = 255
"""Label-map value of pixels no class claims (palette PNGs keep 0-254 for classes)."""


def encode(masks: np.ndarray) -> list[dict]:
    """RLEs of binary masks shaped (n, height, width) or one (height, width) mask.

    pycocotools reads (height, width, n) uint8 in column-major order, so masks computed
    transposed, (n, width, height) in memory and passed as a `.transpose(0, 2, 1)` view, are
    encoded without a copy; others are copied once.
    """
    stack = masks[None] if masks.ndim == 2 else masks
    if len(stack) == 0:
        return []
    as_bytes = stack.view(np.uint8) if stack.dtype == bool else stack.astype(np.uint8)
    fortran = np.asfortranarray(np.moveaxis(as_bytes, 0, -1))
    return [{"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
            for rle in coco_mask.encode(fortran)]


def decode(rle: dict) -> np.ndarray:
    """The (height, width) boolean mask of an RLE (counts as str or bytes)."""
    return coco_mask.decode(rle).astype(bool)


def box(rle: dict) -> list[float]:
    """The mask's bounding box as [x0, y0, x1, y1] pixels (all zeros for an empty mask)."""
    x, y, w, h = (float(v) for v in coco_mask.toBbox(rle))
    return [x, y, x + w, y + h]


def area(rle: dict) -> int:
    return int(coco_mask.area(rle))


def semantic_regions(label_map: np.ndarray, classes: Sequence[str]) -> list[Region]:
    """One region per class present in a (height, width) map of class indices, background and
    values past the class list (255, unlabelled) left out: they are what no region covers."""
    present = [int(v) for v in np.unique(label_map)
               if 0 <= v < len(classes) and classes[int(v)] not in BACKGROUND_NAMES]
    if not present:
        return []
    rles = encode(np.stack([label_map == value for value in present]))
    return [Region(box=box(rle), label=classes[value], mask=rle, kind="semantic")
            for value, rle in zip(present, rles, strict=True)]


def label_map(regions: Sequence[Region], size: tuple[int, int], classes: Sequence[str]) -> np.ndarray:
    """The (height, width) uint8 map of class indices `regions` paint on an image of `size`
    (width, height). Instances paint in ascending score, so the best-scoring one owns a pixel;
    what no region covers is the background class if `classes` has one, else 255."""
    width, height = size
    index = {name: i for i, name in enumerate(classes)}
    fill = next((i for i, name in enumerate(classes) if name in BACKGROUND_NAMES), IGNORED)
    out = np.full((height, width), fill, dtype=np.uint8)
    painted = [r for r in regions if r.mask is not None and r.label in index]
    for region in sorted(painted, key=lambda r: -1.0 if r.score is None else r.score):
        out[decode(region.mask)] = index[region.label]
    return out
