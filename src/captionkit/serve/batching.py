"""Dynamic batching: one worker thread per model gathers waiting requests into model batches.

Requests from any number of clients wait in one bounded queue. The worker takes the oldest request
and every other one that asked the same options, up to `max_batch_size` images; it waits up to
`max_wait_ms` after the oldest arrived for more to come, then runs the batch and hands each request
its own predictions. Float32 batches are batch-invariant, so a request's captions do not depend on
which others shared its batch.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from captionkit.predictions import Prediction

log = logging.getLogger("captionkit.serve")

Predict = Callable[[list[Image.Image], Any, list[str | None]], list[Prediction]]
"""A batch of images, the options they share and each one's prompt -> one prediction per image."""


@dataclass(eq=False)
class Job:
    """One request's images on their way through the model."""

    images: list[Image.Image]
    options: Hashable
    """Requests with equal options can share a batch."""
    prompts: list[str | None]
    alone: bool = False
    """Run in a batch of its own (sampling with a seed gives the same captions every time only so)."""
    arrived: float = field(default_factory=time.monotonic)
    started: float = 0.0
    finished: float = 0.0
    batch_images: int = 0
    """How many images the batch it ran in held."""
    future: Future = field(default_factory=Future)


class QueueFull(Exception):
    """The queue has no room for a request's images."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the queue is full: retry in {retry_after} s")
        self.retry_after = retry_after


class Batcher:
    """A bounded queue and the worker thread that runs its requests in batches."""

    def __init__(self, predict: Predict, max_batch_size: int, max_wait_ms: float, queue_size: int,
                 name: str = "model", on_batch: Callable[[int, float], None] | None = None) -> None:
        self.predict = predict
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.queue_size = queue_size
        self.on_batch = on_batch
        self._jobs: deque[Job] = deque()
        self._waiting = 0
        self._seconds_per_image = 0.0
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name=f"captionkit-{name}", daemon=True)

    def start(self) -> Batcher:
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop the worker after its current batch; requests still waiting are cancelled."""
        with self._cond:
            self._closed = True
            for job in self._jobs:
                job.future.cancel()
            self._jobs.clear()
            self._waiting = 0
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join()

    @property
    def depth(self) -> int:
        """Images waiting for the model (not counting the batch it runs now)."""
        return self._waiting

    def has_room(self, images: int) -> bool:
        return self._waiting + images <= self.queue_size

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained, from the recent time per image."""
        return min(60, max(1, math.ceil(self._waiting * self._seconds_per_image)))

    def submit(self, images: list[Image.Image], options: Hashable, prompts: list[str | None],
               alone: bool = False) -> Job:
        """Queue a request; raises QueueFull when its images do not fit."""
        job = Job(images, options, prompts, alone)
        with self._cond:
            if self._closed:
                raise RuntimeError("the model worker has stopped")
            if not self.has_room(len(images)):
                raise QueueFull(self.retry_after())
            self._jobs.append(job)
            self._waiting += len(images)
            self._cond.notify()
        return job

    def cancel(self, job: Job) -> None:
        """Take a request out of the queue (its client left or timed out), freeing its room."""
        with self._cond:
            if job.future.cancel() and job in self._jobs:
                self._jobs.remove(job)
                self._waiting -= len(job.images)
                self._cond.notify()

    def _loop(self) -> None:
        while (jobs := self._gather()) is not None:
            live = [job for job in jobs if job.future.set_running_or_notify_cancel()]
            if live:
                self._run(live)

    def _gather(self) -> list[Job] | None:
        """The next batch: the oldest request and the ones that can join it, once the batch is full
        or the oldest has waited `max_wait`; None once closed."""
        with self._cond:
            while not self._closed:
                if not self._jobs:
                    self._cond.wait()
                    continue
                batch = self._joining(self._jobs[0])
                images = sum(len(job.images) for job in batch)
                wait = self._jobs[0].arrived + self.max_wait - time.monotonic()
                if images >= self.max_batch_size or batch[0].alone or wait <= 0:
                    for job in batch:
                        self._jobs.remove(job)
                    self._waiting -= images
                    return batch
                self._cond.wait(wait)
            return None

    def _joining(self, first: Job) -> list[Job]:
        """`first` and the waiting requests with its options that fit beside it, oldest first."""
        batch, images = [first], len(first.images)
        if first.alone:
            return batch
        for job in self._jobs:
            if images >= self.max_batch_size:
                break
            fits = images + len(job.images) <= self.max_batch_size
            if job is not first and not job.alone and job.options == first.options and fits:
                batch.append(job)
                images += len(job.images)
        return batch

    def _run(self, jobs: list[Job]) -> None:
        """Predict for the jobs together; when that fails, each alone, so one bad request fails
        by itself."""
        images = [image for job in jobs for image in job.images]
        prompts = [prompt for job in jobs for prompt in job.prompts]
        started = time.monotonic()
        try:
            predictions = self._predict(images, jobs[0].options, prompts)
        except Exception as error:  # noqa: BLE001 - handed to the waiting request(s)
            if len(jobs) > 1:
                for job in jobs:
                    self._run([job])
                return
            log.warning("the model failed on a request", exc_info=error)
            jobs[0].future.set_exception(error)
            return
        finished = time.monotonic()
        self._record(len(images), finished - started)
        for job in jobs:
            job.started, job.finished, job.batch_images = started, finished, len(images)
            job.future.set_result(predictions[:len(job.images)])
            predictions = predictions[len(job.images):]

    def _predict(self, images: list[Image.Image], options: Any,
                 prompts: list[str | None]) -> list[Prediction]:
        """One call per `max_batch_size` images (only a request bigger than that needs several)."""
        size, out = self.max_batch_size, []
        for start in range(0, len(images), size):
            out += self.predict(images[start:start + size], options, prompts[start:start + size])
        if len(out) != len(images):
            raise RuntimeError(f"the model returned {len(out)} predictions for {len(images)} images")
        return out

    def _record(self, images: int, seconds: float) -> None:
        per_image = seconds / images
        # an average of recent batches: Retry-After follows the load without jumping on one batch
        self._seconds_per_image = per_image if not self._seconds_per_image else (
            0.8 * self._seconds_per_image + 0.2 * per_image)
        if self.on_batch is not None:
            self.on_batch(images, seconds)
