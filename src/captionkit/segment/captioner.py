"""Segmenters in the captioning pipeline: `captionkit segment` and `caption --segment NAME`.

A `SegmentingCaptioner` is a `Captioner` whose predictions carry the segmenters' regions, after a
captioner's text (and grounded phrases, which a promptable segmenter masks) or alone. The pipeline
then plans, executes, resumes and exports segmentation exactly as it does captions.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

from captionkit.models.base import Captioner
from captionkit.options import GenerationOptions
from captionkit.predictions import Prediction
from captionkit.segment.combine import add_masks
from captionkit.segment.options import SegmentOptions


class SegmentingCaptioner(Captioner):
    """`inner`'s predictions (none: empty text) with each segmenter's regions added in turn."""

    # Images reach segmenters at their full size, so masks are made at the file's own size.
    input_size = None

    def __init__(self, segmenters: Sequence, options: SegmentOptions,
                 inner: Captioner | None = None) -> None:
        if not segmenters:
            raise ValueError("a SegmentingCaptioner needs at least one segmenter")
        self.segmenters, self.segment_options, self.inner = list(segmenters), options, inner
        self.model_id = inner.model_id if inner else "+".join(s.model_id for s in self.segmenters)
        self.device = (inner or self.segmenters[0]).device
        self.run_kind = "caption" if inner else "segment"
        if inner is not None:
            self.preferred_batch_size, self.generates = inner.preferred_batch_size, inner.generates
            self.grounded, self.variant, self.fingerprint = inner.grounded, inner.variant, inner.fingerprint
        else:
            self.generates = False

    def identity(self) -> dict:
        own = {"model": self.model_id} if self.inner is None else self.inner.identity()
        return {**own, "segmenters": [s.model_id for s in self.segmenters],
                "segment": self.segment_options.key()}

    def caption(self, images: list[Image.Image], options: GenerationOptions,
                prompts: list[str | None] | None = None) -> list[Prediction]:
        found = (self.inner.caption(images, options, prompts) if self.inner is not None
                 else [Prediction() for _ in images])
        for segmenter in self.segmenters:
            found = add_masks(found, images, segmenter, self.segment_options)
        return found


def segmenting(segmenters: Sequence[str], options: SegmentOptions, inner: Captioner | None = None,
               device: str = "auto", dtype: str = "auto") -> SegmentingCaptioner:
    """Load the named segmenters around `inner` (or alone)."""
    from captionkit.segment.registry import load_segmenter

    return SegmentingCaptioner([load_segmenter(name, device=device, dtype=dtype) for name in segmenters],
                               options, inner)
