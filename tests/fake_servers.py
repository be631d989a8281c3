"""Real HTTP servers on 127.0.0.1 speaking the OpenAI chat-completions and Hugging Face inference
protocols, with knobs for slow, failing, rate-limiting and dying behaviour."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image

CHAT_PATH = "/v1/chat/completions"
HF_PREFIX = "/models/"


@dataclass
class Request:
    """One request as the server saw it."""

    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


class FakeServer:
    """POST /v1/chat/completions (OpenAI) and POST /models/<id> (Hugging Face image-to-text).

    Knobs are plain attributes a test sets; every request is recorded in `requests`.
    """

    def __init__(self, api_key: str | None = None, models: tuple[str, ...] = ("llava",),
                 port: int = 0) -> None:
        self.api_key = api_key
        self.models = set(models)
        self.delay = 0.0
        self.unavailable = 0
        self.rate_limited = 0
        self.retry_after = "1"
        self.estimated_time = 0.05
        self.status: int | None = None
        self.reject_size: tuple[int, int] | None = None
        self.healthy_for: int | None = None
        self.die_after: int | None = None
        self.content_parts = False
        self.hub_tasks: dict[str, str | None] = {}
        self.requests: list[Request] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.captions = 0
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._connections: set[socket.socket] = set()
        self.httpd = _Server(("127.0.0.1", port), _Handler)
        self.httpd.fake = self  # type: ignore[attr-defined]
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.01,), daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop listening and cut open connections, as a crashed server would."""
        if self._closing.is_set():
            return
        self._closing.set()
        with self._lock:
            # the listening socket first, so new connections are refused from this moment on
            for connection in [self.httpd.socket, *self._connections]:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)
        self.httpd.shutdown()
        self.httpd.server_close()

    @property
    def closed(self) -> bool:
        return self._closing.is_set()

    def __enter__(self) -> FakeServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def answer(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict, object]:
        """Status, extra headers and JSON body for one request."""
        with self._lock:
            self.requests.append(Request(path, headers, body))
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.delay:
                self._closing.wait(self.delay)
            hf = path.startswith(HF_PREFIX)
            if path != CHAT_PATH and not hf:
                return 404, {}, _openai_error(f"Unknown request URL: POST {path}. Please check the URL "
                                              "for typos.", "invalid_request_error", "unknown_url")
            reply = self._misbehave(headers, hf)
            if reply is None:
                reply = self._huggingface(path[len(HF_PREFIX):], body) if hf else self._openai(body)
            return reply
        finally:
            with self._lock:
                self.in_flight -= 1

    def _misbehave(self, headers: dict[str, str], hf: bool) -> tuple[int, dict, object] | None:
        """Authentication, then whatever failure the knobs ask for."""
        given = headers.get("authorization", "").removeprefix("Bearer ")
        if self.api_key is not None and given != self.api_key:
            if hf:
                return 401, {}, {"error": "Invalid credentials in Authorization header"}
            # like OpenAI, the message quotes the key it was sent
            return 401, {}, _openai_error(f"Incorrect API key provided: {given}. You can find your "
                                          "API key in your account settings.", "invalid_request_error",
                                          "invalid_api_key")
        with self._lock:
            if self.status is None and self.rate_limited:
                self.rate_limited -= 1
                status = 429
            elif self.status is None and self.unavailable:
                self.unavailable -= 1
                status = 503
            elif self.status is None and self.healthy_for is not None and self.captions >= self.healthy_for:
                status = 503
            else:
                status = self.status
        if status is None:
            return None
        if status == 429:
            message = "Rate limit reached for requests. Please try again in 1s."
            body = {"error": message} if hf else _openai_error(message, "requests", "rate_limit_exceeded")
            return 429, {"Retry-After": self.retry_after}, body
        if status == 503 and hf:
            return 503, {}, {"error": "Model is currently loading", "estimated_time": self.estimated_time}
        if status == 503:
            return 503, {}, _openai_error("The server is overloaded or not ready yet.", "server_error")
        return status, {}, {"error": f"scripted failure {status}"} if hf else _openai_error(
            f"scripted failure {status}", "server_error")

    def _openai(self, body: bytes) -> tuple[int, dict, object]:
        try:
            request = json.loads(body)
            model = request["model"]
            parts = request["messages"][-1]["content"]
            url = next(p["image_url"]["url"] for p in parts if p["type"] == "image_url")
        except (ValueError, KeyError, IndexError, TypeError, StopIteration):
            return 400, {}, _openai_error("Invalid chat completion request.", "invalid_request_error")
        if model not in self.models:
            return 404, {}, _openai_error(f"The model `{model}` does not exist or you do not have access "
                                          "to it.", "invalid_request_error", "model_not_found")
        prefix = "data:image/jpeg;base64,"
        caption = self._caption(base64.b64decode(url[len(prefix):]) if url.startswith(prefix) else b"")
        if caption is None:
            return 400, {}, _openai_error("You uploaded an unsupported image. Please make sure your image "
                                          "is valid.", "invalid_request_error", "invalid_image")
        texts = [caption] + [f"{caption} ({i})" for i in range(2, request.get("n", 1) + 1)]
        contents = [[{"type": "text", "text": t}] if self.content_parts else t for t in texts]
        return 200, {}, {
            "id": f"chatcmpl-{len(self.requests)}", "object": "chat.completion", "created": int(time.time()),
            "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": content},
                         "logprobs": None, "finish_reason": "stop"} for i, content in enumerate(contents)],
            "usage": {"prompt_tokens": 100, "completion_tokens": 8, "total_tokens": 108},
        }

    def _huggingface(self, model: str, body: bytes) -> tuple[int, dict, object]:
        if model not in self.models:
            return 404, {}, {"error": f"Model {model} does not exist"}
        caption = self._caption(body)
        if caption is None:
            return 400, {}, {"error": "Invalid image: cannot identify image file"}
        return 200, {}, [{"generated_text": caption}]

    def _caption(self, jpeg: bytes) -> str | None:
        """A caption naming the image's size (so tests can tell images apart), or None to reject it."""
        try:
            with Image.open(io.BytesIO(jpeg), formats=["JPEG"]) as image:
                size = image.size
        except Exception:  # noqa: BLE001 - anything unreadable is a bad request
            return None
        if size == self.reject_size:
            return None
        with self._lock:
            self.captions += 1
            if self.die_after is not None and self.captions >= self.die_after:
                threading.Thread(target=self.close, daemon=True).start()
        return caption_for(size)

    def model_info(self, path: str) -> tuple[int, dict, object]:
        """GET /api/models/<id>?expand=inferenceProviderMapping, as the Hub answers it."""
        model = path.partition("?")[0].removeprefix("/api/models/")
        if model not in self.hub_tasks:
            return 404, {"X-Error-Code": "RepoNotFound"}, {"error": "Repository not found"}
        task = self.hub_tasks[model]
        mapping = {"hf-inference": {"status": "live", "providerId": model, "task": task}} if task else {}
        return 200, {}, {"_id": "0" * 24, "id": model, "inferenceProviderMapping": mapping}

    def track(self, connection: socket.socket, open_: bool) -> None:
        with self._lock:
            (self._connections.add if open_ else self._connections.discard)(connection)


def caption_for(size: tuple[int, int]) -> str:
    """What the fake servers answer for an image of this size."""
    return f"a picture of {size[0]}x{size[1]} pixels"


def _openai_error(message: str, type_: str, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


class _Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        pass  # dropped connections are part of the script; tracebacks would only be noise


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        self.server.fake.track(self.connection, True)  # type: ignore[attr-defined]

    def finish(self) -> None:
        self.server.fake.track(self.connection, False)  # type: ignore[attr-defined]
        with contextlib.suppress(OSError):
            super().finish()

    def do_GET(self) -> None:
        self._send(*self.server.fake.model_info(self.path))  # type: ignore[attr-defined]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        headers = {key.lower(): value for key, value in self.headers.items()}
        fake: FakeServer = self.server.fake  # type: ignore[attr-defined]
        status, extra, payload = fake.answer(self.path, headers, body)
        if fake.closed:
            self.close_connection = True  # a dead server answers nothing
            return
        self._send(status, extra, payload)

    def _send(self, status: int, extra: dict, payload: object) -> None:
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in extra.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            self.close_connection = True  # the client gave up (timeout) or the server is closing

    def log_message(self, format: str, *args) -> None:
        pass
