"""`create_app` served by a real uvicorn on 127.0.0.1 in a thread of the test process, so that a
test can hold the model back (a full queue, a timeout, a client that leaves), plug in a segmenter
(torchvision's Mask R-CNN with random weights behind a small adapter), and drive the web page in
headless Chromium."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import made_in_threads
import numpy as np
import pytest
import torch
from PIL import Image

from captionkit import sources
from captionkit.options import GenerationOptions
from captionkit.predictions import Prediction, Region
from captionkit.serve import ServeOptions, create_app

REPO = Path(__file__).resolve().parent.parent
FEW_TOKENS = GenerationOptions(max_new_tokens=3)


@contextmanager
def serving(app) -> Iterator[str]:
    """The app on a free port of 127.0.0.1 until the block ends."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


class Gated:
    """The tiny BLIP behind a gate the test opens, so that requests pile up as under load."""

    def __init__(self, captioner) -> None:
        self.inner = captioner
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def caption(self, images, options, prompts=None):
        self.entered.set()
        assert self.gate.wait(60)
        return self.inner.caption(images, options, prompts)


@contextmanager
def held(gated: Gated) -> Iterator[None]:
    gated.gate.clear()
    gated.entered.clear()
    try:
        yield
    finally:
        gated.gate.set()


@pytest.fixture(scope="module")
def jpeg(photos) -> bytes:
    buffer = io.BytesIO()
    photos[1].save(buffer, "JPEG", quality=90)  # chelsea, the cat
    return buffer.getvalue()


@pytest.fixture(scope="module")
def gated(blip_fp32) -> Gated:
    return Gated(blip_fp32)


def _limits(gated: Gated, **change):
    settings = {"max_batch_size": 1, "max_wait_ms": 0, "queue_size": 2, "request_timeout": 60, **change}
    options = ServeOptions(model="tiny-blip", **settings)
    return serving(create_app(gated, options, generation=FEW_TOKENS))


def _post(base: str, jpeg: bytes, images: int = 1, timeout: float = 120) -> httpx.Response:
    return httpx.post(f"{base}/v1/caption", files=[("image", ("cat.jpg", jpeg))] * images, timeout=timeout)


