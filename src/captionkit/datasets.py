"""Read reference captions and predictions from the formats captioning datasets ship in.

Images are matched by base file name: folders are dropped, case and extension are kept, so
`val2014/COCO_val2014_000000391895.jpg` and `COCO_val2014_000000391895.jpg` are one image. A name
with no image extension (a mirrored sidecar `photo.txt`, a bare COCO id) matches the reference
image with that stem when exactly one has it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from captionkit.errors import InputError, OptionError
from captionkit.exporters import parse_captions_txt_line

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".heic", ".heif", ".avif"}
)
# captionkit's own export files, which can sit in a folder of sidecars without being one.
EXPORT_NAMES = frozenset({"captions.txt", "captions.jsonl", "captions.csv"})


class DatasetError(InputError):
    """A captions file that cannot be read at all; the message names the file and line."""


@dataclass
class References:
    """Reference captions per image name, where the images live, and what was wrong on the way."""

    captions: dict[str, list[str]]
    root: Path | None = None
    split: str | None = None
    fmt: str = ""
    source: Path | None = None
    problems: list[str] = field(default_factory=list)
    ids: dict[int, str] = field(default_factory=dict)
    folders: dict[str, str] = field(default_factory=dict)

    def image_paths(self) -> dict[str, Path]:
        """Where each referenced image should be on disk (empty when the root is unknown)."""
        if self.root is None:
            return {}
        return {name: self.root / self.folders.get(name, "") / name for name in self.captions}


@dataclass
class Predictions:
    """One predicted caption per image name, plus rows that could not be used."""

    captions: dict[str, str]
    fmt: str = ""
    source: Path | None = None
    problems: list[str] = field(default_factory=list)


@dataclass
class _Row:
    """One caption as a file states it, or why the row at `where` could not be read."""

    where: str
    image: str = ""
    caption: str = ""
    error: str | None = None
    split: str | None = None
    image_id: int | None = None


def posix_name(name: str) -> str:
    r"""`name` with `/` between folders. A backslash separates folders only in a Windows path
    (`C:\photos\dog.jpg`, `\\server\share\dog.jpg`) or on Windows; elsewhere it is part of
    the file name, as Linux and macOS allow (`we\ird.jpg`)."""
    if os.sep == "\\" or re.match(r"[A-Za-z]:\\|\\\\", name):
        return name.replace("\\", "/")
    return name


def image_key(name: str) -> str:
    """The name images are matched by: the base file name, folders dropped."""
    return posix_name(name).rstrip("/").rsplit("/", 1)[-1]


def match_images(predicted: Iterable[str], referenced: Iterable[str]) -> dict[str, str]:
    """Map each predicted name to its reference name by the module's rule; unmatched are left out."""
    references = set(referenced)
    predicted = list(predicted)
    matched = {name: name for name in predicted if name in references}
    by_stem: dict[str, list[str]] = {}
    for name in references:
        by_stem.setdefault(PurePosixPath(name).stem, []).append(name)
    claimed = set(matched)
    for name in predicted:
        if name in matched or PurePosixPath(name).suffix.lower() in IMAGE_EXTENSIONS:
            continue
        candidates = by_stem.get(name, [])
        if len(candidates) == 1 and candidates[0] not in claimed:
            matched[name] = candidates[0]
            claimed.add(candidates[0])
    return matched


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file") from None
    except OSError as error:
        raise DatasetError(f"{path}: cannot read it ({error.strerror})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise DatasetError(f"{path}:{line}: not UTF-8 text; save the file as UTF-8") from None


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    # split("\n"), not splitlines(), so line numbers agree with editors on odd separators.
    for number, line in enumerate(_read_text(path).split("\n"), start=1):
        line = line.rstrip("\r")
        if line.strip():
            yield number, line


def _load_json(path: Path) -> object:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as error:
        raise DatasetError(f"{path}:{error.lineno}: invalid JSON ({error.msg})") from None
    except RecursionError:
        raise DatasetError(f"{path}: JSON nested too deeply to read") from None


def _failed(record: Mapping, where: str) -> _Row | None:
    if record.get("status") == "failed":
        return _Row(where, error=f"captioning failed: {record.get('error') or 'no reason recorded'}")
    return None


def _rows_csv(path: Path) -> Iterator[_Row]:
    reader = csv.reader(io.StringIO(_read_text(path), newline=""))
    header = [column.strip().lower() for column in next(reader, [])]
    if "image" not in header or "caption" not in header:
        raise DatasetError(f"{path}:1: the header needs `image` and `caption` columns")
    for values in reader:
        where = f"{path}:{reader.line_num}"
        if not any(value.strip() for value in values):
            continue
        if len(values) != len(header):
            yield _Row(where, error=f"{len(values)} fields where the header has {len(header)}")
            continue
        record = dict(zip(header, values, strict=True))
        failed = _failed(record, where)
        if failed:
            yield failed
        elif not record["image"].strip() or not record["caption"].strip():
            yield _Row(where, error="empty image name or caption")
        else:
            yield _Row(where, record["image"].strip(), record["caption"])


def _rows_jsonl(path: Path) -> Iterator[_Row]:
    for number, line in _lines(path):
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            yield _Row(where, error=f"invalid JSON ({error.msg})")
            continue
        except RecursionError:
            yield _Row(where, error="JSON nested too deeply to read")
            continue
        if not isinstance(record, dict):
            yield _Row(where, error="not a JSON object")
            continue
        yield from _rows_record(record, where)


def _rows_record(record: dict, where: str) -> Iterator[_Row]:
    failed = _failed(record, where)
    if failed:
        yield failed
        return
    image, caption = record.get("image"), record.get("caption")
    if not isinstance(image, str) or not image.strip():
        yield _Row(where, error="no `image` string")
        return
    captions = caption if isinstance(caption, list) else [caption]
    if not captions or not all(isinstance(c, str) and c.strip() for c in captions):
        yield _Row(where, error="`caption` must be a non-empty string or list of strings")
        return
    for text in captions:
        yield _Row(where, image.strip(), text)


def _rows_captions_txt(path: Path) -> Iterator[_Row]:
    for number, line in _lines(path):
        image, caption = parse_captions_txt_line(line)
        if not image.strip() or not caption.strip():
            yield _Row(f"{path}:{number}", error="expected `image.jpg: caption`")
        else:
            yield _Row(f"{path}:{number}", image.strip(), caption)


def _rows_flickr_token(path: Path) -> Iterator[_Row]:
    for number, line in _lines(path):
        name, tab, caption = line.partition("\t")
        image, hash_sign, index = name.rpartition("#")
        if not tab or not hash_sign or not index.isdigit() or not image or not caption.strip():
            yield _Row(f"{path}:{number}", error="expected `image.jpg#N<TAB>caption`")
        else:
            yield _Row(f"{path}:{number}", image, caption)


def _rows_flickr30k_csv(path: Path) -> Iterator[_Row]:
    lines = _lines(path)
    next(lines, None)
    for number, line in lines:
        parts = [part.strip() for part in line.split("|", 2)]
        if len(parts) != 3 or not parts[1].isdigit() or not parts[0] or not parts[2]:
            yield _Row(f"{path}:{number}", error="expected `image.jpg| N| caption`")
        else:
            yield _Row(f"{path}:{number}", parts[0], parts[2])


def _bad_id(value: object) -> bool:
    """An id that cannot name an image: a JSON list or object (valid JSON, but not a number)."""
    return isinstance(value, list | dict)


def _rows_coco(path: Path, data: dict) -> Iterator[_Row]:
    names, first = {}, {}
    for index, image in enumerate(data["images"]):
        where = f"{path}: images[{index}]"
        if not isinstance(image, dict) or "id" not in image or not isinstance(
                image.get("file_name"), str):
            yield _Row(where, error="needs `id` and `file_name`")
        elif _bad_id(image["id"]):
            yield _Row(where, error=f"`id` must be a number, not {image['id']!r}")
        elif image["id"] in names:
            yield _Row(where, error=f"id {image['id']!r} of {image['file_name']} is already "
                                    f"images[{first[image['id']]}]'s ({names[image['id']]}), which "
                                    "keeps the captions; image ids must be unique")
        else:
            names[image["id"]], first[image["id"]] = image["file_name"], index
    for index, note in enumerate(data["annotations"]):
        where = f"{path}: annotations[{index}]"
        if not isinstance(note, dict) or not isinstance(note.get("caption"), str):
            yield _Row(where, error="needs `image_id` and a `caption` string")
        elif _bad_id(note.get("image_id")):
            yield _Row(where, error=f"`image_id` must be a number, not {note['image_id']!r}")
        elif note.get("image_id") not in names:
            yield _Row(where, error=f"image_id {note.get('image_id')!r} is not in `images`")
        else:
            image_id = note["image_id"]
            yield _Row(where, names[image_id], note["caption"], image_id=image_id)


def _karpathy_field_error(image: dict) -> str | None:
    """What is wrong with an entry's optional fields, such as `"sentences": 5`; None if nothing."""
    for key, kind, valid in (("filepath", "a string", str), ("split", "a string", str),
                             ("sentences", "a list", list)):
        if image.get(key) is not None and not isinstance(image[key], valid):
            return f"`{key}` must be {kind}, not {image[key]!r}"
    if _bad_id(image.get("cocoid")):
        return f"`cocoid` must be a number, not {image['cocoid']!r}"
    return None


def _rows_karpathy(path: Path, data: dict) -> Iterator[_Row]:
    for index, image in enumerate(data["images"]):
        where = f"{path}: images[{index}]"
        if not isinstance(image, dict) or not isinstance(image.get("filename"), str):
            yield _Row(where, error="needs a `filename`")
            continue
        wrong = _karpathy_field_error(image)
        if wrong:
            yield _Row(where, error=wrong)
            continue
        name = "/".join(filter(None, [image.get("filepath"), image["filename"]]))
        sentences = image.get("sentences") or []
        raws = [s.get("raw") for s in sentences if isinstance(s, dict)]
        if not raws or not all(isinstance(raw, str) and raw.strip() for raw in raws):
            yield _Row(where, error="needs `sentences` with a `raw` caption each")
            continue
        for raw in raws:
            yield _Row(where, name, raw, split=image.get("split"), image_id=image.get("cocoid"))


def _rows_json_list(path: Path, data: list) -> Iterator[_Row]:
    for index, record in enumerate(data):
        where = f"{path}: entry {index}"
        if not isinstance(record, dict):
            yield _Row(where, error="not a JSON object")
        elif "image_id" in record and "image" not in record:
            if not isinstance(record.get("caption"), str) or not record["caption"].strip():
                yield _Row(where, error="needs a non-empty `caption` string")
            elif _bad_id(record["image_id"]):
                yield _Row(where, error=f"`image_id` must be a number, not {record['image_id']!r}")
            else:
                image_id = record["image_id"]
                yield _Row(where, str(image_id), record["caption"], image_id=image_id)
        else:
            yield from _rows_record(record, where)


def _json_kind(data: object) -> str:
    if isinstance(data, list):
        by_id = bool(data) and isinstance(data[0], dict) and "image_id" in data[0]
        return "coco-results" if by_id else "json"
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        if isinstance(data.get("annotations"), list):
            return "coco"
        if "dataset" in data or any(isinstance(i, dict) and "sentences" in i
                                    for i in data["images"][:1]):
            return f"karpathy-{data.get('dataset', 'unknown')}"
    return ""


def _rows_json(path: Path) -> tuple[str, Iterator[_Row]]:
    data = _load_json(path)
    kind = _json_kind(data)
    if kind == "coco":
        return kind, _rows_coco(path, data)
    if kind.startswith("karpathy"):
        return kind, _rows_karpathy(path, data)
    if kind:
        return kind, _rows_json_list(path, data)
    raise DatasetError(f"{path}: JSON that is neither COCO captions, a Karpathy split file, "
                       "nor a list of {image, caption} or {image_id, caption} objects")


def _sidecar_image(stem: str, images: dict[str, str]) -> str:
    """`photo.jpg.txt` and `photo.txt` beside `photo.jpg` name photo.jpg; a lone `photo.txt`, photo."""
    if PurePosixPath(stem).suffix.lower() in IMAGE_EXTENSIONS:
        return stem
    return images.get(stem, stem)


def _rows_sidecars(folder: Path, one_per_line: bool) -> Iterator[_Row]:
    if not folder.is_dir():
        raise DatasetError(f"{folder}: no such folder")
    for directory, subdirectories, files in os.walk(folder):
        subdirectories[:] = sorted(d for d in subdirectories if not d.startswith("."))
        here = Path(directory)
        images = {Path(f).stem: f for f in sorted(files)
                  if Path(f).suffix.lower() in IMAGE_EXTENSIONS}
        for name in sorted(files):
            if not name.endswith(".txt") or name.startswith(".") or name in EXPORT_NAMES:
                continue
            image = (here / _sidecar_image(name[: -len(".txt")], images)).relative_to(folder)
            where = str(here / name)
            try:
                text = _read_text(here / name)
            except DatasetError as error:
                yield _Row(where, error=f"unreadable ({error})")
                continue
            lines = [line.strip() for line in text.split("\n") if line.strip()]
            if not lines:
                yield _Row(where, error="empty caption file")
            elif one_per_line:
                yield from (_Row(where, image.as_posix(), line) for line in lines)
            else:
                yield _Row(where, image.as_posix(), " ".join(lines))


_FIRST_LINE_KINDS: list[tuple[str, Callable[[str], bool]]] = [
    ("csv", lambda line: bool(re.match(r"\s*image\s*,", line, re.I)) and "caption" in line.lower()),
    ("flickr30k-csv", lambda line: line.replace(" ", "").lower().startswith("image_name|")),
    ("flickr8k-token", lambda line: bool(re.match(r"[^\t]+#\d+\t", line))),
    ("captions.txt", lambda line: ": " in line),
]

FORMATS = ("csv", "jsonl", "json", "captions.txt", "flickr8k-token", "flickr30k-csv", "sidecars")


def detect_format(path: Path) -> str:
    """Tell a captions file's format from its name and first line; one of FORMATS."""
    path = Path(path)
    if path.is_dir():
        return "sidecars"
    suffix = path.suffix.lower()
    if suffix == ".json":
        return "json"
    if suffix == ".jsonl":
        return "jsonl"
    numbered_first = next(_lines(path), None)
    if numbered_first is None:
        raise DatasetError(f"{path}: no captions in it (empty, or only blank lines)")
    first = numbered_first[1]
    for kind, test in _FIRST_LINE_KINDS:
        if test(first):
            return kind
    raise DatasetError(
        f"{path}:1: cannot tell the format from {first[:60]!r}; expected an `image,caption` "
        "header, `image.jpg#0<TAB>caption`, `image_name| comment_number| comment`, "
        "or `image.jpg: caption`"
    )


def _rows(path: Path, fmt: str | None, one_per_line: bool) -> tuple[str, Iterator[_Row]]:
    fmt = fmt or detect_format(path)
    readers: dict[str, Callable[[Path], Iterator[_Row]]] = {
        "csv": _rows_csv,
        "jsonl": _rows_jsonl,
        "captions.txt": _rows_captions_txt,
        "flickr8k-token": _rows_flickr_token,
        "flickr30k-csv": _rows_flickr30k_csv,
        "sidecars": lambda folder: _rows_sidecars(folder, one_per_line),
    }
    if fmt == "json":
        return _rows_json(path)
    if fmt not in readers:
        raise OptionError(f"format {fmt!r}: choose from {', '.join(FORMATS)}")
    return fmt, readers[fmt](path)


def read_split_file(path: Path) -> list[str]:
    """Image names, one a line, as in `Flickr_8k.testImages.txt`."""
    return [image_key(line.strip()) for _, line in _lines(Path(path))]


def read_references(
    path: Path, split: str | None = None, split_file: Path | None = None, fmt: str | None = None
) -> References:
    """Read reference captions from any supported format, keeping only `split` when given.

    `split` selects images in Karpathy split files; `split_file` lists the image names to keep.
    Malformed rows are recorded in `problems` as `file:line: reason`; they never vanish.
    """
    path = Path(path)
    kind, rows = _rows(path, fmt, one_per_line=True)
    refs = References({}, fmt=kind, source=path, split=split)
    splits_seen: set[str] = set()
    for row in rows:
        if row.error:
            refs.problems.append(f"{row.where}: {row.error}")
            continue
        if row.split is not None:
            splits_seen.add(row.split)
            if split is not None and row.split != split:
                continue
        name = image_key(row.image)
        folder = PurePosixPath(posix_name(row.image)).parent.as_posix()
        if refs.folders.get(name, folder) != folder:
            refs.problems.append(f"{row.where}: {name} is also under {refs.folders[name]!r}; "
                                 "image names must be unique")
            continue
        if folder != ".":
            refs.folders[name] = folder
        refs.captions.setdefault(name, []).append(row.caption)
        if row.image_id is not None:
            refs.ids[row.image_id] = name
    if split is not None and split_file is None:
        if not splits_seen:
            raise OptionError(f"{path} has no split information; pass a split file "
                              f"(e.g. Flickr_8k.{split}Images.txt) instead of split {split!r}")
        if split not in splits_seen:
            raise OptionError(f"split {split!r} is not in {path}; it has "
                              f"{', '.join(sorted(splits_seen))}")
    if split_file is not None:
        _keep_split(refs, Path(split_file))
    if not refs.captions:
        detail = f"; first problem: {refs.problems[0]}" if refs.problems else ""
        raise DatasetError(f"{path}: no usable reference captions{detail}")
    if path.is_dir():
        refs.root = path
    return refs


def _keep_split(refs: References, split_file: Path) -> None:
    wanted = read_split_file(split_file)
    for name in wanted:
        if name not in refs.captions:
            refs.problems.append(f"{split_file}: {name} is listed but has no reference captions")
    keep = set(wanted)
    refs.captions = {name: refs.captions[name] for name in wanted if name in refs.captions}
    refs.ids = {i: name for i, name in refs.ids.items() if name in keep}
    refs.split = refs.split or split_file.name


def read_predictions(
    path: Path, ids: Mapping[int, str] | None = None, fmt: str | None = None,
    *, keep_folders: bool = False,
) -> Predictions:
    """Read one caption per image: captions.txt, JSONL, CSV, a JSON list, or a sidecar folder.

    COCO results (`[{"image_id", "caption"}]`) are named through `ids` (see `References.ids`);
    without it an id stays a bare name. Failed or malformed rows go to `problems`. Images are
    keyed by base name, or with `keep_folders` by the name as written (`A/x.jpg` and `B/x.jpg`
    are then two images, as `score` finds them on disk).
    """
    path = Path(path)
    kind, rows = _rows(path, fmt, one_per_line=False)
    predictions = Predictions({}, fmt=kind, source=path)
    first_seen: dict[str, str] = {}
    for row in rows:
        if row.error:
            predictions.problems.append(f"{row.where}: {row.error}")
            continue
        name = row.image if keep_folders else image_key(row.image)
        if row.image_id is not None and ids:
            if row.image_id not in ids:
                predictions.problems.append(
                    f"{row.where}: image_id {row.image_id} is not in the references")
                continue
            name = ids[row.image_id]
        caption = " ".join(row.caption.split())
        if name in predictions.captions:
            if predictions.captions[name] != caption:
                predictions.problems.append(
                    f"{row.where}: a second, different caption for {name} (first at "
                    f"{first_seen[name]}); the first is kept")
            continue
        predictions.captions[name] = caption
        first_seen[name] = row.where
    if not predictions.captions:
        detail = f"; first problem: {predictions.problems[0]}" if predictions.problems else ""
        raise DatasetError(f"{path}: no usable predictions{detail}")
    return predictions


def find_images(refs: References, folder: Path) -> dict[str, Path]:
    """Where each referenced image should be under `folder`: in its dataset subfolder, else directly."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: no such folder")
    paths = {}
    for name in refs.captions:
        nested = folder / refs.folders.get(name, "") / name
        paths[name] = nested if nested.is_file() else folder / name
    if not any(path.is_file() for path in paths.values()):
        raise DatasetError(f"{folder}: none of the {len(paths)} referenced images is here (such as "
                           f"{next(iter(paths))}); --images takes the folder that holds them")
    return paths


@dataclass(frozen=True)
class DatasetLayout:
    """Where a public dataset's caption files and images usually sit under its root."""

    karpathy: str
    native: tuple[str, ...]
    image_folders: tuple[str, ...]
    split_lists: str | None = None


DATASETS: dict[str, DatasetLayout] = {
    "flickr8k": DatasetLayout(
        karpathy="dataset_flickr8k.json",
        native=("Flickr8k.token.txt", "captions.txt"),
        image_folders=("Flicker8k_Dataset", "Flickr8k_Dataset", "Images", "images"),
        split_lists="Flickr_8k.{split}Images.txt",
    ),
    "flickr30k": DatasetLayout(
        karpathy="dataset_flickr30k.json",
        native=("results_20130124.token", "results.csv"),
        image_folders=("flickr30k-images", "flickr30k_images", "Images", "images"),
    ),
    "coco": DatasetLayout(
        karpathy="dataset_coco.json",
        native=("captions_{split}2014.json", "captions_{split}2017.json"),
        image_folders=("{split}2014", "{split}2017", "images"),
    ),
}

# The official Flickr8k lists say "dev" where Karpathy's files say "val".
_LIST_SPLIT = {"val": "dev"}


def _find(root: Path, name: str, depth: int = 3) -> Path | None:
    for directory, subdirectories, files in os.walk(root):
        level = len(Path(directory).relative_to(root).parts)
        if name in files or name in subdirectories:
            return Path(directory) / name
        if level >= depth - 1:
            subdirectories.clear()
        subdirectories.sort()
    return None


def load_dataset(name: str, root: Path, split: str | None = "test") -> References:
    """References for a public dataset under `root`, from Karpathy's split file when present.

    `root.image_paths()` then names every image; a missing image folder is an error, since the
    point is to caption those images.
    """
    root = Path(root)
    split = None if split == "all" else split
    if name not in DATASETS:
        raise OptionError(f"--dataset {name!r}: choose from {', '.join(DATASETS)}")
    if not root.is_dir():
        raise DatasetError(f"{root}: no such folder")
    layout = DATASETS[name]
    karpathy = _find(root, layout.karpathy)
    if karpathy is not None:
        refs = read_references(karpathy, split=split)
    else:
        refs = _load_native(name, root, layout, split)
    _place_images(refs, root, layout, split)
    return refs


def _load_native(name: str, root: Path, layout: DatasetLayout, split: str | None) -> References:
    for pattern in layout.native:
        if split is None and "{split}" in pattern:
            continue
        found = _find(root, pattern.format(split=split))
        if found is None:
            continue
        if split is None or "{split}" in pattern:
            return read_references(found)
        if layout.split_lists:
            split_list = _find(root, layout.split_lists.format(split=_LIST_SPLIT.get(split, split)))
            if split_list is not None:
                return read_references(found, split_file=split_list)
        raise OptionError(f"{found} has no {split!r} split and no split list was found under "
                          f"{root}; add {layout.karpathy} (Karpathy's splits) or use --split all")
    expected = [layout.karpathy, *(p.format(split=split) for p in layout.native
                                   if split or "{split}" not in p)]
    raise DatasetError(f"{root}: none of {', '.join(expected)} found for {name}")


def _place_images(refs: References, root: Path, layout: DatasetLayout, split: str | None) -> None:
    first = next(iter(refs.captions))
    relative = PurePosixPath(refs.folders.get(first, ""), first)
    folders = [f.format(split=split) for f in layout.image_folders if split or "{split}" not in f]
    candidates = [root, *(found for folder in folders if (found := _find(root, folder)))]
    # Kaggle's Flickr30k nests flickr30k_images/flickr30k_images/, so look one level deeper too.
    candidates += [c / c.name for c in candidates[1:]]
    for candidate in candidates:
        if (candidate / relative).is_file():
            refs.root = candidate
            return
    raise DatasetError(f"{root}: no image folder holds {relative} (looked in "
                       f"{', '.join(str(c) for c in candidates)})")
