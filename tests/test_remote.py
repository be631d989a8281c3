"""Remote endpoints against real HTTP servers on 127.0.0.1: protocol, concurrency, retries, errors, resume."""

from __future__ import annotations

import base64
import email.utils
import io
import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fake_servers import FakeServer, caption_for
from PIL import Image

from captionkit.errors import ModelNotFoundError, OptionError
from captionkit.models import load, remote
from captionkit.models.remote import (
    FAILING_STREAK,
    AccessError,
    EndpointFailingError,
    EndpointUnreachableError,
    PartialFailure,
)
from captionkit.options import GenerationOptions, LoadOptions
from captionkit.pipeline import Pipeline, RunOptions, default_batch_size

GEN = GenerationOptions(max_new_tokens=20)
KEY = "sk-test-0123456789abcdefSECRET"  # the fake servers accept it as an OpenAI key or an HF token
HF_MODEL = "Salesforce/blip-image-captioning-large"


@pytest.fixture(autouse=True)
def _local_only(monkeypatch):
    """Fast retries, no credentials or proxies from the developer's environment."""
    monkeypatch.setattr(remote, "BACKOFF_SECONDS", 0.01)
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "HF_TOKEN", "HTTP_PROXY", "HTTPS_PROXY",
                 "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def server():
    with FakeServer(api_key=KEY, models=("llava", HF_MODEL, "org/vlm")) as fake:
        yield fake


def openai(server: FakeServer, **options):
    return load("openai:llava", LoadOptions(api_base=f"{server.url}/v1", **options))


def hf_api(server: FakeServer, **options):
    return load(f"hf-api:{HF_MODEL}", LoadOptions(api_base=f"{server.url}/models/{HF_MODEL}", **options))


def run(captioner, folder: Path, out: Path, **options):
    return Pipeline(captioner, GEN, RunOptions(output_dir=out, progress=False, **options)).run([str(folder)])


def expected_captions(folder: Path) -> dict[str, str]:
    captions = {}
    for path in sorted(folder.iterdir()):
        with Image.open(path) as image:
            captions[path.name] = caption_for(image.size)
    return captions


def records(out: Path) -> dict[str, dict]:
    lines = (out / "captions.jsonl").read_text().splitlines()
    return {record["image"]: record for record in map(json.loads, lines)}


def done_captions(out: Path) -> dict[str, str]:
    return {name: r["caption"] for name, r in records(out).items() if r["status"] == "done"}


