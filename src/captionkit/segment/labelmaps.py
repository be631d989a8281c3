"""Semantic label maps as palette PNGs: pixel value i is class i of `classes.json`."""

from __future__ import annotations

import colorsys
import functools
from collections.abc import Sequence
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
