"""Semantic label maps as palette PNGs: pixel value i is class i of `classes.json`."""

from __future__ import annotations

import colorsys
import functools
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from captionkit.errors import InputError
from captionkit.predictions import Region
from captionkit.segment import masks
from captionkit.segment.masks import BACKGROUND_NAMES, IGNORED

UNLABELLED_COLOR = (255, 255, 255)


@functools.cache
def class_color(index: int) -> tuple[int, int, int]:
    """A fixed, bright colour per class index: hues a golden-ratio turn apart, so neighbouring
    classes never look alike."""
    red, green, blue = colorsys.hsv_to_rgb((index * 0.618034) % 1.0, 0.7, 0.95)
    return round(red * 255), round(green * 255), round(blue * 255)


def vocabularies(segmenters: Iterable) -> dict[str, list[str]]:
    """Each region kind's label-map classes from the segmenters that make it: their own
    `label_map_classes` (VOC or ADE ids, COCO's 80 classes after background), in order; two of one
    kind share a list, the second's new classes after the first's. Promptable ones add none."""
    found: dict[str, list[str]] = {}
    for segmenter in segmenters:
        if segmenter.kind != "promptable":
            classes = found.setdefault(segmenter.kind, [])
            classes += [name for name in segmenter.label_map_classes if name not in classes]
    return found


def classes_by_kind(regions: Iterable[Region],
                    recorded: Mapping[str, Sequence[str]] | None) -> dict[str, list[str]]:
    """Pixel value i of each kind's label map, for these masked regions and the run's recorded
    `vocabularies`: a recorded kind keeps its classes, any label found that they lack appended; a
    kind nothing recorded (SAM's phrases, runs recorded without them) has background, then its
    labels sorted."""
    found: dict[str, set[str]] = {}
    for region in regions:
        if region.mask is not None:
            found.setdefault(region.kind, set()).add(region.label)
    maps = {kind: list(classes) for kind, classes in (recorded or {}).items()}
    for kind, labels in sorted(found.items()):
        classes = maps.setdefault(kind, ["background"])
        classes += sorted(labels - set(classes))
    return maps


def palette(classes: Sequence[str]) -> list[int]:
    """A 256-entry PNG palette: each class its colour, background black, unlabelled white."""
    colors = [(0, 0, 0) if name in BACKGROUND_NAMES else class_color(i) for i, name in enumerate(classes)]
    colors += [(0, 0, 0)] * (256 - len(colors))
    colors[IGNORED] = UNLABELLED_COLOR
    return [channel for color in colors for channel in color]


def render(regions: Sequence[Region], size: tuple[int, int], classes: Sequence[str]) -> Image.Image:
    """The palette image of an image's regions (semantic regions, or instances painted best-last)."""
    if len(classes) > IGNORED:
        raise InputError(f"{len(classes)} classes do not fit a palette PNG (at most {IGNORED})")
    image = Image.fromarray(masks.label_map(regions, size, classes))
    image.putpalette(palette(classes))  # an L image becomes P, its values kept as indices
    return image


def read(path: Path) -> np.ndarray:
    """A label map's class indices: a palette or grayscale PNG as it is stored."""
    try:
        with Image.open(path) as image:
            if image.mode not in ("P", "L", "I", "I;16"):
                raise InputError(f"{path}: a {image.mode} image, not a label map (palette or "
                                 "grayscale PNG of class indices)")
            return np.asarray(image)
    except OSError as error:
        raise InputError(f"{path}: cannot read this label map ({error})") from None
