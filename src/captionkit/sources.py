"""Find input images and decode them safely: the first stage of the pipeline."""

from __future__ import annotations

import codecs
import errno
import fnmatch
import functools
import hashlib
import io
import os
import stat
import sys
import tarfile
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath, PurePosixPath

from PIL import Image, ImageOps, UnidentifiedImageError, features

from captionkit.errors import ImageError, InputError, OptionError

DEFAULT_MAX_PIXELS = 100_000_000  # options.DEFAULT_MAX_PIXELS, the flag's default, equals it (a test checks)

LIST_SUFFIXES = (".txt", ".lst")
WHITE = (255, 255, 255)

# Our own check in `decode` replaces Pillow's global one, which would fire first with its own wording.
Image.MAX_IMAGE_PIXELS = None

_BASE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
# Only formats behind the extensions above are tried: Pillow's rarer plugins (EPS runs Ghostscript)
# are attack surface that a captioning tool has no use for.
_BASE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "TIFF", "BMP")
_HEIF_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"}


def _optional_formats() -> set[str]:
    """Pillow formats that depend on what is installed: HEIF, AVIF."""
    formats: set[str] = set()
    if "avif" in features.modules and features.check_module("avif"):
        formats.add("AVIF")
    try:
        import pillow_heif
    except ImportError:
        return formats
    pillow_heif.register_heif_opener()
    formats.add("HEIF")
    # pillow-heif dropped its AVIF opener once Pillow decoded AVIF itself.
    if "AVIF" not in formats and hasattr(pillow_heif, "register_avif_opener"):
        pillow_heif.register_avif_opener()
        formats.add("AVIF")
    return formats


# HEIC and AVIF files are collected even when they cannot be decoded here, so a folder of iPhone
# photos is listed as failed with what to install instead of looking empty.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(_BASE_EXTENSIONS | {".heic", ".heif", ".avif"})
IMAGE_FORMATS: tuple[str, ...] = _BASE_FORMATS + tuple(sorted(_optional_formats()))


@dataclass(frozen=True)
class ImageRef:
    """One image to caption: where it is and the name it is exported under."""

    path: Path
    name: str


@dataclass(frozen=True)
class Problem:
    """Something found while discovering inputs that cannot be captioned, and why."""

    path: str
    """As `os.fsdecode` gives it, so it names the file even when its bytes are not UTF-8."""
    reason: str


def discover(inputs: Sequence[str], recursive: bool = False, extensions: Iterable[str] | None = None,
             skip_names: Collection[str] = ()) -> tuple[list[ImageRef], list[Problem]]:
    """Expand files, folders, globs, list files and `-` (stdin list) into unique images, in order.

    Raises InputError for an input that does not exist or matches nothing.
    """
    finder = _Finder(recursive, normalise_extensions(extensions), extensions is not None,
                     frozenset(skip_names))
    refs: dict[str, ImageRef] = {}
    sidecars = _sidecars_named(inputs)
    for item in inputs:
        if item in sidecars:
            continue
        try:
            found = finder.expand(os.fspath(item))
        except _Unusable as error:
            raise InputError(f"{printable(item)}: {error}") from None
        for path, name in found:
            path = os.path.abspath(path)
            refs.setdefault(path, ImageRef(Path(path), printable(name)))
    return list(refs.values()), finder.problems


def _sidecars_named(inputs: Sequence[str]) -> set[str]:
    """Inputs that are another input image's companion file: `cat.txt` (or `cat.jpg.txt`, `cat.xmp`)
    beside `cat.jpg`, as a shell glob such as `photos/*` names them. They are not lists of paths
    or images to caption; taken as lists, a caption file's words became failed 'paths'."""
    images = {(os.path.dirname(i), os.path.basename(i)) for i in inputs
              if os.path.splitext(i)[1].lower() in IMAGE_EXTENSIONS}
    stems = images | {(folder, os.path.splitext(name)[0]) for folder, name in images}
    return {i for i in inputs if os.path.splitext(i)[1].lower() not in IMAGE_EXTENSIONS
            and (os.path.dirname(i), os.path.splitext(os.path.basename(i))[0]) in stems}


