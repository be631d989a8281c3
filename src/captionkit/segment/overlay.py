"""Overlays: an image with its regions' masks filled and outlined, labels, a legend, and the
caption with each grounded phrase in its mask's colour."""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from captionkit.boxes import COLORS
from captionkit.options import OVERLAY_ALPHA
from captionkit.predictions import Prediction, Region
from captionkit.segment import masks
from captionkit.segment.labelmaps import class_color

Classes = Mapping[str, Sequence[str]] | Sequence[str]
"""Label-map classes by region kind (`labelmaps.classes_by_kind`), or one list for every kind."""


def colors(regions: Sequence[Region], classes: Classes) -> list[tuple[int, int, int]]:
    """Each region's colour: a class keeps its colour in every image (its index in its kind's
    `classes`, else the order labels first appear); grounded phrases take `--draw-boxes`' colours,
    in caption order."""
    indices: dict[str, dict[str, int]] = {}
    out = []
    phrases = 0
    for region in regions:
        if region.kind == "phrase":
            hex_color = COLORS[phrases % len(COLORS)]
            out.append(tuple(int(hex_color[i:i + 2], 16) for i in (1, 3, 5)))
            phrases += 1
            continue
        if region.kind not in indices:
            names = classes.get(region.kind, ()) if isinstance(classes, Mapping) else classes
            indices[region.kind] = {name: i for i, name in enumerate(names)}
        index = indices[region.kind]
        out.append(class_color(index.setdefault(region.label, len(index))))
    return out


def draw(image: Image.Image, prediction: Prediction, classes: Classes = (),
         alpha: float = OVERLAY_ALPHA) -> Image.Image:
    """A copy of `image` with `prediction`'s regions drawn (boxes are drawn for regions without
    masks), a legend, and the caption below when there is one."""
    regions = prediction.regions
    palette = colors(regions, classes)
    pixels = np.array(image.convert("RGB"), dtype=np.float32)
    line = max(2, round(min(image.size) / 250))
    outlines = []
    for region, color in zip(regions, palette, strict=True):
        if region.mask is None:
            continue
        mask = masks.decode(region.mask)
        pixels[mask] = pixels[mask] * (1 - alpha) + np.array(color, np.float32) * alpha
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        outlines.append((contours, color))
    canvas = pixels.round().astype(np.uint8)
    for contours, color in outlines:
        cv2.drawContours(canvas, contours, -1, color, line)
    out = Image.fromarray(canvas)
    font = ImageFont.load_default(size=max(12, round(min(image.size) / 36)))
    _labels(ImageDraw.Draw(out), regions, palette, font, line)
    _legend(ImageDraw.Draw(out), regions, palette, font, line, out.size)
    return _with_caption(out, prediction.text, regions, palette, font, line) if prediction.text else out


def _labels(draw: ImageDraw.ImageDraw, regions: Sequence[Region], palette: list, font, line: int) -> None:
    """Label and score at each instance's top-left corner (semantic regions are in the legend)."""
    for region, color in zip(regions, palette, strict=True):
        if region.kind == "semantic":
            continue
        x0, y0, x1, y1 = region.box
        if region.mask is None:
            draw.rectangle((x0, y0, max(x0, x1), max(y0, y1)), outline=color, width=line)
        text = region.label if region.score is None else f"{region.label} {region.score:.2f}"
        _, _, right, bottom = draw.textbbox((0, 0), text, font=font)
        width, height = draw.im.size
        # inside the box's corner, moved left or up where the label would leave the image
        corner = (max(0, min(x0 + line, width - right - line)),
                  max(0, min(y0 + line, height - bottom - line)))
        draw.rectangle(draw.textbbox(corner, text, font=font), fill=color)
        draw.text(corner, text, fill="black", font=font)


def _legend(draw: ImageDraw.ImageDraw, regions: Sequence[Region], palette: list, font, line: int,
            size: tuple[int, int]) -> None:
    """A swatch and a name for every label shown in each of its colours, top right."""
    entries = dict.fromkeys(zip((r.label for r in regions), palette, strict=True))
    if not entries:
        return
    height = font.size + 2 * line
    width = max(draw.textlength(name, font=font) for name, _ in entries) + height + 3 * line
    left = size[0] - width - line
    draw.rectangle((left, line, size[0] - line, line + height * len(entries)), fill=(255, 255, 255))
    for row, (name, color) in enumerate(entries):
        top = line + row * height
        draw.rectangle((left + line, top + line, left + height - line, top + height - line), fill=color)
        draw.text((left + height + line, top + line), name, fill="black", font=font)


def _with_caption(image: Image.Image, text: str, regions: Sequence[Region], palette: list, font,
                  line: int) -> Image.Image:
    """The image above a white band holding the caption, each grounded phrase's span in its
    region's colour, wrapped at spaces."""
    shade = [(0, 0, 0)] * len(text)
    for region, color in zip(regions, palette, strict=True):
        if region.span is not None:
            start, end = region.span
            shade[max(0, start):min(len(text), end)] = [color] * (min(len(text), end) - max(0, start))
    width, space = image.size[0] - 2 * line, font.getlength(" ")
    rows: list[list[re.Match]] = [[]]
    used = 0.0
    for word in re.finditer(r"\S+", text):
        length = font.getlength(word.group())
        if rows[-1] and used + space + length > width:
            rows.append([])
            used = 0.0
        used += (space if rows[-1] else 0) + length
        rows[-1].append(word)
    height = font.size + line
    out = Image.new("RGB", (image.size[0], image.size[1] + len(rows) * height + 2 * line), "white")
    out.paste(image)
    draw = ImageDraw.Draw(out)
    for index, row in enumerate(rows):
        x, y = float(line), image.size[1] + line + index * height
        for word in row:
            for color, run in itertools.groupby(range(word.start(), word.end()), key=shade.__getitem__):
                piece = "".join(text[i] for i in run)
                draw.text((x, y), piece, fill=color, font=font)
                x += font.getlength(piece)
            x += space
    return out
