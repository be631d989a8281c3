"""Output formats: captions.txt, sidecars (mirrored or beside images), JSONL, CSV."""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import pytest

from captionkit.datasets import read_predictions
from captionkit.errors import OptionError, OutputError
from captionkit.exporters import (
    ExportOptions,
    atomic_write,
    distinct_names,
    export,
    nothing_to_write,
    parse_captions_txt_line,
    parse_formats,
)
from captionkit.store import DB_NAME, Result


@pytest.fixture
def results(tmp_path) -> list[Result]:
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    return [
        Result(path=images / "a.jpg", name="a.jpg", status="done", caption="a dog\non grass",
               extras={"clip_score": 0.71}, hash="h1", model_id="m"),
        Result(path=images / "sub" / "b.png", name="sub/b.png", status="done",
               caption='a "quoted", comma', hash="h2", model_id="m"),
        Result(path=images / "c.jpg", name="c.jpg", status="failed", error="truncated image data",
               model_id="m"),
    ]


def test_captions_txt_lists_done_images_one_line_each(results, tmp_path):
    out = tmp_path / "out"
    export(results, ["captions.txt"], ExportOptions(out))
    assert (out / "captions.txt").read_text() == "a.jpg: a dog on grass\nsub/b.png: a \"quoted\", comma\n"


def test_sidecars_mirror_the_tree_or_sit_beside_images(results, tmp_path):
    out = tmp_path / "out"
    written = export(results, ["txt"], ExportOptions(out, caption_extension=".caption"))
    assert sorted(p.relative_to(out).as_posix() for p in written) == ["a.caption", "sub/b.caption"]
    assert (out / "a.caption").read_text() == "a dog on grass\n"
    export(results, ["txt"], ExportOptions(out, sidecars_beside_images=True))
    assert (tmp_path / "images" / "sub" / "b.txt").read_text() == 'a "quoted", comma\n'
    assert not (tmp_path / "images" / "c.txt").exists()


def test_jsonl_and_csv_keep_every_field(results, tmp_path):
    out = tmp_path / "out"
    written = export(results, ["jsonl", "csv", "csv"], ExportOptions(out))  # as the Python API takes them
    assert written == [out / "captions.jsonl", out / "captions.csv"]
    records = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["done", "done", "failed"]
    assert records[0]["clip_score"] == 0.71 and records[2]["error"] == "truncated image data"
    rows = list(csv.DictReader((out / "captions.csv").open(encoding="utf-8")))
    assert rows[1]["caption"] == 'a "quoted", comma'
    assert rows[0]["clip_score"] == "0.71"


def test_prefix_and_suffix_go_into_every_format_and_failures_stay_captionless(results, tmp_path):
    out = tmp_path / "out"
    export(results, parse_formats("all"), ExportOptions(out, prefix="ohwx, ", suffix=", photo"))
    assert (out / "captions.txt").read_text() == ("a.jpg: ohwx, a dog on grass, photo\n"
                                                  'sub/b.png: ohwx, a "quoted", comma, photo\n')
    assert (out / "a.txt").read_text() == "ohwx, a dog on grass, photo\n"
    records = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert [r["caption"] for r in records] == ["ohwx, a dog\non grass, photo",
                                               'ohwx, a "quoted", comma, photo', None]
    rows = list(csv.DictReader((out / "captions.csv").open(encoding="utf-8")))
    assert [row["caption"] for row in rows] == [r["caption"] or "" for r in records]
    assert results[0].caption == "a dog\non grass"  # the results themselves are left as they were


def test_a_caption_file_that_already_holds_its_caption_is_not_written_again(results, tmp_path):
    out = tmp_path / "out"
    export(results, ["txt"], ExportOptions(out))
    for path in out.rglob("*.txt"):
        os.utime(path, ns=(10**18, 10**18))
    assert export(results, ["txt"], ExportOptions(out)) == []  # nothing written
    assert {p.stat().st_mtime_ns for p in out.rglob("*.txt")} == {10**18}
    export(results, ["txt"], ExportOptions(out, suffix="."))
    assert (out / "a.txt").read_text() == "a dog on grass.\n"
    assert (out / "a.txt").stat().st_mtime_ns != 10**18


