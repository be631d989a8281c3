"""The training progress bar: batches done, the running loss, images/s and the epoch's ETA."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from captionkit.ui import bar_on_stderr


@contextmanager
def epoch_bar(batches: int, label: str, enabled: bool) -> Iterator[Callable[[int, float], None]]:
    """A rich bar on stderr for one epoch; yields `advance(images, loss)`, a no-op when hidden."""
    if not enabled or batches <= 0:
        yield lambda images, loss: None
        return
    bar = bar_on_stderr(label, "loss {task.fields[loss]}", "{task.fields[rate]}")
    task = bar.add_task(label, total=batches, loss="-", rate="")
    started, seen, total_loss, steps = time.perf_counter(), 0, 0.0, 0

    def advance(images: int, loss: float) -> None:
        nonlocal seen, total_loss, steps
        seen, total_loss, steps = seen + images, total_loss + loss, steps + 1
        rate = seen / max(time.perf_counter() - started, 1e-9)
        bar.update(task, advance=1, loss=f"{total_loss / steps:.3f}", rate=f"{rate:.1f} img/s")

    with bar:
        yield advance
