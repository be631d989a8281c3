"""The training loop every architecture shares: epochs, validation, checkpoints, early stopping, resume.

An architecture is a `Task`: it prepares its data (vocabulary, cached features), owns the module
whose `forward(**batch)` returns the loss, builds its optimizer and scheduler, captions validation
images, and saves itself as a checkpoint captionkit loads. The loop does the rest the same way for
all of them: devices and several processes through `accelerate`, mixed precision through
`torch.autocast`.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from captionkit.errors import OptionError
from captionkit.train import checkpoint
from captionkit.train.curves import plot_curves, write_metrics
from captionkit.train.data import Example, Splits
from captionkit.train.options import TrainOptions
from captionkit.train.progress import epoch_bar
from captionkit.train.validation import validate

Plateau = torch.optim.lr_scheduler.ReduceLROnPlateau


class Task(Protocol):
    """One architecture, as the loop sees it."""

    architecture: str
    module: nn.Module
    """Trained; `module(**batch)` returns the batch's loss."""
    grad_clip: float | None

    def prepare(self, splits: Splits, device: torch.device) -> None:
        """Build the module and whatever the data needs; drop unreadable images from `splits`."""

    def train_size(self) -> int:
        """Training items (image-caption pairs) per epoch."""

    def collate(self, indices: list[int]) -> dict:
        """The batch of those training items, as `module`'s keyword arguments."""

    def optimizer(self, learning_rate: float, weight_decay: float) -> torch.optim.Optimizer: ...

    def scheduler(self, optimizer: torch.optim.Optimizer, total_steps: int, mode: str) -> object | None:
        """A per-step scheduler, a ReduceLROnPlateau (stepped each epoch with the monitored value),
        or None."""

    def captions(self, examples: list[Example], beams: int) -> dict[str, str]:
        """Generated captions by image name."""

    def val_loss(self, examples: list[Example]) -> float: ...

    def save(self, folder: Path) -> None:
        """A checkpoint `captionkit.load(folder)` serves."""

    def restore(self, folder: Path) -> None:
        """The trained weights from a checkpoint `save` wrote."""


@dataclass
class TrainResult:
    """Where the checkpoints are, every epoch's numbers and what was wrong with the data."""

    output: Path
    best: Path
    last: Path
    history: list[dict]
    best_epoch: int | None
    best_score: float | None
    stopped_early: bool
    problems: list[str] = field(default_factory=list)


@dataclass
class _Run:
    """What one training run holds between epochs."""

    task: Task
    options: TrainOptions
    accelerator: object
    module: nn.Module
    """The task's module, wrapped for several processes (DistributedDataParallel) when there are."""
    optimizer: torch.optim.Optimizer
    scheduler: object | None
    scaler: torch.amp.GradScaler
    state: dict


def fit(task: Task, options: TrainOptions, splits: Splits, accelerator=None) -> TrainResult:
    """Train `task` on `splits` for `options.epochs`, or on from the last checkpoint with `resume`."""
    accelerator = accelerator or make_accelerator(options)
    _seed(options)
    if accelerator.is_main_process:
        for name in ("last", "best"):
            checkpoint.recover(options.output / name)
    with accelerator.main_process_first():  # the main process fills the feature cache, the others read it
        task.prepare(splits, accelerator.device)
    if accelerator.is_main_process:
        _report_problems(options.output, splits.problems)
    run = _start(task, options, accelerator)
    scorer = _scorer(options) if accelerator.is_main_process else None
    state = run.state
    while state["epoch"] < options.epochs and not _patience_spent(state, options):
        row = _train_epoch(run)
        row.update(_validated(accelerator, task, splits, options, scorer))
        _update(state, row, options, run.scheduler)
        if accelerator.is_main_process:
            _checkpoint(run)
        accelerator.wait_for_everyone()
    stopped = _patience_spent(state, options) and state["epoch"] < options.epochs
    return TrainResult(options.output, options.output / "best", options.output / "last", state["history"],
                       state["best_epoch"], state["best"], stopped, splits.problems)


