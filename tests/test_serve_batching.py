"""The dynamic batcher and the server's options, without HTTP: which requests share a batch, the
bounded queue, cancellation, failures that stay with their request, and what ServeOptions refuses."""

from __future__ import annotations

import threading
import time

import pytest
from PIL import Image

from captionkit.errors import OptionError
from captionkit.predictions import Prediction
from captionkit.serve import ServeOptions
from captionkit.serve.batching import Batcher, QueueFull
from captionkit.serve.options import API_KEY_ENV, is_loopback


class Recorder:
    """A model that names each image by its colour and remembers the batches it was given."""

    def __init__(self, gate: threading.Event | None = None, fail_on: str | None = None) -> None:
        self.batches: list[list[str]] = []
        self.gate = gate
        self.fail_on = fail_on
        self.entered = threading.Event()

    def __call__(self, images, options, prompts):
        names = [f"{image.getpixel((0, 0))[0]}" for image in images]
        self.batches.append(names)
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(10)
        if self.fail_on in names:
            raise ValueError("this image breaks the model")
        return [Prediction(text=f"{name}|{options}|{prompt}") for name, prompt
                in zip(names, prompts, strict=True)]


def image(value: int) -> Image.Image:
    return Image.new("RGB", (4, 4), (value, 0, 0))


def test_requests_waiting_together_share_a_batch_and_get_their_own_predictions():
    model = Recorder()
    batcher = Batcher(model, max_batch_size=8, max_wait_ms=200, queue_size=64).start()
    try:
        jobs = [batcher.submit([image(i), image(100 + i)], "same", [f"p{i}"] * 2) for i in range(3)]
        results = [job.future.result(5) for job in jobs]
    finally:
        batcher.close()
    assert model.batches == [["0", "100", "1", "101", "2", "102"]]
    for i, predictions in enumerate(results):
        assert [p.text for p in predictions] == [f"{i}|same|p{i}", f"{100 + i}|same|p{i}"]
    assert all(job.batch_images == 6 and job.finished >= job.started >= job.arrived for job in jobs)


def test_batches_hold_at_most_max_batch_size_images_and_only_equal_options():
    gate = threading.Event()
    model = Recorder(gate)
    batcher = Batcher(model, max_batch_size=3, max_wait_ms=0, queue_size=64).start()
    try:
        first = batcher.submit([image(1)], "a", [None])
        assert model.entered.wait(5)  # the worker is busy with `first`; the rest queue up
        jobs = [batcher.submit([image(10 + i)], "b" if i == 2 else "a", [None]) for i in range(5)]
        gate.set()
        for job in [first, *jobs]:
            job.future.result(5)
    finally:
        batcher.close()
    assert model.batches == [["1"], ["10", "11", "13"], ["12"], ["14"]]


def test_a_request_bigger_than_a_batch_runs_in_chunks():
    model = Recorder()
    batcher = Batcher(model, max_batch_size=2, max_wait_ms=0, queue_size=64).start()
    try:
        predictions = batcher.submit([image(i) for i in range(5)], "a", [None] * 5).future.result(5)
    finally:
        batcher.close()
    assert model.batches == [["0", "1"], ["2", "3"], ["4"]]
    assert [p.text.split("|")[0] for p in predictions] == ["0", "1", "2", "3", "4"]


def test_a_seeded_sampling_request_runs_alone():
    gate = threading.Event()
    model = Recorder(gate)
    batcher = Batcher(model, max_batch_size=8, max_wait_ms=0, queue_size=64).start()
    try:
        first = batcher.submit([image(1)], "a", [None])
        assert model.entered.wait(5)
        jobs = [batcher.submit([image(2)], "a", [None], alone=True),
                batcher.submit([image(3)], "a", [None]), batcher.submit([image(4)], "a", [None])]
        gate.set()
        for job in [first, *jobs]:
            job.future.result(5)
    finally:
        batcher.close()
    assert model.batches == [["1"], ["2"], ["3", "4"]]


