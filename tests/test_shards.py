"""Webdataset tar shards in (as img2dataset writes them), Parquet files out."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest
from forked_cli import captionkit
from PIL import Image

from captionkit import sources
from captionkit.errors import ImageError, InputError
from captionkit.exporters import ExportOptions, export, parse_formats
from captionkit.options import GenerationOptions
from captionkit.pipeline import Pipeline, RunOptions
from captionkit.predictions import Region
from captionkit.store import DB_NAME, Result, Store, unchanged_row

GEN = GenerationOptions(max_new_tokens=6)


def write_shards(folder: Path, images: list[Image.Image], per_shard: int) -> list[Path]:
    """Shards laid out as img2dataset writes them: `{key}.jpg`, `{key}.txt` (the alt text) and
    `{key}.json` per sample, keys of shard number then index, `00000.tar`, `00001.tar`..."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for number, start in enumerate(range(0, len(images), per_shard)):
        path = folder / f"{number:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for index, image in enumerate(images[start:start + per_shard]):
                key = f"{number:05d}{index:04d}"
                jpeg = io.BytesIO()
                image.save(jpeg, "JPEG", quality=90)
                meta = json.dumps({"key": key, "url": f"https://example.com/{key}.jpg", "status": "success"})
                for extension, data in ((".jpg", jpeg.getvalue()), (".txt", f"alt text {key}".encode()),
                                        (".json", meta.encode())):
                    info = tarfile.TarInfo(key + extension)
                    info.size, info.mtime = len(data), 1_700_000_000
                    tar.addfile(info, io.BytesIO(data))
        shards.append(path)
    return shards


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, photos) -> Path:
    """Three shards of the eight photos (3 + 3 + 2), shrunk so the tests stay quick."""
    small = [photo.resize((96, 72)) for photo in photos]
    folder = tmp_path_factory.mktemp("shards")
    write_shards(folder, small, per_shard=3)
    return folder


def test_a_brace_list_names_every_image_member_in_archive_order(shard_dir):
    refs, problems = sources.discover([f"{shard_dir}/{{00000..00002}}.tar"])
    assert not problems
    assert [ref.name for ref in refs] == [f"0000{s}.tar/0000{s}000{i}.jpg"
                                          for s, count in enumerate((3, 3, 2)) for i in range(count)]
    assert refs[4].path == shard_dir / "00001.tar" / "000010001.jpg"
    # a glob naming shards, one shard, and one member all address members the same way
    assert sources.discover([f"{shard_dir}/*.tar"])[0] == refs
    assert sources.discover([str(shard_dir / "00002.tar")])[0] == refs[6:]
    assert sources.discover([str(refs[4].path)])[0] == [refs[4]]
    with pytest.raises(InputError, match=r"00000\.tar: a tar shard holding no images"):
        sources.discover([f"{shard_dir}/{{00000..00002}}.tar"], extensions=["png"])


def test_members_are_read_in_place_without_extracting(shard_dir, photos):
    before = sorted(os.listdir(shard_dir))
    refs, _ = sources.discover([str(shard_dir / "00001.tar")])
    data = sources.read_bytes(refs[1].path)
    with tarfile.open(shard_dir / "00001.tar") as tar:
        assert data == tar.extractfile("000010001.jpg").read()  # the reference reader agrees
    image = sources.decode(data, refs[1].name)
    assert image.size == (96, 72) and sorted(os.listdir(shard_dir)) == before
    assert sources.stat_image(refs[1].path) == os.stat(shard_dir / "00001.tar")
    assert sources.image_exists(refs[1].path)
    assert not sources.image_exists(shard_dir / "00001.tar" / "000019999.jpg")
    assert not sources.image_exists(shard_dir / "00009.tar" / "000090000.jpg")


def test_a_missing_member_or_shard_is_named(shard_dir):
    with pytest.raises(ImageError, match="no member 000019999.jpg in tar shard"):
        sources.read_bytes(shard_dir / "00001.tar" / "000019999.jpg")
    with pytest.raises(InputError, match=r"00003\.tar: no such file or folder"):
        sources.check_inputs_exist([f"{shard_dir}/{{00001..00007}}.tar"])
    with pytest.raises(InputError, match=r"00009\.tar"):
        sources.discover([f"{shard_dir}/{{00001,00009}}.tar"])
    sources.check_inputs_exist([f"{shard_dir}/{{00000..00002}}.tar", str(shard_dir / "00000.tar" / "x.jpg")])


