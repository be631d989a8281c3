"""Training data from any `captionkit.datasets` reader: train/val/test splits of usable examples.

A dataset with split lists (Karpathy's files, Flickr8k's lists) keeps its splits; one without (a
folder of images and caption sidecars, a CSV) gets a seeded validation split carved out. Problems
(a missing image, an empty or over-long caption) leave the example or caption out and are reported
with the file and line that named it, so a few bad rows never stop a run.
"""

from __future__ import annotations

import contextlib
import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from captionkit import sources
from captionkit.datasets import References, find_images, load_dataset, read_references
from captionkit.errors import ImageError, InputError, OptionError
from captionkit.train.options import TrainOptions


@dataclass(frozen=True)
class Example:
    """One image and its reference captions."""

    name: str
    """The image's base name, unique in the dataset (captionkit.datasets' matching key)."""
    path: Path
    captions: tuple[str, ...]


@dataclass
class Splits:
    """The examples of each split, and every problem met on the way."""

    train: list[Example]
    val: list[Example]
    test: list[Example] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def drop(self, names: set[str]) -> None:
        """Leave out images found unusable later (unreadable files)."""
        self.train = [e for e in self.train if e.name not in names]
        self.val = [e for e in self.val if e.name not in names]
        self.test = [e for e in self.test if e.name not in names]


def load_splits(options: TrainOptions) -> Splits:
    """The dataset `options` names, cleaned, with train, validation and (when it has one) test."""
    if options.root is None and options.dataset != "file":
        raise OptionError(f"--dataset {options.dataset} needs --root, the dataset's folder")
    read = _reader(options)
    problems: list[str] = []
    try:
        parts = {split: _examples(read(split), options, problems) for split in ("train", "val")}
    except OptionError as error:
        if "split" not in str(error):
            raise
        return _carved(_examples(read(None), options, problems), options, problems)
    parts["test"] = []
    with contextlib.suppress(OptionError):
        parts["test"] = _examples(read("test"), options, problems)
    if options.dataset == "coco":  # Karpathy's COCO adds "restval" to the training images
        with contextlib.suppress(OptionError):
            parts["train"] += _examples(read("restval"), options, problems)
    train = _sample(parts["train"], options.max_images, options.seed)
    return Splits(train, _sample(parts["val"], options.max_val_images, options.seed), parts["test"],
                  problems)


def _reader(options: TrainOptions) -> Callable[[str | None], References]:
    """A function reading one split (None: all) of the dataset, its image folder known."""
    if options.dataset == "folder":
        if not Path(options.root).is_dir():  # type: ignore[arg-type]
            raise InputError(f"--root {options.root}: no such folder")

        def folder(split: str | None) -> References:
            if split is not None:
                raise OptionError(f"{options.root} has no split information")
            return read_references(options.root, fmt="sidecars")  # type: ignore[arg-type]
        return folder
    if options.dataset == "file":
        captions = Path(options.captions)  # type: ignore[arg-type]
        images = options.root or captions.parent

        def listed(split: str | None) -> References:
            refs = read_references(captions, split=split)
            paths = find_images(refs, images)
            refs.root, refs.folders = images, {
                name: path.parent.relative_to(images).as_posix() for name, path in paths.items()}
            return refs
        return listed
    return lambda split: load_dataset(options.dataset, options.root, split)  # type: ignore[arg-type]


def _examples(refs: References, options: TrainOptions, problems: list[str]) -> list[Example]:
    """The usable examples of `refs`; what is not usable goes to `problems`."""
    problems += [p for p in refs.problems if p not in problems]
    examples = []
    for name, path in refs.image_paths().items():
        where = _source(refs, path)
        if not path.is_file():
            lone_sidecar = refs.fmt == "sidecars" and where.suffix == ".txt"
            problems.append(f"{where}: no image {path.name}.* beside this caption file" if lone_sidecar
                            else f"{_line(where, path.name, whole=True)}: image {path} missing")
            continue
        kept = []
        for caption in refs.captions[name]:
            text = " ".join(caption.split())
            words = len(text.split())
            if not words:
                problems.append(f"{_line(where, caption)}: empty caption for {name}")
            elif words > options.max_caption_words:
                problems.append(f"{_line(where, caption)}: caption of {words} words is over "
                                f"--max-caption-words {options.max_caption_words}; left out")
            else:
                kept.append(text)
        if kept:
            examples.append(Example(name, path, tuple(kept)))
        else:
            problems.append(f"{where}: no usable caption for {name}; image left out")
    return examples


def _source(refs: References, image: Path) -> Path:
    """The file that names `image`: its caption sidecar in a folder dataset, else the captions file."""
    if refs.fmt == "sidecars":
        for sidecar in (image.with_suffix(".txt"), image.with_name(image.name + ".txt")):
            if sidecar.is_file():
                return sidecar
    return Path(refs.source or image)


def _line(source: Path, text: str, whole: bool = False) -> str:
    """`file:line` of the first line holding `text` (readers keep captions and names, not line
    numbers); `whole` matches only where no name character touches it, so `1.png` skips `11.png`."""
    needle = re.escape(text.strip()[:80])
    pattern = re.compile(rf"(?<![\w.-]){needle}(?![\w.-])" if whole else needle)
    try:
        with open(source, encoding="utf-8-sig", errors="replace") as file:
            for number, line in enumerate(file, start=1):
                if needle and pattern.search(line):
                    return f"{source}:{number}"
    except OSError:
        pass
    return str(source)


def _carved(examples: list[Example], options: TrainOptions, problems: list[str]) -> Splits:
    """A seeded validation split out of a dataset that has none."""
    if len(examples) < 2:
        first = f" (first problem: {problems[0]})" if problems else ""
        raise InputError(f"{options.root or options.captions}: {len(examples)} usable image(s); "
                         f"training needs at least 2{first}")
    order = sorted(examples, key=lambda e: e.name)
    random.Random(options.seed).shuffle(order)
    held = max(1, math.ceil(len(order) * options.val_fraction)) if options.val_fraction else 0
    val, train = order[:held], order[held:]
    if not train:
        raise OptionError(f"--val-fraction {options.val_fraction} leaves no training images")
    return Splits(_sample(train, options.max_images, options.seed),
                  _sample(val, options.max_val_images, options.seed), [], problems)


def _sample(examples: list[Example], limit: int | None, seed: int) -> list[Example]:
    if limit is None or len(examples) <= limit:
        return examples
    chosen = random.Random(seed).sample(range(len(examples)), limit)
    return [examples[i] for i in sorted(chosen)]


def load_folder(folder: Path, options: TrainOptions | None = None) -> list[Example]:
    """Every usable example of a folder of images with caption sidecars (a held-out test folder)."""
    problems: list[str] = []
    return _examples(read_references(Path(folder), fmt="sidecars"), options or TrainOptions(), problems)


def decode_example(example: Example, size: int) -> Image.Image:
    """The example's image, decoded the way `captionkit caption` decodes for a model of `size` px."""
    return sources.decode(sources.read_bytes(example.path), sources.printable(example.path), size)


def unreadable(examples: list[Example], size: int) -> dict[str, str]:
    """Images that cannot be decoded (name -> `path: reason`), found once before training reads
    them every epoch."""
    failed = {}
    for example in examples:
        try:
            decode_example(example, size)
        except ImageError as error:
            failed[example.name] = str(error)
    return failed
