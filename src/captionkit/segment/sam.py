"""SAM through transformers: a mask for every box it is prompted with.

The boxes come from another model's regions (a detector's instances, a grounded captioner's
phrases); each mask keeps its prompt's label, score, kind and caption span.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from captionkit import hub
from captionkit.errors import OptionError
from captionkit.predictions import Region
from captionkit.segment import masks
from captionkit.segment.base import Segmenter, pick_precision, scale
from captionkit.segment.options import SegmenterLoadOptions, SegmentOptions


class SamSegmenter(Segmenter):
    """Image embeddings computed once per image (batched), then one mask per prompt box."""

    kind = "promptable"

    def __init__(self, path: Path, model_id: str, options: SegmenterLoadOptions) -> None:
        from transformers import AutoModel, AutoProcessor

        self.model_id = model_id
        self.fingerprint = hub.fingerprint(path) if Path(model_id).is_absolute() else ""
        self.device, self.dtype = pick_precision(options)
        self.processor = AutoProcessor.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path, dtype=self.dtype).to(self.device).eval()
        self.classes = []
        self.input_size = self.processor.image_processor.size.get("longest_edge")

    def predict(self, images: list[Image.Image], options: SegmentOptions,
                prompts: Sequence[Sequence[Region]] | None,
                sizes: list[tuple[int, int]]) -> list[list[Region]]:
        if prompts is None:
            raise OptionError(f"{self.model_id} masks the boxes it is given: pair it with a detector "
                              "or a grounded captioner (caption --segment sam)")
        found: list[list[Region]] = [[] for _ in images]
        asked = [i for i, regions in enumerate(prompts) if regions]
        if not asked:
            return found
        inputs = self.processor(images=[images[i] for i in asked], return_tensors="pt")
        pixels = inputs["pixel_values"].to(self.device, self.dtype)
        embeddings = self.model.get_image_embeddings(pixels)
        for row, index in enumerate(asked):
            found[index] = self.masked(images[index], sizes[index], prompts[index],
                                       embeddings[row:row + 1], options)
        return found

    def masked(self, image: Image.Image, size: tuple[int, int], prompts: Sequence[Region],
               embedding: torch.Tensor, options: SegmentOptions) -> list[Region]:
        """A mask at `size` (the file's) for each prompt, whose box is in that size's pixels."""
        boxes = [scale(region.box, size, image.size) for region in prompts]
        inputs = self.processor(images=[image], input_boxes=[boxes], return_tensors="pt")
        outputs = self.model(image_embeddings=embedding,
                             input_boxes=inputs["input_boxes"].to(self.device, self.dtype),
                             multimask_output=False)
        binary = self.processor.post_process_masks(
            outputs.pred_masks.float().cpu(), [size[::-1]], inputs["reshaped_input_sizes"],
            mask_threshold=logit(options.mask_threshold))[0][:, 0]
        return [Region(box=region.box, label=region.label, score=region.score, mask=rle,
                       span=region.span, kind=region.kind)
                for region, rle in zip(prompts, masks.encode(binary.numpy()), strict=True)]


def logit(probability: float) -> float:
    """The mask logit SAM compares against for a probability threshold."""
    clipped = min(max(probability, 1e-6), 1 - 1e-6)
    return math.log(clipped / (1 - clipped))