def check_inputs_exist(inputs: Sequence[str]) -> None:
    """Raise InputError for an input that is no file, folder, glob or `-`, before a model loads."""
    for item in inputs:
        for text in map(os.path.expanduser, _brace_expanded(os.fspath(item))):
            if (text != "-" and not os.path.lexists(text) and not _is_pattern(text)
                    and shard_of(Path(text)) is None):
                raise InputError(f"{printable(text)}: {_absent_reason(text)}")


def _is_pattern(item: str) -> bool:
    return any(char in item for char in "*?[")


def _brace_expanded(item: str) -> list[str]:
    """A shell-style brace list (`shards/{00000..01023}.tar`, `{a,b}/*.jpg`) as the inputs it names,
    in order; anything else, and a path that exists under its literal name, as itself."""
    if "{" not in item or "}" not in item or os.path.lexists(os.path.expanduser(item)):
        return [item]
    try:
        from braceexpand import braceexpand
    except ImportError:
        raise InputError(f"{printable(item)}: brace lists need the braceexpand package: "
                         "pip install 'captionkit[ray]' (or pip install braceexpand)") from None
    return list(braceexpand(item))


def _absent_reason(item: str) -> str:
    return URL_REASON if is_url(item) else "no such file or folder"


def read_bytes(path: Path) -> bytes:
    """The whole file, or the whole member of a tar shard (`shard.tar/key.jpg`); raises ImageError
    with a one-line reason."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise ImageError(printable(path), "not a regular file")
        with open(path, "rb") as file:
            data = file.read()
    except NotADirectoryError as error:
        data = _read_member(path, error)
    except OSError as error:
        raise ImageError(printable(path), _os_reason(error, path)) from None
    if not data:
        raise ImageError(printable(path), "empty file (0 bytes)")
    return data


SHARD_SUFFIX = ".tar"
"""Webdataset shards, as img2dataset writes them (`{key}.jpg` beside `{key}.json` and `{key}.txt`),
are uncompressed tar files. Each image member is read in place and addressed as if the shard were a
folder: `shards/00001.tar/000010123.jpg`, exported as `00001.tar/000010123.jpg`."""


def is_shard(name: str) -> bool:
    return name.lower().endswith(SHARD_SUFFIX)


def shard_of(path: Path) -> tuple[Path, str] | None:
    """(the shard, the member's name in it) when `path` names a member of a tar shard: the nearest
    folder above it that is a regular `.tar` file; None otherwise."""
    for parent in path.parents:
        if not is_shard(parent.name):
            continue
        try:
            if stat.S_ISREG(os.stat(parent).st_mode):
                return parent, path.relative_to(parent).as_posix()
        except OSError:
            continue
    return None


def stat_image(path: Path) -> os.stat_result:
    """`os.stat` of an image, or of the shard a member lives in: a rewritten shard (another size or
    modification time) counts as a change of every member, so a resumed run captions them again."""
    try:
        return os.stat(path)
    except NotADirectoryError:
        found = shard_of(path)
        if found is None:
            raise
        return os.stat(found[0])


def image_exists(path: Path) -> bool:
    """Whether an image is still there: a file, or a member of a shard that still holds it."""
    if os.path.lexists(path):
        return True
    found = shard_of(Path(path))
    try:
        return found is not None and found[1] in shard_index(found[0]).members
    except OSError:
        return False


@dataclass(frozen=True)
class ShardIndex:
    """Where each regular member of a tar shard is: name -> (offset of its data, size)."""

    members: dict[str, tuple[int, int]]
    cut_short: str | None = None
    """Why reading the headers stopped before the end (a truncated or corrupt shard), else None."""


@functools.lru_cache(maxsize=32)
def _shard_index(path: str, size: int, mtime_ns: int) -> ShardIndex:
    """Scan a shard's headers once (size and mtime make a rewritten shard scanned again); a name
    met twice keeps its last copy, as `tar -x` would."""
    members: dict[str, tuple[int, int]] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                name = PurePosixPath(info.name)  # `./key.jpg` is `key.jpg`
                # a member that would resolve outside its shard has no address inside it
                if info.isreg() and not name.is_absolute() and ".." not in name.parts:
                    members.pop(name.as_posix(), None)
                    members[name.as_posix()] = (info.offset_data, info.size)
    except (tarfile.TarError, OSError, EOFError) as error:
        return ShardIndex(members, _one_line(error))
    return ShardIndex(members)


def shard_index(path: str | os.PathLike[str]) -> ShardIndex:
    """The shard's member index, scanned once per shard version and kept for the readers after it."""
    info = os.stat(path)
    return _shard_index(os.fspath(path), info.st_size, info.st_mtime_ns)


def _read_member(path: Path, error: OSError) -> bytes:
    """A tar member's bytes, read at its offset without extracting anything."""
    found = shard_of(Path(path))
    if found is None:
        raise ImageError(printable(path), _os_reason(error, path)) from None
    shard, name = found
    try:
        where = shard_index(shard).members.get(name)
        if where is None:
            raise ImageError(printable(path), f"no member {printable(name)} in tar shard {printable(shard)}")
        offset, size = where
        with open(shard, "rb") as file:
            file.seek(offset)
            data = file.read(size)
    except OSError as err:
        raise ImageError(printable(path), _os_reason(err, shard)) from None
    if len(data) < size:
        raise ImageError(printable(path), "truncated image data (the tar shard ends inside this member)")
    return data


def content_hash(data: bytes) -> str:
    """A 32-hex-character digest of the file's bytes, the key that makes runs resumable."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


FULL_SIZE = "captionkit.full_size"
"""`Image.info` key of a decoded image: its upright size before any draft decoding or reduction."""
ORIGINAL = "captionkit.original"
"""`Image.info` key of a decoded image made smaller than its file: (what it was decoded from, the
target size it was decoded for), so that a model wanting more pixels decodes it again
(`at_least`). Holds the file's bytes, or the PIL image it was given; set where asked for
(`keep_original`), by a model that declares `Captioner.decodes_again`."""


def decode(data: bytes, name: str, target_size: int | None = None,
           max_pixels: int = DEFAULT_MAX_PIXELS, keep_original: bool = False) -> Image.Image:
    """An upright, fully loaded RGB image whose short side stays >= `target_size` when it was.
    `keep_original`: a shrunk image keeps `data` for `at_least` (memory held per queued image).

    Raises ImageError for anything that is not a decodable image within `max_pixels`.
    """
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError(name, f"decompression bomb: {width}x{height} = {width * height} "
                                       f"pixels is over the limit of {max_pixels} "
                                       "(raise it with --max-pixels)")
            if target_size and image.format in ("JPEG", "MPO"):
                # Decodes at 1/2, 1/4 or 1/8 scale in the DCT, never below the requested size.
                image.draft("RGB", (target_size, target_size))
            decoded = _finish(image, target_size)
            return _sized(decoded, (width, height), data if keep_original else None, target_size)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(name, _unidentified_reason(data)) from None
    except Exception as error:  # Pillow's decoders raise many types; all mean a bad file
        raise ImageError(name, _failure_reason(error)) from None


def shrinks(data: bytes, target_size: int | None) -> bool:
    """Whether `decode` with `target_size` gives other pixels than a full decode: only images whose
    short side is at least twice the target are drafted (JPEG) or reduced (any format)."""
    if not target_size:
        return False
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
            return _reduction(image.size, target_size) >= 2
    except Exception:  # noqa: BLE001 - not readable: `decode` says why
        return True


URL_REASON = "a URL: captionkit reads local files; download it first (or pass its bytes in Python)"


def load_image(source: object, target_size: int | None = None, keep_original: bool = False) -> Image.Image:
    """A path, a PIL image, an encoded file's bytes, a binary file object or an RGB array
    (H x W x 3 uint8, as numpy holds it) as an upright RGB image, the way the pipeline sees it."""
    if isinstance(source, str | os.PathLike):
        if is_url(str(source)):
            raise ImageError(str(source), URL_REASON)
        return decode(read_bytes(Path(source)), printable(source), target_size, keep_original=keep_original)
    if isinstance(source, bytes | bytearray | memoryview):
        return decode(bytes(source), "<bytes>", target_size, keep_original=keep_original)
    if hasattr(source, "read"):
        name = printable(getattr(source, "name", "<stream>"))
        if isinstance(source, io.TextIOBase):
            raise ImageError(name, "a file opened as text: open it in binary mode (open(path, 'rb'))")
        return decode(source.read(), name, target_size, keep_original=keep_original)
    if hasattr(source, "__array_interface__") and not isinstance(source, Image.Image):
        source = _array_image(source)
    if not isinstance(source, Image.Image):
        raise TypeError("an image is a path, a PIL image, encoded bytes, a binary file or an "
                        f"H x W x 3 uint8 array, not {type(source).__name__}")
    try:
        decoded = _finish(source, target_size)
    except Exception as error:
        shown = printable(source.filename) if getattr(source, "filename", "") else "<image>"
        raise ImageError(shown, _failure_reason(error)) from None
    return _sized(decoded, source.size, source if keep_original else None, target_size)


def _sized(decoded: Image.Image, stored: tuple[int, int], original: object,
           target_size: int | None) -> Image.Image:
    """`decoded` noting its file's upright size, and, when it is smaller and `original` is given,
    what it came from."""
    decoded.info[FULL_SIZE] = _upright_size(stored, decoded.size)
    if original is not None and decoded.size != decoded.info[FULL_SIZE]:
        decoded.info[ORIGINAL] = (original, target_size)
    return decoded


def at_least(image: Image.Image, target_size: int | None) -> Image.Image:
    """`image` as decoding for `target_size` gives it (None: the full size): itself unless it was
    made smaller for another target, when it is decoded again from its original."""
    original, decoded_for = image.info.get(ORIGINAL, (None, target_size))
    if original is None or decoded_for == target_size:
        return image
    if isinstance(original, Image.Image):
        return load_image(original, target_size)
    # the bytes decoded once already: within the pixel limit
    return decode(original, "<image>", target_size, max_pixels=sys.maxsize)


def is_url(text: str) -> bool:
    return text.lower().startswith(("http://", "https://"))


def _array_image(array) -> Image.Image:
    shape, kind = array.__array_interface__["shape"], array.__array_interface__["typestr"]
    if (kind != "|u1" or not (len(shape) == 2 or (len(shape) == 3 and shape[2] in (3, 4)))
            or 0 in shape[:2]):
        raise ImageError("<array>", f"an array of shape {tuple(shape)} and type {kind}: "
                                    "expected H x W (gray) or H x W x 3/4 (RGB/RGBA) uint8, not empty")
    return Image.fromarray(array)


class _Unusable(Exception):
    """An input that yields nothing: fatal on the command line, a Problem inside a list."""


@dataclass
class _Finder:
    """The state of one `discover` call: what to look for, and the problems met so far."""

    recursive: bool
    extensions: frozenset[str]
    filtered: bool
    skip_names: frozenset[str]
    problems: list[Problem] = field(default_factory=list)

    def expand(self, item: str, relative_to: str = "", listed: bool = False) -> list[tuple[str, str]]:
        """(path, export name) pairs for one input or one line of a list."""
        item = os.path.expanduser(item)
        if item == "-" and not listed:
            return self.list_lines(_read_stdin(), "", "standard input")
        path = os.path.join(relative_to, item)
        if os.path.isdir(path):
            return self.folder(path)
        if os.path.lexists(path):
            return self.file(path, _listed_name(item) if listed else os.path.basename(path), listed)
        expanded = _brace_expanded(item)
        if expanded != [item]:
            return [found for one in expanded for found in self.expand_named(one, relative_to, listed)]
        if _is_pattern(item):
            return self.glob(item, relative_to)
        member = shard_of(Path(os.path.abspath(path)))
        if member is not None:  # one image inside a shard, named as shard.tar/key.jpg
            return [(path, _listed_name(item) if listed else "/".join(
                (os.path.basename(member[0]), member[1])))]
        raise _Unusable(_absent_reason(item))

    def expand_named(self, item: str, relative_to: str, listed: bool) -> list[tuple[str, str]]:
        """`expand` for one of several inputs a brace list names: its errors say which one."""
        try:
            return self.expand(item, relative_to, listed)
        except _Unusable as error:
            raise _Unusable(f"{printable(item)}: {error}") from None

    def file(self, path: str, name: str, listed: bool) -> list[tuple[str, str]]:
        basename = os.path.basename(path)
        if basename in self.skip_names:
            return []
        try:
            mode = os.stat(path).st_mode
        except OSError as error:
            raise _Unusable(_os_reason(error, path)) from None
        if not stat.S_ISREG(mode):
            raise _Unusable("not a regular file")
        if not listed and basename.lower().endswith(LIST_SUFFIXES):
            return self.list_file(path)
        if is_shard(basename):
            return self.shard(path, name)
        # A file named directly is tried whatever its extension, unless the user restricted them.
        if self.filtered and os.path.splitext(basename)[1].lower() not in self.extensions:
            return []
        return [(path, name)]

    def list_file(self, path: str) -> list[tuple[str, str]]:
        try:
            with open(path, "rb") as file:
                text = os.fsdecode(file.read())
        except OSError as error:
            raise _Unusable(_os_reason(error, path)) from None
        return self.list_lines(text, os.path.dirname(path), printable(path))

    def list_lines(self, text: str, folder: str, source: str) -> list[tuple[str, str]]:
        lines = enumerate(text.removeprefix("\ufeff").split("\n"), 1)
        entries = [(number, line.strip()) for number, line in lines
                   if line.strip() and not line.strip().startswith("#")]
        if not entries:
            raise _Unusable("lists no paths")
        found = []
        for number, entry in entries:
            try:
                found += self.expand(entry, folder, listed=True)
            except _Unusable as error:
                where = os.path.abspath(os.path.join(folder, entry))
                self.problems.append(Problem(where, f"{error} (listed in {source} line {number})"))
        return found

    def shard(self, path: str, name: str) -> list[tuple[str, str]]:
        """The image members of a tar shard, in archive order, each as `shard.tar/member`."""
        try:
            index = shard_index(path)
        except OSError as error:
            raise _Unusable(_os_reason(error, path)) from None
        if index.cut_short is not None:
            if not index.members:
                raise _Unusable(f"not a readable tar shard ({index.cut_short}); shards are "
                                "uncompressed .tar files")
            self.problems.append(Problem(path, f"tar shard cut short after {len(index.members)} "
                                               f"members ({index.cut_short}): the rest is left out"))
        found = [(os.path.join(path, member), f"{name}/{member}") for member in index.members
                 if self.wants(PurePath(member).name)]
        if not found and index.cut_short is None:
            raise _Unusable("a tar shard holding no images")
        return found

    def shard_or_problem(self, path: str, name: str) -> list[tuple[str, str]]:
        """A shard a pattern matched: one that cannot be read is a problem, not the end of the run."""
        try:
            return self.shard(path, name)
        except _Unusable as error:
            self.problems.append(Problem(path, str(error)))
            return []

    def folder(self, path: str) -> list[tuple[str, str]]:
        problems_before = len(self.problems)
        found = [(file, "/".join(parts)) for file, parts in self.walk(
            path, lambda parts: self.wants(parts[-1]), lambda parts: self.recursive)]
        if not found and len(self.problems) == problems_before:
            hint = "" if self.recursive else " (subfolders are searched with --recursive)"
            raise _Unusable(f"no images found{hint}")
        return found

    def glob(self, pattern: str, relative_to: str) -> list[tuple[str, str]]:
        parts = PurePath(pattern).parts
        fixed = next(index for index, part in enumerate(parts) if any(c in part for c in "*?["))
        base = os.path.join(relative_to, *parts[:fixed]) if fixed else relative_to or "."
        rest = parts[fixed:]
        if not os.path.isdir(base):
            raise _Unusable("matches no images")
        problems_before = len(self.problems)
        # shards are collected when the pattern names them (`shards/*.tar`), not by `*` alone
        shards = is_shard(rest[-1])
        found = [(file, "/".join(parts)) for file, parts in self.walk(
            base, lambda parts: (self.wants(parts[-1]) or shards and is_shard(parts[-1]))
            and _glob_match(rest, parts),
            lambda parts: _glob_match(rest, parts, partial=True))]
        found = [member for file, name in found for member in
                 (self.shard_or_problem(file, name) if is_shard(file) else [(file, name)])]
        if not found and len(self.problems) == problems_before:
            raise _Unusable("matches no images")
        return found

    def wants(self, name: str) -> bool:
        """Whether a file met inside a folder is an image to caption."""
        return (not name.startswith(".") and name not in self.skip_names
                and os.path.splitext(name)[1].lower() in self.extensions)

    def walk(self, root: str, wanted: Callable[[tuple[str, ...]], bool],
             descend: Callable[[tuple[str, ...]], bool]) -> Iterator[tuple[str, tuple[str, ...]]]:
        """Wanted regular files under `root` in name order, with their path parts below it."""
        yield from self._walk(os.path.abspath(root), (), wanted, descend, frozenset())

    def _walk(self, folder: str, parts: tuple[str, ...], wanted: Callable[[tuple[str, ...]], bool],
              descend: Callable[[tuple[str, ...]], bool],
              ancestors: frozenset[tuple[int, int]]) -> Iterator[tuple[str, tuple[str, ...]]]:
        try:
            identity = _identity(folder)
            if identity in ancestors:
                # A link back to a folder we are inside: following it would never end.
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP))
            with os.scandir(folder) as scan:
                entries = sorted(scan, key=lambda entry: entry.name)
        except OSError as error:
            if not parts:
                raise _Unusable(_os_reason(error, folder)) from None
            self.problems.append(Problem(folder, _os_reason(error, folder)))
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            below = (*parts, entry.name)
            try:
                is_dir, is_file = entry.is_dir(), entry.is_file()
            except OSError:  # a symbolic link loop raises here instead of reading as neither
                is_dir = is_file = False
            if is_dir:
                if descend(below):
                    yield from self._walk(entry.path, below, wanted, descend, ancestors | {identity})
            elif wanted(below):
                if is_file:
                    yield entry.path, below
                else:
                    self.problems.append(Problem(entry.path, _unusable_reason(entry.path)))


def _glob_match(pattern: tuple[str, ...], parts: tuple[str, ...], partial: bool = False) -> bool:
    """Whether `parts` match `pattern` component by component (`**` spans folders).

    With `partial`, whether `parts` could be the start of a match, i.e. worth descending into.
    """
    if not pattern:
        return not parts
    if not parts:
        return partial or all(part == "**" for part in pattern)
    if pattern[0] == "**":
        return _glob_match(pattern[1:], parts, partial) or _glob_match(pattern, parts[1:], partial)
    return fnmatch.fnmatchcase(parts[0], pattern[0]) and _glob_match(pattern[1:], parts[1:], partial)


def _listed_name(entry: str) -> str:
    """A relative list entry keeps its folders, so `a/x.jpg` and `b/x.jpg` export apart."""
    relative = os.path.normpath(entry)
    if os.path.isabs(relative) or relative == os.pardir or relative.startswith(os.pardir + os.sep):
        return os.path.basename(relative)
    return PurePath(relative).as_posix()


def _read_stdin() -> str:
    # Bytes when there are any, so file names that are not UTF-8 survive the round trip.
    buffer = getattr(sys.stdin, "buffer", None)
    return os.fsdecode(buffer.read()) if buffer is not None else sys.stdin.read()


def normalise_extensions(extensions: Iterable[str] | None) -> frozenset[str]:
    """`--ext` as lowercase dotted extensions; every image extension when None."""
    if extensions is None:
        return IMAGE_EXTENSIONS
    if isinstance(extensions, str):
        extensions = [extensions]
    given = list(extensions)
    cleaned = frozenset("." + bare for extension in given
                        if (bare := extension.strip().lstrip(".").lower()))
    if given and not cleaned:
        raise OptionError(f"--ext {','.join(given)!r} names no extension: try --ext jpg,png")
    return cleaned


def _identity(path: str) -> tuple[int, int]:
    info = os.stat(path)
    return info.st_dev, info.st_ino


def _unusable_reason(path: str) -> str:
    """Why a folder entry that is neither a file nor a folder cannot be read."""
    try:
        os.stat(path)
    except OSError as error:
        return _os_reason(error, path)
    return "not a regular file"


def _os_reason(error: OSError, path: str | Path) -> str:
    if isinstance(error, FileNotFoundError):
        return "broken symbolic link" if os.path.islink(path) else "file not found"
    if isinstance(error, PermissionError):
        return "permission denied"
    if error.errno == errno.ELOOP:
        return "symbolic link loop"
    if isinstance(error, IsADirectoryError):
        return "is a folder"
    return _one_line(error.strerror or error)


def printable(path: str | os.PathLike[str]) -> str:
    """Valid UTF-8 for messages and export names; undecodable bytes become U+FFFD."""
    return os.fsencode(path).decode("utf-8", "replace")


def exact_text(path: str | os.PathLike[str]) -> str:
    """Valid UTF-8 that still tells a file's name byte for byte: each byte that is not UTF-8
    becomes `\\xNN` (Python's backslashreplace), so `x\\xfe.jpg` and `x\\xff.jpg` stay apart."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _finish(image: Image.Image, target_size: int | None) -> Image.Image:
    """Load, turn upright, convert to RGB and shrink; the result shares nothing with `image`."""
    image.load()
    rgb = _to_rgb(_upright(image))
    factor = _reduction(rgb.size, target_size)
    # An integer box reduction keeps the short side >= target_size and is far cheaper than resizing.
    return rgb.reduce(factor) if factor >= 2 else rgb


def _reduction(size: tuple[int, int], target_size: int | None) -> int:
    """The integer factor an image of `size` shrinks by toward `target_size` (under 2: not at all)."""
    return min(size) // target_size if target_size else 1


def _upright_size(stored: tuple[int, int], decoded: tuple[int, int]) -> tuple[int, int]:
    """The full upright size of an image stored as `stored`, decoded (turned, maybe shrunk) as
    `decoded`: turned by a quarter when the decoded shape says so. Boxes found on a shrunk image
    are scaled back to this size."""
    width, height = stored
    ratio = decoded[0] / decoded[1]
    turned = abs(ratio - height / width) < abs(ratio - width / height)
    return (height, width) if turned else (width, height)


def _upright(image: Image.Image) -> Image.Image:
    """A new image turned by its EXIF orientation."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # a malformed EXIF block should cost the orientation, not the picture
        return image.copy()


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with high-bit-depth scaled (not clipped) and transparency composited on white."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        return _to_8bit(image).convert("RGB")
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", image.size, WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image if image.mode == "RGB" else image.convert("RGB")


def _to_8bit(image: Image.Image) -> Image.Image:
    """Greyscale "L" from 16-bit, 32-bit integer or float pixels.

    16-bit maps 0..65535, integers that fit 0..65535 likewise, floats that fit 0..1 map 0..1;
    anything else is stretched from its own minimum to maximum.
    """
    nominal = 1.0 if image.mode == "F" else 65535
    if image.mode.startswith("I;16"):
        image, low, high = image.convert("I"), 0, nominal
    else:
        low, high = image.getextrema()
        if low >= 0 and high <= nominal:
            low, high = 0, nominal
    scale = 255 / (high - low) if high > low else 0.0
    return image.point(lambda value: value * scale - low * scale).convert("L")


def _unidentified_reason(data: bytes) -> str:
    head = data[:512]
    if head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS and "HEIF" not in IMAGE_FORMATS:
        return "unsupported format (HEIC/HEIF needs pillow-heif: pip install 'captionkit[heif]')"
    if head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis") and "AVIF" not in IMAGE_FORMATS:
        return "unsupported format (AVIF needs Pillow built with libavif, or pillow-heif)"
    if not head:
        return "not an image (no data)"
    try:
        # Incremental, so a character cut in two at the end of `head` is not an error.
        text = codecs.getincrementaldecoder("utf-8")().decode(head)
    except UnicodeDecodeError:
        text = ""
    if text and all(char.isprintable() or char in "\t\n\r\f" for char in text):
        return "not an image (looks like text)"
    return "not an image (unrecognised format)"


def _failure_reason(error: Exception) -> str:
    if isinstance(error, EOFError) or "truncated" in str(error).lower():
        return "truncated image data"
    return f"corrupt image data ({_one_line(error)})"


def _one_line(error: object) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 120 else text[:117] + "..."