def _wait_until(condition, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def test_a_full_queue_answers_503_with_retry_after(gated, jpeg, blip_fp32):
    expected = blip_fp32.caption([sources.decode(jpeg, "cat", blip_fp32.input_size)], FEW_TOKENS)[0].text
    with _limits(gated) as base, ThreadPoolExecutor(4) as pool:
        with held(gated):
            running = pool.submit(_post, base, jpeg)
            assert gated.entered.wait(30)
            waiting = pool.submit(_post, base, jpeg, 2)  # fills the queue: two images
            health = httpx.get(f"{base}/healthz")  # the server still answers while the model works
            _wait_until(lambda: _depth(base) == 2)
            refused = _post(base, jpeg)
        assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
        assert "queue is full" in refused.json()["error"]["message"]
        assert running.result().json()["results"][0]["caption"] == expected
        assert [r["caption"] for r in waiting.result().json()["results"]] == [expected, expected]
        assert health.status_code == 200 and _post(base, jpeg).status_code == 200


def test_a_request_past_its_timeout_gets_504_and_leaves_the_queue(gated, jpeg):
    with _limits(gated, request_timeout=1.5) as base, ThreadPoolExecutor(4) as pool:
        with held(gated):
            running = pool.submit(_post, base, jpeg)
            assert gated.entered.wait(30)
            queued = pool.submit(_post, base, jpeg)
            late = queued.result()
            assert late.status_code == 504 and "request timeout of 1.5 s" in late.json()["error"]["message"]
            assert _depth(base) == 0
            assert running.result().status_code == 504
        assert _post(base, jpeg).status_code == 200


def test_a_client_that_disconnects_frees_its_place_in_the_queue(gated, jpeg):
    with _limits(gated) as base, ThreadPoolExecutor(4) as pool:
        with held(gated):
            running = pool.submit(_post, base, jpeg)
            assert gated.entered.wait(30)
            leaving = _send(base, jpeg, 2)
            _wait_until(lambda: _depth(base) == 2)  # it waits in the queue, which is full
            leaving.close()  # the client gives up
            _wait_until(lambda: _depth(base) == 0, 10)
            admitted = pool.submit(_post, base, jpeg, 2)  # fits only because the leaver's room is free
            _wait_until(lambda: _depth(base) == 2)
        assert running.result().status_code == 200 and admitted.result().status_code == 200
        counts = httpx.get(f"{base}/metrics").text
        assert 'captionkit_requests_total{route="/v1/caption",status="499"} 1.0' in counts


def _send(base: str, jpeg: bytes, images: int) -> socket.socket:
    """A whole upload written to a socket whose answer nobody reads: a client that can leave."""
    request = httpx.Request("POST", f"{base}/v1/caption", files=[("image", ("cat.jpg", jpeg))] * images)
    body = request.read()
    head = "".join(f"{name}: {value}\r\n" for name, value in request.headers.items())
    connection = socket.create_connection((request.url.host, request.url.port))
    connection.sendall(f"POST /v1/caption HTTP/1.1\r\n{head}\r\n".encode() + body)
    return connection


def _depth(base: str) -> int:
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if line.startswith('captionkit_queue_depth{model="caption"}'):
            return int(float(line.split()[-1]))
    raise AssertionError("no queue depth in /metrics")


class MaskRCNNSegmenter:
    """torchvision's Mask R-CNN behind the segmenter interface: boxes, COCO labels, scores and
    COCO RLE masks (pycocotools) in the pixels of the image given."""

    model_id = "maskrcnn-random"

    def __init__(self) -> None:
        from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights, maskrcnn_resnet50_fpn

        torch.manual_seed(0)
        self.model = maskrcnn_resnet50_fpn(
            weights=None, weights_backbone=None, num_classes=91, min_size=128, max_size=224,
            box_score_thresh=0.0, box_detections_per_img=4, rpn_pre_nms_top_n_test=64,
            rpn_post_nms_top_n_test=16).eval()
        self.categories = MaskRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]

    @torch.inference_mode()
    def segment(self, images: list[Image.Image], options) -> list[Prediction]:
        from pycocotools import mask as coco_mask
        from torchvision.transforms.functional import to_tensor

        predictions = []
        for output in self.model([to_tensor(image) for image in images]):
            regions = []
            for box, label, score, mask in zip(output["boxes"], output["labels"], output["scores"],
                                               output["masks"], strict=True):
                rle = coco_mask.encode(np.asfortranarray((mask[0] > 0.5).numpy().astype(np.uint8)))
                regions.append(Region(box=box.tolist(), label=self.categories[int(label)],
                                      score=float(score), mask={"size": list(rle["size"]),
                                                                "counts": rle["counts"].decode()}))
            predictions.append(Prediction(regions=regions))
        return predictions


@pytest.fixture(scope="module")
def segmenter() -> MaskRCNNSegmenter:
    return MaskRCNNSegmenter()


@pytest.fixture(scope="module")
def page_server(blip_fp32, segmenter) -> Iterator[str]:
    options = ServeOptions(model="tiny-blip", segment_model="maskrcnn-random", max_wait_ms=20)
    with serving(create_app(blip_fp32, options, segmenter=segmenter)) as base:
        yield base


