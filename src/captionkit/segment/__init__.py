"""Segmentation beside captions: instance, semantic and promptable (SAM) masks as regions.

`load_segmenter(name).segment(images)` returns one `Prediction` per image whose regions carry COCO
RLE masks at the image's own size. The modules follow the data's path: `registry` (names ->
adapters: `yolo`, `torchvision_models`, `hf`, `sam`), `base` (the interface and shared filtering),
`masks` (RLE and label maps), `combine` (captions + masks), `coco`, `labelmaps`, `overlay` and
`outputs` (files), `metrics` (COCO AP/AR, mIoU). Heavy libraries load only with a model.
"""

from captionkit.segment.options import SegmenterLoadOptions, SegmentOptions
from captionkit.segment.registry import DEFAULT, SEGMENTERS, SegmenterSpec, load_segmenter

__all__ = ["DEFAULT", "SEGMENTERS", "SegmentOptions", "SegmenterLoadOptions", "SegmenterSpec",
           "load_segmenter"]