def test_a_full_queue_refuses_and_a_cancelled_request_frees_its_room():
    gate = threading.Event()
    model = Recorder(gate)
    batcher = Batcher(model, max_batch_size=1, max_wait_ms=0, queue_size=2).start()
    try:
        running = batcher.submit([image(1)], "a", [None])
        assert model.entered.wait(5)
        waiting = batcher.submit([image(2), image(3)], "a", [None, None])
        assert batcher.depth == 2
        with pytest.raises(QueueFull) as full:
            batcher.submit([image(4)], "a", [None])
        assert full.value.retry_after >= 1
        batcher.cancel(waiting)
        assert batcher.depth == 0 and waiting.future.cancelled()
        admitted = batcher.submit([image(5)], "a", [None])
        gate.set()
        assert admitted.future.result(5)[0].text.startswith("5|")
        running.future.result(5)
    finally:
        batcher.close()
    assert ["2", "3"] not in model.batches and ["2"] not in model.batches


def test_a_failing_request_fails_alone_and_the_worker_keeps_going():
    gate = threading.Event()
    model = Recorder(gate, fail_on="66")
    batcher = Batcher(model, max_batch_size=8, max_wait_ms=0, queue_size=64).start()
    try:
        first = batcher.submit([image(1)], "a", [None])
        assert model.entered.wait(5)
        bad, good = batcher.submit([image(66)], "a", [None]), batcher.submit([image(7)], "a", [None])
        gate.set()
        with pytest.raises(ValueError, match="breaks the model"):
            bad.future.result(5)
        assert good.future.result(5)[0].text.startswith("7|")
        assert batcher.submit([image(8)], "a", [None]).future.result(5)[0].text.startswith("8|")
        first.future.result(5)
    finally:
        batcher.close()
    assert ["66", "7"] in model.batches and ["66"] in model.batches and ["7"] in model.batches


def test_the_oldest_request_waits_at_most_max_wait_ms():
    model = Recorder()
    batcher = Batcher(model, max_batch_size=64, max_wait_ms=150, queue_size=64).start()
    try:
        started = time.monotonic()
        batcher.submit([image(1)], "a", [None]).future.result(5)
        waited = time.monotonic() - started
    finally:
        batcher.close()
    assert 0.14 <= waited < 2


def test_closing_cancels_waiting_requests():
    gate = threading.Event()
    batcher = Batcher(Recorder(gate), max_batch_size=1, max_wait_ms=0, queue_size=8).start()
    running = batcher.submit([image(1)], "a", [None])
    waiting = batcher.submit([image(2)], "a", [None])
    threading.Timer(0.2, gate.set).start()
    batcher.close()
    assert waiting.future.cancelled() and running.future.done()


def test_serve_options_refuse_to_listen_beyond_loopback_without_a_key(monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    with pytest.raises(OptionError, match="--api-key"):
        ServeOptions(host="0.0.0.0")
    assert ServeOptions(host="0.0.0.0", insecure=True).api_key is None
    assert ServeOptions(host="0.0.0.0", api_key="k").api_key == "k"
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    options = ServeOptions(host="192.168.1.5")
    assert options.api_key == "from-env" and "from-env" not in repr(options)
    assert ServeOptions(api_key="given").api_key == "given"


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("127.8.0.1", True), ("::1", True),
                                            ("[::1]", True), ("localhost", True), ("0.0.0.0", False),
                                            ("::", False), ("example.org", False), ("10.0.0.1", False)])
def test_loopback_hosts(host, loopback):
    assert is_loopback(host) is loopback


@pytest.mark.parametrize("change, message", [
    ({"port": 70000}, "--port"), ({"max_batch_size": 0}, "--max-batch-size"),
    ({"queue_size": -1}, "--queue-size"), ({"max_wait_ms": -1}, "--max-wait-ms"),
    ({"request_timeout": 0}, "--request-timeout"), ({"api_key": "  "}, "--api-key is empty"),
    ({"cors_origins": ("*",), "api_key": "k"}, "--cors-origin")])
def test_serve_options_check_their_values(change, message, monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    with pytest.raises(OptionError, match=message):
        ServeOptions(**change)
