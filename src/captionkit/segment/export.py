"""Segmentation formats rebuilt from a run store: `coco` (instances.json) and `masks` (palette
label maps with classes.json), so `captionkit export` writes them as a run does, and overlays."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from PIL import Image

from captionkit.boxes import draw_copies
from captionkit.exporters import ExportOptions, relative_path
from captionkit.options import OVERLAY_ALPHA
from captionkit.predictions import Prediction, Region
from captionkit.segment.coco import Segmented
from captionkit.segment.labelmaps import classes_by_kind
from captionkit.segment.outputs import INSTANCES, write_instances, write_label_maps
from captionkit.segment.overlay import draw
from captionkit.store import Result

MASKS_DIR = "masks"
OVERLAYS_MANIFEST = ".captionkit-overlays.json"
"""In the --overlays folder: what each overlay shows, so a resumed run redraws nothing."""


def draw_overlays(results: Sequence[Result], directory: Path,
                  label_maps: Mapping[str, Sequence[str]] | None = None,
                  alpha: float = OVERLAY_ALPHA) -> list[Path]:
    """Each result's masks (filled at `alpha`), boxes and labels drawn over a copy of its image
    (`--overlays DIR`), each class in its label-map colour (see `write_masks`); a copy is drawn
    again when its colours or alpha change."""
    classes = classes_by_kind(_regions(results), label_maps)
    return draw_copies(results, directory,
                       lambda image, result: draw(image, result.as_prediction(), classes, alpha),
                       OVERLAYS_MANIFEST, style=[classes, alpha])


def write_coco(results: Sequence[Result], options: ExportOptions) -> list[Path]:
    """`OUT/instances.json`: every captioned image and its masked instances, COCO-style."""
    return [write_instances(options.output_dir / INSTANCES, _segmented(results))]


def write_masks(results: Sequence[Result], options: ExportOptions) -> list[Path]:
    """`OUT/masks/`: a palette PNG per image and classes.json, pixel values from the segmenters'
    own class lists (`labelmaps.classes_by_kind`); regions of several kinds (instances and a
    semantic map) get a map each, in `masks/instance/`, `masks/semantic/`..."""
    maps = classes_by_kind(_regions(results), options.label_maps) or {"instance": ["background"]}
    images = _segmented(results)
    written = []
    for kind, classes in maps.items():
        folder = options.output_dir / MASKS_DIR / (kind if len(maps) > 1 else "")
        own = [image._replace(prediction=Prediction(regions=[r for r in image.prediction.regions
                                                              if r.kind == kind]))
               for image in images]
        written += write_label_maps(folder, own, classes)
    return written


def _regions(results: Sequence[Result]) -> Iterator[Region]:
    return (region for result in results if result.status == "done" for region in result.regions)


def _segmented(results: Sequence[Result]) -> list[Segmented]:
    """The done results with their image sizes: from a mask, else from the file's header."""
    found = []
    for result in results:
        if result.status != "done":
            continue
        size = _size(result)
        if size is not None:
            found.append(Segmented(relative_path(result).as_posix(), size, result.as_prediction()))
    return found


def _size(result: Result) -> tuple[int, int] | None:
    for region in result.regions:
        if region.mask is not None:
            height, width = region.mask["size"]
            return width, height
    try:
        with Image.open(result.path) as image:
            return image.size
    except OSError:
        return None  # the image went away since the run: nothing to place its regions on
