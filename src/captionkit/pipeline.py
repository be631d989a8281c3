"""The captioning run in three steps: plan what is pending, execute it, finalize the outputs.

*plan* finds the inputs and asks the store what is left; *execute* turns pending images into
predictions batch by batch through an `Executor` (threads here, Ray elsewhere); *finalize* records
each batch as it comes, then applies the quality gate and writes every output from the store.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from captionkit import boxes, gate, sources
from captionkit.device import default_workers, set_malloc_thresholds
from captionkit.errors import OptionError
from captionkit.execute import (
    Decoding,
    Executor,
    LocalExecutor,
    Outcome,
    Predictor,
    WorkItem,
    default_batch_size,
    jpegs_on_gpu,
)
from captionkit.exporters import (
    OUTPUT_NAMES,
    distinct_names,
    export,
    foreign_sidecars,
    make_output_dir,
    nothing_to_write,
    with_existing_files,
)
from captionkit.keys import resume_key
from captionkit.models.base import Captioner
from captionkit.options import GenerationOptions, RunOptions
from captionkit.store import DB_NAME, Result, Store, extras_of, unchanged_row
from captionkit.ui import progress_bar

if TYPE_CHECKING:
    from captionkit.scoring import ClipScorer

__all__ = ["Pipeline", "RunOptions", "RunSummary", "default_batch_size", "default_workers",
           "find_inputs", "run_identity"]


@dataclass
class RunSummary:
    """What a run did, for the end-of-run report and the exit code."""

    total: int = 0
    done: int = 0
    skipped: int = 0
    duplicates: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    failed_earlier: int = 0
    model_failures: int = 0
    """Images that decoded fine but that the model failed on (the CLI exits non-zero for these)."""
    seconds: float = 0.0
    outputs: list[Path] = field(default_factory=list)
    model_id: str = ""
    run_kind: str = "caption"
    """What the run's model does: caption, or segment (the summary's verb)."""
    scores: list[float] = field(default_factory=list)
    min_score: float | None = None
    passed: int = 0
    set_aside: int = 0
    missing: list[str] = field(default_factory=list)
    """Images captioned earlier that are no longer on disk, left out of captions.txt and caption files."""
    kept: list[Path] = field(default_factory=list)
    """Existing caption files captionkit did not write, left as they were (`--overwrite` replaces them)."""
    unmatched_prompts: list[str] = field(default_factory=list)
    """`--prompt-file` images that are not among the inputs (a typo, another folder): nobody asked them."""
    unwritten: list[str] = field(default_factory=list)
    """Formats asked for that had nothing to write, each with why (`exporters.nothing_to_write`)."""

    @property
    def images_per_second(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        data = asdict(self)
        data["outputs"] = [str(path) for path in self.outputs]
        data["kept"] = [str(path) for path in self.kept]
        scores = data.pop("scores")
        data["scored"] = len(scores)
        data["mean_score"] = sum(scores) / len(scores) if scores else None
        data["images_per_second"] = round(self.images_per_second, 3)
        return data


def run_identity(captioner: Captioner, generation: GenerationOptions, scorer: ClipScorer | None = None,
                 full_decode: bool = False, gpu_jpeg: bool = False) -> dict:
    """What the resume key is made of: the model (its checkpoint files, its precision), the
    generation options it honours, the decoding and the scorer."""
    # A captioner that generates no text writes the same captions whatever the generation options.
    asked = generation if captioner.generates else GenerationOptions()
    identity = {**captioner.identity(), "generation": asked.key(),
                # without a size to shrink big images toward, draft decoding is a full decode
                "full_decode": bool(full_decode and captioner.input_size),
                "scorer": f"{scorer.name}@{scorer.scale}" if scorer is not None else None}
    if jpegs_on_gpu(captioner, gpu_jpeg, scorer):
        identity["decoder"] = "nvjpeg"  # its pixels are not libjpeg's
    return identity


@dataclass
class Found:
    """The inputs' images and the inputs that are not images, before anything is loaded."""

    refs: list[sources.ImageRef]
    problems: list[sources.Problem]


def find_inputs(inputs: Sequence[str], options: RunOptions) -> Found:
    """Expand the inputs (raising InputError when they hold no image), leaving out the files
    captionkit wrote itself in its own folders unless an input points into one."""
    options.check_inputs(inputs)
    refs, problems = sources.discover(inputs, recursive=options.recursive, extensions=options.extensions,
                                      skip_names=OUTPUT_NAMES | {DB_NAME})
    return Found(_outside_own_folders(refs, inputs, options), problems)


