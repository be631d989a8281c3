"""What a run leaves to read: metrics.csv (one row per epoch) and curves.png (loss and metrics)."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from captionkit.train.checkpoint import write_atomic

COLUMNS = ("epoch", "step", "train_loss", "val_loss", "BLEU-4", "CIDEr-D", "CLIPScore", "learning_rate",
           "images_per_s", "train_seconds", "val_seconds")
METRICS = ("BLEU-4", "CIDEr-D", "CLIPScore")


def write_metrics(path: Path, history: list[dict]) -> None:
    """All epochs so far, rewritten whole, so a resumed run never keeps rows of epochs it redid."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: _cell(row.get(k)) for k in COLUMNS})
    write_atomic(path, buffer.getvalue())


def _cell(value: object) -> object:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return "" if value is None else value


def read_metrics(path: Path) -> list[dict]:
    """metrics.csv back as rows of floats (empty cells omitted)."""
    with open(path, newline="") as file:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(file)]


def plot_curves(path: Path, history: list[dict], title: str = "") -> None:
    """Training and validation loss beside the validation metrics, per epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; set before pyplot is imported
    from matplotlib import pyplot

    epochs = [row["epoch"] for row in history]
    figure, (losses, metrics) = pyplot.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for key, label in (("train_loss", "train loss"), ("val_loss", "validation loss")):
        _line(losses, epochs, history, key, label)
    losses.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    for key in METRICS:
        _line(metrics, epochs, history, key, key)
    metrics.set(xlabel="epoch", title="validation")
    for axes in (losses, metrics):
        axes.grid(alpha=0.3)
        if axes.lines:
            axes.legend()
    if title:
        figure.suptitle(title)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    pyplot.close(figure)
    write_atomic(path, buffer.getvalue())


def _line(axes, epochs: list, history: list[dict], key: str, label: str) -> None:
    points = [(e, row[key]) for e, row in zip(epochs, history, strict=True) if row.get(key) is not None]
    if points:
        axes.plot(*zip(*points, strict=True), marker="o", label=label)
