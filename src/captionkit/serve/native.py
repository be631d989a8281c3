"""captionkit's own API: `POST /v1/caption` and `POST /v1/segment`."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from fastapi import APIRouter, Request
from PIL import Image

from captionkit.errors import OptionError
from captionkit.options import GenerationOptions
from captionkit.predictions import Prediction
from captionkit.serve import inputs
from captionkit.serve.inputs import Upload
from captionkit.serve.service import Answer, Service

router = APIRouter(prefix="/v1", tags=["captionkit"])


@dataclass(frozen=True)
class RegionFilter:
    """Which regions /v1/segment answers with."""

    min_score: float = 0.0
    """Regions scoring below this are left out."""
    masks: bool = True
    """Each region's COCO RLE mask (false: boxes only, a much smaller answer)."""

    def __post_init__(self) -> None:
        if not 0 <= self.min_score <= 1:
            raise OptionError("min_score must be between 0 and 1")


def _body(extra: dict[str, dict]) -> dict:
    """The OpenAPI description of a request body: multipart files or JSON base64, plus fields."""
    file_list = {"type": "array", "items": {"type": "string", "format": "binary"}}
    text_list = {"type": "array", "items": {"type": "string", "description": "base64 or a data: URL"}}
    return {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["image"],
                                           "properties": {"image": file_list, **extra}}},
        "application/json": {"schema": {"type": "object", "required": ["images"],
                                        "properties": {"images": text_list, **extra}}}}}}


_GENERATION_FIELDS = {f.name: {"type": "string"} for f in fields(GenerationOptions)}
_FILTER_FIELDS = {"min_score": {"type": "number"}, "masks": {"type": "boolean"}}


@router.post("/caption", openapi_extra=_body(_GENERATION_FIELDS))
async def caption(request: Request) -> dict:
    """Caption one or more images; every other field is a generation option (max_new_tokens,
    num_beams, prompt, candidates, ...)."""
    service: Service = request.app.state.service
    uploads, values = await inputs.read_images(request, service.options.max_images)
    options = inputs.generation_options(values, service.generation, service.options)
    answer = await service.caption(request, uploads, options)
    return {"model": service.name, "results": _results(uploads, answer, caption_json),
            "timings": answer.timings}


@router.post("/segment", openapi_extra=_body(_FILTER_FIELDS))
async def segment(request: Request) -> dict:
    """The regions (box, label, score, COCO RLE mask) of each image, in the image's own pixels."""
    service: Service = request.app.state.service
    uploads, values = await inputs.read_images(request, service.options.max_images)
    wanted = inputs.parse(RegionFilter, values)
    answer = await service.segment(request, uploads)
    results = _results(uploads, answer, lambda p, image, name: regions_json(p, image, name, wanted))
    return {"model": service.segmenter_name, "results": results, "timings": answer.timings}


def _results(uploads: list[Upload], answer: Answer, shape) -> list[dict]:
    return [shape(prediction, image, upload.name) for upload, image, prediction
            in zip(uploads, answer.images, answer.predictions, strict=True)]


def caption_json(prediction: Prediction, image: Image.Image, name: str | None) -> dict[str, Any]:
    """One image's caption, its scored candidates, its CLIPScore and any grounded regions."""
    return {"name": name, "width": image.width, "height": image.height,
            "caption": prediction.text,
            "candidates": [_plain(candidate) for candidate in prediction.extras.get("candidates", [])],
            "clip_score": prediction.extras.get("clip_score"),
            "regions": [region.to_dict() for region in getattr(prediction, "regions", [])]}


def regions_json(prediction: Prediction, image: Image.Image, name: str | None,
                 wanted: RegionFilter) -> dict[str, Any]:
    regions = []
    for region in prediction.regions:
        if region.score is not None and region.score < wanted.min_score:
            continue
        data = region.to_dict()
        if not wanted.masks:
            data.pop("mask", None)
        regions.append(data)
    return {"name": name, "width": image.width, "height": image.height, "regions": regions}


def _plain(candidate: dict) -> dict:
    """A candidate's JSON-safe fields (text and scores)."""
    return {key: value for key, value in candidate.items()
            if isinstance(value, str | int | float | bool) or value is None}