def _start(task: Task, options: TrainOptions, accelerator) -> _Run:
    """Optimizer, scheduler and gradient scaler, fresh or as the last checkpoint left them."""
    rate, decay = _rates(task, options)
    optimizer = task.optimizer(rate, decay)
    per_epoch = math.ceil(math.ceil(task.train_size() / accelerator.num_processes / options.batch_size)
                          / options.grad_accumulation)
    mode = "min" if options.monitor == "loss" else "max"
    scheduler = task.scheduler(optimizer, per_epoch * options.epochs, mode)
    # fp16 gradients underflow without scaling; bf16 and float32 need none
    scaler = torch.amp.GradScaler(accelerator.device.type, enabled=options.mixed_precision == "fp16")
    state = {"epoch": 0, "step": 0, "best": None, "best_epoch": None, "bad_epochs": 0, "history": []}
    # a run killed before its first checkpoint has nothing to restore: it starts again
    resuming = options.resume and (options.output / "last").exists()
    if resuming:
        state = _restore(task, options.output, optimizer, scheduler, scaler)
    module = accelerator.prepare(task.module)
    if resuming:
        checkpoint.set_rng_state(state["rng"])
    return _Run(task, options, accelerator, module, optimizer, scheduler, scaler, state)


def make_accelerator(options: TrainOptions):
    """The `accelerate.Accelerator` of this process (devices and processes; mixed precision is the
    loop's own, since accelerate's process-wide state would refuse a second precision in one
    Python process)."""
    try:
        from accelerate import Accelerator
    except ImportError as error:
        raise OptionError("training needs accelerate and matplotlib: "
                          "pip install 'captionkit[train]'") from error

    from captionkit.device import pick_device

    device = pick_device(options.device)
    if options.mixed_precision == "fp16" and device.type != "cuda":
        raise OptionError(f"--mixed-precision fp16 needs a CUDA GPU; on {device.type} use bf16 or no")
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    return Accelerator(cpu=device.type == "cpu")


def _autocast(device: torch.device, precision: str):
    if precision == "no":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def _seed(options: TrainOptions) -> None:
    random.seed(options.seed)
    np.random.seed(options.seed)
    torch.manual_seed(options.seed)
    if options.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)


def _rates(task: Task, options: TrainOptions) -> tuple[float, float]:
    from captionkit.train.options import DEFAULT_RATES

    rate, decay = DEFAULT_RATES[task.architecture]
    return (options.learning_rate if options.learning_rate is not None else rate,
            options.weight_decay if options.weight_decay is not None else decay)


def _report_problems(output: Path, problems: list[str]) -> None:
    import sys

    output.mkdir(parents=True, exist_ok=True)
    checkpoint.write_atomic(output / "problems.txt", "".join(f"{p}\n" for p in problems))
    if problems:
        print(f"{len(problems)} problem(s) in the data, left out of training (all in "
              f"{output / 'problems.txt'}); first: {problems[0]}", file=sys.stderr)


def _scorer(options: TrainOptions):
    if options.clip_model is None:
        return None
    from captionkit.scoring import load_scorer

    return load_scorer(options.clip_model, device=options.device)


def _restore(task: Task, output: Path, optimizer, scheduler, scaler) -> dict:
    """Weights, optimizer, scheduler, gradient scaler and loop state from `output/last`."""
    last = output / "last"
    state = checkpoint.load_trainer_state(last)
    task.restore(last)
    optimizer.load_state_dict(state.pop("optimizer"))
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return state


def _patience_spent(state: dict, options: TrainOptions) -> bool:
    return options.patience is not None and state["bad_epochs"] >= options.patience


def _epoch_batches(size: int, options: TrainOptions, epoch: int, rank: int, world: int) -> list[list[int]]:
    """This process's batches: a permutation seeded by the epoch (the same in every process and in a
    resumed run), dealt out so that each process gets as many batches as the others."""
    generator = torch.Generator().manual_seed(options.seed * 100_003 + epoch)
    order = torch.randperm(size, generator=generator).tolist()
    order = order[: len(order) - len(order) % world] if world > 1 else order
    mine = order[rank::world]
    return [mine[i:i + options.batch_size] for i in range(0, len(mine), options.batch_size)]


def _loader(task: Task, batches: list[list[int]], options: TrainOptions, epoch: int):
    if options.workers == 0:
        return (task.collate(batch) for batch in batches)
    # workers draw augmentations from seeds this generator gives them: the same every run
    generator = torch.Generator().manual_seed(options.seed * 100_003 + epoch)
    return torch.utils.data.DataLoader(range(task.train_size()), batch_sampler=batches,
                                       collate_fn=task.collate, num_workers=options.workers,
                                       generator=generator)


