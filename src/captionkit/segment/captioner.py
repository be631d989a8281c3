"""Segmenters in the captioning pipeline: `captionkit segment` and `caption --segment NAME`.

A `SegmentingCaptioner` is a `Captioner` whose predictions carry the segmenters' regions, after a
captioner's text (and grounded phrases, which a promptable segmenter masks) or alone. The pipeline
then plans, executes, resumes and exports segmentation exactly as it does captions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from PIL import Image

from captionkit import sources
from captionkit.models.base import Captioner, at_full_size, full_size
from captionkit.options import GenerationOptions, LoadOptions
from captionkit.predictions import Prediction
from captionkit.segment.combine import add_masks
from captionkit.segment.labelmaps import vocabularies
from captionkit.segment.options import SegmenterLoadOptions, SegmentOptions


class SegmentingCaptioner(Captioner):
    """`inner`'s predictions (none: empty text) with each segmenter's regions added in turn.

    Images arrive as `inner` would get them alone (a JPEG drafted to its input size), so its caption
    is the one it gives without segmenters; each segmenter gets the image decoded for its own input
    size and makes boxes and masks at the file's size.
    """

    decodes_again = regions_at_full_size = True

    def __init__(self, segmenters: Sequence, options: SegmentOptions,
                 inner: Captioner | None = None) -> None:
        if not segmenters:
            raise ValueError("a SegmentingCaptioner needs at least one segmenter")
        self.segmenters, self.segment_options, self.inner = list(segmenters), options, inner
        self.label_maps = vocabularies(self.segmenters)
        self.model_id = inner.model_id if inner else "+".join(s.model_id for s in self.segmenters)
        self.device = (inner or self.segmenters[0]).device
        self.run_kind = "caption" if inner else "segment"
        sizes = [s.input_size for s in self.segmenters]
        self.input_size = inner.input_size if inner else None if None in sizes else max(sizes)
        if inner is not None:
            self.preferred_batch_size, self.generates = inner.preferred_batch_size, inner.generates
            self.grounded, self.variant, self.fingerprint = inner.grounded, inner.variant, inner.fingerprint
        else:
            self.generates = False

    def identity(self) -> dict:
        own = {"model": self.model_id} if self.inner is None else self.inner.identity()
        return {**own, "segmenters": [s.describe() for s in self.segmenters],
                "segment": self.segment_options.key()}

    def caption(self, images: list[Image.Image], options: GenerationOptions,
                prompts: list[str | None] | None = None) -> list[Prediction]:
        sizes = [full_size(image) for image in images]
        found = ([at_full_size(self.inner, image, prediction) for image, prediction
                  in zip(images, self.inner.caption(images, options, prompts), strict=True)]
                 if self.inner is not None else [Prediction() for _ in images])
        for segmenter in self.segmenters:
            seen = [sources.at_least(image, segmenter.input_size) for image in images]
            found = add_masks(found, seen, segmenter, self.segment_options, sizes)
        return found


def segmenting(segmenters: Sequence[str], options: SegmentOptions, inner: Captioner | None = None,
               load: SegmenterLoadOptions | None = None) -> SegmentingCaptioner:
    """Load the named segmenters around `inner` (or alone)."""
    from captionkit.segment.registry import load_segmenter

    load = load or SegmenterLoadOptions()
    return SegmentingCaptioner([load_segmenter(name, load.device, load.dtype, load.input_size, load.task)
                                for name in segmenters], options, inner)


@dataclass(frozen=True)
class SegmentingLoader:
    """Loads the segmenters (around the captioner `--model` names, or alone) where the model runs:
    a Ray worker calls it with the recipe's name and load options, whose device and dtype the
    segmenters take too."""

    segmenters: tuple[str, ...]
    options: SegmentOptions
    with_captioner: bool = True
    load: SegmenterLoadOptions = SegmenterLoadOptions()

    def __call__(self, name: str, load: LoadOptions) -> SegmentingCaptioner:
        from captionkit.models import load as load_captioner

        inner = load_captioner(name, load) if self.with_captioner else None
        return segmenting(self.segmenters, self.options, inner,
                          replace(self.load, device=load.device, dtype=load.dtype))