def test_names_two_images_share_are_lengthened_by_their_folders_until_they_differ():
    def done(path, name):
        return Result(path=Path(path), name=name, status="done", caption=name)

    results = [done("/data/A/x.jpg", "x.jpg"), done("/data/B/x.jpg", "x.jpg"),
               done("/one/set/sub/y.jpg", "sub/y.jpg"), done("/two/set/sub/y.jpg", "sub/y.jpg"),
               done("/data/A/z.jpg", "z.jpg")]
    assert [r.name for r in distinct_names(results)] == [
        "A/x.jpg", "B/x.jpg", "one/set/sub/y.jpg", "two/set/sub/y.jpg", "z.jpg"]
    assert [r.name for r in results][:2] == ["x.jpg", "x.jpg"]  # the results given stay as they were
    unique = results[-1:]
    assert distinct_names(unique) == unique


def undecodable(folder: Path, *names: bytes) -> list[Path]:
    """Image files whose names are the given bytes, not all UTF-8, under `folder`."""
    paths = [folder / os.fsdecode(name) for name in names]
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"an image")
    return paths


def test_names_that_differ_only_in_bytes_that_are_not_utf8_are_told_apart_and_exported(tmp_path):
    # The lengthened names kept the paths' surrogate escapes, and writing captions.txt crashed.
    paths = undecodable(tmp_path / "images", b"Gr\xfcn/x.jpg", b"Blau/x.jpg", b"y\xfe.jpg",
                        b"y\xff.jpg", b"Gr\xfcn/z.jpg", b"Gr\xfdn/z.jpg")
    shown = ["x.jpg", "x.jpg", "y\ufffd.jpg", "y\ufffd.jpg", "z.jpg", "z.jpg"]  # as discover names them
    results = [Result(path=path, name=name, status="done", caption=f"caption {index}", model_id="m")
               for index, (path, name) in enumerate(zip(paths, shown, strict=True))]
    named = distinct_names(results)
    assert [r.name for r in named] == ["Blau/x.jpg", "Gr\\xfcn/z.jpg", "Gr\\xfdn/z.jpg",
                                       "Gr\ufffdn/x.jpg", "y\\xfe.jpg", "y\\xff.jpg"]
    out = tmp_path / "out"
    written = export(named, parse_formats("all"), ExportOptions(out))
    assert len(written) == 3 + len(paths), "a caption file each, none written over another"
    lines = (out / "captions.txt").read_text(encoding="utf-8").splitlines()
    assert [parse_captions_txt_line(line)[0] for line in lines] == [r.name for r in named]


def test_caption_files_keep_the_bytes_of_image_names_that_are_not_utf8(tmp_path):
    # Under the output folder they were named as the printable name, U+FFFD for each such byte, so
    # a caption file never paired with its image by name.
    paths = undecodable(tmp_path / "images", b"solo\xfd.jpg", b"y\xfe.jpg", b"y\xff.jpg",
                        b"Gr\xfcn/x.jpg", b"Blau/x.jpg")
    shown = ["solo\ufffd.jpg", "y\ufffd.jpg", "y\ufffd.jpg", "x.jpg", "x.jpg"]
    results = distinct_names([Result(path=path, name=name, status="done", caption="a cat")
                              for path, name in zip(paths, shown, strict=True)])
    out = tmp_path / "out"
    mirrored = export(results, ["txt"], ExportOptions(out))
    assert sorted(os.fsencode(path.relative_to(out)) for path in mirrored) == [
        b"Blau/x.txt", b"Gr\xfcn/x.txt", b"solo\xfd.txt", b"y\xfe.txt", b"y\xff.txt"]
    beside = export(results, ["txt"], ExportOptions(out, sidecars_beside_images=True))
    assert sorted(map(os.fsencode, beside)) == sorted(os.fsencode(p.with_suffix(".txt")) for p in paths)


def named_file(path: str) -> bytes:
    """The file a JSONL or CSV `path` names, by the README's rule: `\\xNN` is the byte NN."""
    return re.sub(rb"\\x([0-9a-f]{2})", lambda match: bytes([int(match[1], 16)]), path.encode())