def _train_epoch(run: _Run) -> dict:
    """One pass over this process's batches; the epoch's mean loss and speed."""
    options, accelerator, state = run.options, run.accelerator, run.state
    run.module.train()
    epoch = state["epoch"]
    batches = _epoch_batches(run.task.train_size(), options, epoch, accelerator.process_index,
                             accelerator.num_processes)
    total = torch.zeros(2, device=accelerator.device)  # summed loss x items, items
    started = time.perf_counter()
    label = f"epoch {epoch + 1}/{options.epochs}"
    with epoch_bar(len(batches), label, options.progress and accelerator.is_main_process) as advance:
        for i, batch in enumerate(_loader(run.task, batches, options, epoch)):
            stepping = (i + 1) % options.grad_accumulation == 0 or i + 1 == len(batches)
            # gradients are exchanged between processes only on the micro-batch that steps
            with nullcontext() if stepping else accelerator.no_sync(run.module):
                with _autocast(accelerator.device, options.mixed_precision):
                    loss = run.module(**_to(batch, accelerator.device))
                run.scaler.scale(loss / options.grad_accumulation).backward()
            if stepping:
                _step(run)
            items = len(batches[i])
            total += torch.tensor([loss.item() * items, items], device=total.device)
            advance(items, loss.item())
    seconds = time.perf_counter() - started
    total = accelerator.reduce(total, reduction="sum")
    return {"epoch": epoch + 1, "step": state["step"], "train_loss": (total[0] / total[1]).item(),
            "images_per_s": total[1].item() / seconds, "train_seconds": seconds,
            "learning_rate": run.optimizer.param_groups[0]["lr"], "processes": accelerator.num_processes,
            "backend": accelerator.state.backend}


def _step(run: _Run) -> None:
    """Clip, step the optimizer (through the fp16 scaler) and a per-step scheduler."""
    if run.task.grad_clip:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.module.parameters(), run.task.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad()
    run.state["step"] += 1
    if run.scheduler is not None and not isinstance(run.scheduler, Plateau):
        run.scheduler.step()


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _validated(accelerator, task: Task, splits: Splits, options: TrainOptions, scorer) -> dict:
    """The validation numbers, computed by the main process and shared with the others."""
    from accelerate.utils import broadcast_object_list

    row = [validate(task, splits.val, options, scorer) if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(row)
    return row[0]


def _update(state: dict, row: dict, options: TrainOptions, scheduler) -> None:
    """Record the epoch; track the best monitored value and how long it has not improved."""
    value = row["val_loss"] if options.monitor == "loss" else row[options.monitor]
    best = state["best"]
    better = best is None or (value < best if options.monitor == "loss" else value > best)
    if better:
        state.update(best=value, best_epoch=row["epoch"], bad_epochs=0)
    else:
        state["bad_epochs"] += 1
    row["improved"] = better
    state["epoch"] = row["epoch"]
    state["history"].append(row)
    if isinstance(scheduler, Plateau):
        scheduler.step(value)


def _checkpoint(run: _Run) -> None:
    """best/ when the epoch improved, then last/ with everything a resume needs, then the curves."""
    output, state, task = run.options.output, run.state, run.task
    row = state["history"][-1]
    if row["improved"]:
        with checkpoint.checkpoint_dir(output / "best") as folder:
            task.save(folder)
            _write_summary(folder, row)
    with checkpoint.checkpoint_dir(output / "last") as folder:
        task.save(folder)
        _write_summary(folder, row)
        checkpoint.save_trainer_state(folder, {
            **state, "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict() if run.scheduler is not None else None,
            "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None,
            "rng": checkpoint.rng_state()})
    write_metrics(output / "metrics.csv", state["history"])
    plot_curves(output / "curves.png", state["history"], f"{task.architecture}: {output.name}")


def _write_summary(folder: Path, row: dict) -> None:
    summary = {k: v for k, v in row.items() if k != "improved"}
    (folder / "training.json").write_text(json.dumps(summary, indent=1) + "\n")
