"""OpenAI-compatible endpoints: `POST /v1/chat/completions` (an image in, its caption as the
assistant's answer) and `GET /v1/models`.

Captions are generated whole, so `stream: true` sends each answer as one content chunk, as
server-sent events in OpenAI's chunk format, ending with `data: [DONE]`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from captionkit.serve import inputs
from captionkit.serve.inputs import ApiError, Upload
from captionkit.serve.service import Service

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])
SYSTEM_ROLES = ("system", "developer")


@router.get("/models")
async def models(request: Request) -> dict:
    """The models this server runs, in OpenAI's list format (with each one's task)."""
    return {"object": "list", "data": _models(request.app.state.service)}


@router.get("/models/{model_id:path}")
async def model(model_id: str, request: Request) -> dict:
    for entry in _models(request.app.state.service):
        if entry["id"] == model_id:
            return entry
    raise ApiError(404, f"no model {model_id!r} here: GET /v1/models lists them", "model_not_found")


def _models(service: Service) -> list[dict]:
    started = int(service.started)
    entries = [{"id": service.name, "object": "model", "created": started, "owned_by": "captionkit",
                "task": "image-to-text", "clip_model": service.options.clip_model}]
    if service.segmenter_name is not None:
        entries.append({"id": service.segmenter_name, "object": "model", "created": started,
                        "owned_by": "captionkit", "task": "image-segmentation",
                        "min_score": service.min_score})
    return entries


@router.post("/chat/completions")
async def chat_completions(request: Request) -> Any:
    """The caption of the image in the last user message; its text is the prompt.

    Any `model` is answered by the one captioner (the answer names it): Hugging Face's client
    sends "dummy" to servers it reaches by URL."""
    service: Service = request.app.state.service
    body = await inputs.read_json(request)
    upload, prompt, system = read_messages(body.get("messages"))
    options = inputs.generation_options(chat_options(body, prompt, system), service.generation,
                                        service.options)
    answer = await service.caption(request, [upload], options)
    prediction = answer.predictions[0]
    texts = [c["text"] for c in prediction.extras.get("candidates", [])] or [prediction.text]
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": service.name}
    if body.get("stream"):
        return StreamingResponse(_events(head, texts), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    choices = [{"index": index, "message": {"role": "assistant", "content": text},
                "finish_reason": "stop", "logprobs": None} for index, text in enumerate(texts)]
    return {**head, "object": "chat.completion", "choices": choices}


def read_messages(messages: Any) -> tuple[Upload, str | None, str | None]:
    """The image, the prompt (the last user message's text) and the system message's text."""
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise ApiError(422, '"messages" must be a non-empty list of messages', "bad_messages")
    system = " ".join(text for m in messages if m.get("role") in SYSTEM_ROLES
                      for text in _texts(m.get("content"))).strip() or None
    users = [m for m in messages if m.get("role") == "user"]
    if not users:
        raise ApiError(422, "no user message: send one with an image_url part", "bad_messages")
    content = users[-1].get("content")
    urls = _image_urls(content)
    if len(urls) != 1:
        raise ApiError(422, f"the last user message has {len(urls)} images: send exactly one as an "
                            "image_url part (POST /v1/caption takes several)", "bad_messages")
    prompt = " ".join(_texts(content)).strip() or None
    return inputs.from_text(urls[0], "the image_url"), prompt, system


def _texts(content: Any) -> list[str]:
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        return []
    return [part["text"] for part in content
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)]


def _image_urls(content: Any) -> list[str]:
    urls = []
    for part in content if isinstance(content, list) else []:
        if not isinstance(part, dict) or part.get("type") != "image_url":
            continue
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        if not isinstance(url, str):
            raise ApiError(422, "an image_url part needs a url: a data: URL", "bad_messages")
        urls.append(url)
    return urls


def chat_options(body: dict, prompt: str | None, system: str | None) -> dict[str, Any]:
    """OpenAI's request fields as GenerationOptions fields: max_tokens, n (candidates), and
    sampling when temperature > 0 or top_p < 1 (temperature 0 is greedy search)."""
    values: dict[str, Any] = {"prompt": prompt, "system": system}
    tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if tokens is not None:
        values["max_new_tokens"] = tokens
    if body.get("n") is not None:
        values["candidates"] = body["n"]
    if body.get("seed") is not None:
        values["seed"] = body["seed"]
    temperature, top_p = _number(body, "temperature"), _number(body, "top_p")
    if (temperature is not None and temperature > 0) or (top_p is not None and top_p < 1
                                                          and temperature != 0):
        values["do_sample"] = True
        values["temperature"] = temperature or None
        values["top_p"] = top_p if top_p is not None and top_p < 1 else None
    return values


def _number(body: dict, name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ApiError(422, f"{name} must be a number of at least 0", "bad_option")
    return float(value)


async def _events(head: dict, texts: list[str]) -> AsyncIterator[str]:
    chunk = {**head, "object": "chat.completion.chunk"}
    for index, text in enumerate(texts):
        for delta, finish in (({"role": "assistant", "content": ""}, None), ({"content": text}, None),
                              ({}, "stop")):
            choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
            yield f"data: {json.dumps({**chunk, 'choices': [choice]})}\n\n"
    yield "data: [DONE]\n\n"
