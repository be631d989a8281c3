"""The execute step: decoded images in, predictions out, in batches.

`Predictor` is the pure part, a batch of decoded images to one prediction (or failure reason)
each, shared by every engine and the server. An `Executor` feeds it: `LocalExecutor` reads and
decodes in threads on this machine; other engines (Ray) implement the same small interface.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from PIL import Image

from captionkit import gate, preprocess, sources
from captionkit.device import default_workers
from captionkit.errors import CaptionkitError, ImageError
from captionkit.models.base import Captioner, at_full_size
from captionkit.options import GenerationOptions
from captionkit.predictions import Prediction

if TYPE_CHECKING:
    from captionkit.options import RunOptions
    from captionkit.scoring import ClipScorer

ReuseKey = tuple[str | None, str | None]
"""(content hash, the image's own prompt): identical files asked the same thing share a prediction."""


@dataclass
class WorkItem:
    """An image on its way through the pipeline."""

    ref: sources.ImageRef
    size: int | None = None
    mtime_ns: int | None = None
    hash: str | None = None
    image: Image.Image | None = None
    error: str | None = None
    prompt: str | None = None
    reused: Prediction | None = None
    """The prediction the other decoding (draft or full) gave these same pixels."""
    pixels: dict[object, object] = field(default_factory=dict)
    """Inputs made in the decoding thread (tensors), by the preprocessing that made each: the
    captioner's and the gate scorer's, where they declare one (`input_makers`)."""

    @property
    def reuse_key(self) -> ReuseKey:
        """Identical files share one prediction only when they are asked the same prompt."""
        return self.hash, self.prompt


def default_batch_size(captioner: Captioner) -> int:
    """Batches big enough to keep the hardware busy; CUDA out-of-memory halves them at run time."""
    if captioner.preferred_batch_size:
        return captioner.preferred_batch_size
    # On a CPU 16 beats 8 by ~13% (the decoder's weights are read once per step for the whole
    # batch); 32 adds ~3% for ~0.7 GB more of cross-attention cache. On an H100, where each
    # generate step is bound by kernel launches, 64 beats 32 by ~1.3x (benchmarks/RESULTS.md).
    return 64 if getattr(captioner.device, "type", captioner.device) == "cuda" else 16


class Predictor:
    """Predicts batches of decoded images with one captioner; a failing batch is retried smaller
    to isolate the image that broke the model, and CUDA out-of-memory halves the batch size."""

    def __init__(self, captioner: Captioner, generation: GenerationOptions,
                 scorer: ClipScorer | None = None, batch_size: int | None = None) -> None:
        self.captioner = captioner
        self.generation = generation
        self.scorer = scorer
        self.batch_size = batch_size or default_batch_size(captioner)

    def predict(self, images: Sequence[Image.Image],
                prompts: Sequence[str | None]) -> list[Prediction | str]:
        """A prediction or a failure reason per image; with a scorer, predictions carry scores."""
        asked = [prompt or self.generation.prompt for prompt in prompts]
        outcomes = self._predict(list(images), asked)
        if self.scorer is not None:
            gate.score_batch(self.scorer, [(image, outcome) for image, outcome
                                           in zip(images, outcomes, strict=True)
                                           if isinstance(outcome, Prediction)])
        # regions were found on the image as decoded: give them in the full image's pixels
        return [outcome if isinstance(outcome, str) else at_full_size(self.captioner, image, outcome)
                for image, outcome in zip(images, outcomes, strict=True)]

    def _predict(self, images: list[Image.Image], prompts: list[str | None]) -> list[Prediction | str]:
        if not images:
            return []
        try:
            return list(self.captioner.caption(images, self.generation, prompts))
        except CaptionkitError:
            raise
        except Exception as err:  # noqa: BLE001 - a model error on one image must not end the run
            answered = getattr(err, "outcomes", None)
            # remote captioners answer per image and say which failed, so nothing is sent twice
            if isinstance(answered, list) and len(answered) == len(images):
                return answered
            out_of_memory = _is_out_of_memory(err)
            if out_of_memory and len(images) > 1:
                _free_accelerator_memory()
                self.batch_size = max(1, min(self.batch_size, len(images)) // 2)
            elif len(images) == 1:
                return [f"captioning failed: {type(err).__name__}: {err}".splitlines()[0]]
        outcomes: list[Prediction | str] = []
        while len(outcomes) < len(images):
            # after an OOM every chunk follows the (maybe further halved) batch size;
            # otherwise halves narrow down which image broke the model
            size = self.batch_size if out_of_memory else max(1, len(images) // 2)
            start = len(outcomes)
            outcomes += self._predict(images[start:start + size], prompts[start:start + size])
        return outcomes


def _is_out_of_memory(err: Exception) -> bool:
    import torch

    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def _free_accelerator_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class Decoding:
    """How images are read: threads, draft or full decoding, the pixel limit."""

    workers: int | None = None
    full_decode: bool = False
    max_pixels: int = sources.DEFAULT_MAX_PIXELS
    gpu_jpeg: bool = False
    """Decode JPEGs with nvJPEG on a CUDA model's GPU, for captioners that take pixel tensors and runs
    without a scorer; other files, and files nvJPEG refuses, take the CPU path. Pixels differ from
    libjpeg's by rounding, so captions may too."""

    @classmethod
    def of(cls, options: RunOptions) -> Decoding:
        return cls(options.workers, options.full_decode, options.max_pixels, options.gpu_jpeg)


def input_makers(captioner: Captioner, scorer: ClipScorer | None) -> list[Callable]:
    """The preprocessings whose inputs the decoding threads make for each image: the captioner's
    and the gate scorer's, where each declares one; equal ones are made once."""
    declared = (captioner.preprocess, getattr(scorer, "preprocess", None))
    return list(dict.fromkeys(maker for maker in declared if maker is not None))


def jpegs_on_gpu(captioner: Captioner, asked: bool, scorer: ClipScorer | None) -> bool:
    """Whether a run decodes JPEGs with nvJPEG: asked, on a CUDA model whose `preprocess` takes
    JPEG bytes, and without a scorer (which needs the CPU's pixels)."""
    on_cuda = getattr(captioner.device, "type", captioner.device) == "cuda"
    return asked and on_cuda and scorer is None and captioner.takes_jpeg_bytes()


@dataclass
class Outcome:
    """One image's result from an executor: a prediction, or why there is none."""

    item: WorkItem
    prediction: Prediction | None = None
    seconds: float | None = None
    """Model time per image of its batch when predicted now; None when taken from an identical
    file or the other decoding."""
    model_failed: bool = False
    """The image decoded, but the model failed on it."""


class Executor(Protocol):
    """Turns pending work items into outcomes, batch by batch, in any order of batches."""

    def execute(self, items: list[WorkItem]) -> Iterator[list[Outcome]]: ...


class LocalExecutor:
    """Reads, hashes and decodes in threads on this machine, a bounded number ahead of the model,
    and predicts each distinct (content, prompt) pair once. When the captioner declares its
    `preprocess`, each image's model input is made in those threads too, and each batch's inputs
    are stacked while the batch before it is predicted."""

    def __init__(self, predictor: Predictor, decoding: Decoding, known: dict[ReuseKey, Prediction],
                 same_pixels: dict[ReuseKey, Prediction]) -> None:
        self.predictor = predictor
        self.decoding = decoding
        self.known = known
        """Predictions by reuse key: from the store, then as this run makes them."""
        self.same_pixels = same_pixels
        """The other decoding's predictions, reused where the two decode to the same pixels."""
        captioner = predictor.captioner
        self.preprocess = captioner.preprocess
        """The captioner's image-to-input step for the decoding threads; None: it makes its own."""
        self.makers = input_makers(captioner, predictor.scorer)
        """Every image-to-input step the decoding threads run: the captioner's, the scorer's."""
        self.pin = getattr(captioner.device, "type", captioner.device) == "cuda"
        self.gpu_jpeg = jpegs_on_gpu(captioner, decoding.gpu_jpeg, predictor.scorer)

    def execute(self, items: list[WorkItem]) -> Iterator[list[Outcome]]:
        batches = self._batches(self._decoded(items))
        if self.makers:
            batches = _prepared_ahead(batches, self._stack)
        for batch in batches:
            # a batch taken before out-of-memory halved the size goes in pieces of the new size
            size = self.predictor.batch_size
            for start in range(0, len(batch), size):
                yield self._finish(batch[start:start + size])

    def _batches(self, decoded: Iterator[WorkItem]) -> Generator[list[WorkItem], None, None]:
        """Decoded items in batches of the predictor's size (which out-of-memory may halve)."""
        batch: list[WorkItem] = []
        for item in decoded:
            batch.append(item)
            if len(batch) >= self.predictor.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def _load(self, item: WorkItem) -> WorkItem:
        """Read, hash and decode one image, and make its model input when the captioner declares
        how (runs in a worker thread)."""
        try:
            data = sources.read_bytes(item.ref.path)
            item.hash = sources.content_hash(data)
            size = self.predictor.captioner.input_size
            if item.reuse_key in self.known:
                return item
            # nvJPEG's pixels are neither decoding's, so nothing is taken from the other one
            if (item.reuse_key in self.same_pixels and not self.gpu_jpeg
                    and not sources.shrinks(data, size)):
                item.reused = self.same_pixels[item.reuse_key]
                return item
            if self.gpu_jpeg and self._decoded_on_gpu(item, data):
                return item
            target = None if self.decoding.full_decode else size
            item.image = sources.decode(data, item.ref.name, target, self.decoding.max_pixels,
                                        keep_original=self.predictor.captioner.decodes_again)
            item.pixels = preprocess.inputs_of(item.image, self.makers)
        except ImageError as err:
            item.error = err.reason
        return item

    def _decoded_on_gpu(self, item: WorkItem, data: bytes) -> bool:
        """Decode a JPEG with nvJPEG and make its input on the GPU; False sends the file to the CPU
        path (another format, an EXIF turn, CMYK, or a file nvJPEG refuses)."""
        header = preprocess.jpeg_header(data, self.decoding.max_pixels)
        if header is None:
            return False
        try:
            made = self.preprocess.from_jpeg(data, self.predictor.captioner.device)  # type: ignore[union-attr]
        except RuntimeError:  # nvJPEG refuses some files libjpeg reads (and says why if it cannot)
            return False
        item.image, item.pixels = header, {self.preprocess: made}
        return True

    def _decoded(self, items: list[WorkItem]) -> Iterator[WorkItem]:
        """Decoded items in order, with a bounded number decoding ahead of the model."""
        workers = self.decoding.workers or default_workers()
        ahead = max(2 * self.predictor.batch_size, workers)
        # threads that run torch for the inputs get one intra-op thread each, not a team each
        pinned = preprocess.one_torch_thread if self.makers else None
        with ThreadPoolExecutor(workers, thread_name_prefix="captionkit-decode",
                                initializer=pinned) as pool:
            queue: deque[Future[WorkItem]] = deque()
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

    def _stack(self, batch: list[WorkItem]) -> None:
        """Stack the batch's inputs into one tensor per preprocessing (page-locked for a CUDA model)
        and hand each row over with its image, where the captioner and the scorer find them."""
        for maker in self.makers:
            ready = [item for item in batch if maker in item.pixels]
            if not ready:
                continue
            rows = preprocess.stacked([item.pixels[maker] for item in ready], pin=self.pin)  # type: ignore[misc]
            for index, item in enumerate(ready):
                preprocess.attach(item.image, maker, rows, index)  # type: ignore[arg-type]
        for item in batch:
            item.pixels = {}

    def _finish(self, batch: list[WorkItem]) -> list[Outcome]:
        """Predict the batch's new images once per reuse key; the rest take a known prediction."""
        leaders: dict[ReuseKey, WorkItem] = {}
        for item in batch:
            if item.reused is not None:
                self.known.setdefault(item.reuse_key, item.reused)
            fresh = item.reuse_key not in self.known and item.reuse_key not in leaders
            if item.error is None and fresh:
                leaders[item.reuse_key] = item
        to_predict = list(leaders.values())
        started = time.perf_counter()
        outcomes = self.predictor.predict([item.image for item in to_predict],  # type: ignore[misc]
                                          [item.prompt for item in to_predict])
        seconds = (time.perf_counter() - started) / max(1, len(to_predict))
        for item, outcome in zip(to_predict, outcomes, strict=True):
            if isinstance(outcome, Prediction):
                self.known[item.reuse_key] = _with_prompt(outcome, item.prompt)
            else:
                item.error = outcome
        return [self._outcome(item, seconds if item in to_predict else None) for item in batch]

    def _outcome(self, item: WorkItem, seconds: float | None) -> Outcome:
        prediction = self.known.get(item.reuse_key) if item.error is None else None
        outcome = Outcome(item, prediction, seconds=seconds,
                          model_failed=prediction is None and item.image is not None)
        item.image = None
        return outcome


def _prepared_ahead(batches: Generator[list[WorkItem], None, None],
                    prepare: Callable[[list[WorkItem]], None]) -> Iterator[list[WorkItem]]:
    """The batches, each one taken and prepared in a thread of its own while the batch before it
    is predicted."""
    def take() -> list[WorkItem] | None:
        batch = next(batches, None)
        if batch is not None:
            prepare(batch)
        return batch

    stager = ThreadPoolExecutor(1, thread_name_prefix="captionkit-stack",
                                initializer=preprocess.one_torch_thread)
    try:
        upcoming = stager.submit(take)
        while (batch := upcoming.result()) is not None:
            upcoming = stager.submit(take)
            yield batch
    finally:  # a batch being taken is finished before the decoding threads are stopped
        stager.shutdown(wait=True, cancel_futures=True)
        batches.close()


def _with_prompt(prediction: Prediction, prompt: str | None) -> Prediction:
    """The prediction as recorded: an image's own prompt is kept with it."""
    if prompt is None:
        return prediction
    return Prediction(prediction.text, {**prediction.extras, "prompt": prompt}, prediction.regions)
