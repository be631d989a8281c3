"""The one interface every segmenter implements, and the filtering all of them share."""

from __future__ import annotations

import difflib
import threading
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from PIL import Image

from captionkit import sources
from captionkit.device import pick_device
from captionkit.errors import OptionError
from captionkit.predictions import Prediction, Region
from captionkit.segment.masks import BACKGROUND_NAMES
from captionkit.segment.options import SegmenterLoadOptions, SegmentOptions

MASK_BYTES = 256 << 20
"""float32 bytes of full-size soft masks held at once: a 12-megapixel photo with many instances
never holds all of them."""


class Segmenter:
    """Decoded RGB images in, one Prediction per image out, its regions carrying masks.

    Instance segmenters return a region per object (kind "instance": box, label, score, mask);
    semantic ones a region per class present (kind "semantic": that class's pixels, score None);
    promptable ones (SAM) a mask for each prompt region they are given, which keeps its label, score,
    kind and caption span. Boxes are pixels of the image as given (or of its file, see `sizes`);
    masks are COCO RLE at that size.
    """

    kind: str = "instance"
    """instance, semantic or promptable: what its regions are (see above)."""
    default_threshold: ClassVar[float] = 0.5
    default_nms_iou: ClassVar[float | None] = None
    model_id: str = ""
    """The name regions are recorded under: an alias, a Hub id or a local path."""
    classes: list[str]
    """The class names the model can output, in its own order (semantic: pixel value i is class i)."""
    input_size: int | None = None
    """The short side the model resizes images to."""
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    """The precision it computes in (float32, or the autocast type on a GPU)."""
    preferred_batch_size: int = 4
    fingerprint: str = ""
    """For local checkpoints: what changes when the files are replaced in place."""

    def segment(self, images: Any, options: SegmentOptions | None = None,
                prompts: Sequence[Sequence[Region]] | None = None,
                sizes: Sequence[tuple[int, int]] | None = None) -> Any:
        """Segment a list of images (a list of Predictions back) or one image (one Prediction).

        An image is a PIL image, a path, encoded bytes or an RGB array (see `sources.load_image`);
        a bad one raises ImageError naming it. `prompts` gives a promptable model each image's
        regions to mask. `sizes` are the (width, height) of the files the images were decoded from
        when they were decoded smaller (a JPEG draft): regions come back at those sizes, prompts
        are read at them.
        """
        options = options or SegmentOptions()
        single = not isinstance(images, list | tuple)
        batch = [_rgb(image) for image in ([images] if single else images)]
        if single and sizes is not None and len(sizes) == 2 and isinstance(sizes[0], int):
            sizes = [sizes]  # one image's (width, height)
        sizes = [tuple(size) for size in sizes] if sizes is not None else [im.size for im in batch]
        for name, given in (("prompt lists", prompts), ("sizes", sizes)):
            if given is not None and len(given) != len(batch):
                raise ValueError(f"{len(given)} {name} for {len(batch)} images")
        self.check_classes(options)
        if not batch:
            return []
        # one call at a time per model: adapters set per-call thresholds on the network (Mask
        # R-CNN's heads) and some cache per-shape state in it (YOLO's grids)
        with self.__dict__.setdefault("_lock", threading.Lock()), torch.inference_mode():
            found = self.predict(batch, options, prompts, sizes)
        predictions = [Prediction(regions=self.keep(regions, options)) for regions in found]
        return predictions[0] if single else predictions

    def predict(self, images: list[Image.Image], options: SegmentOptions,
                prompts: Sequence[Sequence[Region]] | None,
                sizes: list[tuple[int, int]]) -> list[list[Region]]:
        """Each image's regions at its size in `sizes`, before the class filter and the cap."""
        raise NotImplementedError

    def keep(self, regions: list[Region], options: SegmentOptions) -> list[Region]:
        """The regions `options` keep: their classes only; instances above the threshold, best
        first, at most `max_instances`."""
        if self.kind == "promptable":
            return regions  # one mask per prompt, whatever its label
        if options.classes is not None:
            wanted = set(options.classes)
            regions = [r for r in regions if r.label in wanted]
        if self.kind != "instance":
            return regions
        threshold = self.threshold(options)
        regions = [r for r in regions if r.score is None or r.score >= threshold]
        regions.sort(key=lambda r: -(r.score or 0.0))
        return regions[:options.max_instances]

    def threshold(self, options: SegmentOptions) -> float:
        return self.default_threshold if options.threshold is None else options.threshold

    def nms_iou(self, options: SegmentOptions) -> float | None:
        return self.default_nms_iou if options.nms_iou is None else options.nms_iou

    def check_classes(self, options: SegmentOptions) -> None:
        """Refuse class names the model does not know, before any image is processed."""
        if options.classes is None or self.kind == "promptable":
            return
        for name in options.classes:
            if name not in self.output_classes:
                close = difflib.get_close_matches(name, self.output_classes, n=3)
                hint = f"did you mean {', '.join(close)}?" if close else \
                    f"its classes are {', '.join(self.output_classes[:12])}..."
                raise OptionError(f"--classes {name}: {self.model_id} has no such class ({hint})")

    @property
    def output_classes(self) -> list[str]:
        """The classes regions can be labelled with (no background or placeholder names)."""
        return [c for c in self.classes if c not in BACKGROUND_NAMES and c != "N/A"]

    @property
    def label_map_classes(self) -> list[str]:
        """Pixel value i of this model's label maps (`classes.json`): a semantic model's own
        classes; for instance models, background first and then their classes."""
        if self.kind == "semantic":
            return list(self.classes)
        return ["background", *self.output_classes]

    def describe(self) -> dict:
        """What makes this segmenter's regions differ from another's, for a resume key."""
        return {"model": self.model_id, "kind": self.kind, "input_size": self.input_size,
                "dtype": str(self.dtype).removeprefix("torch."), "fingerprint": self.fingerprint}


