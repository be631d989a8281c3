"""Captions and masks in one prediction: `caption --segment NAME`."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

from captionkit.predictions import Prediction
from captionkit.segment.base import Segmenter
from captionkit.segment.options import SegmentOptions


def add_masks(predictions: Sequence[Prediction], images: list[Image.Image], segmenter: Segmenter,
              options: SegmentOptions | None = None,
              sizes: Sequence[tuple[int, int]] | None = None) -> list[Prediction]:
    """Each prediction with the segmenter's masks: a promptable segmenter (SAM) masks the regions
    the prediction already has (a grounded caption's phrases keep their spans); any other adds its
    own regions after them. Text and extras are kept. With `sizes` (the files' sizes when images
    were drafted), the predictions' regions are read and the new ones made at those sizes."""
    if segmenter.kind == "promptable":
        masked = segmenter.segment(images, options, prompts=[p.regions for p in predictions], sizes=sizes)
        return [Prediction(p.text, p.extras, m.regions) for p, m in zip(predictions, masked, strict=True)]
    found = segmenter.segment(images, options, sizes=sizes)
    return [Prediction(p.text, p.extras, [*p.regions, *f.regions])
            for p, f in zip(predictions, found, strict=True)]