def test_a_truncated_shard_keeps_its_whole_members_and_says_where_it_stopped(shard_dir, tmp_path):
    data = (shard_dir / "00000.tar").read_bytes()
    with tarfile.open(shard_dir / "00000.tar") as tar:
        inside_second = tar.getmember("000000001.jpg").offset_data + 100
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[:inside_second])
    refs, problems = sources.discover([str(cut)])
    assert [ref.name for ref in refs] == ["cut.tar/000000000.jpg", "cut.tar/000000001.jpg"]
    assert len(problems) == 1 and "cut short after 4 members" in problems[0].reason
    assert sources.decode(sources.read_bytes(refs[0].path), refs[0].name).size == (96, 72)
    with pytest.raises(ImageError, match="the tar shard ends inside this member"):
        sources.read_bytes(refs[1].path)
    not_a_tar = tmp_path / "notes.tar"
    not_a_tar.write_text("hello")
    with pytest.raises(InputError, match="not a readable tar shard"):
        sources.discover([str(not_a_tar)])
    # matched by a pattern among good shards, a bad one is a problem, not the end of the run
    (shard_dir.parent / "mixed").mkdir()
    for name in ("00000.tar", "00001.tar"):
        (shard_dir.parent / "mixed" / name).write_bytes((shard_dir / name).read_bytes())
    (shard_dir.parent / "mixed" / "00002.tar").write_text("hello")
    refs, problems = sources.discover([f"{shard_dir.parent}/mixed/*.tar"])
    assert len(refs) == 6 and [Path(p.path).name for p in problems] == ["00002.tar"]


def test_shards_caption_like_files_and_export_under_their_member_names(blip_fp32, shard_dir, tmp_path):
    out = tmp_path / "out"
    options = RunOptions(output_dir=out, progress=False, formats=("captions.txt", "jsonl", "txt"))
    summary = Pipeline(blip_fp32, GEN, options).run([f"{shard_dir}/{{00000..00002}}.tar"])
    assert summary.done == 8 and not summary.failed
    lines = (out / "captions.txt").read_text().splitlines()
    assert [line.split(": ")[0] for line in lines][:2] == ["00000.tar/000000000.jpg",
                                                           "00000.tar/000000001.jpg"]
    records = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert records[0]["path"] == str(shard_dir / "00000.tar" / "000000000.jpg")
    # the caption files mirror the members under the output folder, the shard as a folder
    assert (out / "00001.tar" / "000010002.txt").read_text().strip() == dict(
        line.split(": ", 1) for line in lines)["00001.tar/000010002.jpg"]
    again = Pipeline(blip_fp32, GEN, options).run([f"{shard_dir}/*.tar"])
    assert (again.done, again.skipped) == (0, 8)


