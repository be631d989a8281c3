"""The models behind the server, each with its batching worker: decoded images in, predictions out.

Every protocol (native, OpenAI, Hugging Face) asks the same `Service`; they differ only in how a
request is read and an answer written.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from PIL import Image
from starlette.requests import Request

from captionkit import gate, preprocess
from captionkit.device import default_workers
from captionkit.errors import CaptionkitError
from captionkit.execute import input_makers
from captionkit.models.base import Captioner, at_full_size
from captionkit.options import GenerationOptions
from captionkit.predictions import Prediction
from captionkit.serve import inputs
from captionkit.serve.batching import Batcher, Job, QueueFull
from captionkit.serve.inputs import ApiError, Upload
from captionkit.serve.metrics import Metrics
from captionkit.serve.options import ServeOptions


class Segmenter(Protocol):
    """What the server asks of a segmentation model: images in, one prediction per image whose
    regions carry a box, a label, a score and a COCO RLE mask."""

    model_id: str

    def segment(self, images: list[Image.Image], options: Any) -> list[Prediction]: ...


class ClientLeft(Exception):
    """The client disconnected before its results were ready."""


@dataclass
class Answer:
    """A request's predictions with the decoded images they describe and where the time went."""

    predictions: list[Prediction]
    images: list[Image.Image]
    timings: dict[str, float]


