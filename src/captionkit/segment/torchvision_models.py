"""torchvision's COCO Mask R-CNNs and its VOC semantic models (DeepLabV3, FCN, LR-ASPP).

Weights come through torchvision's weights API and the torch hub cache; each model is built by
torchvision's own builder, so it runs exactly as torchvision's documentation shows.
"""

from __future__ import annotations

import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from PIL import Image

from captionkit.errors import ModelUnavailableError
from captionkit.predictions import Region
from captionkit.segment import masks
from captionkit.segment.base import Segmenter, autocast, chunk_size, groups, pick_precision, scale
from captionkit.segment.options import SegmenterLoadOptions, SegmentOptions

REACHABILITY_TIMEOUT_S = 3.0
DEFAULT_MIN_SIZE, DEFAULT_MAX_SIZE = 800, 1333  # torchvision's GeneralizedRCNNTransform defaults


def weights_file(weights) -> Path:
    """Where the torch hub cache keeps `weights` (a torchvision weights enum member)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name


def ensure_weights(weights, name: str) -> None:
    """Make sure the builder will find plain tensors: a cached file is checked to hold only
    tensors (unpickled with `weights_only`); a missing one needs the download host to answer."""
    path = weights_file(weights)
    if path.is_file():
        try:
            _load_tensors(path)
        except Exception as error:  # noqa: BLE001 - truncated, not a checkpoint, or pickled code
            reason = " ".join(str(error).split())[:160]
            raise ModelUnavailableError(f"{name}: {path} is not a usable weights file ({reason}); "
                                        f"delete it and download {weights.url} again") from None
        return
    host = urlparse(weights.url).hostname or ""
    try:
        with socket.create_connection((host, 443), timeout=REACHABILITY_TIMEOUT_S):
            return
    except OSError:
        raise ModelUnavailableError(f"{name}: its weights are not in the torch hub cache and {host} "
                                    f"cannot be reached: put {path.name} (from {weights.url}) at "
                                    f"{path}") from None


def _load_tensors(path: Path) -> None:
    """Unpickle allowing tensors only; mapped, not read, unless it is in the pre-zip format that
    older torchvision weights use."""
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as error:
        if "mmap" not in str(error):
            raise
        torch.load(path, map_location="cpu", weights_only=True)


def build(builder_name: str, name: str, **kwargs) -> tuple[torch.nn.Module, object]:
    """torchvision's model `builder_name` with its default weights, and those weights."""
    import torchvision

    weights = torchvision.models.get_model_weights(builder_name).DEFAULT
    ensure_weights(weights, name)
    model = torchvision.models.get_model(builder_name, weights=weights, progress=False, **kwargs)
    return model.eval(), weights


class MaskRCNNSegmenter(Segmenter):
    """torchvision Mask R-CNN: the model's own resize, NMS and mask pasting at the image's size."""

    kind = "instance"
    default_threshold = 0.5
    default_nms_iou = 0.5

    def __init__(self, builder_name: str, name: str, options: SegmenterLoadOptions) -> None:
        self.model_id = name
        self.input_size = options.input_size or DEFAULT_MIN_SIZE
        max_size = round(self.input_size * DEFAULT_MAX_SIZE / DEFAULT_MIN_SIZE)
        self.model, self.weights = build(builder_name, name, min_size=self.input_size,
                                         max_size=max_size)
        self.device, self.dtype = pick_precision(options)
        self.model.to(self.device)
        self.classes = list(self.weights.meta["categories"])
        self.transform = self.weights.transforms()
        self.preferred_batch_size = 4 if self.device.type != "cpu" else 2

    def predict(self, images: list[Image.Image], options: SegmentOptions, prompts,
                sizes: list[tuple[int, int]]) -> list[list[Region]]:
        heads = self.model.roi_heads
        # The model filters before pasting masks at full size, which is the costly part.
        heads.score_thresh = self.threshold(options)
        heads.nms_thresh = self.nms_iou(options)
        heads.detections_per_img = options.max_instances
        found: list[list[Region]] = [[] for _ in images]
        for group in groups([image.size for image in images]):
            tensors = [self.transform(images[i]).to(self.device) for i in group]
            with autocast(self.device, self.dtype):
                outputs = self.model(tensors)
            for index, output in zip(group, outputs, strict=True):
                found[index] = self.regions(output, images[index].size, sizes[index], options)
        return found

    def regions(self, output: dict, decoded: tuple[int, int], size: tuple[int, int],
                options: SegmentOptions) -> list[Region]:
        """Regions at `size`: torchvision's masks, pasted at the decoded image's size, are
        upsampled (still soft) when the file was bigger, then thresholded."""
        soft, rles = output["masks"].float(), []
        step = chunk_size(size)
        for start in range(0, len(soft), step):
            chunk = soft[start:start + step]
            if size != decoded:
                chunk = F.interpolate(chunk, size=size[::-1], mode="bilinear", align_corners=False)
            rles += masks.encode((chunk[:, 0] > options.mask_threshold).cpu().numpy())
        return [Region(box=scale(box, decoded, size), label=self.classes[int(label)],
                       score=float(score), mask=rle)
                for box, label, score, rle in zip(output["boxes"].float().tolist(), output["labels"].tolist(),
                                                  output["scores"].float().tolist(), rles, strict=True)]


class TorchvisionSemanticSegmenter(Segmenter):
    """torchvision DeepLabV3 / FCN / LR-ASPP: logits upsampled to the image's size, then argmax."""

    kind = "semantic"

    def __init__(self, builder_name: str, name: str, options: SegmenterLoadOptions) -> None:
        self.model_id = name
        self.model, self.weights = build(builder_name, name)
        self.model.aux_classifier = None  # a training head: its output is never used here
        self.device, self.dtype = pick_precision(options)
        self.model.to(self.device)
        self.classes = list(self.weights.meta["categories"])
        self.transform = self.weights.transforms()
        self.input_size = options.input_size or self.transform.resize_size[0]
        self.transform.resize_size = [self.input_size]

    def predict(self, images: list[Image.Image], options: SegmentOptions, prompts,
                sizes: list[tuple[int, int]]) -> list[list[Region]]:
        tensors = [self.transform(image) for image in images]
        found: list[list[Region]] = [[] for _ in images]
        for group in groups([tuple(t.shape) for t in tensors]):
            batch = torch.stack([tensors[i] for i in group]).to(self.device)
            with autocast(self.device, self.dtype):
                logits = self.model(batch)["out"]
            for row, index in enumerate(group):
                width, height = sizes[index]
                full = F.interpolate(logits[row:row + 1].float(), size=(height, width),
                                     mode="bilinear", align_corners=False)
                label_map = full.argmax(1)[0].to(torch.uint8).cpu().numpy()
                found[index] = masks.semantic_regions(label_map, self.classes)
        return found
