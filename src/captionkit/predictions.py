"""What a model says about one image: text, scored candidates and regions with boxes and masks.

Every model kind returns these, so the pipeline, the store, the exporters and the server never ask
which family produced them. Boxes are `[x0, y0, x1, y1]` in pixels of the image as given; masks are
COCO run-length encodings (`{"size": [height, width], "counts": "..."}`) at that same size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Region:
    """Something located in the image: a box, what it is, and optionally its mask and the caption
    phrase it grounds (`span`, character offsets into the caption)."""

    box: list[float]
    label: str
    score: float | None = None
    mask: dict | None = None
    span: tuple[int, int] | None = None
    kind: str = "instance"
    """instance (a detector's object), phrase (a grounded caption phrase), region (a model's own)
    or semantic (all pixels of one class in a semantic map; score None)."""

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"box": [round(float(v), 2) for v in self.box], "label": self.label}
        if self.score is not None:
            data["score"] = round(float(self.score), 6)
        if self.mask is not None:
            data["mask"] = self.mask
        if self.span is not None:
            data["span"] = list(self.span)
        if self.kind != "instance":
            data["kind"] = self.kind
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Region:
        span = data.get("span")
        return cls(box=[float(v) for v in data["box"]], label=str(data.get("label", "")),
                   score=data.get("score"), mask=data.get("mask"),
                   span=tuple(span) if span is not None else None,  # type: ignore[arg-type]
                   kind=data.get("kind", "instance"))


@dataclass
class Prediction:
    """One image's prediction. `extras` holds what has no typed home yet (a gate's score, the
    image's own prompt, a candidate list's scores)."""

    text: str = ""
    extras: dict = field(default_factory=dict)
    regions: list[Region] = field(default_factory=list)

    @property
    def candidates(self) -> list[dict]:
        """The captions generated for this image, best first when they were scored."""
        return list(self.extras.get("candidates", []))


Caption = Prediction
"""The name captioners used before predictions carried regions; the same class."""


def regions_to_json(regions: list[Region]) -> list[dict] | None:
    """The stored form of a prediction's regions (None when there are none)."""
    return [region.to_dict() for region in regions] if regions else None


def regions_from_json(data: list[dict] | None) -> list[Region]:
    return [Region.from_dict(item) for item in data or []]