def test_segment_answers_the_segmenters_regions_in_the_images_pixels(page_server, segmenter, jpeg):
    from pycocotools import mask as coco_mask

    answer = httpx.post(f"{page_server}/v1/segment", files={"image": ("cat.jpg", jpeg)}, timeout=120)
    assert answer.status_code == 200, answer.text
    (result,) = answer.json()["results"]
    assert (result["width"], result["height"]) == (451, 300) and answer.json()["model"] == "maskrcnn-random"
    decoded = sources.decode(jpeg, "cat.jpg", None)
    expected = [region.to_dict() for region in segmenter.segment([decoded], None)[0].regions]
    assert result["regions"] == expected and len(expected) == 4
    for region in result["regions"]:
        assert coco_mask.decode(region["mask"]).shape == (300, 451)
        x0, y0, x1, y1 = region["box"]
        assert 0 <= x0 <= x1 <= 451 and 0 <= y0 <= y1 <= 300
    scores = sorted(r["score"] for r in expected)
    cut = (scores[1] + scores[2]) / 2
    fewer = httpx.post(f"{page_server}/v1/segment", data={"min_score": str(cut), "masks": "false"},
                       files={"image": ("cat.jpg", jpeg)}, timeout=120).json()["results"][0]["regions"]
    assert len(fewer) == 2 and all(r["score"] >= cut and "mask" not in r for r in fewer)
    listed = httpx.get(f"{page_server}/v1/models").json()["data"]
    assert [(m["id"], m["task"]) for m in listed] == [("tiny-blip", "image-to-text"),
                                                      ("maskrcnn-random", "image-segmentation")]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver

    downloads = tmp_path_factory.mktemp("downloads")
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000",
                     "--force-device-scale-factor=1"):
        options.add_argument(argument)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    service = webdriver.ChromeService(executable_path="/usr/bin/chromedriver")
    driver = webdriver.Chrome(options=options, service=service)
    driver.downloads = downloads
    try:
        yield driver
    finally:
        driver.quit()


def test_the_page_decodes_coco_rle_as_pycocotools_does(page_server, browser):
    from pycocotools import mask as coco_mask

    browser.get(page_server)
    rows, cols = np.ogrid[:300, :451]
    disk = ((rows - 120) ** 2 / 80 ** 2 + (cols - 260) ** 2 / 150 ** 2 <= 1).astype(np.uint8)
    disk[250:, :40] = 1  # a second part, touching the border
    rle = coco_mask.encode(np.asfortranarray(disk))
    flat = disk.flatten(order="F")  # COCO runs go down the columns, starting with zeros
    changes = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    runs = runs if flat[0] == 0 else [0, *runs]
    assert browser.execute_script("return rleCounts(arguments[0]);", rle["counts"].decode()) == runs
    painted = browser.execute_script("""
        const canvas = maskCanvas({mask: {size: [300, 451], counts: arguments[0]}}, "rgb(255, 0, 0)");
        const data = canvas.getContext("2d").getImageData(0, 0, 451, 300).data;
        const alpha = []; for (let i = 3; i < data.length; i += 4) alpha.push(data[i] > 0 ? 1 : 0);
        return alpha;""", rle["counts"].decode())
    assert np.array_equal(np.array(painted).reshape(300, 451), disk)


def _caption_of(captioner, path: Path) -> str:
    return captioner.caption([sources.decode(path.read_bytes(), path.name, captioner.input_size)],
                             GenerationOptions())[0].text


