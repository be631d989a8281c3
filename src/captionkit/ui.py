"""What a person sees: consoles, progress bars, end-of-run summaries and the model list."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from captionkit.models import ModelSpec
    from captionkit.pipeline import RunSummary
    from captionkit.segment import SegmenterSpec

# No markup unless a line asks for it: paths, names and reasons may hold `[...]` (`a [1].jpg`).
err = Console(stderr=True, markup=False)
"""Messages, warnings and progress: stdout stays for results."""
out = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 200, markup=False)
"""Results (tables, metrics); piped, lines are not folded at 80 columns unless COLUMNS says so."""

SHOWN = 20
"""Failures and skipped files listed one by one before the rest are counted."""


def bar_on_stderr(label: str, *columns: str):
    """A rich Progress on stderr (stdout stays for results): the label, the bar, done/total, text
    `columns` (formats over the task's fields), the time so far and the ETA."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), *map(TextColumn, columns),
                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                    console=Console(stderr=True))


class progress_bar:
    """A rich progress bar on stderr with images/s and ETA, or nothing when hidden."""

    def __init__(self, total: int, enabled: bool, label: str = "captioning") -> None:
        self.total = total
        self.enabled = enabled and total > 0
        self.label = label

    def __enter__(self):
        if not self.enabled:
            return lambda n: None
        self.bar = bar_on_stderr(self.label, "{task.fields[rate]}")
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


def counted(count: int, noun: str) -> str:
    """'1 caption', '2 captions'."""
    return f"{count} {noun}{'s' * (count != 1)}"


def print_run(summary: RunSummary) -> None:
    """The end of a captioning run: counts, failures, files written and the CLIPScores."""
    failed = len(summary.failed)
    verb = "segmented" if summary.run_kind == "segment" else "captioned"
    parts = [f"[bold]{summary.done}[/] {verb}", f"{summary.skipped} already done", f"{failed} failed"]
    if summary.duplicates:
        parts.append(f"{summary.duplicates} identical to another file")
    if summary.failed_earlier:
        parts.append(f"{summary.failed_earlier} failed earlier (--retry-failed to retry)")
    err.print(", ".join(parts) + f" in {summary.seconds:.1f}s ({summary.images_per_second:.2f} images/s) "
              f"with {escape(summary.model_id)}", markup=True)
    print_problems("failed", [f"{name}: {reason}" for name, reason in summary.failed], "see captions.jsonl")
    print_missing(summary.missing)
    print_kept(summary.kept)
    if summary.unmatched_prompts:
        err.print(f"  {counted(len(summary.unmatched_prompts), '--prompt-file row')} named no input "
                  f"image, such as {summary.unmatched_prompts[0]}", highlight=False)
    print_written(summary.outputs)
    print_unwritten(summary.unwritten)
    if getattr(summary, "scores", None):
        print_scores(summary.scores, summary.min_score, summary.passed)


def print_problems(label: str, problems: Sequence[str], where: str | None = None, style: str = "red") -> None:
    """`  failed NAME: REASON` for the first few, then how many more (and where they are listed)."""
    for problem in problems[:SHOWN]:
        err.print(f"  [{style}]{label}[/] {escape(problem)}", markup=True, highlight=False)
    if len(problems) > SHOWN:
        err.print(f"  ... and {len(problems) - SHOWN} more" + (f" ({where})" if where else ""))


def print_written(paths: Sequence[Path], shown: int = 5) -> None:
    """`  wrote PATH` for the first files, then how many more."""
    from captionkit.sources import printable

    for path in paths[:shown]:
        err.print(f"  wrote {printable(path)}")
    if len(paths) > shown:
        err.print(f"  ... and {len(paths) - shown} more files")


def print_unwritten(notes: Sequence[str]) -> None:
    """`  FORMAT: nothing written, since ...` for each format asked for that had nothing to write."""
    for note in notes:
        err.print(f"  {note}", highlight=False)


