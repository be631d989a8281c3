"""Train captioners that captionkit then serves like any other: CNN-LSTM, ClipCap, BLIP fine-tunes.

`train(TrainOptions(...), CnnLstmOptions(...))` reads a dataset through `captionkit.datasets`, runs
the shared loop (`loop.py`) and leaves `best/` and `last/` checkpoints that `captionkit.load(path)`
and `--model path` take. `captionkit train ARCHITECTURE --help` lists the options.

The names below load on first use: `captionkit --help` reads the options classes, and must not wait
for torch, which the loop imports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from captionkit.train.loop import TrainResult
    from captionkit.train.options import BlipOptions, ClipCapOptions, CnnLstmOptions, TrainOptions
    from captionkit.train.run import resume_options, saved_options, train

_HOMES = {"TrainResult": "loop", "BlipOptions": "options", "ClipCapOptions": "options",
          "CnnLstmOptions": "options", "TrainOptions": "options", "resume_options": "run",
          "saved_options": "run", "train": "run"}

__all__ = ["BlipOptions", "ClipCapOptions", "CnnLstmOptions", "TrainOptions", "TrainResult",
           "resume_options", "saved_options", "train"]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
