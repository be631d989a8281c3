"""Hugging Face Inference-compatible captioning: `POST /models/{model_id}` with the image's raw
bytes, or JSON `{"inputs": <base64>, "parameters": {...}}`, answering `[{"generated_text": ...}]`
(what `huggingface_hub.InferenceClient(model=URL).image_to_text` sends and reads)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from captionkit.serve import inputs
from captionkit.serve.inputs import ApiError, Upload
from captionkit.serve.service import Service

router = APIRouter(tags=["Hugging Face Inference-compatible"])
NESTED = ("generation_parameters", "generate_kwargs")
"""Where Hugging Face clients put generation options inside `parameters`."""


@router.post("/models/{model_id:path}")
async def image_to_text(model_id: str, request: Request) -> list[dict]:
    service: Service = request.app.state.service
    if not service.serves(model_id):
        raise ApiError(404, f"this server runs {service.name!r}: POST /models/{service.name}",
                       "model_not_found")
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "application/json":
        body = await inputs.read_json(request)
        if not isinstance(body.get("inputs"), str):
            raise ApiError(422, '"inputs" must be the image as base64 or a data: URL')
        upload = inputs.from_text(body["inputs"], "the image")
        values = _parameters(body.get("parameters"))
    else:
        upload, values = Upload(await request.body(), "the image"), {}
    inputs.check_count(1 if upload.data else 0, 1)
    options = inputs.generation_options(values, service.generation, service.options)
    answer = await service.caption(request, [upload], options)
    return [{"generated_text": answer.predictions[0].text}]


def _parameters(parameters: Any) -> dict[str, Any]:
    """`parameters` with its nested generation options lifted to the top."""
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise ApiError(422, '"parameters" must be an object')
    values = {key: value for key, value in parameters.items() if key not in NESTED}
    for key in NESTED:
        nested = parameters.get(key) or {}
        if not isinstance(nested, dict):
            raise ApiError(422, f'"parameters.{key}" must be an object')
        values.update(nested)
    return values
