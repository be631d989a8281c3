"""What a model says about one image: text, scored candidates and regions with boxes and masks.

Every model kind returns these, so the pipeline, the store, the exporters and the server never ask
which family produced them. Boxes are `[x0, y0, x1, y1]` in pixels of the image as given; masks are
COCO run-length encodings (`{"size": [height, width], "counts": "..."}`) at that same size.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
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

    def scaled(self, sx: float, sy: float) -> Region:
        """The region on an image resized by these factors (a mask keeps its size)."""
        x0, y0, x1, y1 = self.box
        return replace(self, box=[x0 * sx, y0 * sy, x1 * sx, y1 * sy])

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

    def scaled(self, seen: tuple[int, int], full: tuple[int, int]) -> Prediction:
        """This prediction for the full-size image when the model saw it at `seen` pixels: boxes
        scale with the image (masks are made at the full size by the models that make them)."""
        if seen == full:
            return self
        factors = (full[0] / seen[0], full[1] / seen[1])
        extras = dict(self.extras)
        if "candidates" in extras:
            extras["candidates"] = [
                {**c, "regions": [Region.from_dict(r).scaled(*factors).to_dict() for r in c["regions"]]}
                if "regions" in c else c for c in extras["candidates"]]
        return Prediction(self.text, extras, [region.scaled(*factors) for region in self.regions])

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


def phrase_regions(entities: list[dict], size: tuple[int, int]) -> list[Region]:
    """Grounded phrases (`{"phrase", "span", "boxes"}` with boxes normalized to 0..1, as Kosmos-2's
    processor gives them) as one pixel region per box on an image of `size`."""
    width, height = size
    return [Region(box=[x0 * width, y0 * height, max(x0, x1) * width, max(y0, y1) * height],
                   label=entity.get("phrase", ""), span=tuple(entity["span"]) if "span" in entity else None,
                   kind="phrase")
            for entity in entities for x0, y0, x1, y1 in entity.get("boxes", [])]
