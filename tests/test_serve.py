"""`python -m captionkit.serve` in a subprocess on 127.0.0.1, serving the tiny BLIP, called the way
users call it: curl-style multipart (httpx), JSON with base64, the official `openai` SDK and
`huggingface_hub.InferenceClient`. Captions must equal what the captioning pipeline gives the same
files; every bad input gets its status code and the server keeps serving."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from captionkit import sources
from captionkit.api import Model
from captionkit.exporters import parse_captions_txt_line
from captionkit.options import GenerationOptions

KEY = "test-key-7f3a9c"
NAMES = ["astronaut", "chelsea", "coffee", "rocket"]
MAX_BODY = 3_000_000
MAX_PIXELS = 4_000_000
SRC = Path(__file__).resolve().parent.parent / "src"


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory, photos) -> Path:
    """Four real photos as JPEG files (what users upload)."""
    folder = tmp_path_factory.mktemp("serve-photos")
    for name, photo in zip(NAMES, photos, strict=False):
        photo.save(folder / f"{name}.jpg", quality=90)
    return folder


@pytest.fixture(scope="module")
def jpegs(photo_dir) -> dict[str, bytes]:
    return {name: (photo_dir / f"{name}.jpg").read_bytes() for name in NAMES}


@pytest.fixture(scope="module")
def server(blip_dir, tmp_path_factory) -> Iterator[str]:
    """The server's base URL; its log is checked for tracebacks when the module ends."""
    log_path = tmp_path_factory.mktemp("serve-log") / "server.log"
    with _serving(["captionkit.serve", "--model", str(blip_dir), "--dtype", "float32",
                   "--max-batch-size", "32", "--max-wait-ms", "30", "--max-body-bytes", str(MAX_BODY),
                   "--max-pixels", str(MAX_PIXELS), "--max-images", "8"], log_path,
                  CAPTIONKIT_API_KEY=KEY) as url:
        yield url
        text = log_path.read_text()
        assert "Traceback" not in text, text[-3000:]


@contextmanager
def _serving(arguments: list[str], log_path: Path, **env: str) -> Iterator[str]:
    """`python -m <arguments>` on a free port of 127.0.0.1, on the CPU; its URL until the block ends."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
           **env}
    command = [sys.executable, "-m", *arguments, "--port", "0", "--device", "cpu",
               "--request-timeout", "600"]  # a loaded test machine must not turn slow answers into 504s
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        yield _wait_for_url(process, log_path)
    finally:
        process.terminate()
        process.wait(60)


def _wait_for_url(process: subprocess.Popen, log_path: Path) -> str:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        found = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", log_path.read_text())
        if found:
            return found[1]
        if process.poll() is not None:
            raise AssertionError(f"the server exited:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"the server did not start:\n{log_path.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def client(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def oracle(blip_fp32, photo_dir, tmp_path_factory):
    """Each photo's caption from the captioning pipeline (what `captionkit caption` writes)."""
    cache: dict[GenerationOptions, dict[str, str]] = {}

    def captions(options: GenerationOptions) -> dict[str, str]:
        if options not in cache:
            out = tmp_path_factory.mktemp("oracle")
            Model(blip_fp32).run(photo_dir, options, output_dir=out, progress=False)
            lines = (out / "captions.txt").read_text().splitlines()
            cache[options] = {name.removesuffix(".jpg"): text for name, text
                              in map(parse_captions_txt_line, lines)}
        return cache[options]

    return captions


def data_url(data: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(data).decode()


def test_concurrent_uploads_get_the_pipelines_captions(client, jpegs, oracle):
    """Requests batched together (and a request of several images) get exactly what the pipeline
    gives each file."""
    from concurrent.futures import ThreadPoolExecutor

    def one(name: str) -> dict:
        response = client.post("/v1/caption", files={"image": (f"{name}.jpg", jpegs[name], "image/jpeg")})
        assert response.status_code == 200, response.text
        return response.json()

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, NAMES * 2))
    expected = oracle(GenerationOptions())
    for name, answer in zip(NAMES * 2, answers, strict=True):
        (result,) = answer["results"]
        assert result["caption"] == expected[name] and result["name"] == f"{name}.jpg"
        assert answer["model"] == "blip" and answer["timings"]["batch_images"] >= 1
        assert answer["timings"]["total_ms"] >= answer["timings"]["model_ms"] > 0
    several = client.post("/v1/caption", files=[("image", (f"{n}.jpg", jpegs[n])) for n in NAMES])
    assert [r["caption"] for r in several.json()["results"]] == [expected[n] for n in NAMES]


