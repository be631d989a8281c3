"""Train captioners that captionkit then serves like any other: CNN-LSTM, ClipCap, BLIP fine-tunes.

`train(TrainOptions(...), CnnLstmOptions(...))` reads a dataset through `captionkit.datasets`, runs
the shared loop (`loop.py`) and leaves `best/` and `last/` checkpoints that `captionkit.load(path)`
and `--model path` take. `python -m captionkit.train ARCHITECTURE --help` lists the options.
"""

from captionkit.train.loop import TrainResult
from captionkit.train.options import BlipOptions, ClipCapOptions, CnnLstmOptions, TrainOptions
from captionkit.train.run import resume_options, saved_options, train

__all__ = ["BlipOptions", "ClipCapOptions", "CnnLstmOptions", "TrainOptions", "TrainResult",
           "resume_options", "saved_options", "train"]
