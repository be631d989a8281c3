"""The captioning loop: find images, decode them in threads, caption in batches, record, export."""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from captionkit import boxes, gate, sources
from captionkit.device import set_malloc_thresholds, usable_cpus
from captionkit.errors import CaptionkitError, ImageError
from captionkit.exporters import (
    OUTPUT_NAMES,
    distinct_names,
    export,
    foreign_sidecars,
    make_output_dir,
    with_existing_files,
)
from captionkit.models.base import Caption, Captioner
from captionkit.options import GenerationOptions, RunOptions
from captionkit.store import DB_NAME, Result, Store, extras_of, unchanged_row
from captionkit.ui import progress_bar

if TYPE_CHECKING:
    from captionkit.scoring import ClipScorer


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


@dataclass
class _Item:
    """An image on its way through the pipeline."""

    ref: sources.ImageRef
    size: int | None = None
    mtime_ns: int | None = None
    hash: str | None = None
    image: Image.Image | None = None
    error: str | None = None
    prompt: str | None = None
    reused: tuple[str, dict] | None = None
    """The caption the other decoding (draft or full) gave these same pixels."""

    @property
    def reuse_key(self) -> tuple[str | None, str | None]:
        """Identical files share one caption only when they are asked the same prompt."""
        return self.hash, self.prompt


def default_batch_size(captioner: Captioner) -> int:
    """Batches big enough to keep the hardware busy; CUDA out-of-memory halves them at run time."""
    preferred = getattr(captioner, "preferred_batch_size", None)
    if preferred:
        return preferred
    device = getattr(captioner, "device", None)
    # On a CPU 16 beats 8 by ~13% (the decoder's weights are read once per step for the whole
    # batch); 32 adds ~3% for ~0.7 GB more of cross-attention cache. On an H100, where each
    # generate step is bound by kernel launches, 64 beats 32 by ~1.3x (benchmarks/RESULTS.md).
    return 64 if getattr(device, "type", "cpu") == "cuda" else 16


def default_workers() -> int:
    """Decoding threads: the CPUs this process may run on, plus two to cover file reads, at most 8.

    Not the machine's core count: under `taskset` or a container's cpuset, threads for every core
    would only take turns on the allowed ones (torch sizes its own thread pool the same way).
    """
    return min(8, usable_cpus() + 2)


def options_key(captioner: Captioner, generation: GenerationOptions,
                scorer: ClipScorer | None = None, full_decode: bool = False) -> str:
    """Results are only reused for the same model (a local checkpoint's files, the weights'
    precision), generation options, decoding and scorer.

    A part that does not apply adds nothing, so keys stay what they were before it was added and
    earlier stores resume.
    """
    # A captioner that generates no text writes the same captions whatever the generation options,
    # so its key is the defaults' (what its stores were keyed by before this rule).
    asked = generation if getattr(captioner, "generates", True) else GenerationOptions()
    key = f"{captioner.model_id}#{asked.key()}"
    variant = getattr(captioner, "variant", "")
    key = f"{key}#{variant}" if variant else key
    fingerprint = getattr(captioner, "fingerprint", "")
    key = f"{key}#files-{fingerprint}" if fingerprint else key
    # Without a size to shrink big images toward, draft decoding is a full decode.
    key = f"{key}#full-decode" if full_decode and captioner.input_size else key
    return f"{key}#{scorer.name}@{scorer.scale}" if scorer is not None else key