def test_options_and_prompt_per_request(client, jpegs, oracle):
    options = {"max_new_tokens": "12", "num_beams": "2", "prompt": "a picture of"}
    expected = oracle(GenerationOptions(max_new_tokens=12, num_beams=2, prompt="a picture of"))
    response = client.post("/v1/caption", data=options,
                           files={"image": ("coffee.jpg", jpegs["coffee"], "image/jpeg")})
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["caption"] == expected["coffee"]
    # the same options as JSON, the image as a data: URL, another as bare base64
    body = {"images": [data_url(jpegs["coffee"]), base64.b64encode(jpegs["rocket"]).decode()],
            "max_new_tokens": 12, "num_beams": 2, "prompt": "a picture of"}
    answer = client.post("/v1/caption", json=body).json()
    assert [r["caption"] for r in answer["results"]] == [expected["coffee"], expected["rocket"]]


def test_openai_sdk(server, jpegs, oracle, blip_fp32):
    import openai

    sdk = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)
    assert "blip" in [model.id for model in sdk.models.list()]
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(jpegs["chelsea"])}}]}]
    answer = sdk.chat.completions.create(model="blip", messages=messages, max_tokens=12)
    expected = oracle(GenerationOptions(max_new_tokens=12))["chelsea"]
    assert answer.choices[0].message.content == expected and answer.choices[0].finish_reason == "stop"
    stream = sdk.chat.completions.create(model="blip", messages=messages, max_tokens=12, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream) == expected
    # n: several captions, the beam search's, as the Python API returns them
    decoded = sources.decode(jpegs["chelsea"], "chelsea.jpg", blip_fp32.input_size)
    beams = blip_fp32.caption([decoded], GenerationOptions(max_new_tokens=12, candidates=2))[0]
    several = sdk.chat.completions.create(model="blip", messages=messages, max_tokens=12, n=2)
    assert [c.message.content for c in several.choices] == [c["text"] for c in beams.extras["candidates"]]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).models.list()
    url_messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest/meta-data"}}]}]
    with pytest.raises(openai.BadRequestError, match="URLs are not fetched"):
        sdk.chat.completions.create(model="blip", messages=url_messages)


def test_huggingface_inference_client(server, jpegs, oracle):
    from huggingface_hub import InferenceClient

    hf = InferenceClient(model=f"{server}/models/blip", token=KEY)
    assert hf.image_to_text(jpegs["rocket"]).generated_text == oracle(GenerationOptions())["rocket"]
    # JSON with parameters, as the client sends when given some
    body = {"inputs": base64.b64encode(jpegs["rocket"]).decode(),
            "parameters": {"generation_parameters": {"max_new_tokens": 12}}}
    answer = httpx.post(f"{server}/models/blip", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert answer.json() == [{"generated_text": oracle(GenerationOptions(max_new_tokens=12))["rocket"]}]
    chat = InferenceClient(base_url=f"{server}/v1", api_key=KEY).chat_completion(
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(jpegs["rocket"])}}]}], max_tokens=12)
    assert chat.choices[0].message.content == oracle(GenerationOptions(max_new_tokens=12))["rocket"]


def _png(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (40, 90, 200)).save(buffer, "PNG")
    return buffer.getvalue()