def groups(keys: list) -> list[list[int]]:
    """Indices of equal keys, in first-seen order: images batched together share a shape, so
    nothing is padded and each image gets the regions it would get alone."""
    found: dict = defaultdict(list)
    for index, key in enumerate(keys):
        found[key].append(index)
    return list(found.values())


def scale(box: Sequence[float], source: tuple[int, int], target: tuple[int, int]) -> list[float]:
    """A box in pixels of an image of `source` (width, height), in pixels of one of `target`."""
    x_scale, y_scale = target[0] / source[0], target[1] / source[1]
    x0, y0, x1, y1 = (float(v) for v in box)
    return [x0 * x_scale, y0 * y_scale, x1 * x_scale, y1 * y_scale]


def chunk_size(size: tuple[int, int]) -> int:
    """How many float32 masks of `size` (width, height) to hold at once."""
    return max(1, MASK_BYTES // (4 * size[0] * size[1]))


def _rgb(image: Any) -> Image.Image:
    """An RGB PIL image as it is (the pipeline's decoded images), anything else through the
    shared loader (paths, bytes, arrays, other modes)."""
    if isinstance(image, Image.Image) and image.mode == "RGB":
        return image
    return sources.load_image(image)


def pick_precision(options: SegmenterLoadOptions) -> tuple[torch.device, torch.dtype]:
    """The device, and the dtype computed in there: `auto` is float32 on the CPU (bfloat16
    convolutions are slower there without AMX) and half precision on a GPU."""
    device = pick_device(options.device)
    if options.dtype == "auto":
        if device.type == "cuda":
            return device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return device, torch.float16 if device.type == "mps" else torch.float32
    if device.type == "cpu" and options.dtype != "float32":
        raise OptionError(f"--dtype {options.dtype}: segmenters run in float32 on the CPU")
    return device, getattr(torch, options.dtype)


def autocast(device: torch.device, dtype: torch.dtype):
    """Half-precision autocast on a GPU when asked for, else nothing."""
    enabled = dtype != torch.float32 and device.type in ("cuda", "mps")
    return torch.autocast(device.type, dtype=dtype, enabled=enabled)
