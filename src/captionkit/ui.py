"""What a person sees while a job runs: progress bars on stderr."""

from __future__ import annotations

import time


class progress_bar:
    """A rich progress bar on stderr with images/s and ETA, or nothing when hidden."""

    def __init__(self, total: int, enabled: bool, label: str = "captioning") -> None:
        self.total = total
        self.enabled = enabled and total > 0
        self.label = label

    def __enter__(self):
        if not self.enabled:
            return lambda n: None
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(TextColumn(self.label), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
                            TextColumn("eta"), TimeRemainingColumn(), transient=False,
                            console=Console(stderr=True))  # stdout stays for results
        self.bar.start()
        task = self.bar.add_task("caption", total=self.total, rate="")
        started = time.perf_counter()
        done = 0

        def advance(n: int) -> None:
            nonlocal done
            done += n
            rate = done / max(time.perf_counter() - started, 1e-9)
            self.bar.update(task, advance=n, rate=f"{rate:.2f} img/s")

        return advance

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.bar.stop()
