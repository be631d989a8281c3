"""The FastAPI application: routes, the page, and the layers every request passes through
(metrics, the body limit, CORS when asked for, the API key)."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from captionkit import __version__
from captionkit.errors import OptionError
from captionkit.models.base import Captioner
from captionkit.options import GenerationOptions, LoadOptions
from captionkit.serve import hf_api, native, openai_api
from captionkit.serve.inputs import ApiError
from captionkit.serve.metrics import Metrics
from captionkit.serve.options import ServeOptions
from captionkit.serve.service import ClientLeft, Segmenter, Service

log = logging.getLogger("captionkit.serve")
STATIC = Path(__file__).parent / "static"
PAGE_POLICY = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
               "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               413: "invalid_request_error", 415: "invalid_request_error", 422: "invalid_request_error",
               503: "overloaded_error", 504: "timeout_error"}


def create_app(captioner: Captioner, options: ServeOptions, *,
               generation: GenerationOptions | None = None, scorer: Any = None,
               segmenter: Segmenter | None = None, segment_options: Any = None) -> FastAPI:
    """The server for a loaded captioner: `generation` holds the defaults requests start from,
    `scorer` (a `scoring.ClipScorer`) adds CLIPScores, and `segmenter` (anything with
    `segment(images, segment_options) -> list[Prediction]`) enables /v1/segment and the overlay."""
    service = Service(captioner, options, generation, scorer, segmenter, segment_options)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.start()
        try:
            yield
        finally:
            service.close()

    app = FastAPI(title="captionkit", version=__version__, lifespan=lifespan,
                  description="Captions (and segmentation) for uploaded images, dynamically batched.")
    app.state.service = service
    guarded = [Depends(require_key)]
    for router in (native.router, openai_api.router, hf_api.router):
        app.include_router(router, dependencies=guarded)
    app.add_api_route("/metrics", metrics, methods=["GET"], dependencies=guarded,
                      include_in_schema=False)
    app.add_api_route("/healthz", healthz, methods=["GET"])
    app.add_api_route("/", page, methods=["GET"], include_in_schema=False)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    _handle_errors(app)
    if options.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(options.cors_origins),
                           allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(BodyLimit, limit=options.max_body_bytes)
    app.add_middleware(Observe, metrics=service.metrics)
    return app


async def require_key(request: Request) -> None:
    """401 unless the request carries the server's key as `Authorization: Bearer KEY`."""
    key = request.app.state.service.options.api_key
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), key.encode()):
        raise ApiError(401, "missing or wrong API key: send it as Authorization: Bearer KEY",
                       "unauthorized", {"WWW-Authenticate": "Bearer"})


async def healthz(request: Request) -> dict:
    """Liveness, and whether the API wants a key (the page asks for one then)."""
    service: Service = request.app.state.service
    return {"status": "ok", "auth": service.options.api_key is not None}


async def metrics(request: Request) -> Response:
    return Response(request.app.state.service.metrics.render(),
                    media_type="text/plain; version=0.0.4; charset=utf-8")


async def page(request: Request) -> HTMLResponse:
    return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"),
                        headers={"Content-Security-Policy": PAGE_POLICY})


def error_body(path: str, status: int, message: str, code: str) -> dict:
    """Hugging Face clients read `{"error": message}`; OpenAI's (and ours) an error object."""
    if path.startswith("/models/"):
        return {"error": message}
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "code": code}}


def _handle_errors(app: FastAPI) -> None:
    """Every error as JSON that names the problem, never echoing the request, a path or a key."""

    def answer(request: Request, status: int, message: str, code: str,
               headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(error_body(request.url.path, status, message, code), status, headers)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return answer(request, error.status, error.message, error.code, error.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        message = {404: "no such endpoint", 405: "method not allowed"}.get(error.status_code,
                                                                           str(error.detail))
        return answer(request, error.status_code, message, "http_error", error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        return answer(request, 422, "the request does not match the endpoint", "invalid_request")

    @app.exception_handler(ClientLeft)
    async def client_left(request: Request, error: ClientLeft) -> Response:
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        log.error("unexpected error on %s", request.url.path, exc_info=error)
        return answer(request, 500, "internal server error; the server log has the details",
                      "internal_error")


class BodyLimit:
    """413 for a body over `limit` bytes: at once when Content-Length says so, else as soon as
    the bytes read pass it (a chunked upload cannot fill the memory first)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            error = self.too_large()
            await JSONResponse(error_body(scope["path"], error.status, error.message, error.code),
                               error.status)(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise self.too_large()
            return message

        await self.app(scope, limited, send)

    def too_large(self) -> ApiError:
        return ApiError(413, f"the request body is over the server's limit of {self.limit} bytes",
                        "body_too_large")


class Observe:
    """Counts every response by route and status with its latency, and marks responses nosniff."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.monotonic(), 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []),
                                      (b"x-content-type-options", b"nosniff")]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.observe(route, status, time.monotonic() - started)


def run(options: ServeOptions, load: LoadOptions | None = None,
        generation: GenerationOptions | None = None, segment: Any = None,
        segmenter_load: Any = None) -> None:
    """Load the models `options` names and serve them until interrupted; `segment` (a
    `SegmentOptions`) says which regions the segmenter keeps, `segmenter_load` (a
    `SegmenterLoadOptions`) its input size and task."""
    import uvicorn

    from captionkit import models, scoring

    load = load or LoadOptions()
    captioner = models.load(options.model, load)
    device = str(getattr(captioner, "device", load.device))
    scorer = scoring.load_scorer(options.clip_model, device=device) if options.clip_model else None
    segmenter = (_load_segmenter(options.segment_model, load, segment, segmenter_load)
                 if options.segment_model else None)
    app = create_app(captioner, options, generation=generation, scorer=scorer, segmenter=segmenter,
                     segment_options=segment)
    uvicorn.run(app, host=options.host, port=options.port, server_header=False,
                timeout_graceful_shutdown=5)


def _load_segmenter(name: str, load: LoadOptions, segment: Any, segmenter_load: Any) -> Segmenter:
    try:
        from captionkit.segment import load_segmenter
    except ImportError:
        raise OptionError("--segment needs the segmentation extra: pip install 'captionkit[seg]'") from None
    size, task = (segmenter_load.input_size, segmenter_load.task) if segmenter_load else (None, None)
    segmenter = load_segmenter(name, device=load.device, dtype=load.dtype, input_size=size, task=task)
    if segment is not None:
        segmenter.check_classes(segment)  # a --classes typo fails here, not on every request
    return segmenter
