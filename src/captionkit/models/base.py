"""The one interface every captioner implements."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from PIL import Image

from captionkit.options import GenerationOptions


@dataclass
class Caption:
    """One image's caption, plus whatever else the model can tell (candidates, entities...)."""

    text: str
    extras: dict = field(default_factory=dict)


@runtime_checkable
class Captioner(Protocol):
    """Takes decoded RGB images and generation options, returns one Caption per image."""

    model_id: str
    """The name captions are recorded under: a Hub id, a local path or a built-in name."""

    input_size: int | None
    """The side in pixels the model looks at; decoders may shrink images to about this size."""

    def caption(
        self,
        images: list[Image.Image],
        options: GenerationOptions,
        prompts: list[str | None] | None = None,
    ) -> list[Caption]: ...