def print_missing(missing: list[str]) -> None:
    if missing:
        err.print(f"  left out {counted(len(missing), 'image')} captioned earlier and no longer on "
                  f"disk, such as {missing[0]}", highlight=False)


def print_kept(kept: list[Path]) -> None:
    from captionkit.sources import printable

    if kept:
        err.print(f"  kept {counted(len(kept), 'caption file')} captionkit did not write, such as "
                  f"{printable(kept[0])} (--overwrite replaces them)", highlight=False)


def print_scores(scores: list[float], min_score: float | None, passed: int) -> None:
    """The mean CLIPScore, a histogram, and how many reached `min_score`."""
    from captionkit.scoring import histogram_text

    err.print(f"CLIPScore of {counted(len(scores), 'caption')} (mean {sum(scores) / len(scores):.4f}):")
    err.print(histogram_text(scores, threshold=min_score), highlight=False, markup=False)
    if min_score is not None:
        err.print(f"{passed} of {len(scores)} passed (>= {min_score:g})")


def print_models(specs: Iterable[ModelSpec], families: Iterable[str], cached: Mapping[str, str]) -> None:
    """The known captioners (see `_print_fitting`), then the families whose checkpoints work by Hub
    id or folder."""
    specs = list(specs)
    wide = Table("alias", "source", "family", "params", "license", "memory", "cached")
    for spec in specs:
        wide.add_row(spec.alias, spec.source, spec.family, spec.params, spec.license, spec.memory,
                     cached[spec.alias])
    _print_fitting(wide, [(spec.alias, spec.source, f"{spec.family}, {spec.params} parameters, "
                           f"{spec.license}, {spec.memory}, cached: {cached[spec.alias]}")
                          for spec in specs])
    listing = Table("family (read from config.json)", "aliases")
    listing.columns[0].no_wrap = True
    for family in families:
        listing.add_row(family, ", ".join(spec.alias for spec in specs if spec.family == family))
    out.print(listing)
    out.print("Any Hub id or local directory of these families works too: --model ORG/NAME or --model "
              "./checkpoint; any other image-text-to-text checkpoint runs as a chat VLM")
    out.print("Remote endpoints: --model openai:MODEL --api-base URL (OpenAI-compatible servers) or "
              "--model hf-api:ORG/NAME (Hugging Face Inference API)")


def print_segmenters(specs: Iterable[SegmenterSpec], default: str) -> None:
    """The known segmenters (`captionkit segment --model`, `caption --segment`) with their licences."""
    specs = list(specs)
    wide = Table("segmenter", "source", "kind", "params", "license", "published quality")
    for spec in specs:
        wide.add_row(spec.alias, spec.source, spec.kind, spec.params, spec.license, spec.metrics)
    _print_fitting(wide, [(spec.alias, spec.source, f"{spec.kind}, {spec.params} parameters, "
                           f"{spec.license}; {spec.metrics}") for spec in specs])
    out.print(f"Segmenters: {default} is the default of `captionkit segment`. Any transformers "
              "instance, panoptic, semantic or SAM checkpoint works too, by Hub id or folder")


def _print_fitting(wide: Table, rows: list[tuple[str, str, str]]) -> None:
    """`wide` when it fits the terminal; narrower, each (name, source, details) row puts its
    details under its source, so that names and Hub ids are never cut."""
    if _fits(wide):
        out.print(wide)
        return
    narrow = Table(wide.columns[0].header, "source and details")
    narrow.columns[0].no_wrap = True
    for name, source, details in rows:
        narrow.add_row(name, Text.assemble(source, "\n", (details, "dim")))
    out.print(narrow)


def _fits(table: Table) -> bool:
    from rich.measure import Measurement

    unbounded = out.options.update_width(1_000_000)  # measured as if any width would do
    return Measurement.get(out, unbounded, table).maximum <= out.width