def test_the_page_captions_and_segments_uploads(page_server, browser, photos, blip_fp32, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    paths = []
    for name, photo in zip(["astronaut.jpg", "cat.jpg", "coffee.jpg"], photos, strict=False):
        photo.save(tmp_path / name, quality=90)
        paths.append(tmp_path / name)
    (tmp_path / "notes.jpg").write_text("not a photo at all\n")
    browser.set_window_size(1280, 1000)
    browser.get(page_server)
    wait = WebDriverWait(browser, 180)
    wait.until(lambda d: "tiny-blip" in d.find_element(By.ID, "model").text)
    assert "maskrcnn-random" in browser.find_element(By.ID, "model").text
    browser.execute_script("const s = document.getElementById('min-score'); s.value = '0';"
                           "s.dispatchEvent(new Event('input'));")
    upload = browser.find_element(By.ID, "files")
    upload.send_keys("\n".join(str(p) for p in [*paths, tmp_path / "notes.jpg"]))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".caption.done")) == 3
               and d.find_element(By.CSS_SELECTOR, ".card:nth-child(4) .error").text
               and not d.find_element(By.ID, "status").text)
    cards = browser.find_elements(By.CSS_SELECTOR, ".card")
    for card, path in zip(cards, paths, strict=False):
        assert card.find_element(By.CSS_SELECTOR, ".caption").text == _caption_of(blip_fp32, path)
        assert card.find_elements(By.CSS_SELECTOR, ".legend li")  # the regions' labels
    assert "not an image" in cards[3].find_element(By.CSS_SELECTOR, ".error").text
    # the overlay follows the toggles: boxes drawn, then not
    pixels = "return document.querySelector('.card canvas').toDataURL();"
    with_boxes = browser.execute_script(pixels)
    browser.find_element(By.ID, "show-boxes").click()
    browser.find_element(By.ID, "show-masks").click()
    assert browser.execute_script(pixels) != with_boxes
    browser.find_element(By.ID, "show-boxes").click()
    browser.find_element(By.ID, "show-masks").click()
    _check_downloads(browser, paths, blip_fp32)
    _screenshot(browser, tmp_path / "serve.png", (1200, 1220))
    browser.set_window_size(390, 844)  # a phone: one column, nothing wider than the screen
    assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth;")
    _screenshot(browser, tmp_path / "serve-phone.png", (390, 844))


def _check_downloads(browser, paths: list[Path], blip_fp32) -> None:
    from selenium.webdriver.common.by import By

    browser.find_element(By.ID, "download-json").click()
    browser.find_element(By.ID, "download-txt").click()
    _wait_until(lambda: (browser.downloads / "captions.json").exists()
                and (browser.downloads / "captions.txt").exists())
    time.sleep(0.5)  # the second file may still be being written
    saved = json.loads((browser.downloads / "captions.json").read_text())
    assert [item["caption"] for item in saved[:3]] == [_caption_of(blip_fp32, p) for p in paths]
    assert saved[1]["regions"] and saved[1]["width"] == 451 and saved[3]["error"]
    lines = (browser.downloads / "captions.txt").read_text().splitlines()
    assert lines == [f"{p.name}: {_caption_of(blip_fp32, p)}" for p in paths]


def _screenshot(browser, shot: Path, size: tuple[int, int]) -> None:
    """A picture of the page; with CAPTIONKIT_SCREENSHOTS=docs/images also kept there (the docs')."""
    browser.set_window_size(*size)
    browser.save_screenshot(str(shot))
    assert Image.open(shot).size[0] > 0
    if os.environ.get("CAPTIONKIT_SCREENSHOTS"):
        shutil.copy(shot, REPO / os.environ["CAPTIONKIT_SCREENSHOTS"] / shot.name)


DROP = """
const [name, encoded] = arguments;
const bytes = Uint8Array.from(atob(encoded), (c) => c.charCodeAt(0));
const files = new DataTransfer();
files.items.add(new File([bytes], name, {type: "image/jpeg"}));
const drop = document.getElementById("drop");
drop.dispatchEvent(new DragEvent("dragover", {dataTransfer: files, bubbles: true, cancelable: true}));
const over = drop.classList.contains("over");
const handled = !drop.dispatchEvent(new DragEvent("drop", {dataTransfer: files, bubbles: true,
                                                            cancelable: true}));
return [over, handled, drop.classList.contains("over")];
"""
"""Drops a file on the page as a browser does when one is dragged from the desktop: a DataTransfer
holding a File (Selenium cannot drag from outside the page), through the page's own handlers."""


