"""Write results as captions.txt, per-image sidecars, JSONL or CSV; every write is atomic."""

from __future__ import annotations

import csv
import importlib
import io
import json
import os
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePath, PurePosixPath

from captionkit.errors import OptionError, OutputError
from captionkit.predictions import regions_to_json
from captionkit.sources import IMAGE_EXTENSIONS, exact_text, image_exists, printable
from captionkit.store import DB_NAME, RecordedCaptions, Result, Store


@dataclass(frozen=True)
class ExportOptions:
    """Where outputs go and how sidecars are named."""

    output_dir: Path
    caption_extension: str = ".txt"
    sidecars_beside_images: bool = False
    keep_failed: bool = False
    """Keep images that failed the quality gate (`passed` false) in captions.txt and sidecars."""
    ours: RecordedCaptions | None = None
    """Every caption captionkit has recorded per image. When given, an existing caption file
    holding anything else (a hand-written caption) is kept, not replaced."""
    missing: frozenset[Path] = frozenset()
    """Images captioned earlier that are no longer on disk: left out of captions.txt and caption files."""
    prefix: str = ""
    """Text put before every exported caption (a LoRA trigger word: `ohwx, `); the store keeps the
    model's caption as it was."""
    suffix: str = ""
    parquet_rows: int = 100_000
    """Rows per Parquet file (`captions-00000.parquet`, ...): big runs write several."""
    label_maps: Mapping[str, Sequence[str]] | None = None
    """The segmenters' label-map classes by region kind, as the run recorded them
    (`Captioner.label_maps`); None: the labels found (`segment.labelmaps.classes_by_kind`)."""

    def __post_init__(self) -> None:
        if self.parquet_rows < 1:
            raise OptionError(f"parquet rows per file must be at least 1, not {self.parquet_rows}")
        extension = self.caption_extension
        if not extension.startswith(".") or extension == ".":
            raise OptionError(f"--caption-extension {extension!r} must start with '.', like .txt")
        unusable = [char for char in ("/", "\\", "\0") if char in extension]
        if unusable:
            raise OptionError(f"--caption-extension {extension!r} is not a file extension (it holds "
                              f"{unusable[0]!r}): use a plain one like .caption")
        # a.txt.jpg is an image too: --beside-images would turn it into a.jpg's caption file
        if "." + extension.rsplit(".", 1)[1].lower() in IMAGE_EXTENSIONS:
            raise OptionError(f"--caption-extension {extension!r} ends in an image extension: caption "
                              "files would overwrite images")

    def decorate(self, caption: str | None) -> str | None:
        """The caption as exported: with the prefix and suffix; None stays None (a failure)."""
        return None if caption is None else f"{self.prefix}{caption}{self.suffix}"

    def line(self, result: Result) -> str:
        """The result's caption as one line of a caption file or captions.txt."""
        return _one_line(self.decorate(result.caption) or "")


