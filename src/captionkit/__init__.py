"""captionkit: turn images into text with any captioning model, batched, resumable and scored."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Imported when first used, so that `captionkit --help` and the CLI's first moments need no torch.
_EXPORTS = {
    "Model": "captionkit.api", "load": "captionkit.api", "GateOptions": "captionkit.gate",
    "Caption": "captionkit.models", "Captioner": "captionkit.models",
    "GenerationOptions": "captionkit.options", "LoadOptions": "captionkit.options",
    "Pipeline": "captionkit.pipeline", "RunOptions": "captionkit.pipeline",
    "RunSummary": "captionkit.pipeline",
}

__all__ = ["Caption", "Captioner", "GateOptions", "GenerationOptions", "LoadOptions", "Model", "Pipeline",
           "RunOptions", "RunSummary", "__version__", "load"]

if TYPE_CHECKING:
    from captionkit.api import Model, load
    from captionkit.gate import GateOptions
    from captionkit.models import Caption, Captioner
    from captionkit.options import GenerationOptions, LoadOptions
    from captionkit.pipeline import Pipeline, RunOptions, RunSummary


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'captionkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
