"""What a segmenter is asked (`SegmentOptions`) and how it is loaded (`SegmenterLoadOptions`)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from captionkit.errors import OptionError
from captionkit.flags import flag
from captionkit.options import SEGMENTATION

TASKS = ("instance", "panoptic", "semantic")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(","))


@dataclass(frozen=True)
class SegmentOptions:
    """Which instances are kept and how their masks are cut. Only fields a model uses change its output."""

    threshold: float | None = flag(None, "Minimum score an instance needs, 0-1 (default: the model's "
                                   "own, 0.25 YOLO, 0.5 others).", panel=SEGMENTATION, metavar="NUM")
    mask_threshold: float = flag(0.5, "Mask probability above which a pixel belongs to an instance.",
                                 panel=SEGMENTATION)
    max_instances: int = flag(100, "Most instances kept per image, best first.", panel=SEGMENTATION, min=1)
    classes: tuple[str, ...] | None = flag(None, "Keep only these classes, e.g. person,dog.",
                                           panel=SEGMENTATION, cli_type=str | None, parse=_names,
                                           metavar="LIST")
    nms_iou: float | None = flag(None, "Drop an instance overlapping a better one of its class by more "
                                 "than this box IoU (default: the model's own).", panel=SEGMENTATION)

    def __post_init__(self) -> None:
        if isinstance(self.classes, str):  # the Python API may pass "person,dog"
            object.__setattr__(self, "classes", tuple(self.classes.split(",")))
        if self.classes is not None:
            names = tuple(name.strip() for name in self.classes)
            if not names or not all(names):
                raise OptionError("--classes needs class names separated by commas, "
                                  "e.g. --classes person,dog")
            object.__setattr__(self, "classes", names)
        for name, value in (("--threshold", self.threshold), ("--mask-threshold", self.mask_threshold),
                            ("--nms-iou", self.nms_iou)):
            if value is not None and not 0 <= value <= 1:
                raise OptionError(f"{name} {value}: use a number from 0 to 1")
        if self.max_instances < 1:
            raise OptionError("--max-instances must be at least 1")

    def key(self) -> str:
        """A short stable digest: two runs with equal keys and models produce the same regions."""
        blob = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class SegmenterLoadOptions:
    """Where and how a segmenter runs. `--device` and `--dtype` are the captioner's flags
    (`LoadOptions`), passed on."""

    device: str = "auto"
    """auto (the first GPU, else the CPU), cpu, cuda, cuda:N or mps."""
    dtype: str = "auto"
    """auto (bfloat16 or float16 autocast on a GPU, float32 on the CPU), float32, bfloat16 or float16."""
    input_size: int | None = flag(None, "Short side segmenters resize images to (masks stay at the "
                                  "image's size; default: the model's own, 640 YOLO, 800 Mask R-CNN, "
                                  "520 DeepLab/FCN/LR-ASPP).", panel=SEGMENTATION, metavar="N")
    task: str | None = flag(None, "Task of universal transformers segmenters (Mask2Former, OneFormer, "
                            "DETR): instance, panoptic or semantic (default: from the checkpoint's "
                            "name, else panoptic).", panel=SEGMENTATION, metavar="TASK")

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise OptionError(f"--dtype {self.dtype!r}: use {', '.join(DTYPES)}")
        if self.input_size is not None and self.input_size < 32:
            raise OptionError(f"--input-size {self.input_size}: use at least 32 pixels")
        if self.task is not None and self.task not in TASKS:
            raise OptionError(f"--task {self.task!r}: use {', '.join(TASKS)}")

    def check_unused(self, needed: str) -> None:
        """Refuse `--input-size` and `--task` on a run that loads no segmenter without `needed`."""
        for name, value in (("--input-size", self.input_size), ("--task", self.task)):
            if value is not None:
                raise OptionError(f"{name} sets how segmenters load, and this run loads none: add "
                                  f"{needed} NAMES or drop {name}")