class Service:
    """The captioner (and optionally a CLIP scorer and a segmenter) behind one batching worker each."""

    def __init__(self, captioner: Captioner, options: ServeOptions,
                 generation: GenerationOptions | None = None, scorer: Any = None,
                 segmenter: Segmenter | None = None, segment_options: Any = None) -> None:
        self.captioner = captioner
        self.options = options
        self.generation = generation or GenerationOptions()
        self.scorer = scorer
        self.segmenter = segmenter
        self.segment_options = segment_options
        self.metrics = Metrics()
        self.started = time.time()
        self.name = public_name(options.model, captioner.model_id)
        self.segmenter_name = (public_name(options.segment_model or segmenter.model_id,
                                           segmenter.model_id) if segmenter is not None else None)
        self.captions = self._batcher("caption", self._caption)
        self.segments = self._batcher("segment", self._segment) if segmenter is not None else None
        self.min_score = self._min_score()
        self.makers = input_makers(captioner, scorer)
        """The captioner's and the scorer's image-to-input steps, run in the decoding threads."""
        # threads that run torch for those inputs get one intra-op thread each
        pinned = preprocess.one_torch_thread if self.makers else None
        self.decoders = ThreadPoolExecutor(default_workers(), thread_name_prefix="captionkit-decode",
                                           initializer=pinned)
        """Where uploads are decoded, and made into the captioner's inputs when it says how."""

    def _min_score(self) -> float | None:
        """The lowest score among the regions the segmenter keeps (its threshold), if it says;
        None for models whose regions have no score (semantic) or keep every prompt (SAM)."""
        if getattr(self.segmenter, "kind", "instance") != "instance":
            return None
        threshold = getattr(self.segmenter, "threshold", None)
        if callable(threshold):
            from captionkit.segment.options import SegmentOptions

            return threshold(self.segment_options or SegmentOptions())
        return getattr(self.segment_options, "threshold", None)

    def _batcher(self, name: str, predict: Callable) -> Batcher:
        batcher = Batcher(predict, self.options.max_batch_size, self.options.max_wait_ms,
                          self.options.queue_size, name=name)
        batcher.on_batch = self.metrics.watch(name, lambda: batcher.depth)
        return batcher

    def start(self) -> None:
        for batcher in self._batchers():
            batcher.start()

    def close(self) -> None:
        for batcher in self._batchers():
            batcher.close()
        self.decoders.shutdown(wait=False, cancel_futures=True)

    def _batchers(self) -> list[Batcher]:
        return [b for b in (self.captions, self.segments) if b is not None]

    def serves(self, model: str | None) -> bool:
        """Whether a request naming `model` is meant for this server's captioner."""
        return model is None or model in (self.name, self.options.model, self.captioner.model_id)

    def _caption(self, images: list[Image.Image], options: GenerationOptions,
                 prompts: list[str | None]) -> list[Prediction]:
        predictions = [at_full_size(self.captioner, image, prediction) for image, prediction
                       in zip(images, self.captioner.caption(images, options, prompts), strict=True)]
        if self.scorer is not None:
            gate.score_batch(self.scorer, list(zip(images, predictions, strict=True)))
        return predictions

    def _segment(self, images: list[Image.Image], options: Any,
                 prompts: list[str | None]) -> list[Prediction]:
        assert self.segmenter is not None
        return self.segmenter.segment(images, self.segment_options)

    async def caption(self, request: Request, uploads: list[Upload],
                      options: GenerationOptions) -> Answer:
        """Captions for the uploads, batched with other requests that asked the same options."""
        shared, prompt, alone = inputs.batch_key(options)
        size = self.captioner.input_size
        return await self._run(request, self.captions, uploads, size, shared, prompt, alone)

    async def segment(self, request: Request, uploads: list[Upload]) -> Answer:
        if self.segments is None:
            raise ApiError(404, "this server has no segmentation model (start it with "
                                "--segment-model)", "no_segmenter")
        # decoded whole, so that boxes and masks are in the pixels of the image as sent
        return await self._run(request, self.segments, uploads, None, None, None, False)

    async def _run(self, request: Request, batcher: Batcher, uploads: list[Upload],
                   size: int | None, options: Any, prompt: str | None, alone: bool) -> Answer:
        arrived = time.monotonic()
        if not batcher.has_room(len(uploads)):  # before decoding: a full queue answers at once
            raise _busy(batcher.retry_after())
        images = await asyncio.get_running_loop().run_in_executor(
            self.decoders, self._decoded, uploads, size, batcher is self.captions)
        decoded = time.monotonic()
        try:
            job = batcher.submit(images, options, [prompt] * len(images), alone)
        except QueueFull as full:
            raise _busy(full.retry_after) from None
        predictions = await self._wait(request, batcher, job)
        done = time.monotonic()
        timings = {"decode_ms": decoded - arrived, "queue_ms": job.started - decoded,
                   "model_ms": job.finished - job.started, "total_ms": done - arrived}
        timings = {key: round(seconds * 1000, 2) for key, seconds in timings.items()}
        return Answer(predictions, images, {**timings, "batch_images": job.batch_images})

    def _decoded(self, uploads: list[Upload], size: int | None, to_caption: bool) -> list[Image.Image]:
        """The uploads decoded (in a decoding thread); images to caption carry the inputs of the
        captioner and the scorer that declare how to make them, so the model's thread does not."""
        images = [inputs.decode(upload, size, self.options.max_pixels) for upload in uploads]
        for image in images if to_caption else ():
            preprocess.attach_inputs(image, self.makers)
        return images

    async def _wait(self, request: Request, batcher: Batcher, job: Job) -> list[Prediction]:
        """The job's predictions; a client that leaves or a request that times out leaves the queue."""
        result = asyncio.wrap_future(job.future)
        left = asyncio.ensure_future(_disconnected(request.receive))
        try:
            done, _ = await asyncio.wait({result, left}, timeout=self.options.request_timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            batcher.cancel(job)
            raise
        finally:
            left.cancel()
        if result in done:
            return self._outcome(result)
        batcher.cancel(job)
        if left in done:
            raise ClientLeft
        raise ApiError(504, f"no answer within the server's request timeout of "
                            f"{self.options.request_timeout:g} s", "timeout")

    def _outcome(self, result: asyncio.Future) -> list[Prediction]:
        error = result.exception()
        if error is None:
            return result.result()
        if isinstance(error, CaptionkitError):  # a request the model cannot honour (a prompt...)
            raise ApiError(422, self.scrub(str(error)), "bad_option")
        raise ApiError(500, f"the model failed on this request ({type(error).__name__}); the "
                            "server log has the details", "model_error")

    def scrub(self, message: str) -> str:
        """A message without the server's own paths (the model's folder, the home folder)."""
        for local, shown in ((self.captioner.model_id, self.name), (self.options.model, self.name),
                             (os.getcwd(), "."), (str(Path.home()), "~")):
            if os.path.isabs(local) or os.path.exists(local):
                message = message.replace(local, shown)
        return message


def public_name(name: str, model_id: str) -> str:
    """The name clients see: a local checkpoint by its folder's name, never its path."""
    shown = model_id if name == "auto" else name
    if os.path.isabs(shown) or Path(shown).exists():
        return Path(shown).name or shown
    return shown


def _busy(retry_after: int) -> ApiError:
    return ApiError(503, f"the server is busy: its queue is full; retry in {retry_after} s",
                    "overloaded", {"Retry-After": str(retry_after)})


async def _disconnected(receive: Callable[[], Awaitable[dict]]) -> None:
    """Returns once the client has gone (after the body, the next message is the disconnect)."""
    while (await receive())["type"] != "http.disconnect":
        pass