def test_jsonl_and_csv_paths_name_files_that_are_not_utf8_exactly(tmp_path):
    # They were written with `?` for each such byte: a path naming no file, the same for both.
    paths = undecodable(tmp_path / "Gr\u00fcn", b"bad\xfe.jpg", b"bad\xff.jpg")
    results = [Result(path=path, name=f"{index}.jpg", status="done", caption="a cat", model_id="m")
               for index, path in enumerate(paths)]
    out = tmp_path / "out"
    export(results, ["jsonl", "csv"], ExportOptions(out))
    records = [json.loads(line) for line in (out / "captions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert records[0]["path"] == f"{tmp_path}/Gr\u00fcn/bad\\xfe.jpg"
    assert [named_file(record["path"]) for record in records] == [os.fsencode(p) for p in paths]
    rows = list(csv.DictReader((out / "captions.csv").open(encoding="utf-8")))
    assert [row["path"] for row in rows] == [record["path"] for record in records]


def test_only_a_format_that_writes_nothing_for_captioned_images_says_why(results, tmp_path):
    said = nothing_to_write(results, ["jsonl", "webdataset", "webdataset"])
    assert said == ["webdataset: nothing written, since no captioned image came from a tar shard "
                    "(it writes a caption shard per input shard)"]
    assert nothing_to_write(results, ["jsonl", "txt"]) == []
    assert nothing_to_write(results[2:], ["webdataset"]) == [], "nothing captioned, nothing to say"
    shard = tmp_path / "00000.tar"
    shard.write_bytes(b"")  # a regular .tar file is all `shard_of` looks for
    from_shard = Result(path=shard / "a.jpg", name="00000.tar/a.jpg", status="done", caption="x")
    assert nothing_to_write([*results, from_shard], ["webdataset"]) == []


def test_parse_formats():
    assert parse_formats("all") == ["captions.txt", "txt", "jsonl", "csv"]
    assert parse_formats("csv, jsonl,csv") == ["csv", "jsonl"]
    with pytest.raises(OptionError, match="choose from"):
        parse_formats("xml")
    with pytest.raises(OptionError, match="must start with"):
        ExportOptions(Path("/tmp"), caption_extension="txt")


@pytest.mark.parametrize("extension", [".jpg", ".PNG", ".webp", ".heic", ".txt.jpg", ".caption.PNG"])
def test_a_caption_extension_that_would_overwrite_images_is_refused(extension):
    with pytest.raises(OptionError, match=f"'{re.escape(extension)}' ends in an image extension"):
        ExportOptions(Path("/tmp"), caption_extension=extension, sidecars_beside_images=True)


@pytest.mark.parametrize("extension", [".a/b", "./txt", ".a\\b", ".txt\0"])
def test_a_caption_extension_that_is_no_file_extension_is_refused(extension):
    with pytest.raises(OptionError, match=r"is not a file extension \(it holds "):
        ExportOptions(Path("/tmp"), caption_extension=extension)


def test_a_caption_file_never_replaces_its_image(tmp_path):
    image = tmp_path / "scan.caption"  # named directly, an image may have any extension
    image.write_bytes(b"the image's bytes")
    result = Result(path=image, name="scan.caption", status="done", caption="a scan")
    with pytest.raises(OutputError, match="would replace the image itself"):
        export([result], ["txt"], ExportOptions(tmp_path, caption_extension=".caption",
                                                sidecars_beside_images=True))
    assert image.read_bytes() == b"the image's bytes"


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "captions.txt"
    atomic_write(target, "old\n")
    atomic_write(target, "new\n")
    assert target.read_text() == "new\n"
    assert target.stat().st_mode & 0o644 == 0o644, "outputs are readable by others, like any file"
    assert [p.name for p in tmp_path.iterdir()] == ["captions.txt"]


def test_captions_txt_escapes_names_with_line_breaks_and_reads_them_back(tmp_path):
    names = ["new\nline.png", "back\\slash.png", "cr\r.png", "plain: colon.png", "a: b\\: c.png",
             "12:30.png"]
    results = [Result(path=tmp_path / name, name=name, status="done", caption=f"caption {index}",
                      hash=f"h{index}", model_id="m") for index, name in enumerate(names)]
    export(results, ["captions.txt"], ExportOptions(tmp_path))
    text = (tmp_path / "captions.txt").read_text()
    assert text.split("\n")[:2] == ["\\new\\nline.png: caption 0", "\\back\\\\slash.png: caption 1"]
    assert text.split("\n")[3:6] == ["\\plain\\: colon.png: caption 3",
                                     "\\a\\: b\\\\\\: c.png: caption 4", "12:30.png: caption 5"]
    assert text.count("\n") == len(names)
    predictions = read_predictions(tmp_path / "captions.txt")
    assert predictions.captions == {name: f"caption {index}" for index, name in enumerate(names)}


def test_captions_txt_written_before_colons_were_escaped_reads_as_it_did():
    assert parse_captions_txt_line("\\back\\\\slash.png: a: b") == ("back\\slash.png", "a: b")
    assert parse_captions_txt_line("\\new\\nline\\r.png: c") == ("new\nline\r.png", "c")
    assert parse_captions_txt_line("plain.png: a: b") == ("plain.png", "a: b")
    assert parse_captions_txt_line("no separator") == ("", "")


def test_a_file_that_cannot_be_written_is_one_line_naming_it():
    with pytest.raises(OutputError, match=r"^/proc/captions.txt: cannot write: "):
        export([], ["captions.txt"], ExportOptions(Path("/proc")))  # procfs takes no new files


def test_images_differing_only_in_extension_keep_a_caption_file_each(tmp_path):
    results = [Result(path=tmp_path / name, name=name, status="done", caption=f"caption of {name}")
               for name in ("a.jpg", "a.png", "b.jpg")]
    written = export(results, ["txt"], ExportOptions(tmp_path / "out"))
    assert sorted(p.name for p in written) == ["a.jpg.txt", "a.png.txt", "b.txt"]
    assert read_predictions(tmp_path / "out").captions == {
        "a.jpg": "caption of a.jpg", "a.png": "caption of a.png", "b": "caption of b.jpg"}


OWN_FILES = ["captions.txt", "captions.jsonl", "captions.csv", "captionkit.db", "captionkit.db-wal",
             "captionkit.db-shm", "captionkit.db-journal"]


@pytest.mark.parametrize("beside", [False, True], ids=["mirrored", "beside-images-in-the-output-folder"])
def test_a_caption_file_never_takes_the_name_of_captionkits_own_files(tmp_path, beside):
    images = tmp_path / "images"
    out = images if beside else tmp_path / "out"
    for name in OWN_FILES:
        atomic_write(out / name, f"captionkit's own {name}\n")
    results = [Result(path=images / name, name=name, status="done", caption=f"caption of {name}")
               for name in ("captions.jpg", "captionkit.jpg", "Captions.png")]
    for extension in {name[name.index("."):] for name in OWN_FILES}:  # .txt, .db-wal, ...
        export(results, ["txt"], ExportOptions(out, caption_extension=extension,
                                                sidecars_beside_images=beside))
    assert {name: (out / name).read_text() for name in OWN_FILES} == {
        name: f"captionkit's own {name}\n" for name in OWN_FILES}
    assert (out / "captions.jpg.txt").read_text() == "caption of captions.jpg\n"
    assert (out / "Captions.png.txt").read_text() == "caption of Captions.png\n"  # macOS: captions.txt
    assert (out / "captionkit.jpg.db").read_text() == "caption of captionkit.jpg\n"
    assert (out / "captionkit.jpg.db-wal").read_text() == "caption of captionkit.jpg\n"
    assert read_predictions(out).captions["captions.jpg"] == "caption of captions.jpg"


def test_an_image_without_an_extension_never_replaces_the_run_store(tmp_path):
    (tmp_path / DB_NAME).write_text("the run store\n")
    result = Result(path=tmp_path / "photos" / "captionkit", name="captionkit", status="done",
                    caption="a scan")  # named directly, an image may have no extension
    with pytest.raises(OutputError, match="would replace captionkit's own file"):
        export([result], ["txt"], ExportOptions(tmp_path, caption_extension=".db"))
    assert (tmp_path / DB_NAME).read_text() == "the run store\n"
