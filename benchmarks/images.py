"""The benchmark's image folder: real photos plus 12-megapixel JPEGs made from them."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image

SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "moon",
                  "hubble_deep_field", "immunohistochemistry", "retina")
BIG_SIZE = (4000, 3000)
GRAIN = 4.0
NAMES = (*SKIMAGE_PHOTOS, "china", "flower")


def photos() -> list[tuple[str, Path | Image.Image]]:
    """(name, image) for every bundled photo; scikit-learn's are JPEG files already."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    found: list[tuple[str, Path | Image.Image]] = [
        (name, Image.fromarray(getattr(data, name)()).convert("RGB")) for name in SKIMAGE_PHOTOS]
    found += [(Path(f).stem, Path(f)) for f in load_sample_images().filenames]
    return found


def big_jpeg(image: Image.Image, seed: int) -> Image.Image:
    """A 12-megapixel 4:3 version with film grain, so it costs what a camera JPEG costs to decode."""
    width, height = image.size
    crop_w, crop_h = min(width, height * 4 // 3), min(height, width * 3 // 4)
    left, top = (width - crop_w) // 2, (height - crop_h) // 2
    return grain(image.crop((left, top, left + crop_w, top + crop_h)).resize(BIG_SIZE, Image.BICUBIC),
                 seed)


def grain(image: Image.Image, seed: int) -> Image.Image:
    """The image with Gaussian noise added; also makes repeated photos distinct files."""
    noise = np.random.default_rng(seed).normal(0, GRAIN, (image.height, image.width, 1))
    return Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8))


def make_folder(folder: Path, count: int, thumbnail: int | None = None) -> list[Path]:
    """`count` images in `folder`, alternately a 12 MP JPEG and a photo at its own size.

    With `thumbnail`, PNG photos no larger than that instead: tiny test models look at 32 px, and
    thumbnails under twice that reach them with no resizing by captionkit, so the pixels match.
    Files already there are reused, so repeated runs see byte-identical inputs.
    """
    folder.mkdir(parents=True, exist_ok=True)
    sources: list[tuple[str, Path | Image.Image]] = []
    paths = []
    for index in range(count):
        big = thumbnail is None and index % 2 == 0
        position = index if thumbnail else index // 2
        name = NAMES[position % len(NAMES)]
        repeat = position // len(NAMES)
        stem = f"{index:03d}-{name}{'-12mp' if big else ''}{f'-{repeat}' if repeat else ''}"
        path = folder / (f"{stem}.png" if thumbnail else f"{stem}.jpg")
        paths.append(path)
        if path.exists():
            continue
        sources = sources or photos()
        source = dict(sources)[name]
        image = source if isinstance(source, Image.Image) else Image.open(source).convert("RGB")
        if big:
            big_jpeg(image, index).save(path, quality=90)
        elif isinstance(source, Path) and not (repeat or thumbnail):
            shutil.copyfile(source, path)
        else:
            if thumbnail:
                image.thumbnail((thumbnail, thumbnail))
            # repeats get their own grain: identical files would be captioned once by captionkit
            (grain(image, index) if repeat else image).save(path, quality=95)
    return paths