def test_openai_run_captions_every_image_in_order_with_overlapping_requests(
        server, photo_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    server.delay = 0.2
    captioner = openai(server, concurrency=4)
    assert captioner.model_id == f"openai:llava@127.0.0.1:{server.port}/v1"
    assert default_batch_size(captioner) == 4
    summary = run(captioner, photo_dir, tmp_path / "out")
    assert summary.done == 8 and not summary.failed
    assert done_captions(tmp_path / "out") == expected_captions(photo_dir)
    assert len(server.requests) == 8 and server.max_in_flight >= 2

    request = server.requests[0]
    assert request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.headers["content-type"] == "application/json"
    body = request.json()
    assert body["model"] == "llava" and body["max_tokens"] == 20 and body["temperature"] == 0.0
    text, image = body["messages"][0]["content"]
    assert text == {"type": "text", "text": remote.DEFAULT_PROMPT}
    data = image["image_url"]["url"].removeprefix("data:image/jpeg;base64,")
    assert Image.open(io.BytesIO(base64.b64decode(data))).format == "JPEG"


def test_openai_sends_the_prompt_without_a_key_and_reads_content_parts(server, photos):
    server.api_key = None
    server.content_parts = True
    captions = openai(server).caption(photos[:2], GenerationOptions(do_sample=True, temperature=0.7,
                                                                    seed=3), ["Name the animal.", None])
    assert [c.text for c in captions] == [caption_for(p.size) for p in photos[:2]]
    first, second = sorted((r.json() for r in server.requests), key=lambda b: b["messages"][0]["content"][0]
                           ["text"] != "Name the animal.")
    assert "authorization" not in server.requests[0].headers
    assert first["messages"][0]["content"][0]["text"] == "Name the animal."
    assert second["messages"][0]["content"][0]["text"] == remote.DEFAULT_PROMPT
    assert first["temperature"] == 0.7 and first["seed"] == 3


def test_chat_options_reach_the_server_and_candidates_come_back(server, photos):
    server.api_key = None
    generation = GenerationOptions(detail="detailed", system="You caption photos.", language="French",
                                   candidates=2, do_sample=True)
    [caption] = openai(server).caption(photos[:1], generation)
    expected = caption_for(photos[0].size)
    assert caption.text == expected
    assert caption.extras == {"candidates": [{"text": expected}, {"text": f"{expected} (2)"}]}
    body = server.requests[0].json()
    assert body["messages"][0] == {"role": "system", "content": "You caption photos."}
    assert body["messages"][1]["content"][0]["text"] == "Describe this image in detail. Answer in French."
    assert body["n"] == 2 and body["temperature"] == 1.0


def test_hf_image_to_text_refuses_what_only_chat_models_take(server, photos, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", KEY)
    with pytest.raises(OptionError, match=f"use --model hf-api:chat:{HF_MODEL}"):
        hf_api(server).caption(photos[:1], GenerationOptions(prompt="What is this?"))
    assert not server.requests


@pytest.mark.parametrize("connect", [openai, hf_api])
def test_503s_are_retried_until_the_server_recovers(server, photos, monkeypatch, connect):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("HF_TOKEN", KEY)
    server.unavailable = 3
    captions = connect(server, max_retries=3).caption(photos[:1], GEN)
    assert captions[0].text == caption_for(photos[0].size)
    assert len(server.requests) == 4


@pytest.mark.parametrize("connect", [openai, hf_api])
def test_429_waits_as_long_as_retry_after_says(server, photos, monkeypatch, connect):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("HF_TOKEN", KEY)
    server.rate_limited = 1
    started = time.perf_counter()
    captions = connect(server).caption(photos[:1], GEN)
    assert captions[0].text == caption_for(photos[0].size)
    assert len(server.requests) == 2 and time.perf_counter() - started >= 0.9


def test_retry_after_as_http_date_and_too_long_waits(server, photos, monkeypatch):
    soon = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 28 <= remote._retry_after(soon) <= 30
    assert remote._retry_after("garbage") is None
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    server.rate_limited, server.retry_after = 1, "3600"
    with pytest.raises(PartialFailure) as caught:
        openai(server).caption(photos[:1], GEN)
    assert "wait 3600 s" in caught.value.outcomes[0] and len(server.requests) == 1


def test_retries_give_up_with_a_clear_reason_and_the_run_goes_on(server, photo_dir, tmp_path,
                                                                  monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    server.status = 502
    summary = run(openai(server, max_retries=2), photo_dir, tmp_path / "out")
    assert summary.done == 0 and len(summary.failed) == 8
    assert len(server.requests) == 8 * 3
    assert all(reason.startswith("HTTP 502: scripted failure 502 (3 attempts;")
               for _, reason in summary.failed)


def test_slow_answers_time_out_and_fail_the_image(server, photos, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    server.delay = 1.5
    with pytest.raises(PartialFailure) as caught:
        openai(server, timeout=0.3, max_retries=1).caption(photos[:2], GEN)
    assert caught.value.outcomes == ["no answer within 0.3 s (2 attempts; --retry-failed tries again)"] * 2
    assert len(server.requests) == 4


@pytest.mark.parametrize("connect", [openai, hf_api])
def test_a_rejected_image_fails_alone_and_nothing_is_sent_twice(server, photo_dir, tmp_path, monkeypatch,
                                                                 connect):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("HF_TOKEN", KEY)
    with Image.open(photo_dir / "coins.png") as coins:
        server.reject_size = coins.size
    summary = run(connect(server, concurrency=8), photo_dir, tmp_path / "out")
    assert summary.done == 7 and len(server.requests) == 8
    [(name, reason)] = summary.failed
    assert name == "coins.png" and reason.startswith("HTTP 400: ")
    assert "unsupported image" in reason or "Invalid image" in reason


def test_hf_image_to_text_speaks_the_inference_protocol(server, photo_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", KEY)
    server.delay = 0.2
    captioner = hf_api(server, concurrency=4)
    assert captioner.model_id == f"hf-api:{HF_MODEL}@127.0.0.1:{server.port}/models/{HF_MODEL}"
    summary = run(captioner, photo_dir, tmp_path / "out")
    assert summary.done == 8 and done_captions(tmp_path / "out") == expected_captions(photo_dir)
    assert server.max_in_flight >= 2
    request = server.requests[0]
    assert request.path == f"/models/{HF_MODEL}"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.headers["content-type"] == "image/jpeg" and request.body[:2] == b"\xff\xd8"


def test_hf_chat_sends_the_image_to_a_vlm(server, photos, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", KEY)
    captioner = load("hf-api:chat:org/vlm", LoadOptions(api_base=server.url))
    assert captioner.model_id == f"hf-api:chat:org/vlm@127.0.0.1:{server.port}"
    captions = captioner.caption(photos[:2], GEN)
    assert [c.text for c in captions] == [caption_for(p.size) for p in photos[:2]]
    body = server.requests[0].json()
    assert server.requests[0].path == "/v1/chat/completions"
    assert body["model"] == "org/vlm" and body["max_tokens"] == 20
    assert body["messages"][0]["content"][1]["image_url"]["url"].startswith("data:image/jpeg;base64,")


def test_hf_api_checks_the_task_the_hub_serves_the_model_for(server, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", server.url)
    server.hub_tasks = {HF_MODEL: "image-to-text", "org/vlm": "conversational", "org/offline": None}
    assert load(f"hf-api:{HF_MODEL}").model_id == f"hf-api:{HF_MODEL}"
    assert load("hf-api:chat:org/vlm").model_id == "hf-api:chat:org/vlm"
    with pytest.raises(OptionError, match="for conversational, not image-to-text; use --model "
                                          "hf-api:chat:org/vlm"):
        load("hf-api:org/vlm")
    with pytest.raises(ModelNotFoundError, match="no Inference Provider serves this model"):
        load("hf-api:org/offline")
    with pytest.raises(ModelNotFoundError, match="no such model on the Hugging Face Hub"):
        load("hf-api:org/missing")
    assert not server.requests


@pytest.mark.parametrize(("connect", "variable"), [(openai, "OPENAI_API_KEY"), (hf_api, "HF_TOKEN")])
def test_401_aborts_naming_the_variable_but_never_the_key(server, photo_dir, tmp_path, monkeypatch,
                                                         connect, variable):
    server.api_key = "the-server-wants-another-key"
    monkeypatch.setenv(variable, KEY)
    with pytest.raises(AccessError) as caught:
        run(connect(server), photo_dir, tmp_path / "out")
    message = str(caught.value)
    assert "HTTP 401" in message and variable in message and "refused" in message
    assert KEY not in message
    monkeypatch.delenv(variable)
    with pytest.raises(AccessError, match=f"No key was sent; set {variable}"):
        connect(server).caption([Image.new("RGB", (8, 8))], GEN)


@pytest.mark.parametrize("connect", [openai, hf_api])
def test_404_aborts_with_model_not_found(photo_dir, tmp_path, connect):
    with FakeServer(models=()) as server, pytest.raises(ModelNotFoundError) as caught:
        run(connect(server), photo_dir, tmp_path / "out")
    assert "HTTP 404" in str(caught.value) and "Check the model name and --api-base" in str(caught.value)


def test_failing_second_half_is_retried_later_with_the_same_outputs(server, photo_dir, tmp_path,
                                                                     monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    out = tmp_path / "out"
    server.healthy_for = 4
    first = run(openai(server, concurrency=4, max_retries=1), photo_dir, out)
    assert first.done == 4 and len(first.failed) == 4
    assert all("HTTP 503" in reason for _, reason in first.failed)
    server.healthy_for = None
    assert run(openai(server), photo_dir, out).failed_earlier == 4
    again = run(openai(server), photo_dir, out, retry_failed=True)
    assert again.skipped == 4 and again.done == 4 and not again.failed
    assert done_captions(out) == expected_captions(photo_dir)


@pytest.mark.parametrize("connect", [openai, hf_api])
def test_a_server_failing_image_after_image_stops_the_run(photos, tmp_path, connect):
    folder = tmp_path / "many"
    folder.mkdir()
    for index in range(3 * FAILING_STREAK):  # distinct images, so none is deduplicated
        photos[index % len(photos)].resize((40 + index, 30)).save(folder / f"{index:02d}.png")
    with FakeServer(models=("llava", HF_MODEL)) as server:
        server.healthy_for = 2
        with pytest.raises(EndpointFailingError, match=f"{FAILING_STREAK} images in a row got no "
                                                       "caption.*HTTP 503.*run the same command again"):
            run(connect(server, concurrency=2, max_retries=1), folder, tmp_path / "out")
    # stopped well before trying every image twice; the two captioned ones are kept
    assert len(server.requests) < 2 * 3 * FAILING_STREAK
    with sqlite3.connect(tmp_path / "out" / "captionkit.db") as db:
        assert db.execute("SELECT count(*) FROM results WHERE status = 'done'").fetchone() == (2,)


@pytest.mark.parametrize("connect", [openai, hf_api])
def test_a_server_dying_midway_aborts_and_a_rerun_resumes(photo_dir, tmp_path, connect):
    out = tmp_path / "out"
    dying = FakeServer(models=("llava", HF_MODEL))
    dying.die_after = 3
    with pytest.raises(EndpointUnreachableError, match="run the same command again to resume"):
        run(connect(dying, concurrency=2, max_retries=2), photo_dir, out)
    dying.close()
    with FakeServer(models=("llava", HF_MODEL), port=dying.port) as healthy:
        summary = run(connect(healthy, concurrency=2), photo_dir, out)
    assert summary.skipped >= 2 and summary.skipped + summary.done == 8 and not summary.failed
    assert done_captions(out) == expected_captions(photo_dir)


def test_cli_reports_a_refused_key_in_one_line_and_writes_it_nowhere(server, photo_dir, tmp_path,
                                                                        monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    out = tmp_path / "out"
    run(openai(server), photo_dir, out, formats=("captions.txt", "jsonl", "csv"))
    server.api_key = "rotated"
    proc = subprocess.run(
        [sys.executable, "-m", "captionkit", "caption", str(photo_dir), "-o", str(out), "-q",
         "--model", "openai:llava", "--api-base", f"{server.url}/v1", "--concurrency", "3",
         "--timeout", "5", "--max-retries", "1", "--overwrite"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "OPENAI_API_KEY" in proc.stderr and proc.stderr.strip().count("\n") == 0
    assert len(server.requests) > 8
    for text in (proc.stdout, proc.stderr, *(path.read_bytes().decode("latin-1")
                                             for path in out.iterdir() if path.is_file())):
        assert KEY not in text


@pytest.mark.slow
def test_ctrl_c_while_requests_hang_exits_at_once(server, photo_dir, tmp_path):
    """Python joins worker threads at exit; a request blocked in a slow server must not hold the
    process for its timeout after Ctrl-C."""
    server.api_key, server.delay = None, 60.0
    proc = subprocess.Popen(
        [sys.executable, "-m", "captionkit", "caption", str(photo_dir), "-o", str(tmp_path / "out"),
         "--model", "openai:llava", "--api-base", f"{server.url}/v1", "--timeout", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while not server.requests and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.requests, "no request reached the server"
    interrupted = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted: finished batches are saved" in stderr
    assert time.monotonic() - interrupted < 10, "the exit waited for the hanging requests"


def test_a_signal_the_kernel_hands_to_a_worker_thread_still_stops_the_wait(server, photos):
    """A process-wide Ctrl-C may land on any thread. One landing on a request thread does not wake a
    main thread asleep on a lock, which then saw it only when the request ended (60 s in CI)."""
    server.api_key, server.delay = None, 30.0

    class Stopped(Exception):
        pass

    def stop(signum, frame):
        raise Stopped

    def signal_a_request_thread():
        deadline = time.monotonic() + 20
        while not server.requests and time.monotonic() < deadline:
            time.sleep(0.02)
        worker = next(t for t in threading.enumerate() if t.name.startswith("captionkit-remote"))
        signal.pthread_kill(worker.ident, signal.SIGUSR1)

    previous = signal.signal(signal.SIGUSR1, stop)
    try:
        threading.Thread(target=signal_a_request_thread, daemon=True).start()
        started = time.monotonic()
        with pytest.raises(Stopped):
            openai(server, timeout=30).caption(photos[:1], GEN)
        assert time.monotonic() - started < 10, "the wait outlived the signal"
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_openai_base_url_from_the_environment_and_api_base_over_it(server, photos, monkeypatch):
    server.api_key = None
    monkeypatch.setenv("OPENAI_BASE_URL", f"{server.url}/v1/")
    captioner = load("openai:llava", LoadOptions())
    assert captioner.model_id == f"openai:llava@{server.url.split('://')[1]}/v1"
    assert [c.text for c in captioner.caption(photos[:1], GenerationOptions())] == [
        caption_for(photos[0].size)]
    assert load("openai:llava", LoadOptions(api_base="https://example.com/v1")).model_id == (
        "openai:llava@example.com/v1")
    monkeypatch.setenv("OPENAI_BASE_URL", "localhost:8000/v1")
    with pytest.raises(OptionError, match="OPENAI_BASE_URL='localhost:8000/v1': an API base starts"):
        load("openai:llava", LoadOptions())


def test_options_are_checked_before_any_request():
    with pytest.raises(OptionError, match="--concurrency"):
        LoadOptions(concurrency=0)
    with pytest.raises(OptionError, match="--api-base"):
        LoadOptions(api_base="localhost:8000/v1")
    with pytest.raises(OptionError, match="openai: needs a model"):
        load("openai:", LoadOptions())
    with pytest.raises(OptionError, match="credentials in the URL") as caught:
        load("openai:gpt-4o-mini", LoadOptions(api_base="https://user:pw@example.com/v1"))
    assert "pw" not in str(caught.value)
    captioner = load("openai:gpt-4o-mini", LoadOptions(api_base="https://example.com:8443/v1/"))
    assert captioner.model_id == "openai:gpt-4o-mini@example.com:8443/v1"
    assert load("openai:gpt-4o-mini").model_id == "openai:gpt-4o-mini@api.openai.com/v1"