def test_a_photo_dropped_on_the_page_is_captioned(page_server, browser, photos, blip_fp32, tmp_path):
    import base64

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    photos[1].save(tmp_path / "dropped.jpg", quality=90)
    browser.get(page_server)
    wait = WebDriverWait(browser, 180)
    wait.until(lambda d: "tiny-blip" in d.find_element(By.ID, "model").text)
    encoded = base64.b64encode((tmp_path / "dropped.jpg").read_bytes()).decode()
    over, handled, still_over = browser.execute_script(DROP, "dropped.jpg", encoded)
    assert (over, handled, still_over) == (True, True, False), "dragover marks the zone, drop is taken"
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".caption.done"))
    (card,) = browser.find_elements(By.CSS_SELECTOR, ".card")
    expected = _caption_of(blip_fp32, tmp_path / "dropped.jpg")
    assert card.find_element(By.CSS_SELECTOR, ".caption").text == expected
    assert "dropped.jpg" in card.text


def test_the_page_asks_for_the_key_when_the_server_has_one(blip_fp32, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    app = create_app(blip_fp32, ServeOptions(model="tiny-blip", api_key="page-key"))
    with serving(app) as base:
        browser.get(base)
        browser.execute_script("sessionStorage.clear();")
        browser.get(base)
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: d.find_element(By.ID, "key-field").is_displayed())
        assert "needs an API key" in browser.find_element(By.ID, "model").text
        field = browser.find_element(By.ID, "api-key")
        field.send_keys("page-key")
        browser.execute_script("arguments[0].dispatchEvent(new Event('change'));", field)
        wait.until(lambda d: d.find_element(By.ID, "model").text == "tiny-blip")
        assert httpx.get(f"{base}/v1/models").status_code == 401


def test_uploads_become_model_inputs_in_the_decoding_threads(blip_fp32, photos, monkeypatch):
    """The model's worker stacks inputs made where each upload was decoded, and the captions are
    the processor's path's."""
    import captionkit.models.hf as hf

    files = []
    for index, photo in enumerate(photos):
        buffer = io.BytesIO()
        photo.save(buffer, "JPEG", quality=90)
        files.append(("image", (f"{index}.jpg", buffer.getvalue())))
    decoded = [sources.decode(data, name, blip_fp32.input_size) for _, (name, data) in files]
    expected = [caption.text for caption in blip_fp32.caption(decoded, FEW_TOKENS)]
    made_in, used = made_in_threads.record(monkeypatch, blip_fp32, hf)
    with serving(create_app(blip_fp32, ServeOptions(model="tiny-blip"), generation=FEW_TOKENS)) as base:
        answer = httpx.post(f"{base}/v1/caption", files=files, timeout=120).json()
    assert [result["caption"] for result in answer["results"]] == expected
    assert len(set(expected)) > 2, "random-weight captions that differ per photo"
    assert made_in == {"captionkit-decode"} and used and all(used)


def test_a_scorer_adds_clipscores_and_keeps_the_best_candidate(blip_fp32, scorer, jpeg):
    from captionkit import gate

    app = create_app(blip_fp32, ServeOptions(model="tiny-blip", clip_model="tiny-clip"), scorer=scorer)
    asked = GenerationOptions(max_new_tokens=8, candidates=3)
    image = sources.decode(jpeg, "cat.jpg", blip_fp32.input_size)
    expected = blip_fp32.caption([image], asked)[0]
    gate.score_batch(scorer, [(image, expected)])
    with serving(app) as base:
        answer = httpx.post(f"{base}/v1/caption", data={"max_new_tokens": "8", "candidates": "3"},
                            files={"image": ("cat.jpg", jpeg)}, timeout=120).json()
        listed = httpx.get(f"{base}/v1/models").json()["data"][0]
    (result,) = answer["results"]
    assert result["caption"] == expected.text and result["clip_score"] == expected.extras["clip_score"]
    assert [c["clip_score"] for c in result["candidates"]] == [
        c["clip_score"] for c in expected.extras["candidates"]]
    assert result["clip_score"] == max(c["clip_score"] for c in result["candidates"])
    assert listed["clip_model"] == "tiny-clip"


