"""Annotated copies of images with their grounded phrases' boxes (`--draw-boxes DIR`)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from captionkit import sources
from captionkit.errors import ImageError, OutputError
from captionkit.exporters import atomic_write, relative_path
from captionkit.predictions import Region, phrase_regions, regions_to_json
from captionkit.store import Result

COLORS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45")
MANIFEST = ".captionkit-boxes.json"
"""In the --draw-boxes folder: a digest of what each copy shows, so a resumed run redraws nothing."""


def draw_boxes(results: Sequence[Result], directory: Path) -> list[Path]:
    """Draw each grounded result's phrase boxes on a copy of its image under `directory`.

    Every result is a grounded model's (the pipeline refuses --draw-boxes otherwise), so an image
    with no phrase is copied without boxes. Stores made before regions kept Kosmos-2's entities,
    with boxes normalized to 0..1.
    """
    def render(image: Image.Image, result: Result) -> Image.Image:
        return annotate(image, result.regions or phrase_regions(result.extras.get("entities", []),
                                                                image.size))

    return draw_copies(results, directory, render, MANIFEST)


def draw_copies(results: Sequence[Result], directory: Path,
                render: Callable[[Image.Image, Result], Image.Image], manifest_name: str,
                style: object = None) -> list[Path]:
    """Render each done result on a copy of its image under `directory`; returns the copies drawn
    now. A copy that already shows the same image and regions in the same `style` (JSON: what
    else `render` reads, such as colours) is left as it is."""
    manifest = directory / manifest_name
    drawn = _read_manifest(manifest)
    written = []
    try:
        for result in results:
            if result.status != "done":
                continue
            target = _mirrored(result, directory)
            if target.exists() and target.samefile(result.path):
                raise OutputError(f"{target}: the annotated copy would replace the image itself; "
                                  "pick a folder outside the inputs")
            shown = [result.caption, regions_to_json(result.regions), result.extras.get("entities")]
            drawing = [result.hash, shown] if style is None else [result.hash, shown, style]
            digest = sources.content_hash(json.dumps(drawing, sort_keys=True).encode())
            if drawn.get(result.name) == digest and target.exists():
                continue
            try:
                image = sources.load_image(result.path)
            except ImageError:
                continue  # the file changed or went away since it was captioned
            _save(render(image, result), target)
            drawn[result.name] = digest
            written.append(target)
    finally:  # what was drawn before an interrupt is not drawn again
        if written:
            atomic_write(manifest, json.dumps(drawn, sort_keys=True, indent=0))
    return written


def _read_manifest(path: Path) -> dict[str, str]:
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # none yet, or damaged: every copy is drawn again
    return recorded if isinstance(recorded, dict) else {}


def annotate(image: Image.Image, regions: Sequence[Region]) -> Image.Image:
    """A copy of `image` with every region's box (pixels) and label drawn, one colour per label."""
    out = image.convert("RGB")
    draw = ImageDraw.Draw(out)
    width, height = out.size
    line = max(2, round(min(width, height) / 200))
    font = ImageFont.load_default(size=max(12, 6 * line))
    colours: dict[str, str] = {}
    for region in regions:
        color = colours.setdefault(region.label, COLORS[len(colours) % len(COLORS)])
        x0, y0, x1, y1 = region.box
        box = (x0, y0, max(x0, x1), max(y0, y1))
        draw.rectangle(box, outline=color, width=line)
        label = draw.textbbox((box[0] + line, box[1] + line), region.label, font=font)
        draw.rectangle(label, fill=color)
        draw.text((box[0] + line, box[1] + line), region.label, fill="white", font=font)
    return out


def _mirrored(result: Result, directory: Path) -> Path:
    """`DIR/sub/photo.jpg` for an image exported as `sub/photo.jpg`; formats Pillow cannot write
    become PNG."""
    relative = relative_path(result)
    if Image.registered_extensions().get(relative.suffix.lower()) not in Image.SAVE:
        relative = relative.with_suffix(relative.suffix + ".png")
    return directory / relative


def _save(image: Image.Image, path: Path) -> None:
    """Write through a temporary file and rename, so a half-written image never appears."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        image.save(tmp, format=Image.registered_extensions()[path.suffix.lower()])
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
