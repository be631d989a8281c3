"""captionkit: turn images into text with any captioning model, batched, resumable and scored.

The names below load on first use, so `import captionkit.cli` (and `captionkit --help`) stays quick.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_HOMES = {
    "Model": "captionkit.api", "load": "captionkit.api",
    "Caption": "captionkit.predictions", "Prediction": "captionkit.predictions",
    "Region": "captionkit.predictions", "Captioner": "captionkit.models.base",
    "GateOptions": "captionkit.options", "GenerationOptions": "captionkit.options",
    "LoadOptions": "captionkit.options", "RunOptions": "captionkit.options",
    "Pipeline": "captionkit.pipeline", "RunSummary": "captionkit.pipeline",
    "load_segmenter": "captionkit.segment",
}

__all__ = ["Caption", "Captioner", "GateOptions", "GenerationOptions", "LoadOptions", "Model", "Pipeline",
           "Prediction", "Region", "RunOptions", "RunSummary", "__version__", "load", "load_segmenter"]

if TYPE_CHECKING:
    from captionkit.api import Model, load
    from captionkit.models.base import Captioner
    from captionkit.options import GateOptions, GenerationOptions, LoadOptions, RunOptions
    from captionkit.pipeline import Pipeline, RunSummary
    from captionkit.predictions import Caption, Prediction, Region
    from captionkit.segment import load_segmenter


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'captionkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