def make_output_dir(path: Path) -> None:
    """Create a folder for outputs, or say in one line why it cannot be (a file in the way, say)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError as err:
        raise OptionError(f"{path}: cannot create this output folder: {err.filename} is a file") from err
    except OSError as err:
        raise OptionError(f"{path}: cannot create this output folder: {err.strerror}") from err


def check_output_dir(path: Path) -> None:
    """Fail now, creating nothing, if `path` cannot become an output folder (a file in the way)."""
    existing = Path(path).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OptionError(f"{path}: cannot create this output folder: {existing} is a file")


def atomic_write(path: Path, text: str) -> None:
    """Write through a temporary file and rename, so readers never see half a file."""
    atomic_output(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8", newline=""))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _one_line(text: str) -> str:
    return " ".join(text.split())


def listed(result: Result, options: ExportOptions) -> bool:
    """Whether a result goes into captions.txt and sidecars: captioned, still on disk, and not held
    back by the gate."""
    return (result.status == "done" and (options.keep_failed or result.extras.get("passed", True))
            and result.path not in options.missing)


def missing_images(results: Sequence[Result], found: Collection[Path] = (),
                   copies_in: Sequence[Path | None] = ()) -> frozenset[Path]:
    """The captioned images no longer on disk anywhere captionkit knows. `found` (this run's images)
    are not looked at, and an image with a file under its name in one of `copies_in` (its
    `--copy-images` copy in the output folder, or the failed folder it was moved into) is not
    missing: that file may be the only one left."""
    found = set(found)
    folders = [folder for folder in copies_in if folder is not None]
    return frozenset(result.path for result in results if result.status == "done"
                     and result.path not in found and not image_exists(result.path)
                     and not any((folder / relative_path(result)).exists() for folder in folders))


def with_existing_files(results: Sequence[Result], formats: Collection[str], options: ExportOptions,
                        store: Store, overwrite: bool = False, found: Collection[Path] = (),
                        copies_in: Sequence[Path | None] = ()) -> ExportOptions:
    """`options` told what is already on disk: the images captioned earlier and gone since (see
    `missing_images`) and, for caption files unless `overwrite`, the store's captions, so that a
    file holding none of them (written by hand) is kept."""
    ours = store.recorded_captions() if "txt" in formats and not overwrite else None
    return replace(options, missing=missing_images(results, found, copies_in), ours=ours)


_NAME_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r"}


def captions_txt_line(name: str, caption: str) -> str:
    """One `image.jpg: caption` line. A name with a line break, backslash or `: ` is escaped (`\\n`,
    `\\\\`, `\\: `) and the line starts with a backslash, as `sha256sum` does, so every name reads
    back exactly."""
    escaped = "".join(_NAME_ESCAPES.get(char, char) for char in name).replace(": ", "\\: ")
    prefix = "" if escaped == name else "\\"
    return f"{prefix}{escaped}: {_one_line(caption)}\n"


def parse_captions_txt_line(line: str) -> tuple[str, str]:
    """The (name, caption) of a captions.txt line; an empty name when it has no `: `. On a line
    starting with a backslash the name ends at the first `: ` that is not escaped."""
    if not line.startswith("\\"):
        name, separator, caption = line.partition(": ")
        return (name, caption) if separator else ("", "")
    match = re.match(r"\\((?:\\.|:(?! )|[^\\:])*): ", line, re.S)
    if not match:
        return "", ""
    name = re.sub(r"\\(.)", lambda m: {"n": "\n", "r": "\r"}.get(m[1], m[1]), match[1], flags=re.S)
    return name, line[match.end():]


def write_captions_txt(results: Sequence[Result], options: ExportOptions) -> list[Path]:
    """`image.jpg: caption` lines, the format of the BLIP-2 folder scripts."""
    lines = [captions_txt_line(r.name, options.line(r)) for r in results if listed(r, options)]
    path = options.output_dir / "captions.txt"
    atomic_write(path, "".join(lines))
    return [path]


def sidecar_path(result: Result, options: ExportOptions, full_name: bool = False) -> Path:
    """`photo.txt` beside `photo.jpg`, or mirrored under the output folder; `photo.jpg.txt` with
    `full_name` (for images whose names differ only in their extension) and where `photo.txt` would
    take the name of one of captionkit's own files (`captions.jpg` gets `captions.jpg.txt`)."""
    extension = options.caption_extension
    image = result.path if options.sidecars_beside_images else options.output_dir / relative_path(result)
    path = image.with_suffix(extension)
    return image.with_name(image.name + extension) if full_name or _reserved(path) else path


def _reserved(path: Path) -> bool:
    """Whether a caption file at `path` would take the name of one of captionkit's own files."""
    # any folder, not only the output folder: an image folder may be one (or become one, for
    # `export --to`), and the readers of caption folders skip these names wherever they are;
    # any case, since on macOS and Windows `Captions.txt` is captions.txt
    return path.name.lower() in RESERVED_NAMES


def distinct_names(results: Sequence[Result]) -> list[Result]:
    """The results with names that two images share (`x.jpg` from two input folders, or from two
    runs into one output folder) lengthened by their folders until they differ: `A/x.jpg`, `B/x.jpg`.
    Names that are already unique stay as they are."""
    groups: dict[str, list[int]] = {}
    for index, result in enumerate(results):
        groups.setdefault(result.name, []).append(index)
    renamed = list(results)
    for name, indices in groups.items():
        if len(indices) < 2:
            continue
        longer = _lengthened(name, [results[i].path for i in indices])
        for index, new in zip(indices, longer, strict=True):
            renamed[index] = replace(results[index], name=new)
    if all(len(indices) < 2 for indices in groups.values()):
        return renamed
    return sorted(renamed, key=lambda result: (result.name, os.fsencode(result.path)))  # as the store orders


def _lengthened(name: str, paths: Sequence[Path]) -> list[str]:
    r"""`name` for each of `paths` with the fewest of its folders in front that tell them all apart,
    printable as names are (a byte that is not UTF-8 shows as U+FFFD). Paths that differ only in
    such bytes (`x\xfe.jpg`, `x\xff.jpg`) are told apart by those bytes spelt out as `\xfe`, as in
    `exact_text`; failing all that, the whole paths are, spelt out so."""
    for shown, fewest in ((printable, 1), (exact_text, 0)):
        parts = [_folders_and_name(path, name, shown) for path in paths]
        for depth in range(fewest, max(len(folders) for folders, _ in parts) + 1):
            longer = ["/".join(folders[max(len(folders) - depth, 0):] + own) for folders, own in parts]
            if len(set(longer)) == len(longer):
                return longer
    return ["/".join(map(exact_text, PurePath(path).parts[1:])) for path in paths]


def _folders_and_name(path: Path, name: str,
                      shown: Callable[[str], str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """A path's parts split into the folders above the name's own parts and those parts, each
    `shown`. A name that is the whole path (a file found unusable) is one part; other names that
    the path does not end in stay as they are."""
    if printable(path) == name:
        return (), (shown(path),)
    parts, tail = PurePath(path).parts[1:], PurePosixPath(name).parts
    if tuple(map(printable, parts[-len(tail):])) == tail:
        return tuple(map(shown, parts[:-len(tail)])), tuple(map(shown, parts[-len(tail):]))
    return tuple(map(shown, parts[:-1])), tail


def relative_path(result: Result) -> Path:
    """The result's export name as a path that stays inside the folder it is joined to (its caption
    file's, its copy's), spelt with the image's own bytes where the name shows them printably: a
    caption file and copy of `y` + byte 0xFE + `.jpg` keep that byte, not the name's U+FFFD."""
    relative = PurePosixPath(result.name)
    if relative.is_absolute() or ".." in relative.parts:
        relative = PurePosixPath(relative.name)
    own = result.path.parts[-len(relative.parts):]
    if any(tuple(map(shown, own)) == relative.parts for shown in (printable, exact_text)):
        return Path(*own)
    return Path(*relative.parts)


def write_sidecars(results: Sequence[Result], options: ExportOptions) -> list[Path]:
    """One caption file per image (the convention of LoRA dataset tools). Images that would share
    one (`a.jpg`, `a.png`) each get theirs under the full name (`a.jpg.txt`, `a.png.txt`); files
    that `foreign_sidecars` finds are left as they are. Each existing file is read once."""
    targets = _sidecars(results, options)
    written = []
    for result, path in targets:
        existing = _read_text(path)
        if _foreign(existing, result, options):
            continue  # written by hand, or edited since: kept
        if _write_caption_file(result, options, path, existing):
            written.append(path)
    _withdraw_sidecars(results, options, keep={path for _, path in targets})
    return written


def _withdraw_sidecars(results: Sequence[Result], options: ExportOptions, keep: set[Path]) -> None:
    """Remove the caption files an earlier run wrote for images the quality gate now holds back, so
    a dataset folder never pairs an image with a caption that failed, and those left beside images
    deleted since; other files stay. Under the output folder, a missing image's caption file stays:
    it may be the only record outside the store that the user keeps."""
    for result in results:
        if result.status != "done" or listed(result, options):
            continue
        if result.path in options.missing and not options.sidecars_beside_images:
            continue
        for path in {sidecar_path(result, options), sidecar_path(result, options, full_name=True)} - keep:
            existing = _read_text(path)
            if existing is not None and _is_ours(existing, result, options):
                path.unlink(missing_ok=True)


def foreign_sidecars(results: Sequence[Result], options: ExportOptions) -> list[Path]:
    """Existing caption files that hold none of the captions captionkit recorded for their image:
    written by hand or by another tool. Empty when `options.ours` is None."""
    if options.ours is None:
        return []
    return [path for result, path in _sidecars(results, options)
            if _foreign(_read_text(path), result, options)]


def _foreign(text: str | None, result: Result, options: ExportOptions) -> bool:
    """Whether an existing caption file's text (None: no file) is someone else's, to be kept."""
    return text is not None and options.ours is not None and not _is_ours(text, result, options)


def _read_text(path: Path) -> str | None:
    """A caption file's text exactly as stored; None when there is none (or it cannot be read)."""
    try:
        return path.read_bytes().decode("utf-8", "replace")
    except OSError:
        return None


def _is_ours(text: str, result: Result, options: ExportOptions) -> bool:
    """Whether a caption file's text is one of captionkit's captions for the result's image."""
    return (_one_line(text) == options.line(result)
            or (options.ours is not None and options.ours.include(result.path, text)))


def _sidecars(results: Sequence[Result], options: ExportOptions) -> list[tuple[Result, Path]]:
    """(result, its caption file) for every listed result."""
    chosen = [(result, sidecar_path(result, options)) for result in results if listed(result, options)]
    users = Counter(path for _, path in chosen)
    return [(result, sidecar_path(result, options, full_name=True) if users[path] > 1 else path)
            for result, path in chosen]


def write_sidecar(result: Result, options: ExportOptions, path: Path | None = None) -> Path | None:
    """The result's caption file (`path`, else its usual one), written atomically unless it already
    holds exactly that (a resumed run rewrites nothing, and modification times stay); returns it,
    or None when it was left as it was."""
    path = path or sidecar_path(result, options)
    return path if _write_caption_file(result, options, path, _read_text(path)) else None


def _write_caption_file(result: Result, options: ExportOptions, path: Path, existing: str | None) -> bool:
    """Write the caption file unless `existing` (its text now) is already the same; True if written."""
    text = options.line(result) + "\n"
    if existing == text:
        return False
    if existing is not None and result.path.exists() and path.samefile(result.path):
        raise OutputError(f"{path}: the caption file would replace the image itself; pick another "
                          "--caption-extension")
    if _reserved(path):  # only an image with no extension, named directly, gets here
        raise OutputError(f"{path}: the caption file of {result.name} would replace captionkit's own "
                          "file; give the image an extension")
    atomic_write(path, text)
    return True


def record_of(result: Result, options: ExportOptions) -> dict:
    """What the record formats (JSONL, CSV, Parquet, webdataset) say of one result."""
    record = {"image": result.name, "path": exact_text(result.path), "status": result.status,
              "caption": options.decorate(result.caption), "model": result.model_id, "hash": result.hash,
              "seconds": result.seconds, "error": result.error}
    record.update(result.extras)
    if result.regions:
        record["regions"] = regions_to_json(result.regions)
    return record


def write_jsonl(results: Sequence[Result], options: ExportOptions,
                name: str = "captions.jsonl") -> list[Path]:
    """Every field of every result, failures included, one JSON object per line."""
    lines = [json.dumps(record_of(r, options), ensure_ascii=False, default=str) + "\n" for r in results]
    path = options.output_dir / name
    atomic_write(path, "".join(lines).encode("utf-8", "replace").decode("utf-8"))
    return [path]


CSV_COLUMNS = ["image", "caption", "status", "error", "model", "hash", "seconds", "path"]


def write_csv(results: Sequence[Result], options: ExportOptions,
              name: str = "captions.csv") -> list[Path]:
    """A spreadsheet-friendly table; extras that are plain numbers get their own columns."""
    records = [record_of(r, options) for r in results]
    extra_columns = sorted({key for record in records for key, value in record.items()
                            if key not in CSV_COLUMNS and isinstance(value, int | float | str)})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS + extra_columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(records)
    path = options.output_dir / name
    atomic_write(path, buffer.getvalue().encode("utf-8", "replace").decode("utf-8"))
    return [path]


PARQUET_NAME = re.compile(r"captions-(\d{5,})\.parquet")
PARQUET_COLUMNS = {"image": "string", "path": "string", "status": "string", "caption": "string",
                   "model": "string", "hash": "string", "seconds": "float64", "error": "string",
                   "regions": "string"}
"""Every Parquet file's first columns; the results' extras follow (see `_parquet_type`)."""


def write_parquet(results: Sequence[Result], options: ExportOptions) -> list[Path]:
    """The JSONL records as Parquet files of `options.parquet_rows` rows each, all with one schema:
    regions, and extras that are lists or objects, as JSON strings; files left from a bigger
    export before are removed."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise OptionError("--format parquet needs pyarrow: pip install 'captionkit[ray]' "
                          "(or pip install pyarrow)") from None
    records = [record_of(r, options) for r in results]
    extras = sorted({key for record in records for key in record if key not in PARQUET_COLUMNS})
    types = {**PARQUET_COLUMNS, **{key: _parquet_type([r.get(key) for r in records]) for key in extras}}
    schema = pa.schema([(name, getattr(pa, kind)()) for name, kind in types.items()])
    rows = [{name: _parquet_value(record.get(name), kind) for name, kind in types.items()}
            for record in records]
    written = []
    for number, start in enumerate(range(0, max(len(rows), 1), options.parquet_rows)):
        path = options.output_dir / f"captions-{number:05d}.parquet"
        table = pa.Table.from_pylist(rows[start:start + options.parquet_rows], schema=schema)
        atomic_output(path, lambda tmp, table=table: pq.write_table(table, tmp))
        written.append(path)
    for stale in options.output_dir.glob("captions-*.parquet"):
        if PARQUET_NAME.fullmatch(stale.name) and stale not in written:
            stale.unlink()
    return written


def _parquet_type(values: list) -> str:
    """The column type of one extra: bool, int64, float64 or string; lists, objects and mixed
    values are JSON strings."""
    present = [value for value in values if value is not None]
    if present and all(isinstance(value, bool) for value in present):
        return "bool_"
    if present and all(isinstance(value, int) and not isinstance(value, bool) for value in present):
        return "int64"
    if present and all(isinstance(value, int | float) and not isinstance(value, bool) for value in present):
        return "float64"
    return "string"


def _parquet_value(value: object, kind: str) -> object:
    if value is None or kind != "string" or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


def atomic_output(path: Path, write: Callable[[str], object]) -> None:
    """Let `write` make the file under a temporary name in its folder, then rename it into place."""
    make_output_dir(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise OutputError(f"{path}: cannot write: {error.strerror}") from error
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise OutputError(f"{path}: cannot write: {error.strerror}") from error
        raise


EXPORTERS: dict[str, Callable[[Sequence[Result], ExportOptions], list[Path]] | str] = {
    "captions.txt": write_captions_txt,
    "txt": write_sidecars,
    "jsonl": write_jsonl,
    "csv": write_csv,
    "parquet": write_parquet,
    "webdataset": "captionkit.webdataset:write_shards",
    # the segmentation formats, imported when asked for (they need the [seg] extra)
    "coco": "captionkit.segment.export:write_coco",
    "masks": "captionkit.segment.export:write_masks",
}

NOTHING_WRITTEN: dict[str, str] = {"webdataset": "captionkit.webdataset:why_nothing_written"}
"""Formats that may write nothing for captioned images, each with the function saying why for a
run's captioned results (None: it writes something)."""

ALL_FORMATS = ("captions.txt", "txt", "jsonl", "csv")
"""What `--format all` writes: every caption format that needs no optional package (parquet needs
pyarrow; coco and masks, the segmentation formats, need the [seg] extra)."""


OUTPUT_NAMES = frozenset({"captions.txt", "captions.jsonl", "captions.csv"})
RESERVED_NAMES = OUTPUT_NAMES | {DB_NAME + companion for companion in ("", "-wal", "-shm", "-journal")}
"""The names of captionkit's own files in an output folder (SQLite's beside its store), which no
caption file takes."""


def _writer(name: str) -> Callable[[Sequence[Result], ExportOptions], list[Path]]:
    """The writer of format `name`, importing it first when it is named by its module."""
    target = EXPORTERS[name]
    return target if callable(target) else _imported(target)


def _imported(target: str) -> Callable:
    """The function `module:name` names."""
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def parse_formats(spec: str) -> list[str]:
    """`captions.txt,jsonl` or `all` to a list of exporter names."""
    names = list(dict.fromkeys(part.strip() for part in spec.split(",") if part.strip()))  # once each
    if "all" in names:
        return list(ALL_FORMATS)
    unknown = [name for name in names if name not in EXPORTERS]
    if unknown or not names:
        raise OptionError(f"--format {spec!r}: choose from {', '.join(EXPORTERS)} or all")
    return names


def nothing_to_write(results: Sequence[Result], formats: Sequence[str]) -> list[str]:
    """Why a format asked for writes no file although images were captioned, one line per such
    format (`NOTHING_WRITTEN`: webdataset answers tar shards, so plain files give it nothing)."""
    done = [result for result in results if result.status == "done"]
    asked = [name for name in dict.fromkeys(formats) if name in NOTHING_WRITTEN] if done else []
    reasons = {name: _imported(NOTHING_WRITTEN[name])(done) for name in asked}
    return [f"{name}: nothing written, since {why}" for name, why in reasons.items() if why]


def export(results: Sequence[Result], formats: Sequence[str], options: ExportOptions) -> list[Path]:
    """Write each requested format once; returns the files written."""
    written: list[Path] = []
    for name in dict.fromkeys(formats):
        written.extend(_writer(name)(results, options))
    return written
