"""Captions written back as webdataset shards: for each input shard, a shard of the same name
under `OUT/webdataset/` holding `{key}.txt` (the caption) and `{key}.json` (the JSONL record) for
each captioned member, in the input shard's order, so a webdataset reader joins them by key."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from captionkit import sources
from captionkit.exporters import ExportOptions, atomic_output, record_of, relative_path
from captionkit.store import Result

FOLDER = "webdataset"


def write_shards(results: Sequence[Result], options: ExportOptions) -> list[Path]:
    """A caption shard per input shard that has captioned members; shards left in the folder by
    an export with more of them are removed. Members carry a fixed time, so the same captions
    always give the same bytes."""
    folder = options.output_dir / FOLDER
    written = [_write_shard(folder / name, members, options)
               for name, members in _by_shard(results).items()]
    for stale in folder.rglob("*.tar") if folder.is_dir() else ():
        if stale not in written:
            stale.unlink()
    return written


def why_nothing_written(done: Sequence[Result]) -> str | None:
    """Why captioned results give no caption shard: none of them came from a tar shard."""
    if any(sources.shard_of(result.path) for result in done):
        return None
    return "no captioned image came from a tar shard (it writes a caption shard per input shard)"


def _by_shard(results: Sequence[Result]) -> dict[Path, list[tuple[str, Result]]]:
    """Each shard's captioned members as (webdataset key, result), keyed by the shard's export
    name (`00001.tar`, `part/00001.tar`), in the shard's own order."""
    found: dict[Path, dict[str, tuple[str, Result]]] = {}
    for result in results:
        shard = sources.shard_of(result.path)
        if result.status == "done" and shard is not None:
            exported = relative_path(result)
            depth = len(PurePosixPath(shard[1]).parts)
            found.setdefault(Path(*exported.parts[:-depth]), {})[shard[1]] = (_key(shard[1]), result)
    return {name: _in_shard_order(result_of) for name, result_of in found.items()}


def _in_shard_order(result_of: dict[str, tuple[str, Result]]) -> list[tuple[str, Result]]:
    shard = sources.shard_of(next(iter(result_of.values()))[1].path)[0]
    order = {member: index for index, member in enumerate(sources.shard_index(shard).members)}
    return [result_of[member] for member in sorted(result_of, key=lambda m: order.get(m, len(order)))]


def _key(member: str) -> str:
    """The webdataset key of a member: its path up to the first dot of its file name."""
    path = PurePosixPath(member)
    return str(path.with_name(path.name.split(".", 1)[0]))


def _write_shard(path: Path, members: list[tuple[str, Result]], options: ExportOptions) -> Path:
    def write(tmp: str) -> None:
        with tarfile.open(tmp, "w") as tar:
            for key, result in members:
                record = json.dumps(record_of(result, options), ensure_ascii=False, default=str)
                _add(tar, f"{key}.txt", options.decorate(result.caption))
                _add(tar, f"{key}.json", record)

    atomic_output(path, write)
    return path


def _add(tar: tarfile.TarFile, name: str, text: str) -> None:
    data = text.encode("utf-8", "replace")
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    tar.addfile(info, io.BytesIO(data))