def _corrupt_png() -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[len(data) // 2:len(data) // 2 + 200] = bytes(200)
    return bytes(data)


def _chunks(total: int) -> Iterator[bytes]:
    for _ in range(total // 65536 + 1):
        yield os.urandom(65536)


BAD = {  # name: (method, path, request keyword arguments, status, part of the message)
    "no key": ("POST", "/v1/caption", {"headers": {"Authorization": ""}, "files": {"image": b"x"}}, 401,
               "API key"),
    "wrong key": ("POST", "/v1/caption", {"headers": {"Authorization": "Bearer nope"}}, 401, "API key"),
    "basic auth": ("GET", "/v1/models", {"headers": {"Authorization": f"Basic {KEY}"}}, 401, "API key"),
    "metrics without key": ("GET", "/metrics", {"headers": {"Authorization": ""}}, 401, "API key"),
    "text file": ("POST", "/v1/caption", {"files": {"image": ("/home/me/notes.txt", b"hello there\n")}},
                  415, "image 1 (notes.txt): not an image"),
    "truncated jpeg": ("POST", "/v1/caption", {"files": {"image": ("cut.jpg", "JPEG_HALF")}}, 400,
                       "truncated image data"),
    "corrupt png": ("POST", "/v1/caption", {"files": {"image": ("bad.png", _corrupt_png())}}, 400,
                    "corrupt image data"),
    "pixel bomb": ("POST", "/v1/caption", {"files": {"image": ("big.png", _png((2500, 2000)))}}, 413,
                   "decompression bomb"),
    "body too large": ("POST", "/v1/caption", {"files": {"image": ("big.bin", os.urandom(MAX_BODY))}},
                       413, "over the server's limit"),
    "chunked body too large": ("POST", "/models/blip", {"content": "CHUNKS"}, 413, "over the server's limit"),
    "not multipart or json": ("POST", "/v1/caption",
                              {"content": b"x", "headers": {"Content-Type": "text/plain"}},
                              415, "multipart/form-data"),
    "invalid json": ("POST", "/v1/caption",
                     {"content": b"{nope", "headers": {"Content-Type": "application/json"}},
                     400, "not valid JSON"),
    "no image": ("POST", "/v1/caption", {"json": {"images": []}}, 422, "no image"),
    "too many images": ("POST", "/v1/caption", {"json": {"images": ["QUJD"] * 9}}, 413, "at most 8"),
    "url": ("POST", "/v1/caption", {"json": {"images": ["https://example.com/cat.jpg"]}}, 400,
            "URLs are not fetched"),
    "file url": ("POST", "/v1/caption", {"json": {"images": ["file:///etc/passwd"]}}, 400,
                 "URLs are not fetched"),
    "data url not base64": ("POST", "/v1/caption", {"json": {"images": ["data:image/png,abc"]}}, 400,
                            "base64-encoded"),
    "bad base64": ("POST", "/v1/caption", {"json": {"images": ["%%%not base64"]}}, 400, "not valid base64"),
    "zero tokens": ("POST", "/v1/caption", {"json": {"images": ["JPEG"], "max_new_tokens": 0}}, 422,
                    "--max-new-tokens must be at least 1"),
    "tokens over the limit": ("POST", "/v1/caption", {"json": {"images": ["JPEG"], "max_new_tokens": 10000}},
                              422, "over this server's limit"),
    "not a number": ("POST", "/v1/caption", {"data": {"num_beams": "two"}, "files": {"image": "JPEG_FILE"}},
                     422, "num_beams: expected int"),
    "unknown option": ("POST", "/v1/caption", {"json": {"images": ["JPEG"], "beams": 3}}, 422,
                       "unknown option 'beams'"),
    "temperature without sampling": ("POST", "/v1/caption",
                                     {"json": {"images": ["JPEG"], "temperature": 0.7}}, 422, "--do-sample"),
    "chat without image": ("POST", "/v1/chat/completions",
                           {"json": {"model": "blip", "messages": [{"role": "user", "content": "hi"}]}},
                           422, "0 images"),
    "chat without messages": ("POST", "/v1/chat/completions", {"json": {"model": "blip", "messages": []}},
                              422, "non-empty list"),
    "chat url": ("POST", "/v1/chat/completions", {"json": {"model": "blip", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://10.0.0.1/x.jpg"}}]}]}},
                 400, "URLs are not fetched"),
    "hf url": ("POST", "/models/blip", {"json": {"inputs": "http://169.254.169.254/"}}, 400,
               "URLs are not fetched"),
    "hf other model": ("POST", "/models/someone/else", {"content": b"JPEG"}, 404, "POST /models/blip"),
    "hf bad parameter": ("POST", "/models/blip",
                         {"json": {"inputs": "JPEG", "parameters": {"top_k": 5}}}, 422,
                         "unknown option 'top_k'"),
    "no segmenter": ("POST", "/v1/segment", {"files": {"image": "JPEG_FILE"}}, 404, "--segment-model"),
    "no such endpoint": ("GET", "/v2/everything", {}, 404, "no such endpoint"),
}


def _fill(value, jpeg: bytes):
    """Placeholders in BAD replaced by a real JPEG (as base64, bytes or a file) or a cut one."""
    if isinstance(value, dict):
        return {key: _fill(item, jpeg) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_fill(item, jpeg) for item in value)
    if value == "JPEG":
        return base64.b64encode(jpeg).decode()
    if value == "JPEG_FILE":
        return ("photo.jpg", jpeg)
    if value == "JPEG_HALF":
        return jpeg[:len(jpeg) // 2]
    return _chunks(MAX_BODY + 1) if value == "CHUNKS" else value


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_its_status_and_the_server_keeps_serving(case, server, client, jpegs, blip_dir,
                                                                oracle):
    method, path, kwargs, status, message = BAD[case]
    kwargs = _fill(kwargs, jpegs["chelsea"])
    headers = {"Authorization": f"Bearer {KEY}", **kwargs.pop("headers", {})}
    headers = {name: value for name, value in headers.items() if value}
    response = httpx.request(method, f"{server}{path}", headers=headers, timeout=120, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    text = error if path.startswith("/models/") else error["message"]
    assert message in text
    assert KEY not in response.text and str(blip_dir) not in response.text and "/home/me" not in text
    if status == 401:
        assert response.headers["www-authenticate"] == "Bearer"
    good = client.post("/v1/caption", data={"max_new_tokens": "5"},
                       files={"image": ("chelsea.jpg", jpegs["chelsea"])})
    assert good.json()["results"][0]["caption"] == oracle(GenerationOptions(max_new_tokens=5))["chelsea"]


def test_health_and_page_need_no_key(server):
    assert httpx.get(f"{server}/healthz").json() == {"status": "ok", "auth": True}
    page = httpx.get(f"{server}/")
    assert page.status_code == 200 and "<title>captionkit</title>" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert httpx.get(f"{server}/static/app.js").status_code == 200
    assert httpx.get(f"{server}/openapi.json").json()["paths"]["/v1/caption"]["post"]["requestBody"]


def test_cors_is_off_by_default(server):
    preflight = httpx.options(f"{server}/v1/caption", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers


@pytest.mark.slow
def test_load_300_requests_from_32_clients(server, jpegs, oracle):
    """A bounded load test: every request answered with its own caption, and batches of several."""
    expected = oracle(GenerationOptions(max_new_tokens=5))

    async def load() -> list[tuple[str, int, str]]:
        limit = asyncio.Semaphore(32)
        async with httpx.AsyncClient(base_url=server, headers={"Authorization": f"Bearer {KEY}"},
                                     timeout=300, limits=httpx.Limits(max_connections=32)) as session:
            async def one(index: int) -> tuple[str, int, str]:
                name = NAMES[index % len(NAMES)]
                async with limit:
                    response = await session.post("/v1/caption", data={"max_new_tokens": "5"},
                                                  files={"image": (f"{name}.jpg", jpegs[name])})
                return name, response.status_code, response.json()["results"][0]["caption"]

            return await asyncio.gather(*(one(i) for i in range(300)))

    outcomes = asyncio.run(load())
    assert [status for _, status, _ in outcomes] == [200] * 300
    assert all(caption == expected[name] for name, _, caption in outcomes)
    metrics = _metrics(server)
    batches = metrics["captionkit_batch_size"]
    assert batches["count"] - batches["le=1.0"] > 0, batches  # some batches held several images
    assert metrics["captionkit_requests"]['route="/v1/caption",status="200"'] >= 300
    assert metrics["captionkit_queue_depth"]["caption"] == 0
    assert metrics["captionkit_images_per_second"]["caption"] > 0


def _metrics(server: str) -> dict[str, dict]:
    """The Prometheus text of /metrics, read with prometheus_client's parser."""
    text = httpx.get(f"{server}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    out: dict[str, dict] = {}
    for family in text_string_to_metric_families(text):
        values = out.setdefault(family.name, {})
        for sample in family.samples:
            if sample.name.endswith("_bucket") and sample.labels.get("model") == "caption":
                values[f"le={sample.labels['le']}"] = sample.value
            elif sample.name.endswith("_count") and sample.labels.get("model") == "caption":
                values["count"] = sample.value
            elif family.name == "captionkit_requests" and sample.name.endswith("_total"):
                values[f'route="{sample.labels["route"]}",status="{sample.labels["status"]}"'] = sample.value
            elif "model" in sample.labels:
                values[sample.labels["model"]] = sample.value
    return out


def test_listening_beyond_loopback_without_a_key_is_refused(blip_dir):
    env = {k: v for k, v in os.environ.items() if k != "CAPTIONKIT_API_KEY"}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-m", "captionkit.serve", "--model", str(blip_dir), "--host",
                           "0.0.0.0", "--port", "0"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    assert "--host 0.0.0.0 listens beyond this machine" in done.stderr and "--insecure" in done.stderr


def test_a_checkpoint_captionkit_trained_is_served_by_path(tmp_path, jpegs):
    """`captionkit train` output served as it is: the server's captions are the Python API's."""
    pytest.importorskip("accelerate")
    from captionkit.api import load
    from captionkit.train import CnnLstmOptions, TrainOptions, synthetic, train

    scenes = synthetic.write_dataset(tmp_path / "scenes", train=16, test=2, size=64)
    trained = train(TrainOptions(root=scenes.train, output=tmp_path / "run", epochs=1, batch_size=8,
                                 val_fraction=0.25, progress=False, device="cpu"),
                    CnnLstmOptions(image_size=64, embed_dim=16, attention_dim=16, hidden_dim=32,
                                   min_word_count=1, dropout=0.0))
    with _serving(["captionkit.serve", "--model", str(trained.best)], tmp_path / "server.log") as url:
        response = httpx.post(f"{url}/v1/caption", timeout=120,
                              files=[("image", (f"{n}.jpg", jpegs[n], "image/jpeg")) for n in NAMES[:2]])
    assert response.status_code == 200, response.text
    model = load(str(trained.best), device="cpu")
    expected = model.caption([io.BytesIO(jpegs[n]) for n in NAMES[:2]])
    assert [r["caption"] for r in response.json()["results"]] == expected
    assert all(expected)


def test_captionkit_serve_segment_answers_the_registry_segmenters_regions(blip_dir, jpegs, tmp_path):
    """`captionkit serve --segment yolov5s-seg` (weights ship in the seg extra): /v1/segment gives
    the segmenter's regions, down to --threshold, below YOLO's own 0.25."""
    from captionkit.segment import SegmentOptions, load_segmenter, masks

    arguments = ["captionkit", "serve", "--model", str(blip_dir), "--segment", "yolov5s-seg",
                 "--threshold", "0.1", "--max-instances", "20"]
    with _serving(arguments, tmp_path / "server.log") as url:
        listed = httpx.get(f"{url}/v1/models").json()["data"]
        answer = httpx.post(f"{url}/v1/segment", files={"image": ("coffee.jpg", jpegs["coffee"])},
                            timeout=300)
    assert answer.status_code == 200, answer.text
    assert listed[1] == {**listed[1], "id": "yolov5s-seg", "task": "image-segmentation", "min_score": 0.1}
    decoded = sources.decode(jpegs["coffee"], "coffee.jpg", None)
    wanted = SegmentOptions(threshold=0.1, max_instances=20)
    expected = load_segmenter("yolov5s-seg", device="cpu").segment([decoded], wanted)[0].regions
    got = answer.json()["results"][0]["regions"]
    assert [r["label"] for r in got] == [r.label for r in expected]
    assert min(r["score"] for r in got) < 0.25  # what the model alone would have dropped
    for region, want in zip(got, expected, strict=True):
        assert region["score"] == pytest.approx(want.score, abs=1e-4)
        assert region["box"] == pytest.approx(want.box, abs=0.1)
        mine, theirs = masks.decode(region["mask"]).astype(bool), masks.decode(want.mask).astype(bool)
        assert (mine & theirs).sum() >= 0.99 * (mine | theirs).sum()
