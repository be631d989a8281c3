"""What a request carries: images (uploads, base64, `data:` URLs, raw bytes) and its options.

Nothing here fetches a URL: a server that downloads what a client names can be made to reach
addresses only it can reach (server-side request forgery), so images come in the request itself.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from PIL import Image
from starlette.datastructures import UploadFile
from starlette.requests import Request

from captionkit import sources
from captionkit.errors import ImageError, OptionError
from captionkit.options import GenerationOptions
from captionkit.serve.options import ServeOptions

MAX_PROMPT_CHARS = 2000
T = typing.TypeVar("T")
_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}
_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)"
                       r"(?P<base64>;base64)?,", re.ASCII)


class ApiError(Exception):
    """A request the server cannot answer as asked: its HTTP status and a message for the client."""

    def __init__(self, status: int, message: str, code: str = "invalid_request",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}


@dataclass
class Upload:
    """An encoded image as the request carried it, with the label errors name it by."""

    data: bytes
    label: str
    name: str | None = None
    """The file name the client gave, without folders."""


async def read_json(request: Request) -> dict:
    """The body as a JSON object (400 when it is not one)."""
    try:
        body = json.loads(await request.body())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ApiError(400, f"the body is not valid JSON ({error.__class__.__name__})") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


async def read_images(request: Request, max_images: int) -> tuple[list[Upload], dict[str, Any]]:
    """A native request's images and its other fields: multipart form data (every file is an
    image, every other field an option) or JSON (`images`: base64 or `data:` URLs, plus options)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        form = await request.form(max_files=max_images + 1, max_fields=64)
        uploads, values = [], {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                name = _base_name(value.filename)
                uploads.append(Upload(await value.read(), _label(len(uploads), name), name))
            else:
                values[key] = value
    elif kind == "application/json":
        values = await read_json(request)
        items = values.pop("images", values.pop("image", None))
        items = [items] if isinstance(items, str) else items
        if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
            raise ApiError(422, '"images" must be a list of base64 strings or data: URLs')
        check_count(len(items), max_images)  # before decoding any
        uploads = [from_text(item, _label(index)) for index, item in enumerate(items)]
    else:
        raise ApiError(415, "send the images as multipart/form-data or as application/json",
                       "unsupported_media_type")
    check_count(len(uploads), max_images)
    return uploads, values


def check_count(count: int, max_images: int) -> None:
    if count == 0:
        raise ApiError(422, "the request has no image")
    if count > max_images:
        raise ApiError(413, f"{count} images in one request: the server takes at most {max_images}",
                       "too_many_images")


def from_text(text: str, label: str) -> Upload:
    """An image given as text: a `data:` URL or bare base64. Any other URL is refused."""
    match = _DATA_URL.match(text)
    if match is None and re.match(r"[a-zA-Z][\w+.-]*://", text):
        raise ApiError(400, f"{label}: URLs are not fetched; send the image itself (a file upload, "
                            "base64 or a data: URL)", "url_not_allowed")
    if match is not None and not match["base64"]:
        raise ApiError(400, f"{label}: a data: URL must be base64-encoded (data:image/png;base64,...)")
    encoded = text[match.end():] if match is not None else text
    try:
        return Upload(base64.b64decode(re.sub(r"\s", "", encoded), validate=True), label)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{label}: not valid base64") from None


def decode(upload: Upload, target_size: int | None, max_pixels: int) -> Image.Image:
    """The upload as an upright RGB image, decoded as `captionkit caption` decodes files."""
    try:
        return sources.decode(upload.data, upload.label, target_size, max_pixels)
    except ImageError as error:
        reason = error.reason.replace(" (raise it with --max-pixels)", "")
        if reason.startswith(("not an image", "unsupported format")):
            raise ApiError(415, f"{upload.label}: {reason}", "unsupported_media_type") from None
        if reason.startswith("decompression bomb"):
            raise ApiError(413, f"{upload.label}: {reason}", "too_many_pixels") from None
        raise ApiError(400, f"{upload.label}: {reason}", "bad_image") from None


def parse(cls: type[T], values: Mapping[str, Any], defaults: T | None = None) -> T:
    """An options dataclass from a request's fields (form text or JSON values), starting from
    `defaults`; 422 for an unknown field or an invalid value."""
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - names)
    if unknown:
        raise ApiError(422, f"unknown option {unknown[0]!r}; options are {', '.join(sorted(names))}",
                       "bad_option")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(name, value, hints[name]) for name, value in values.items()}
    try:
        return replace(defaults, **kwargs) if defaults is not None else cls(**kwargs)
    except OptionError as error:
        raise ApiError(422, str(error), "bad_option") from None


def generation_options(values: Mapping[str, Any], defaults: GenerationOptions,
                       limits: ServeOptions) -> GenerationOptions:
    """The defaults with a request's GenerationOptions fields, within the server's limits."""
    options = parse(GenerationOptions, values, defaults)
    if options.max_new_tokens > limits.max_tokens:
        raise ApiError(422, f"max_new_tokens {options.max_new_tokens} is over this server's limit "
                            f"of {limits.max_tokens}", "bad_option")
    if max(options.num_beams, options.candidates) > limits.max_beams:
        raise ApiError(422, f"num_beams and candidates may be at most {limits.max_beams} here",
                       "bad_option")
    if options.prompt is not None and len(options.prompt) > MAX_PROMPT_CHARS:
        raise ApiError(422, f"the prompt is {len(options.prompt)} characters long: at most "
                            f"{MAX_PROMPT_CHARS}", "bad_option")
    return options


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """A form field's text, or a JSON value, as the field's type."""
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    base = next(arg for arg in args if arg is not type(None))
    if value is None or value == "":
        if type(None) in args:
            return None
        raise ApiError(422, f"option {name} needs a value", "bad_option")
    text = value.strip().lower() if isinstance(value, str) else None
    if base is bool and (isinstance(value, bool) or text in _TRUE | _FALSE):
        return value if isinstance(value, bool) else text in _TRUE
    if base is int and not isinstance(value, bool | float):
        try:
            return int(value)
        except (TypeError, ValueError):
            pass
    if base is float and not isinstance(value, bool):
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    if base is str and isinstance(value, str):
        return value
    raise ApiError(422, f"option {name}: expected {base.__name__}, got {_shown(value)}", "bad_option")


def _shown(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _base_name(filename: str | None) -> str | None:
    """The client's file name without its folders, at most 80 characters."""
    if not filename:
        return None
    name = sources.printable(filename.replace("\\", "/").rsplit("/", 1)[-1])
    return name if len(name) <= 80 else name[:77] + "..."


def _label(index: int, name: str | None = None) -> str:
    """`image 2 (cat.jpg)`: the position, and the name the client gave."""
    return f"image {index + 1} ({name})" if name else f"image {index + 1}"


def batch_key(options: GenerationOptions) -> tuple[GenerationOptions, str | None, bool]:
    """The options a batch shares (the prompt goes with each image), the image's prompt, and
    whether the request runs alone (seeded sampling gives the same captions only in its own batch)."""
    return replace(options, prompt=None), options.prompt, options.do_sample and options.seed is not None
