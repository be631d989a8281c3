"""A captioned dataset built in code: shapes drawn with Pillow, captions that say what is drawn.

No captioned dataset ships on the package registries, so the tests and the training demo make one.
Each scene holds one or two groups of identical shapes (one to three of them, one colour); two
groups sit side by side or one above the other. Its captions name the counts, colours, shapes and
where the groups are ("two red circles left of a blue square"), three phrasings per image. The
folder it writes is the LoRA layout (`scene-00001.png` beside `scene-00001.txt`, one reference a
line), so training reads it through the same `--dataset folder` path as a user's own folder.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
           "yellow": (235, 200, 30), "purple": (140, 60, 180)}
SHAPES = ("circle", "square", "triangle")
NUMBERS = {1: "a", 2: "two", 3: "three"}
# Rendered this many times larger, then shrunk: smooth edges like a photo's, not aliased ones.
SUPERSAMPLE = 2


@dataclass(frozen=True)
class Group:
    """Identical shapes of one colour."""

    count: int
    colour: str
    shape: str

    def phrase(self) -> str:
        noun = self.shape if self.count == 1 else f"{self.shape}s"
        return f"{NUMBERS[self.count]} {self.colour} {noun}"


@dataclass(frozen=True)
class Scene:
    """One or two groups; with two, `layout` says how they sit (first group left or on top)."""

    groups: tuple[Group, ...]
    layout: str = "single"  # single, horizontal or vertical

    def captions(self) -> list[str]:
        """Three true descriptions: both orders of the relation, and a plain list."""
        if self.layout == "single":
            one = self.groups[0].phrase()
            return [one, f"only {one}", f"{one} on a plain background"]
        first, second = (group.phrase() for group in self.groups)
        before, after = ("left of", "right of") if self.layout == "horizontal" else ("above", "below")
        return [f"{first} {before} {second}", f"{second} {after} {first}", f"{first} and {second}"]


@dataclass(frozen=True)
class SyntheticDataset:
    """Where `write_dataset` put each split."""

    root: Path
    train: Path
    test: Path
    images: dict[str, int]


def random_scene(rng: random.Random) -> Scene:
    """A scene drawn uniformly: one group a fifth of the time, else two groups that differ."""
    def group() -> Group:
        return Group(rng.randint(1, 3), rng.choice(list(COLOURS)), rng.choice(SHAPES))

    first = group()
    if rng.random() < 0.2:
        return Scene((first,))
    second = group()
    while (second.colour, second.shape) == (first.colour, first.shape):
        second = group()
    return Scene((first, second), rng.choice(("horizontal", "vertical")))


def render(scene: Scene, rng: random.Random, size: int = 128) -> Image.Image:
    """The scene on a pale background, each group's shapes scattered without overlap in its half."""
    big = size * SUPERSAMPLE
    shade = rng.randint(225, 250)
    image = Image.new("RGB", (big, big), (shade, shade, rng.randint(225, 250)))
    draw = ImageDraw.Draw(image)
    for group, area in zip(scene.groups, _areas(scene.layout, big), strict=True):
        placed: list[tuple[float, float, float]] = []
        for _ in range(group.count):
            x, y, radius = _place(rng, area, placed, big)
            placed.append((x, y, radius))
            _draw_shape(draw, group.shape, COLOURS[group.colour], x, y, radius)
    return image.resize((size, size), Image.Resampling.LANCZOS)


def _areas(layout: str, side: int) -> list[tuple[int, int, int, int]]:
    """Each group's box (x0, y0, x1, y1): the whole image, the two halves side by side, or stacked."""
    margin, middle = side // 16, side // 2
    if layout == "single":
        return [(margin, margin, side - margin, side - margin)]
    if layout == "horizontal":
        return [(margin, margin, middle - margin // 2, side - margin),
                (middle + margin // 2, margin, side - margin, side - margin)]
    return [(margin, margin, side - margin, middle - margin // 2),
            (margin, middle + margin // 2, side - margin, side - margin)]


def _place(rng: random.Random, area: tuple[int, int, int, int],
           placed: list[tuple[float, float, float]], side: int) -> tuple[float, float, float]:
    """A centre and radius inside `area` that keeps clear of the shapes already placed."""
    x0, y0, x1, y1 = area
    for attempt in range(200):
        # shrink the shapes if the area is crowded, so three always fit
        radius = rng.uniform(side * 0.06, side * 0.1) * (0.7 if attempt > 100 else 1.0)
        x, y = rng.uniform(x0 + radius, x1 - radius), rng.uniform(y0 + radius, y1 - radius)
        if all((x - px) ** 2 + (y - py) ** 2 > (radius + pr + side * 0.02) ** 2 for px, py, pr in placed):
            return x, y, radius
    raise RuntimeError(f"no room for another shape in {area}")  # not reached at these sizes


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, colour: tuple[int, int, int],
                x: float, y: float, radius: float) -> None:
    box = (x - radius, y - radius, x + radius, y + radius)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        side = radius * 0.85  # the same area as the circle, roughly
        draw.rectangle((x - side, y - side, x + side, y + side), fill=colour)
    else:
        draw.polygon([(x, y - radius), (x + radius, y + radius * 0.8), (x - radius, y + radius * 0.8)],
                     fill=colour)


def write_split(folder: Path, count: int, seed: int, size: int = 128, prefix: str = "scene") -> Path:
    """`count` scenes as PNG files with their captions in a `.txt` beside each, one a line."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for index in range(count):
        scene = random_scene(rng)
        name = f"{prefix}-{index:05d}"
        render(scene, rng, size).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text("\n".join(scene.captions()) + "\n", encoding="utf-8")
    return folder


def write_dataset(root: Path, train: int = 1000, test: int = 200, seed: int = 0,
                  size: int = 128) -> SyntheticDataset:
    """A train folder (validation is carved out of it with `--val-fraction`) and a held-out test
    folder, drawn from different seeds."""
    root = Path(root)
    train_dir = write_split(root / "train", train, seed, size, prefix="train")
    test_dir = write_split(root / "test", test, seed + 1_000_003, size, prefix="test")
    return SyntheticDataset(root, train_dir, test_dir, {"train": train, "test": test})
