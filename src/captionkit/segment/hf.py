"""transformers segmentation checkpoints, post-processed by their own image processors.

Universal models (Mask2Former, MaskFormer, OneFormer, DETR-panoptic) answer the instance, panoptic
or semantic task; semantic models (SegFormer, UperNet, BEiT, DPT...) give a class per pixel.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from captionkit import hub
from captionkit.predictions import Region
from captionkit.segment import masks
from captionkit.segment.base import Segmenter, groups, pick_precision
from captionkit.segment.options import TASKS, SegmenterLoadOptions, SegmentOptions


def task_of(name: str, requested: str | None) -> str:
    """The task asked for, else the one the checkpoint's name says (Meta names its Mask2Former
    and OneFormer checkpoints `...-coco-instance`, `...-ade-semantic`), else panoptic."""
    if requested is not None:
        return requested
    lowered = name.lower()
    return next((task for task in TASKS if task in lowered), "panoptic")


class HFSegmenter(Segmenter):
    """Loading, per-shape batching and the forward pass shared by the transformers adapters."""

    auto_class = "AutoModelForSemanticSegmentation"

    def __init__(self, path: Path, model_id: str, options: SegmenterLoadOptions) -> None:
        import transformers

        self.model_id = model_id
        self.fingerprint = hub.fingerprint(path) if Path(model_id).is_absolute() else ""
        self.device, self.dtype = pick_precision(options)
        self.processor = self.load_processor(path)
        model_class = getattr(transformers, self.auto_class)
        self.model = model_class.from_pretrained(path, dtype=self.dtype).to(self.device).eval()
        labels = self.model.config.id2label
        self.classes = [str(labels[i]) for i in range(len(labels))]
        self.input_size = options.input_size
        if options.input_size is not None:
            self.image_processor.size = self.resized(self.image_processor.size, options.input_size)

    def load_processor(self, path: Path):
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(path)

    @property
    def image_processor(self):
        return getattr(self.processor, "image_processor", self.processor)

    @staticmethod
    def resized(size: dict, side: int) -> dict:
        """The processor's size setting with its short side (or square side) set to `side`."""
        if "shortest_edge" in size:
            longest = size.get("longest_edge")
            ratio = longest / size["shortest_edge"] if longest else None
            return {"shortest_edge": side, **({"longest_edge": round(side * ratio)} if ratio else {})}
        return {"height": side, "width": side}

    def encode(self, image: Image.Image) -> dict:
        return dict(self.processor(images=[image], return_tensors="pt"))

    def forward(self, images: list[Image.Image], sizes: list[tuple[int, int]]):
        """(image indices, model outputs, (height, width) to post-process at) per batch of equally
        shaped inputs:
        nothing is padded, so an image's result never depends on its batch-mates."""
        encoded = [self.encode(image) for image in images]
        for group in groups([tuple(e["pixel_values"].shape) for e in encoded]):
            inputs = {key: torch.cat([encoded[i][key] for i in group]).to(self.device)
                      for key in encoded[group[0]]}
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
            outputs = self.model(**inputs)
            yield group, outputs, [sizes[i][::-1] for i in group]


class SemanticSegmenter(HFSegmenter):
    """A class per pixel from `post_process_semantic_segmentation`, as one region per class."""

    kind = "semantic"

    def predict(self, images: list[Image.Image], options: SegmentOptions, prompts,
                sizes: list[tuple[int, int]]) -> list[list[Region]]:
        found: list[list[Region]] = [[] for _ in images]
        for group, outputs, targets in self.forward(images, sizes):
            maps = self.image_processor.post_process_semantic_segmentation(outputs, target_sizes=targets)
            for index, label_map in zip(group, maps, strict=True):
                found[index] = masks.semantic_regions(label_map.cpu().numpy(), self.classes)
        return found


class UniversalSegmenter(HFSegmenter):
    """Mask2Former, MaskFormer, OneFormer and DETR-panoptic: the instance, panoptic or semantic
    task through the processor's own post-processing."""

    auto_class = "AutoModelForUniversalSegmentation"

    def __init__(self, path: Path, model_id: str, options: SegmenterLoadOptions) -> None:
        self.task = task_of(model_id, options.task)
        super().__init__(path, model_id, options)
        self.kind = "semantic" if self.task == "semantic" else "instance"
        self.takes_task = getattr(self.model.config, "model_type", "") == "oneformer"

    def describe(self) -> dict:
        return {**super().describe(), "task": self.task}

    def load_processor(self, path: Path):
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(path)

    def encode(self, image: Image.Image) -> dict:
        if self.takes_task:  # OneFormer is told the task in words
            return dict(self.processor(images=[image], task_inputs=[self.task], return_tensors="pt"))
        return dict(self.processor(images=[image], return_tensors="pt"))

    def predict(self, images: list[Image.Image], options: SegmentOptions, prompts,
                sizes: list[tuple[int, int]]) -> list[list[Region]]:
        found: list[list[Region]] = [[] for _ in images]
        for group, outputs, targets in self.forward(images, sizes):
            for index, result in zip(group, self.post_process(outputs, targets, options), strict=True):
                found[index] = self.regions(result)
        return found

    def post_process(self, outputs, sizes: list[tuple[int, int]], options: SegmentOptions) -> list:
        processor = self.image_processor
        if self.task == "semantic":
            return processor.post_process_semantic_segmentation(outputs, target_sizes=sizes)
        function = getattr(processor, f"post_process_{self.task}_segmentation")
        kwargs = {"threshold": self.threshold(options), "mask_threshold": options.mask_threshold,
                  "target_sizes": sizes}
        if "return_binary_maps" in inspect.signature(function).parameters and self.task == "instance":
            kwargs["return_binary_maps"] = True  # instances may overlap, as COCO's do
        if "task_type" in inspect.signature(function).parameters:
            kwargs["task_type"] = self.task
        return function(outputs, **kwargs)

    def regions(self, result) -> list[Region]:
        if self.task == "semantic":
            return masks.semantic_regions(result.cpu().numpy(), self.classes)
        segmentation, segments = result["segmentation"], result["segments_info"]
        if segmentation is None or not segments:
            return []
        if segmentation.dim() == 3:  # binary maps, one per segment
            binary = segmentation.bool().cpu().numpy()
        else:
            binary = np.stack([(segmentation == s["id"]).cpu().numpy() for s in segments])
        regions = []
        for segment, rle in zip(segments, masks.encode(binary), strict=True):
            if masks.area(rle):  # a segment other segments covered entirely locates nothing
                regions.append(Region(box=masks.box(rle), label=self.classes[segment["label_id"]],
                                      score=float(segment["score"]), mask=rle))
        return regions