class Pipeline:
    """Runs one captioner over many images with a store for resume and exporters for output."""

    def __init__(self, captioner: Captioner, generation: GenerationOptions,
                 options: RunOptions, scorer: ClipScorer | None = None) -> None:
        self.captioner = captioner
        self.generation = generation
        self.options = options
        self.scorer = scorer if scorer is not None else gate.load_scorer(
            options.gate, generation, str(getattr(captioner, "device", "auto")))
        self.key = options_key(captioner, generation, self.scorer, options.full_decode)
        # The other decoding's key: its captions of images that decode the same either way are reused.
        self.other_key = options_key(captioner, generation, self.scorer, not options.full_decode)
        self.batch_size = options.batch_size or default_batch_size(captioner)
        self.prompts = options.read_prompts()

    def run(self, inputs: Sequence[str]) -> RunSummary:
        """Caption `inputs` (files, folders, globs, list files, `-`), resuming earlier work."""
        options = self.options
        started = time.perf_counter()
        options.check_inputs(inputs)
        set_malloc_thresholds()
        make_output_dir(options.output_dir)
        refs, problems = sources.discover(inputs, recursive=options.recursive,
                                          extensions=options.extensions,
                                          skip_names=OUTPUT_NAMES | {DB_NAME})
        refs = self._outside_output_dir(refs, inputs)
        store = Store(options.output_dir / DB_NAME)
        try:
            summary = RunSummary(total=len(refs) + len(problems),
                                 model_id=self.captioner.model_id)
            run_id = store.start_run(self.captioner.model_id, self.key,
                                     {"generation": asdict(self.generation), "inputs": list(inputs),
                                      "prefix": options.prefix, "suffix": options.suffix})
            if options.overwrite:
                store.forget(self.key)
            todo = self._pending(refs, store, summary)
            failures = [Result(path=Path(p.path), name=sources.printable(p.path), status="failed",
                               error=p.reason, model_id=self.captioner.model_id) for p in problems]
            store.record(failures, self.key, run_id)
            summary.failed.extend((failure.name, failure.error) for failure in failures)
            self._caption_all(todo, store, run_id, summary)
            summary.seconds = time.perf_counter() - started
            results = distinct_names(list(store.results(self.key)))
            store.update_extras(gate.mark(results, options.gate.min_score), self.key)
            gate.bring_back(results, options.gate, options.export_options())
            written = with_existing_files(results, options.export_formats(), options.export_options(),
                                          store, options.overwrite, found=[ref.path for ref in refs],
                                          copies_in=[options.output_dir, options.gate.failed_dir])
            summary.kept = foreign_sidecars(results, written)
            if self.prompts:
                found = {str(ref.path) for ref in refs} | {problem.path for problem in problems}
                summary.unmatched_prompts = sorted(set(self.prompts) - found)
            summary.outputs = export(results, options.export_formats(), written)
            if options.draw_boxes is not None:
                summary.outputs += boxes.draw_boxes(results, options.draw_boxes)
            summary.set_aside = gate.place(results, options.gate, replace(written, ours=None))
            summary.missing = sorted(result.name for result in results if result.path in written.missing)
            summary.scores, summary.passed = gate.tally(results)
            summary.min_score = options.gate.min_score
            store.finish_run(run_id, summary.as_dict())
        finally:
            store.close()
        return summary

    def _outside_output_dir(self, refs: list[sources.ImageRef],
                            inputs: Sequence[str]) -> list[sources.ImageRef]:
        """Leave out the files we wrote ourselves (image copies, failed images, annotated copies)
        that a folder, glob or list found inside our own folders, unless an input points into one."""
        ours = [self.options.output_dir, self.options.gate.failed_dir, self.options.draw_boxes]
        named = [Path(i).resolve() for i in inputs if i != "-" and Path(i).exists()]
        prefixes: set[str] = set()
        for out in filter(None, ours):
            real = out.resolve()
            if not any(real == path or real in path.parents for path in named):
                prefixes |= {os.path.join(os.path.abspath(out), ""), os.path.join(real, "")}
        if not prefixes:
            return refs
        return [ref for ref in refs if not str(ref.path).startswith(tuple(prefixes))]

    def _pending(self, refs: list[sources.ImageRef], store: Store,
                 summary: RunSummary) -> list[_Item]:
        """The images this run still has to caption; done and failed ones are skipped."""
        previous = store.previous(self.key)
        todo = []
        for ref in refs:
            item = _Item(ref, prompt=self.prompts.get(str(ref.path)))
            row, item.size, item.mtime_ns = unchanged_row(previous, ref.path)
            # a per-image prompt is part of what was asked, so a changed one means a new caption
            if row is not None and row["status"] == "done" and extras_of(row).get("prompt") == item.prompt:
                summary.skipped += 1
            elif row is not None and row["status"] == "failed" and not self.options.retry_failed:
                summary.failed_earlier += 1
            else:
                todo.append(item)
        return todo

    def _load(self, item: _Item) -> _Item:
        """Read, hash and decode one image (runs in a worker thread)."""
        try:
            data = sources.read_bytes(item.ref.path)
            item.hash = sources.content_hash(data)
            size = self.captioner.input_size
            if item.reuse_key in self._known:
                return item
            if item.reuse_key in self._same_pixels and not sources.shrinks(data, size):
                item.reused = self._same_pixels[item.reuse_key]
                return item
            target = None if self.options.full_decode else size
            item.image = sources.decode(data, item.ref.name, target, self.options.max_pixels)
        except ImageError as err:
            item.error = err.reason
        return item

    def _decoded(self, items: list[_Item]) -> Iterator[_Item]:
        """Decoded items in order, with a bounded number decoding ahead of the model."""
        workers = self.options.workers or default_workers()
        ahead = max(2 * self.batch_size, workers)
        with ThreadPoolExecutor(workers, thread_name_prefix="captionkit-decode") as pool:
            queue: deque[Future[_Item]] = deque()
            pending = iter(items)
            for item in pending:
                queue.append(pool.submit(self._load, item))
                if len(queue) >= ahead:
                    break
            try:
                while queue:
                    yield queue.popleft().result()
                    next_item = next(pending, None)
                    if next_item is not None:
                        queue.append(pool.submit(self._load, next_item))
            finally:  # interrupted: do not decode the images queued ahead before stopping
                for future in queue:
                    future.cancel()

    def _caption_all(self, items: list[_Item], store: Store, run_id: int,
                     summary: RunSummary) -> None:
        self._known = store.captions_by_content(self.key)
        # --overwrite starts over, so it takes nothing from the other decoding either.
        reuse = self.other_key != self.key and not self.options.overwrite
        self._same_pixels = store.captions_by_content(self.other_key) if reuse else {}
        with progress_bar(len(items), self.options.progress) as advance:
            batch: list[_Item] = []
            for item in self._decoded(items):
                batch.append(item)
                if len(batch) >= self.batch_size:
                    self._finish_batch(batch, store, run_id, summary)
                    advance(len(batch))
                    batch = []
            if batch:
                self._finish_batch(batch, store, run_id, summary)
                advance(len(batch))

    def _finish_batch(self, batch: list[_Item], store: Store, run_id: int,
                      summary: RunSummary) -> None:
        """Caption the batch's new images, reuse captions of identical files, commit."""
        leaders: dict[tuple[str | None, str | None], _Item] = {}
        for item in batch:
            if item.reused is not None:
                self._known.setdefault(item.reuse_key, item.reused)
            fresh = item.reuse_key not in self._known and item.reuse_key not in leaders
            if item.error is None and fresh:
                leaders[item.reuse_key] = item
        to_caption = list(leaders.values())
        started = time.perf_counter()
        captions = self._caption(to_caption)
        if self.scorer is not None:
            gate.score_batch(self.scorer, [(item.image, outcome) for item, outcome
                                           in zip(to_caption, captions, strict=True)
                                           if isinstance(outcome, Caption)])
        seconds = (time.perf_counter() - started) / max(1, len(to_caption))
        for item, outcome in zip(to_caption, captions, strict=True):
            if isinstance(outcome, Caption):
                extras = outcome.extras if item.prompt is None else {**outcome.extras,
                                                                      "prompt": item.prompt}
                self._known[item.reuse_key] = (outcome.text, extras)
            else:
                item.error = outcome
        results = []
        for item in batch:
            result = Result(path=item.ref.path, name=item.ref.name, status="failed",
                            hash=item.hash, size=item.size, mtime_ns=item.mtime_ns,
                            model_id=self.captioner.model_id)
            if item.error is None and item.reuse_key in self._known:
                result.status = "done"
                result.caption, result.extras = self._known[item.reuse_key]
                result.seconds = seconds if item in to_caption else 0.0
                if item.reused is not None:
                    summary.skipped += 1
                else:
                    summary.done += 1
                    summary.duplicates += item not in to_caption
            else:
                result.error = item.error or "not captioned"
                summary.failed.append((item.ref.name, result.error))
                summary.model_failures += item.image is not None
            item.image = None
            results.append(result)
        store.record(results, self.key, run_id)

    def _caption(self, items: list[_Item]) -> list[Caption | str]:
        """Captions or error reasons; a failing batch is retried smaller to isolate the culprit."""
        if not items:
            return []
        try:
            return list(self.captioner.caption([i.image for i in items], self.generation,
                                               [i.prompt or self.generation.prompt
                                                for i in items]))
        except CaptionkitError:
            raise
        except Exception as err:  # noqa: BLE001 - a model error on one image must not end the run
            answered = getattr(err, "outcomes", None)
            # remote captioners answer per image and say which failed, so nothing is sent twice
            if isinstance(answered, list) and len(answered) == len(items):
                return answered
            out_of_memory = _is_out_of_memory(err)
            if out_of_memory and len(items) > 1:
                _free_accelerator_memory()
                self.batch_size = max(1, min(self.batch_size, len(items)) // 2)
            elif len(items) == 1:
                return [f"captioning failed: {type(err).__name__}: {err}".splitlines()[0]]
        outcomes: list[Caption | str] = []
        while len(outcomes) < len(items):
            # after an OOM every chunk follows the (maybe further halved) batch size;
            # otherwise halves narrow down which image broke the model
            size = self.batch_size if out_of_memory else max(1, len(items) // 2)
            outcomes += self._caption(items[len(outcomes):len(outcomes) + size])
        return outcomes


def _is_out_of_memory(err: Exception) -> bool:
    import torch

    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def _free_accelerator_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
