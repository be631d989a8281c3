"""Segmentation files, each written through a temporary file and a rename: `instances.json`,
label-map PNGs with `classes.json`, and overlays."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from PIL import Image

from captionkit.exporters import atomic_output, atomic_write
from captionkit.options import OVERLAY_ALPHA
from captionkit.segment import coco, labelmaps
from captionkit.segment.coco import Segmented
from captionkit.segment.overlay import Classes, draw

INSTANCES = "instances.json"
CLASSES = "classes.json"


def write_instances(path: Path, images: Sequence[Segmented], classes: Sequence[str] | None = None) -> Path:
    """`instances.json`: the COCO dataset of the images' masked regions (see `coco.dataset`)."""
    atomic_write(path, json.dumps(coco.dataset(images, classes), separators=(",", ":")))
    return path


def save_image(image: Image.Image, path: Path, **save_options) -> None:
    """Write an image through a temporary file beside it and a rename; its format from the suffix."""
    kind = Image.registered_extensions()[path.suffix.lower()]
    atomic_output(path, lambda tmp: image.save(tmp, format=kind, **save_options))


def image_file(name: str, directory: Path, suffix: str) -> Path:
    """`directory/sub/photo<suffix>` for an image exported as `sub/photo.jpg`."""
    relative = PurePosixPath(name)
    return directory.joinpath(*relative.parent.parts, relative.stem + suffix)


def write_classes(directory: Path, classes: Sequence[str]) -> Path:
    """`classes.json`: each label-map value with its class name and palette colour."""
    colors = labelmaps.palette(classes)
    rows = [{"id": i, "name": name, "color": colors[3 * i:3 * i + 3]} for i, name in enumerate(classes)]
    path = directory / CLASSES
    atomic_write(path, json.dumps(rows, indent=1))
    return path


def write_label_maps(directory: Path, images: Sequence[Segmented], classes: Sequence[str]) -> list[Path]:
    """A palette PNG per image (`sub/photo.png` for `sub/photo.jpg`) whose value i is class i of
    `classes` (written beside them as classes.json). Two images whose names differ only in their
    suffix get their full names (`photo.jpg.png`, `photo.png.png`)."""
    stems = [image_file(image.name, directory, "") for image in images]
    written = [write_classes(directory, classes)]
    for image, stem in zip(images, stems, strict=True):
        path = Path(f"{stem}.png") if stems.count(stem) == 1 else image_file(
            image.name + ".png", directory, ".png")
        save_image(labelmaps.render(image.prediction.regions, image.size, classes), path, optimize=True)
        written.append(path)
    return written


def write_overlay(image: Image.Image, prediction, path: Path, classes: Classes = (),
                  alpha: float = OVERLAY_ALPHA) -> Path:
    """The overlay of one image (JPEG or PNG by `path`'s suffix); pass the label maps' `classes`
    (`Segmenter.label_map_classes`, or `labelmaps.vocabularies` of several) and each class has the
    same colour in both."""
    drawn = draw(image, prediction, classes, alpha)
    save_image(drawn, path, **({"quality": 90} if path.suffix.lower() in (".jpg", ".jpeg") else {}))
    return path