def test_the_pages_options_slider_copy_and_clipscore(blip_fp32, scorer, segmenter, browser, photos,
                                                     tmp_path):
    """The page's caption options give the API's caption for the same options, with its CLIPScore;
    the confidence slider hides regions below it, down to the segmenter's threshold; copy copies."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from captionkit.segment import SegmentOptions

    photos[1].save(tmp_path / "cat.jpg", quality=90)
    fields = {"max-new-tokens": "8", "num-beams": "2", "prompt": "a picture of"}
    options = ServeOptions(model="tiny-blip", clip_model="tiny-clip", segment_model="maskrcnn-random")
    app = create_app(blip_fp32, options, scorer=scorer, segmenter=segmenter,
                     segment_options=SegmentOptions(threshold=0.3))
    with serving(app) as base:
        upload = {"image": ("cat.jpg", (tmp_path / "cat.jpg").read_bytes())}
        asked = {name.replace("-", "_"): value for name, value in fields.items()}
        expected = httpx.post(f"{base}/v1/caption", data=asked, files=upload, timeout=120).json()
        plain = httpx.post(f"{base}/v1/caption", files=upload, timeout=120).json()
        scores = [r["score"] for r in httpx.post(f"{base}/v1/segment", files=upload,
                                                  timeout=120).json()["results"][0]["regions"]]
        browser.set_window_size(1280, 1000)
        browser.get(base)
        browser.execute_cdp_cmd("Browser.grantPermissions", {
            "origin": base, "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]})
        wait = WebDriverWait(browser, 180)
        wait.until(lambda d: "maskrcnn-random" in d.find_element(By.ID, "model").text)
        for name, value in fields.items():
            browser.find_element(By.ID, name).send_keys(value)
        browser.find_element(By.ID, "files").send_keys(str(tmp_path / "cat.jpg"))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".caption.done")
                   and not d.find_element(By.ID, "status").text)
    (result,) = expected["results"]
    assert result["caption"] != plain["results"][0]["caption"]  # the fields changed the caption
    card = browser.find_element(By.CSS_SELECTOR, ".card")
    assert card.find_element(By.CSS_SELECTOR, ".caption").text == result["caption"]
    assert card.find_element(By.CSS_SELECTOR, ".score").text == f"CLIPScore {result['clip_score']:.3f}"
    # the slider stops at the segmenter's threshold, and hides the regions below its value
    assert _slide(browser, "0") == "0.3" and _shown(card) == len(scores) == 4
    assert _shown(card) > _shown(card, browser, "0.4") == sum(s >= 0.4 for s in scores) > 0
    assert _shown(card, browser, "0.9") == 0 and not card.find_elements(By.CSS_SELECTOR, ".legend li")
    card.find_element(By.CSS_SELECTOR, ".copy").click()
    assert card.find_element(By.CSS_SELECTOR, ".copy").text == "Copied"
    assert browser.execute_async_script(
        "navigator.clipboard.readText().then(arguments[0]);") == result["caption"]


def _slide(browser, value: str) -> str:
    """Moves the confidence slider as a user would to `value`; where it stopped."""
    return browser.execute_script("const s = document.getElementById('min-score'); s.value = arguments[0];"
                                  "s.dispatchEvent(new Event('input')); return s.value;", value)


def _shown(card, browser=None, value: str | None = None) -> int:
    """How many regions the card's legend counts (after moving the slider to `value`)."""
    from selenium.webdriver.common.by import By

    if value is not None:
        assert _slide(browser, value) == value
    total = 0
    for entry in card.find_elements(By.CSS_SELECTOR, ".legend li"):
        _, times, count = entry.text.partition(" ×")
        total += int(count) if times else 1
    return total
