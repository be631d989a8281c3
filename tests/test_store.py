"""The SQLite run store: schema, WAL, per-batch transactions, lookups used for resume."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import sqlite3
from pathlib import Path

import pytest

from captionkit.errors import OutputError
from captionkit.keys import resume_key
from captionkit.predictions import Prediction
from captionkit.store import DB_NAME, MIGRATIONS, Result, Store


def test_schema_is_migrated_and_wal_enabled(tmp_path):
    store = Store(tmp_path / DB_NAME)
    assert store.db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.close()
    reopened = Store(tmp_path / DB_NAME)  # a second open must not re-run migrations
    assert reopened.db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)


def test_record_and_read_back_with_non_utf8_paths(tmp_path):
    store = Store(tmp_path / DB_NAME)
    run = store.start_run("m", "m#1", {"x": 1})
    odd = tmp_path / os.fsdecode(b"caf\xe9.jpg")
    results = [Result(path=odd, name="caf\ufffd.jpg", status="done", caption="a cat",
                      extras={"score": 0.5}, hash="h1", model_id="m"),
               Result(path=tmp_path / "b.jpg", name="b.jpg", status="failed", error="truncated",
                      model_id="m")]
    store.record(results, "m#1", run)
    back = list(store.results("m#1"))
    assert [r.path for r in back] == [tmp_path / "b.jpg", odd]
    assert back[1].extras == {"score": 0.5}
    assert store.captions_by_content("m#1") == {("h1", None): Prediction("a cat", {"score": 0.5})}
    assert set(store.previous("m#1")) == {os.fsencode(odd), os.fsencode(tmp_path / "b.jpg")}
    assert store.latest_options_key() == "m#1"


def test_identical_files_asked_different_prompts_keep_both_captions(tmp_path):
    store = Store(tmp_path / DB_NAME)
    run = store.start_run("m", "m#1", {})
    asked = {"a.jpg": "what is it?", "copy of a.jpg": "what colour is it?", "b.jpg": None}
    store.record([Result(path=tmp_path / name, name=name, status="done", caption=f"answer to {prompt}",
                         extras={"prompt": prompt} if prompt else {}, hash="same bytes", model_id="m")
                  for name, prompt in asked.items()], "m#1", run)
    assert store.captions_by_content("m#1") == {
        ("same bytes", prompt): Prediction(f"answer to {prompt}", {"prompt": prompt} if prompt else {})
        for prompt in asked.values()}


def test_results_of_other_option_sets_are_separate(tmp_path):
    store = Store(tmp_path / DB_NAME)
    run = store.start_run("m", "k1", {})
    store.record([Result(path=Path("/a.jpg"), name="a.jpg", status="done", caption="x")], "k1", run)
    store.record([Result(path=Path("/a.jpg"), name="a.jpg", status="done", caption="y")], "k2", run)
    assert [r.caption for r in store.results("k1")] == ["x"]
    store.forget("k1")
    assert list(store.results("k1")) == []
    assert [r.caption for r in store.results("k2")] == ["y"]


def test_recorded_captions_hold_each_caption_once_and_match_any_exported_decoration(tmp_path):
    store = Store(tmp_path / DB_NAME)
    store.start_run("m", "k1", {"prefix": "ohwx, ", "suffix": ""})
    run = store.start_run("m", "k2", {"prefix": "", "suffix": " (draft)"})
    image = tmp_path / "a.jpg"
    store.record([Result(path=image, name="a.jpg", status="done", caption="a  red\ncar")], "k1", run)
    store.record([Result(path=image, name="a.jpg", status="done", caption="a blue car"),
                  Result(path=tmp_path / "b.jpg", name="b.jpg", status="failed", error="truncated")],
                 "k2", run)
    recorded = store.recorded_captions()
    assert sorted(recorded.captions[os.fsencode(image)]) == ["a  red\ncar", "a blue car"]
    assert os.fsencode(tmp_path / "b.jpg") not in recorded.captions
    for text in ["a red car", "ohwx, a red car\n", "a blue car (draft)", "ohwx,   a blue car"]:
        assert recorded.include(image, text), text
    for text in ["a red car!", "ohwx, a blue car (draft)", "sks a red car", ""]:
        assert not recorded.include(image, text), text
    assert not recorded.include(tmp_path / "b.jpg", "truncated")


def test_other_connections_see_committed_batches(tmp_path):
    store = Store(tmp_path / DB_NAME)
    run = store.start_run("m", "k", {})
    store.record([Result(path=Path("/a.jpg"), name="a.jpg", status="done", caption="x")], "k", run)
    other = sqlite3.connect(tmp_path / DB_NAME)
    assert other.execute("SELECT count(*) FROM results").fetchone()[0] == 1


def _open_store_at_once(path: str, ready, errors) -> None:
    ready.wait()  # every process opens the new store at the same moment
    try:
        Store(Path(path)).close()
    except Exception as err:  # noqa: BLE001 - reported to the parent
        errors.put(f"{type(err).__name__}: {err}")


def test_runs_opening_a_new_store_at_once_all_get_its_schema(tmp_path):
    # Two `captionkit caption -o same/` started together both found the schema missing; one
    # failed with "table runs already exists" (or, switching the new file to WAL, "database is
    # locked", which SQLite says at once without waiting).
    context = multiprocessing.get_context("fork")  # the children only use sqlite3
    errors = context.Queue()
    for attempt in range(50):
        path = tmp_path / f"attempt-{attempt}" / DB_NAME
        path.parent.mkdir()
        ready = context.Barrier(4)
        workers = [context.Process(target=_open_store_at_once, args=(str(path), ready, errors))
                   for _ in range(4)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(60)
        assert [worker.exitcode for worker in workers] == [0] * 4
        assert errors.empty(), errors.get()
        db = sqlite3.connect(path)
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)


def test_a_full_disk_or_a_broken_file_is_one_line_naming_the_store(tmp_path):
    store = Store(tmp_path / DB_NAME)
    run = store.start_run("m", "m#1", {})
    store.record([Result(path=tmp_path / "a.jpg", name="a.jpg", status="done", caption="a cat")],
                 "m#1", run)
    pages = store.db.execute("PRAGMA page_count").fetchone()[0]
    store.db.execute(f"PRAGMA max_page_count = {pages}")  # what a full disk answers from here on
    big = Result(path=tmp_path / "b.jpg", name="b.jpg", status="done", caption="words " * 20_000)
    with pytest.raises(OutputError, match=r"captionkit.db: cannot record results: database or disk "
                                          r"is full; what was recorded before is kept, so the same"):
        store.record([big], "m#1", run)
    assert [r.name for r in store.results("m#1")] == ["a.jpg"]
    store.close()

    (tmp_path / "junk.db").write_text("not a database")
    with pytest.raises(OutputError, match=r"junk.db: cannot open the run record: file is not a "
                                          r"database$"):
        Store(tmp_path / "junk.db")


V1 = Path(__file__).parent / "data" / "v1-store"


def _lay_out_v1_photos() -> Path:
    """The v1 fixture's photos at the absolute paths, sizes and modification times it recorded."""
    examples = Path(__file__).parents[1] / "examples" / "images"
    db = sqlite3.connect(V1 / DB_NAME)
    rows = db.execute("SELECT path, size, mtime_ns FROM results").fetchall()
    db.close()
    for raw, size, mtime_ns in rows:
        path = Path(os.fsdecode(raw))
        path.parent.mkdir(parents=True, exist_ok=True)
        source = examples / path.name
        path.write_bytes(source.read_bytes() if source.exists() else b"not really a jpeg")
        assert path.stat().st_size == size
        os.utime(path, ns=(mtime_ns, mtime_ns))
    return path.parent


