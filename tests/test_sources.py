"""Finding inputs and decoding images, on real files built from scikit-image's sample photos."""

from __future__ import annotations

import io
import os
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data as samples

from captionkit.errors import ImageError, InputError, OptionError
from captionkit.sources import (
    DEFAULT_MAX_PIXELS,
    FULL_SIZE,
    IMAGE_EXTENSIONS,
    IMAGE_FORMATS,
    ORIGINAL,
    ImageRef,
    Problem,
    at_least,
    content_hash,
    decode,
    discover,
    load_image,
    read_bytes,
    shrinks,
)


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return Image.fromarray(samples.astronaut())


@pytest.fixture(scope="module")
def cat() -> Image.Image:
    return Image.fromarray(samples.chelsea())


@pytest.fixture(scope="module")
def jpeg(cat: Image.Image) -> bytes:
    return encode(cat, "JPEG", quality=90)


def write(path: Path, content: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def names(refs: list[ImageRef]) -> list[str]:
    return [ref.name for ref in refs]


def reason_of(data: bytes, **kwargs) -> str:
    with pytest.raises(ImageError) as caught:
        decode(data, "x", **kwargs)
    return caught.value.reason


# --- discover ----------------------------------------------------------------------------------

@pytest.fixture
def album(tmp_path: Path, jpeg: bytes) -> Path:
    folder = tmp_path / "photos"
    for relative in ("b.jpg", "a.JPG", "c.png", "notes.md", ".hidden.jpg", ".git/d.jpg",
                     "sub/e.jpg", "sub/deeper/f.webp"):
        write(folder / relative, jpeg)
    return folder


def test_folder_lists_top_level_images_by_name_skipping_hidden(album: Path) -> None:
    refs, problems = discover([str(album)])
    assert names(refs) == ["a.JPG", "b.jpg", "c.png"]
    assert problems == []
    assert refs[0].path == album / "a.JPG" and refs[0].path.is_absolute()


def test_recursive_folder_goes_down_in_name_order(album: Path) -> None:
    refs, _ = discover([str(album)], recursive=True)
    assert names(refs) == ["a.JPG", "b.jpg", "c.png", "sub/deeper/f.webp", "sub/e.jpg"]


def test_file_given_directly_uses_its_bare_name(album: Path) -> None:
    refs, _ = discover([str(album / "sub" / "e.jpg")])
    assert refs == [ImageRef(album / "sub" / "e.jpg", "e.jpg")]


def test_relative_inputs_become_absolute_without_resolving_links(
        album: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (album.parent / "alias").symlink_to(album)
    monkeypatch.chdir(album.parent)
    refs, _ = discover(["alias/b.jpg"])
    assert refs[0].path == album.parent / "alias" / "b.jpg"


def test_glob_honours_double_star_and_names_below_its_fixed_part(album: Path) -> None:
    refs, _ = discover([f"{album}/**/*.jpg"])
    assert names(refs) == ["b.jpg", "sub/e.jpg"]
    refs, _ = discover([f"{album}/*.*"])
    assert names(refs) == ["a.JPG", "b.jpg", "c.png"]


def test_glob_matching_nothing_is_an_input_error(album: Path) -> None:
    with pytest.raises(InputError, match=r"\*\.gif"):
        discover([f"{album}/*.gif"])


def test_list_file_reads_paths_relative_to_itself(album: Path, tmp_path: Path) -> None:
    listing = write(tmp_path / "lists" / "todo.txt",
                    b"# chosen pictures\n\n../photos/b.jpg\r\n  sub/x.jpg  \n"
                    + str(album / "sub" / "e.jpg").encode() + b"\n")
    write(tmp_path / "lists" / "sub" / "x.jpg", b"jpeg")
    refs, problems = discover([str(listing)])
    assert names(refs) == ["b.jpg", "sub/x.jpg", "e.jpg"]
    assert refs[1].path == tmp_path / "lists" / "sub" / "x.jpg"
    assert problems == []


def test_missing_entry_in_a_list_is_a_problem_not_fatal(tmp_path: Path, jpeg: bytes) -> None:
    write(tmp_path / "a.jpg", jpeg)
    listing = write(tmp_path / "todo.lst", b"a.jpg\ngone.jpg\n")
    refs, problems = discover([str(listing)])
    assert names(refs) == ["a.jpg"]
    assert problems == [Problem(str(tmp_path / "gone.jpg"),
                                f"no such file or folder (listed in {listing} line 2)")]


def test_empty_list_is_an_input_error(tmp_path: Path) -> None:
    listing = write(tmp_path / "todo.txt", b"# nothing yet\n\n")
    with pytest.raises(InputError, match="lists no paths"):
        discover([str(listing)])


def test_dash_reads_the_list_from_stdin(album: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(album)
    monkeypatch.setattr(sys, "stdin", io.StringIO("b.jpg\n# skipped\n\n./sub/e.jpg\n"))
    refs, _ = discover(["-"])
    assert names(refs) == ["b.jpg", "sub/e.jpg"]
    assert refs[1].path == album / "sub" / "e.jpg"


def test_extensions_filter_ignores_case_and_dots(album: Path) -> None:
    assert names(discover([str(album)], extensions=["JPG"])[0]) == ["a.JPG", "b.jpg"]
    with pytest.raises(OptionError, match="--ext ',,' names no extension"):
        discover([str(album)], extensions=["", "", ""])
    assert names(discover([str(album)], extensions=[".png"])[0]) == ["c.png"]
    assert discover([str(album / "c.png")], extensions=["jpg"])[0] == []


def test_skip_names_hides_the_pipelines_own_outputs(album: Path) -> None:
    refs, _ = discover([str(album)], skip_names={"b.jpg", "captions.txt"})
    assert names(refs) == ["a.JPG", "c.png"]


def test_same_path_twice_is_listed_once(album: Path) -> None:
    refs, _ = discover([str(album / "b.jpg"), str(album), f"{album}/b.*"])
    assert names(refs) == ["b.jpg", "a.JPG", "c.png"]


@pytest.mark.parametrize(("kind", "reason"), [("missing", "no such file or folder"),
                                              ("empty folder", "no images found")])
def test_input_that_yields_nothing_is_an_input_error(tmp_path: Path, kind: str,
                                                     reason: str) -> None:
    target = tmp_path / "input"
    if kind == "empty folder":
        target.mkdir()
    with pytest.raises(InputError, match=f"^{target}: {reason}"):
        discover([str(target)])


def test_a_url_is_refused_by_name(tmp_path: Path, jpeg: bytes) -> None:
    with pytest.raises(InputError, match="^https://example.com/a.jpg: a URL: captionkit reads local"):
        discover(["https://example.com/a.jpg"])
    listing = write(tmp_path / "todo.txt", b"http://example.com/b.jpg\n")
    write(tmp_path / "a.jpg", jpeg)
    _, problems = discover([str(listing), str(tmp_path / "a.jpg")])
    assert problems[0].reason.startswith("a URL: captionkit reads local files")


def test_broken_links_and_link_loops_in_folders_are_problems(album: Path) -> None:
    (album / "broken.jpg").symlink_to(album / "gone.jpg")
    (album / "loop1.jpg").symlink_to(album / "loop2.jpg")
    (album / "loop2.jpg").symlink_to(album / "loop1.jpg")
    (album / "link.jpg").symlink_to(album / "b.jpg")
    refs, problems = discover([str(album)])
    assert names(refs) == ["a.JPG", "b.jpg", "c.png", "link.jpg"]
    assert problems == [Problem(str(album / "broken.jpg"), "broken symbolic link"),
                        Problem(str(album / "loop1.jpg"), "symbolic link loop"),
                        Problem(str(album / "loop2.jpg"), "symbolic link loop")]


def test_directory_link_cycle_is_reported_and_not_followed(album: Path) -> None:
    (album / "sub" / "up").symlink_to(album)
    (album / "elsewhere").symlink_to(album / "sub" / "deeper")
    refs, problems = discover([str(album)], recursive=True)
    assert "elsewhere/f.webp" in names(refs)
    assert problems == [Problem(str(album / "sub" / "up"), "symbolic link loop")]


def test_broken_link_given_directly_is_an_input_error(tmp_path: Path) -> None:
    (tmp_path / "broken.jpg").symlink_to(tmp_path / "gone.jpg")
    with pytest.raises(InputError, match="broken symbolic link"):
        discover([str(tmp_path / "broken.jpg")])


def test_non_utf8_file_name_is_found_and_decoded(tmp_path: Path, jpeg: bytes) -> None:
    path = write(tmp_path / os.fsdecode(b"caf\xe9.jpg"), jpeg)
    refs, _ = discover([str(tmp_path)])
    assert refs[0].name == "caf\ufffd.jpg"
    assert os.fsencode(refs[0].path) == os.fsencode(path)
    assert decode(read_bytes(refs[0].path), refs[0].name).size == (451, 300)


# --- read_bytes --------------------------------------------------------------------------------

def test_read_bytes_and_content_hash(tmp_path: Path, jpeg: bytes) -> None:
    data = read_bytes(write(tmp_path / "a.jpg", jpeg))
    assert data == jpeg
    assert content_hash(data) == content_hash(jpeg)
    assert len(content_hash(data)) == 32 and content_hash(data) != content_hash(b"other")


def test_empty_file(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"empty file \(0 bytes\)"):
        read_bytes(write(tmp_path / "a.jpg", b""))


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read anything")
def test_unreadable_file(tmp_path: Path, jpeg: bytes) -> None:
    path = write(tmp_path / "a.jpg", jpeg)
    path.chmod(0)
    with pytest.raises(ImageError, match="permission denied"):
        read_bytes(path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read anything")
def test_unreadable_subfolder_is_a_problem(album: Path) -> None:
    (album / "sub").chmod(0)
    try:
        refs, problems = discover([str(album)], recursive=True)
    finally:
        (album / "sub").chmod(0o755)
    assert names(refs) == ["a.JPG", "b.jpg", "c.png"]
    assert problems == [Problem(str(album / "sub"), "permission denied")]


def test_broken_link_and_link_loop(tmp_path: Path) -> None:
    (tmp_path / "broken.jpg").symlink_to(tmp_path / "gone.jpg")
    (tmp_path / "a.jpg").symlink_to(tmp_path / "b.jpg")
    (tmp_path / "b.jpg").symlink_to(tmp_path / "a.jpg")
    with pytest.raises(ImageError, match="broken symbolic link"):
        read_bytes(tmp_path / "broken.jpg")
    with pytest.raises(ImageError, match="symbolic link loop"):
        read_bytes(tmp_path / "a.jpg")


# --- decode: bad input -------------------------------------------------------------------------

def test_truncated_jpeg(jpeg: bytes) -> None:
    assert reason_of(jpeg[: len(jpeg) // 2]) == "truncated image data"


def test_corrupt_png(cat: Image.Image) -> None:
    png = bytearray(encode(cat, "PNG"))
    png[2000:3000] = bytes(1000)
    assert reason_of(bytes(png)).startswith("corrupt image data (")


def test_text_file_named_jpg(tmp_path: Path) -> None:
    data = read_bytes(write(tmp_path / "notes.jpg", b"shopping list\n- milk\n"))
    assert reason_of(data) == "not an image (looks like text)"
    assert reason_of(bytes(range(256))) == "not an image (unrecognised format)"


def test_header_claiming_huge_size_is_refused_before_decoding() -> None:
    gif = bytearray(encode(Image.new("P", (10, 10)), "GIF"))
    gif[6:10] = struct.pack("<HH", 20000, 20000)
    assert reason_of(bytes(gif)) == (
        "decompression bomb: 20000x20000 = 400000000 pixels is over the limit of 100000000 "
        "(raise it with --max-pixels)")
    assert DEFAULT_MAX_PIXELS == 100_000_000


def test_max_pixels_is_configurable(jpeg: bytes) -> None:
    assert reason_of(jpeg, max_pixels=1000).startswith("decompression bomb: 451x300 = 135300")
    assert decode(jpeg, "x", max_pixels=451 * 300).size == (451, 300)


# --- decode: correctness -----------------------------------------------------------------------

def test_exif_orientation_is_applied(cat: Image.Image) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(cat, "JPEG", exif=exif)
    assert decode(data, "x").size == (300, 451)
    assert decode(data, "x", target_size=100).size == (150, 226)


def test_cmyk_jpeg_keeps_its_colours(cat: Image.Image) -> None:
    decoded = decode(encode(cat.convert("CMYK"), "JPEG", quality=95), "x")
    assert decoded.mode == "RGB"
    difference = np.abs(np.asarray(decoded, float) - np.asarray(cat, float)).mean()
    assert difference < 8


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_transparency_is_composited_on_white(astronaut: Image.Image, mode: str) -> None:
    image = astronaut.convert(mode)
    alpha = Image.new("L", image.size, 255)
    alpha.paste(0, (0, 0, 10, 10))
    image.putalpha(alpha)
    decoded = decode(encode(image, "PNG"), "x")
    assert decoded.mode == "RGB"
    assert decoded.getpixel((0, 0)) == (255, 255, 255)
    assert decoded.getpixel((200, 200)) == image.convert("RGB").getpixel((200, 200))


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_transparency_is_composited_on_white(astronaut: Image.Image, fmt: str) -> None:
    image = astronaut.quantize(16)
    image.paste(0, (0, 0, 10, 10))
    decoded = decode(encode(image, fmt, transparency=0), "x")
    assert decoded.getpixel((0, 0)) == (255, 255, 255)
    assert decoded.getpixel((300, 300)) == image.convert("RGB").getpixel((300, 300))


def test_sixteen_bit_png_is_scaled_not_clipped() -> None:
    ramp = np.linspace(0, 65535, 256 * 256).round().astype(np.uint16).reshape(256, 256)
    decoded = np.asarray(decode(encode(Image.fromarray(ramp), "PNG"), "x"))
    assert decoded.min() == 0 and decoded.max() == 255
    assert abs(decoded.mean() - 127.5) < 1


def test_float_image_in_unit_range_is_scaled() -> None:
    ramp = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    decoded = np.asarray(decode(encode(Image.fromarray(ramp), "TIFF"), "x"))
    assert decoded.min() == 0 and decoded.max() == 255


def test_animated_gif_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (32, 32), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert decode(data, "x").getpixel((5, 5)) == (255, 0, 0)


def test_greyscale_and_bilevel_become_rgb(cat: Image.Image) -> None:
    for mode in ("L", "1"):
        decoded = decode(encode(cat.convert(mode), "PNG"), "x")
        assert decoded.mode == "RGB" and decoded.size == cat.size


def test_large_jpeg_is_decoded_at_reduced_scale(astronaut: Image.Image) -> None:
    data = encode(astronaut.resize((4000, 3000)), "JPEG", quality=85)
    assert decode(data, "x").size == (4000, 3000)
    for target in (384, 500, 750):
        width, height = decode(data, "x", target_size=target).size
        assert min(width, height) >= target and width < 4000
    assert decode(data, "x", target_size=3500).size == (4000, 3000)


def test_an_image_decoded_small_decodes_again_for_a_bigger_target(astronaut: Image.Image) -> None:
    """A segmenter after a captioner: the captioner's draft, then the segmenter's own decode."""
    big = astronaut.resize((2000, 1500))
    for original in (encode(big, "JPEG", quality=85), encode(big, "PNG"), big):
        small = (load_image(original, 100, keep_original=True) if isinstance(original, Image.Image)
                 else decode(original, "x", target_size=100, keep_original=True))
        assert max(small.size) < 1000 and at_least(small, 100) is small
        for target in (600, None):
            again = at_least(small, target)
            expected = (load_image(original, target) if isinstance(original, Image.Image)
                        else decode(original, "x", target_size=target))
            assert again.size == expected.size and again.tobytes() == expected.tobytes()
            assert again.info[FULL_SIZE] == (2000, 1500)
    whole = decode(encode(big, "PNG"), "x")
    assert at_least(whole, 600) is whole  # nothing to decode again from: it is already whole
    # unasked, a shrunk image holds no reference to its file's bytes
    assert ORIGINAL not in decode(encode(big, "JPEG"), "x", target_size=100).info


def test_large_png_is_reduced_by_an_integer_factor(astronaut: Image.Image) -> None:
    data = encode(astronaut.resize((1000, 800)), "PNG")
    assert decode(data, "x", target_size=300).size == (500, 400)
    assert decode(data, "x", target_size=500).size == (1000, 800)


@pytest.mark.parametrize("mode, fmt, params", [("RGB", "JPEG", {}), ("L", "JPEG", {}),
                                               ("CMYK", "JPEG", {}), ("RGB", "JPEG", {"progressive": True}),
                                               ("RGB", "PNG", {})])
def test_images_that_do_not_shrink_decode_to_the_same_pixels_in_full(astronaut: Image.Image, mode: str,
                                                                      fmt: str, params: dict) -> None:
    # a resumed --full-decode run reuses drafted captions exactly where `shrinks` is False
    for size in ((599, 700), (700, 599), (600, 900)):
        data = encode(astronaut.convert(mode).resize(size), fmt, **params)
        same = decode(data, "x", target_size=300).tobytes() == decode(data, "x").tobytes()
        assert same != shrinks(data, 300), size
    assert not shrinks(data, None) and shrinks(b"not an image", 300)


def test_decoded_image_is_loaded_and_detached(jpeg: bytes) -> None:
    decoded = decode(jpeg, "x")
    assert type(decoded) is Image.Image and decoded.mode == "RGB"
    assert decoded.tobytes()


def test_only_known_formats_are_decoded(cat: Image.Image) -> None:
    assert reason_of(encode(cat, "PPM")) == "not an image (unrecognised format)"
    assert {".jpg", ".png", ".gif", ".tiff", ".webp"} <= IMAGE_EXTENSIONS


def test_heif_decodes_when_pillow_heif_is_installed(cat: Image.Image) -> None:
    pytest.importorskip("pillow_heif")
    assert {".heic", ".heif"} <= IMAGE_EXTENSIONS
    assert decode(encode(cat, "HEIF"), "x").size == cat.size


def test_heif_without_pillow_heif_says_what_to_install(tmp_path: Path, jpeg: bytes) -> None:
    if "HEIF" in IMAGE_FORMATS:
        pytest.skip("pillow-heif is installed")
    heic = b"\0\0\0\x18ftypheic" + bytes(64)
    assert "pillow-heif" in reason_of(heic)
    # in a folder it is collected and fails with that reason, instead of being passed over
    write(tmp_path / "IMG_0001.HEIC", heic)
    write(tmp_path / "b.jpg", jpeg)
    assert names(discover([str(tmp_path)])[0]) == ["IMG_0001.HEIC", "b.jpg"]


# --- load_image --------------------------------------------------------------------------------

def test_load_image_from_path_and_from_pil(tmp_path: Path, cat: Image.Image) -> None:
    path = write(tmp_path / "cat.png", encode(cat.convert("LA"), "PNG"))
    assert load_image(path).mode == "RGB"
    assert load_image(str(path), target_size=100).size == (151, 100)
    original = cat.quantize(16)
    original.putalpha(0)
    loaded = load_image(original)
    assert original.mode == "PA"
    assert loaded.mode == "RGB" and loaded.getpixel((0, 0)) == (255, 255, 255)
    with pytest.raises(ImageError, match="file not found"):
        load_image(tmp_path / "gone.png")
