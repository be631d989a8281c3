"""The run record: one SQLite file per output folder, so runs resume and outputs can be rebuilt."""

from __future__ import annotations

import functools
import json
import os
import sqlite3
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from captionkit.errors import OutputError
from captionkit.keys import identity_of_v1_key, resume_key
from captionkit.predictions import Prediction, Region, regions_from_json, regions_to_json

F = TypeVar("F", bound=Callable)

DB_NAME = "captionkit.db"
BUSY_SECONDS = 10.0

RUN_KINDS = ("caption", "score", "export", "segment", "train")
"""What a row of `runs` records: a captioning run, a scoring or export pass, and what comes next."""


def _rekey_v1(db: sqlite3.Connection) -> None:
    """Give v1 results and runs the v2 key of the same identity, so they resume as they were."""
    keys = {key for (key,) in db.execute("SELECT options_key FROM results UNION "
                                         "SELECT options_key FROM runs")}
    for old in keys:
        identity = identity_of_v1_key(old)
        if identity is None:
            continue
        new = resume_key(identity)
        db.execute("UPDATE results SET options_key = ? WHERE options_key = ?", (new, old))
        db.execute("UPDATE runs SET options_key = ? WHERE options_key = ?", (new, old))


MIGRATIONS: list[str | Callable[[sqlite3.Connection], None]] = [
    """
    CREATE TABLE runs (
        id INTEGER PRIMARY KEY,
        started REAL NOT NULL,
        finished REAL,
        model_id TEXT NOT NULL,
        options_key TEXT NOT NULL,
        options TEXT NOT NULL,
        summary TEXT
    );
    CREATE TABLE results (
        path BLOB NOT NULL,
        name TEXT NOT NULL,
        options_key TEXT NOT NULL,
        model_id TEXT NOT NULL,
        hash TEXT,
        size INTEGER,
        mtime_ns INTEGER,
        status TEXT NOT NULL CHECK (status IN ('done', 'failed')),
        caption TEXT,
        extras TEXT,
        error TEXT,
        seconds REAL,
        run_id INTEGER REFERENCES runs(id),
        updated REAL NOT NULL,
        PRIMARY KEY (path, options_key)
    );
    CREATE INDEX results_by_hash ON results (options_key, hash);
    """,
    """
    ALTER TABLE runs ADD COLUMN kind TEXT NOT NULL DEFAULT 'caption';
    UPDATE runs SET kind = 'export' WHERE json_type(options, '$.export') IS NOT NULL;
    UPDATE runs SET kind = 'score' WHERE json_type(options, '$.captions') IS NOT NULL;
    ALTER TABLE results ADD COLUMN regions TEXT;
    """,
    _rekey_v1,
]


@dataclass
class Result:
    """One image's outcome under one model and option set."""

    path: Path
    name: str
    status: str
    caption: str | None = None
    extras: dict = field(default_factory=dict)
    error: str | None = None
    hash: str | None = None
    size: int | None = None
    mtime_ns: int | None = None
    seconds: float | None = None
    model_id: str = ""
    regions: list[Region] = field(default_factory=list)

    def as_prediction(self) -> Prediction:
        """What the model said about this image."""
        return Prediction(self.caption or "", self.extras, self.regions)


KEPT = "; what was recorded before is kept, so the same command resumes once this is fixed"


def _reported(doing: str, hint: str = KEPT) -> Callable[[F], F]:
    """Turn SQLite's errors in a Store method (disk full, read-only, not a database) into one line."""

    def decorate(method: F) -> F:
        @functools.wraps(method)
        def wrapper(self: Store, *args, **kwargs):
            try:
                return method(self, *args, **kwargs)
            except sqlite3.Error as error:
                raise OutputError(f"{self.path}: cannot {doing}: {error}{hint}") from error
        return wrapper  # type: ignore[return-value]
    return decorate