def test_captions_are_written_back_as_shards_a_reader_joins_by_key(blip_fp32, shard_dir, tmp_path):
    """A caption shard per input shard, `{key}.txt` and `{key}.json` in the input's order; a
    member that fails is left out, and exporting again gives the same bytes."""
    broken = tmp_path / "in" / "00003.tar"
    broken.parent.mkdir()
    good = sources.read_bytes(shard_dir / "00000.tar" / "000000000.jpg")
    with tarfile.open(broken, "w") as tar:
        for name, data in (("000030000.jpg", good), ("000030001.jpg", b"not a jpeg")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "out"
    options = RunOptions(output_dir=out, progress=False, formats=("jsonl", "webdataset"))
    summary = Pipeline(blip_fp32, GEN, options).run([f"{shard_dir}/{{00000..00002}}.tar", str(broken)])
    assert summary.done == 9 and [name for name, _ in summary.failed] == ["00003.tar/000030001.jpg"]
    assert summary.unwritten == []
    captions = {record["image"]: record for record in map(json.loads, (out / "captions.jsonl").open())}
    shards = sorted((out / "webdataset").iterdir())
    assert [shard.name for shard in shards] == ["00000.tar", "00001.tar", "00002.tar", "00003.tar"]
    members = {}
    for shard in shards:
        with tarfile.open(shard) as tar:
            names = members[shard.name] = tar.getnames()
            texts = {name: tar.extractfile(name).read().decode() for name in names}
        keys = [name.removesuffix(".txt") for name in names[::2]]
        assert names == [f"{key}{extension}" for key in keys for extension in (".txt", ".json")]
        assert keys == sorted(keys), "the input shard's order"
        for key in keys:
            record = captions[f"{shard.name}/{key}.jpg"]
            assert texts[f"{key}.txt"] == record["caption"] and json.loads(texts[f"{key}.json"]) == record
    assert len(captions) == 10 and members["00003.tar"] == ["000030000.txt", "000030000.json"]
    before = {shard: shard.read_bytes() for shard in shards}
    store = Store(out / DB_NAME)
    export(list(store.results(store.latest_options_key())), ["webdataset"], ExportOptions(out))
    assert {shard: shard.read_bytes() for shard in shards} == before


def test_webdataset_says_why_it_wrote_nothing_for_plain_files(blip_dir, photo_dir, tmp_path):
    """Asked for caption shards of images that came from no shard, the run and `export` say so."""
    out = tmp_path / "out"
    run = captionkit("caption", photo_dir, "--model", blip_dir, "-o", out, "--dtype", "float32",
                     "--max-new-tokens", "3", "-q", "-f", "jsonl,webdataset")
    said = "webdataset: nothing written, since no captioned image came from a tar shard"
    assert said in run.stderr and not (out / "webdataset").exists()
    assert said in captionkit("export", out, "-f", "webdataset").stderr
    assert said not in captionkit("export", out, "-f", "jsonl").stderr
    assert json.loads((out / "captions.jsonl").read_text().splitlines()[0])["caption"]


def test_a_rewritten_shard_is_captioned_again(shard_dir, tmp_path):
    shard = tmp_path / "00000.tar"
    shard.write_bytes((shard_dir / "00000.tar").read_bytes())
    member = shard / "000000001.jpg"
    previous = {os.fsencode(member): {"size": shard.stat().st_size,
                                      "mtime_ns": shard.stat().st_mtime_ns, "status": "done"}}
    assert unchanged_row(previous, member)[0] is not None
    os.utime(shard, ns=(1, 1))
    assert unchanged_row(previous, member)[0] is None


def _results() -> list[Result]:
    return [
        Result(path=Path("/data/a.jpg"), name="a.jpg", status="done", caption="a dog", hash="h1",
               seconds=0.25, model_id="m", extras={"clip_score": 31.5, "passed": True,
                                                   "candidates": [{"text": "a dog", "clip_score": 31.5}]},
               regions=[Region([1.0, 2.0, 30.0, 40.0], "dog", 0.9)]),
        Result(path=Path("/data/s.tar/k1.jpg"), name="s.tar/k1.jpg", status="done", caption="a cat",
               hash="h2", seconds=0.5, model_id="m", extras={"clip_score": 28, "prompt": "a photo of"}),
        Result(path=Path("/data/b.jpg"), name="b.jpg", status="failed", error="not an image", model_id="m"),
    ]


def test_parquet_rows_read_back_like_the_jsonl_records(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    options = ExportOptions(tmp_path, prefix="ohwx, ")
    written = export(_results(), parse_formats("jsonl,parquet"), options)
    assert [path.name for path in written] == ["captions.jsonl", "captions-00000.parquet"]
    table = pq.read_table(tmp_path / "captions-00000.parquet")
    assert table.column_names[:9] == ["image", "path", "status", "caption", "model", "hash", "seconds",
                                      "error", "regions"]
    assert str(table.schema.field("clip_score").type) == "double"
    assert str(table.schema.field("passed").type) == "bool"
    jsonl = [json.loads(line) for line in (tmp_path / "captions.jsonl").read_text().splitlines()]
    for row, record in zip(table.to_pylist(), jsonl, strict=True):
        for key in ("regions", "candidates"):  # nested values travel as JSON strings
            row[key] = json.loads(row[key]) if row[key] is not None else None
        assert {k: row[k] for k in record} == record
        assert all(row[k] is None for k in row.keys() - record.keys())
    assert table.to_pylist()[1]["caption"] == "ohwx, a cat"


def test_parquet_is_sharded_and_a_smaller_export_leaves_no_stale_file(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    results = _results() * 3
    written = export(results, ["parquet"], ExportOptions(tmp_path, parquet_rows=4))
    assert [path.name for path in written] == [f"captions-0000{n}.parquet" for n in range(3)]
    assert [pq.read_metadata(path).num_rows for path in written] == [4, 4, 1]
    schemas = {str(pq.read_schema(path)) for path in written}
    assert len(schemas) == 1, "every file has the same columns"
    export(results[:4], ["parquet"], ExportOptions(tmp_path, parquet_rows=4))
    assert sorted(p.name for p in tmp_path.glob("*.parquet")) == ["captions-00000.parquet"]
    empty = export([], ["parquet"], ExportOptions(tmp_path / "empty"))
    assert pq.read_metadata(empty[0]).num_rows == 0


def test_all_formats_stay_the_ones_without_optional_packages():
    assert "parquet" not in parse_formats("all") and parse_formats("parquet") == ["parquet"]