def _outside_own_folders(refs: list[sources.ImageRef], inputs: Sequence[str],
                         options: RunOptions) -> list[sources.ImageRef]:
    """Leave out image copies, failed images and annotated copies found inside our own folders."""
    ours = [options.output_dir, options.gate.failed_dir, options.draw_boxes, options.overlays]
    named = [Path(i).resolve() for i in inputs if i != "-" and Path(i).exists()]
    prefixes: set[str] = set()
    for out in filter(None, ours):
        real = out.resolve()
        if not any(real == path or real in path.parents for path in named):
            prefixes |= {os.path.join(os.path.abspath(out), ""), os.path.join(real, "")}
    if not prefixes:
        return refs
    return [ref for ref in refs if not str(ref.path).startswith(tuple(prefixes))]


@dataclass
class Plan:
    """What a run has to do: its store, its run row and the images still pending."""

    inputs: list[str]
    found: Found
    store: Store
    run_id: int
    todo: list[WorkItem]
    summary: RunSummary


class Pipeline:
    """Runs one captioner over many images with a store for resume and exporters for output."""

    def __init__(self, captioner: Captioner, generation: GenerationOptions,
                 options: RunOptions, scorer: ClipScorer | None = None) -> None:
        if not isinstance(captioner, Captioner):
            raise TypeError(f"{type(captioner).__name__} is not a captionkit.models.Captioner: "
                            "subclass it (or CaptionerWrapper to wrap one)")
        if options.draw_boxes is not None and not captioner.grounded:
            raise OptionError(f"--draw-boxes draws the boxes of a caption's grounded phrases, and "
                              f"{captioner.model_id} grounds none: use a grounded model such as "
                              "--model kosmos-2, or drop --draw-boxes")
        self.captioner = captioner
        self.generation = generation
        self.options = options
        self.scorer = scorer if scorer is not None else gate.load_scorer(
            options.gate, generation, str(captioner.device))
        self.key = resume_key(run_identity(captioner, generation, self.scorer, options.full_decode,
                                           options.gpu_jpeg))
        # The other decoding's key: its captions of images that decode the same either way are reused.
        self.other_key = resume_key(run_identity(captioner, generation, self.scorer,
                                                 not options.full_decode, options.gpu_jpeg))
        self.batch_size = options.batch_size or default_batch_size(captioner)
        self.prompts = options.read_prompts()

    def run(self, inputs: Sequence[str], found: Found | None = None,
            executor: Executor | None = None) -> RunSummary:
        """Caption `inputs` (files, folders, globs, list files, `-`), resuming earlier work;
        `found` is `find_inputs`' answer when the caller already asked it."""
        started = time.perf_counter()
        plan = self.plan(inputs, found)
        try:
            self.execute(plan, executor or self.local_executor(plan.store))
            plan.summary.seconds = time.perf_counter() - started
            self.finalize(plan)
        finally:
            plan.store.close()
        return plan.summary

    def plan(self, inputs: Sequence[str], found: Found | None = None) -> Plan:
        """Find the images, open the store, record the run and what earlier runs left to do."""
        found = found or find_inputs(inputs, self.options)
        set_malloc_thresholds()
        make_output_dir(self.options.output_dir)
        store = Store(self.options.output_dir / DB_NAME)
        try:
            summary = RunSummary(total=len(found.refs) + len(found.problems),
                                 model_id=self.captioner.model_id, run_kind=self.captioner.run_kind)
            run_id = store.start_run(self.captioner.model_id, self.key, self._recorded_options(inputs),
                                     kind=self.captioner.run_kind)
            if self.options.overwrite:
                store.forget(self.key)
            todo = self._pending(found.refs, store, summary)
            failures = [Result(path=Path(p.path), name=sources.printable(p.path), status="failed",
                               error=p.reason, model_id=self.captioner.model_id) for p in found.problems]
            store.record(failures, self.key, run_id)
            summary.failed.extend((failure.name, failure.error) for failure in failures)
        except BaseException:
            store.close()
            raise
        return Plan(list(inputs), found, store, run_id, todo, summary)

    def _recorded_options(self, inputs: Sequence[str]) -> dict:
        identity = run_identity(self.captioner, self.generation, self.scorer, self.options.full_decode,
                                self.options.gpu_jpeg)
        recorded = {"generation": asdict(self.generation), "inputs": list(inputs), "identity": identity,
                    "prefix": self.options.prefix, "suffix": self.options.suffix}
        if self.captioner.label_maps is not None:
            recorded["label_maps"] = self.captioner.label_maps  # for `captionkit export`
        return recorded

    def _pending(self, refs: list[sources.ImageRef], store: Store, summary: RunSummary) -> list[WorkItem]:
        """The images this run still has to caption; done and failed ones are skipped."""
        previous = store.previous(self.key)
        todo = []
        for ref in refs:
            item = WorkItem(ref, prompt=self.prompts.get(str(ref.path)))
            row, item.size, item.mtime_ns = unchanged_row(previous, ref.path)
            # a per-image prompt is part of what was asked, so a changed one means a new caption
            if row is not None and row["status"] == "done" and extras_of(row).get("prompt") == item.prompt:
                summary.skipped += 1
            elif row is not None and row["status"] == "failed" and not self.options.retry_failed:
                summary.failed_earlier += 1
            else:
                todo.append(item)
        return todo

    def local_executor(self, store: Store) -> LocalExecutor:
        """Threads on this machine, reusing what the store knows of identical files."""
        # --overwrite starts over, so it takes nothing from the other decoding either.
        reuse = self.other_key != self.key and not self.options.overwrite
        predictor = Predictor(self.captioner, self.generation, self.scorer, self.batch_size)
        decoding = Decoding.of(self.options)
        return LocalExecutor(predictor, decoding, store.captions_by_content(self.key),
                             store.captions_by_content(self.other_key) if reuse else {})

    def execute(self, plan: Plan, executor: Executor) -> None:
        """Predict the pending images, recording each batch as it comes back."""
        with progress_bar(len(plan.todo), self.options.progress) as advance:
            for outcomes in executor.execute(plan.todo):
                plan.store.record([self._result(outcome, plan.summary) for outcome in outcomes],
                                  self.key, plan.run_id)
                advance(len(outcomes))

    def _result(self, outcome: Outcome, summary: RunSummary) -> Result:
        """The stored form of one outcome, counted in the summary."""
        item = outcome.item
        result = Result(path=item.ref.path, name=item.ref.name, status="failed", hash=item.hash,
                        size=item.size, mtime_ns=item.mtime_ns, model_id=self.captioner.model_id)
        if outcome.prediction is None:
            result.error = item.error or "not captioned"
            summary.failed.append((item.ref.name, result.error))
            summary.model_failures += outcome.model_failed
            return result
        result.status = "done"
        result.caption = outcome.prediction.text
        result.extras, result.regions = outcome.prediction.extras, outcome.prediction.regions
        result.seconds = outcome.seconds or 0.0
        if item.reused is not None:
            summary.skipped += 1
        else:
            summary.done += 1
            summary.duplicates += outcome.seconds is None
        return result

    def finalize(self, plan: Plan) -> None:
        """Apply the gate and write every output from the store, so a resumed run ends the same."""
        options, store, summary = self.options, plan.store, plan.summary
        results = distinct_names(list(store.results(self.key)))
        store.update_extras(gate.mark(results, options.gate.min_score), self.key)
        gate.bring_back(results, options.gate, options.export_options())
        exporting = replace(options.export_options(), label_maps=self.captioner.label_maps)
        written = with_existing_files(results, options.export_formats(), exporting, store, options.overwrite,
                                      found=[ref.path for ref in plan.found.refs],
                                      copies_in=[options.output_dir, options.gate.failed_dir])
        summary.kept = foreign_sidecars(results, written)
        if self.prompts:
            found = {str(ref.path) for ref in plan.found.refs} | {p.path for p in plan.found.problems}
            summary.unmatched_prompts = sorted(set(self.prompts) - found)
        summary.outputs = export(results, options.export_formats(), written)
        summary.unwritten = nothing_to_write(results, options.export_formats())
        if options.draw_boxes is not None:
            summary.outputs += boxes.draw_boxes(results, options.draw_boxes)
        if options.overlays is not None:
            from captionkit.segment.export import draw_overlays  # the [seg] extra draws the masks

            summary.outputs += draw_overlays(results, options.overlays, self.captioner.label_maps,
                                             options.overlay_alpha)
        summary.set_aside = gate.place(results, options.gate, replace(written, ours=None))
        summary.missing = sorted(result.name for result in results if result.path in written.missing)
        summary.scores, summary.passed = gate.tally(results)
        summary.min_score = options.gate.min_score
        store.finish_run(plan.run_id, summary.as_dict())
