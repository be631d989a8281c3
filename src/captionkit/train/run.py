"""`train(options, model)`: read the dataset, pick the architecture's task, run the loop.

The options of a run are kept in its output folder (train.json), so `--resume` continues with the
same ones: options that shape the result must stay as they were; how long to go on, how to show
progress and where to run may change.
"""

from __future__ import annotations

import json
from dataclasses import fields, replace
from pathlib import Path

from captionkit.errors import OptionError
from captionkit.train.checkpoint import write_atomic
from captionkit.train.data import load_splits
from captionkit.train.loop import TrainResult, fit, make_accelerator
from captionkit.train.options import ARCHITECTURES, TrainOptions, architecture_of, to_dict

RUN_FILE = "train.json"
# May differ between a run and its resumption: they change how long and where, not what is learned.
RESUMABLE_CHANGES = frozenset({"epochs", "patience", "progress", "workers", "device", "resume", "output",
                               "cache_dir", "clip_model", "max_val_images", "val_beams", "mixed_precision"})
TASKS = {"cnn-lstm": "captionkit.train.cnn_lstm:CnnLstmTask",
         "clipcap": "captionkit.train.clipcap:ClipCapTask",
         "blip": "captionkit.train.blip:blip_task"}


def train(options: TrainOptions, model: object) -> TrainResult:
    """Train the architecture `model`'s options belong to (CnnLstmOptions, ClipCapOptions,
    BlipOptions) into `options.output`; with `options.resume`, from its last checkpoint."""
    import importlib

    architecture = architecture_of(model)
    if options.resume:
        check_resumable(options, model)
    elif (options.output / "last").exists():
        raise OptionError(f"--output {options.output} already holds a training run: pass --resume to "
                          "continue it, or another --output")
    accelerator = make_accelerator(options)
    splits = load_splits(options)
    if accelerator.is_main_process and not options.resume:
        _record(options, model, architecture)
    module, _, name = TASKS[architecture].partition(":")
    task = getattr(importlib.import_module(module), name)(options, model)
    return fit(task, options, splits, accelerator)


def _record(options: TrainOptions, model: object, architecture: str) -> None:
    options.output.mkdir(parents=True, exist_ok=True)
    record = {"architecture": architecture, "train": to_dict(options), "model": to_dict(model)}
    write_atomic(options.output / RUN_FILE, json.dumps(record, indent=1) + "\n")


def saved_options(output: Path) -> tuple[TrainOptions, object]:
    """The options a run in `output` was started with."""
    path = Path(output) / RUN_FILE
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise OptionError(f"--resume: {output} holds no {RUN_FILE}, so it is not a training run's "
                          "--output folder") from None
    except (OSError, ValueError) as error:
        raise OptionError(f"{path}: unreadable ({error})") from error
    model_class = ARCHITECTURES[record["architecture"]]
    return TrainOptions(**record["train"]), model_class(**record["model"])


def check_resumable(options: TrainOptions, model: object) -> None:
    """Refuse to resume with options that would make a different model than the run began."""
    saved_train, saved_model = saved_options(options.output)
    if type(saved_model) is not type(model):
        raise OptionError(f"--resume: the run in {options.output} trains {architecture_of(saved_model)}, "
                          f"not {architecture_of(model)}")
    for given, saved in ((options, saved_train), (model, saved_model)):
        for f in fields(given):  # type: ignore[arg-type]
            if f.name in RESUMABLE_CHANGES:
                continue
            now, then = getattr(given, f.name), getattr(saved, f.name)
            if now != then:
                raise OptionError(f"--resume: --{f.name.replace('_', '-')} {now} differs from the run's "
                                  f"{then} (see {options.output / RUN_FILE}); drop it, or train into "
                                  "another --output")


def resume_options(output: Path, **changes) -> tuple[TrainOptions, object]:
    """The saved options of the run in `output`, with `changes` (such as epochs=20), set to resume."""
    saved_train, saved_model = saved_options(output)
    train_changes = {k: v for k, v in changes.items() if k in {f.name for f in fields(TrainOptions)}}
    model_changes = {k: v for k, v in changes.items() if k not in train_changes}
    return (replace(saved_train, output=Path(output), resume=True, **train_changes),
            replace(saved_model, **model_changes))