class Store:
    """Results keyed by (image path, options key); each batch is committed as it finishes."""

    @_reported("open the run record", hint="")
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # timeout: how long a write waits for another run's lock before "database is locked"
        self.db = sqlite3.connect(path, timeout=BUSY_SECONDS, isolation_level=None,
                                  check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self._use_wal()
        self.db.execute("PRAGMA synchronous=NORMAL")
        self._migrate()

    def _use_wal(self) -> None:
        """Switch to write-ahead logging, waiting out another run doing the same to a new store.

        SQLite answers "database is locked" at once, without waiting the busy timeout, when
        another connection holds the lock this switch needs.
        """
        deadline = time.monotonic() + BUSY_SECONDS
        while True:
            try:
                self.db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as err:
                if "locked" not in str(err) or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def _migrate(self) -> None:
        """Bring the schema up to date; safe when several runs open a new store at once."""
        for number, step in enumerate(MIGRATIONS, start=1):
            if self._version() >= number:
                continue
            try:
                if callable(step):
                    self._apply(number, step)
                else:
                    self.db.executescript(f"BEGIN IMMEDIATE; {step}; PRAGMA user_version = {number}; COMMIT;")
            except sqlite3.OperationalError:
                # Another run may have applied it between our check and our write lock.
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                if self._version() < number:
                    raise

    def _apply(self, number: int, step: Callable[[sqlite3.Connection], None]) -> None:
        """Run a migration written in Python in one transaction, unless another run just did."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            if self._version() < number:
                step(self.db)
                self.db.execute(f"PRAGMA user_version = {number}")
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def _version(self) -> int:
        return self.db.execute("PRAGMA user_version").fetchone()[0]

    def close(self) -> None:
        self.db.close()

    @_reported("start a run")
    def start_run(self, model_id: str, options_key: str, options: dict, kind: str = "caption") -> int:
        """Record the start of a run or pass of `kind` (one of RUN_KINDS)."""
        if kind not in RUN_KINDS:
            raise ValueError(f"unknown run kind {kind!r}")
        cursor = self.db.execute(
            "INSERT INTO runs (started, model_id, options_key, options, kind) VALUES (?, ?, ?, ?, ?)",
            (time.time(), model_id, options_key, json.dumps(options, sort_keys=True), kind))
        return int(cursor.lastrowid)

    @_reported("finish the run")
    def finish_run(self, run_id: int, summary: dict) -> None:
        self.db.execute("UPDATE runs SET finished = ?, summary = ? WHERE id = ?",
                        (time.time(), json.dumps(summary), run_id))

    def latest_options_key(self, model_ids: Collection[str] | None = None) -> str | None:
        """The option set of the latest captioning run (of one of `model_ids`, if given): the
        exports and scoring passes recorded beside runs do not count, so `export --model X --to DIR`
        leaves the next export's default."""
        for model_id, key in self._captioning_runs():
            if model_ids is None or model_id in model_ids:
                return key
        return None

    def run_options(self, options_key: str) -> dict:
        """What the latest captioning run of an option set recorded of its options (`start_run`)."""
        row = self.db.execute("SELECT options FROM runs WHERE options_key = ? AND kind IN "
                              "('caption', 'segment') ORDER BY id DESC LIMIT 1", (options_key,)).fetchone()
        return json.loads(row[0] or "{}") if row is not None else {}

    def run_models(self) -> set[str]:
        """The model ids of the captioning runs recorded here."""
        return {model_id for model_id, _ in self._captioning_runs()}

    def _captioning_runs(self) -> Iterator[tuple[str, str]]:
        """(model id, option set) of each run that predicted (captions or masks), the latest first."""
        yield from self.db.execute("SELECT model_id, options_key FROM runs "
                                   "WHERE kind IN ('caption', 'segment') ORDER BY id DESC")

    @_reported("forget results")
    def forget(self, options_key: str) -> None:
        """Drop every result of an option set (`--overwrite`)."""
        self.db.execute("DELETE FROM results WHERE options_key = ?", (options_key,))

    def previous(self, options_key: str) -> dict[bytes, sqlite3.Row]:
        """Earlier outcomes by raw path, to decide what a resumed run skips."""
        rows = self.db.execute("SELECT path, status, size, mtime_ns, hash, caption, extras FROM results "
                               "WHERE options_key = ?", (options_key,))
        return {bytes(row["path"]): row for row in rows}

    def captions_by_content(self, options_key: str) -> dict[tuple[str, str | None], Prediction]:
        """Finished predictions by (content hash, the image's own prompt), so identical files asked
        the same thing are captioned once."""
        rows = self.db.execute("SELECT hash, caption, extras, regions FROM results WHERE options_key = ? "
                               "AND status = 'done' AND hash IS NOT NULL", (options_key,))
        found = {}
        for row in rows:
            extras = extras_of(row)
            found[row["hash"], extras.get("prompt")] = Prediction(
                row["caption"], extras, regions_from_json(json.loads(row["regions"] or "null")))
        return found

    @_reported("record results")
    def record(self, results: Iterable[Result], options_key: str, run_id: int) -> None:
        """Write a batch in one transaction: after a crash it is either all there or absent."""
        now = time.time()
        rows = [(os.fsencode(r.path), r.name, options_key, r.model_id, r.hash, r.size, r.mtime_ns,
                 r.status, r.caption, json.dumps(r.extras) if r.extras else None, r.error,
                 r.seconds, run_id, now, _json_or_none(regions_to_json(r.regions))) for r in results]
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany(
                "INSERT OR REPLACE INTO results (path, name, options_key, model_id, hash, size, "
                "mtime_ns, status, caption, extras, error, seconds, run_id, updated, regions) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)

    def recorded_captions(self) -> RecordedCaptions:
        """Every caption recorded for each image path, under any model or options, and every
        `prefix` and `suffix` a run exported captions with: what a caption file of ours may hold."""
        decorations = {("", "")}
        for (options,) in self.db.execute("SELECT options FROM runs"):
            recorded = json.loads(options or "{}")
            decorations.add((recorded.get("prefix", ""), recorded.get("suffix", "")))
        found: dict[bytes, set[str]] = {}
        for path, caption in self.db.execute("SELECT path, caption FROM results "
                                             "WHERE status = 'done' AND caption IS NOT NULL"):
            found.setdefault(bytes(path), set()).add(caption)
        return RecordedCaptions({path: tuple(captions) for path, captions in found.items()},
                                frozenset(decorations))

    def results(self, options_key: str) -> Iterator[Result]:
        """Every result of an option set, ordered by export name."""
        rows = self.db.execute("SELECT * FROM results WHERE options_key = ? ORDER BY name, path",
                               (options_key,))
        for row in rows:
            yield Result(path=Path(os.fsdecode(bytes(row["path"]))), name=row["name"],
                         status=row["status"], caption=row["caption"],
                         extras=extras_of(row), error=row["error"],
                         hash=row["hash"], size=row["size"], mtime_ns=row["mtime_ns"],
                         seconds=row["seconds"], model_id=row["model_id"],
                         regions=regions_from_json(json.loads(row["regions"] or "null")))

    @_reported("update results")
    def update_extras(self, results: Iterable[Result], options_key: str) -> None:
        """Rewrite the extras of recorded results (a changed quality gate) in one transaction."""
        rows = [(json.dumps(r.extras) if r.extras else None, os.fsencode(r.path), options_key)
                for r in results]
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany("UPDATE results SET extras = ? WHERE path = ? AND options_key = ?",
                                rows)


@dataclass(frozen=True)
class RecordedCaptions:
    """The captions a store recorded per image path (`os.fsencode`), each kept once, and the
    prefix/suffix pairs its runs exported them with; decorated only when a file is checked."""

    captions: Mapping[bytes, tuple[str, ...]]
    decorations: frozenset[tuple[str, str]]

    def include(self, path: Path, text: str) -> bool:
        """Whether `text`, read as one line, is a recorded caption of `path` as some run exported it."""
        line = " ".join(text.split())
        return any(" ".join(f"{prefix}{caption}{suffix}".split()) == line
                   for caption in self.captions.get(os.fsencode(path), ())
                   for prefix, suffix in self.decorations)


def stat_image(path: Path) -> os.stat_result:
    from captionkit.sources import stat_image as stat

    return stat(path)


def unchanged_row(previous: Mapping[bytes, sqlite3.Row],
                  path: Path) -> tuple[sqlite3.Row | None, int | None, int | None]:
    """`path`'s row in `previous` if the file's size and modification time still match it (else
    None), and the file's size and mtime_ns now (None when it cannot be read)."""
    try:
        stat = stat_image(path)  # a tar shard's member: its shard's size and time
        size, mtime_ns = stat.st_size, stat.st_mtime_ns
    except OSError:
        size = mtime_ns = None
    row = previous.get(os.fsencode(path))
    unchanged = row is not None and (row["size"], row["mtime_ns"]) == (size, mtime_ns)
    return (row if unchanged else None), size, mtime_ns


def extras_of(row: sqlite3.Row) -> dict:
    """A stored row's extras (prompt, candidates, score...), decoded."""
    return json.loads(row["extras"] or "{}")


def _json_or_none(value: object) -> str | None:
    return json.dumps(value) if value is not None else None