def test_a_v1_store_migrates_in_place_and_resumes_without_captioning_again(tmp_path):
    from captionkit.models import load
    from captionkit.options import GenerationOptions, RunOptions
    from captionkit.pipeline import Pipeline

    photos = _lay_out_v1_photos()
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(V1 / DB_NAME, out / DB_NAME)
    summary = Pipeline(load("objects"), GenerationOptions(),
                       RunOptions(output_dir=out, progress=False, formats=("captions.txt", "csv"))
                       ).run([str(photos)])
    assert (summary.done, summary.skipped, summary.failed_earlier) == (0, 6, 1)
    assert (out / "captions.txt").read_text() == (V1 / "captions.txt").read_text()
    assert (out / "captions.csv").read_text() == (V1 / "captions.csv").read_text()
    store = Store(out / DB_NAME)
    assert store.db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    kinds = [row[0] for row in store.db.execute("SELECT kind FROM runs ORDER BY id")]
    assert kinds == ["caption", "export", "caption"]
    keys = {row[0] for row in store.db.execute("SELECT options_key FROM results")}
    assert keys == {store.latest_options_key()} and next(iter(keys)).startswith("v2:")


def test_migration_keeps_keys_it_cannot_read(tmp_path):
    db = sqlite3.connect(tmp_path / DB_NAME)
    db.executescript(f"{MIGRATIONS[0]}; PRAGMA user_version = 1;")
    db.execute("INSERT INTO runs (started, model_id, options_key, options) VALUES (1, 'm', 'm#1', '{}')")
    db.execute("INSERT INTO runs (started, model_id, options_key, options) "
               "VALUES (2, 'm', 'blip#0123456789ab#bfloat16#files-42#full-decode#clip@clipscore', "
               "'{\"captions\": \"x.txt\"}')")
    db.commit()
    db.close()
    store = Store(tmp_path / DB_NAME)
    rows = store.db.execute("SELECT options_key, kind FROM runs ORDER BY id").fetchall()
    assert rows[0][0] == "m#1" and rows[0][1] == "caption"
    assert rows[1][1] == "score"
    assert rows[1][0] == resume_key({"model": "blip", "generation": "0123456789ab", "variant": "bfloat16",
                                     "fingerprint": "42", "full_decode": True, "scorer": "clip@clipscore"})
