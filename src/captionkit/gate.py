"""The quality gate: score captions with CLIP, keep the best candidate, set low scorers aside.

Scores are stored with each caption; whether a caption passes is derived from the current
`--min-score` after every run, and files are copied or moved from the store, so a resumed run ends
with the same folders as an uninterrupted one.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from captionkit import sources
from captionkit.datasets import (
    IMAGE_EXTENSIONS,
    image_key,
    match_images,
    posix_name,
    read_predictions,
    read_references,
)
from captionkit.errors import CaptionkitError, ImageError, OptionError
from captionkit.exporters import ExportOptions, listed, relative_path, sidecar_path, write_sidecar
from captionkit.options import GateOptions, GenerationOptions
from captionkit.predictions import Caption, regions_from_json
from captionkit.store import Result, Store, extras_of, unchanged_row

if TYPE_CHECKING:
    import sqlite3

    from PIL.Image import Image

    from captionkit.scoring import ClipScorer


def load_scorer(options: GateOptions, generation: GenerationOptions,
                device: str = "auto") -> ClipScorer | None:
    """The scorer these options ask for, or None."""
    from captionkit import scoring

    name = options.scorer_name(generation)
    return None if name is None else scoring.load_scorer(name, device=device,
                                                         scale=options.score_scale)


def score_batch(scorer: ClipScorer, pairs: Sequence[tuple[Image, Caption]]) -> None:
    """Score each caption against its image, embedding every image once; of several candidates
    the best-scoring becomes the caption, and all are kept with their scores."""
    import torch

    if not pairs:
        return
    embeddings = scorer.embed_images([image for image, _ in pairs])
    groups = [[c["text"] for c in caption.extras.get("candidates", [])] or [caption.text]
              for _, caption in pairs]
    counts = torch.tensor([len(g) for g in groups], device=embeddings.device)
    rows = torch.repeat_interleave(embeddings, counts, dim=0)
    scored = iter(scorer.score_embeddings(rows, [text for group in groups for text in group]))
    for (_, caption), group in zip(pairs, groups, strict=True):
        scores = [next(scored).clip_score for _ in group]
        # max() keeps the first of equal scores: the model's own preferred candidate.
        best = max(range(len(group)), key=scores.__getitem__)
        if caption.extras.get("candidates"):
            candidates = [{**candidate, "clip_score": score} for candidate, score
                          in zip(caption.extras["candidates"], scores, strict=True)]
            caption.extras["candidates"] = candidates
            # The kept candidate's own fields (a model's regions, say) replace the first one's.
            kept = candidates[best]
            caption.extras.update({k: v for k, v in kept.items() if k not in ("text", "regions")})
            if "regions" in kept:
                caption.regions = regions_from_json(kept["regions"])
        caption.text = group[best]
        caption.extras["clip_score"] = scores[best]


def mark(results: Iterable[Result], min_score: float | None) -> list[Result]:
    """Set `passed` on scored results for the threshold (drop it without one); returns the changed."""
    changed = []
    for result in results:
        score = result.extras.get("clip_score")
        passed = None if min_score is None or score is None else score >= min_score
        if result.extras.get("passed") == passed:
            continue
        if passed is None:
            del result.extras["passed"]
        else:
            result.extras["passed"] = passed
        changed.append(result)
    return changed


def tally(results: Iterable[Result]) -> tuple[list[float], int]:
    """Every caption's score, and how many of them passed."""
    scored = [r for r in results if r.status == "done" and "clip_score" in r.extras]
    return ([r.extras["clip_score"] for r in scored],
            sum(r.extras.get("passed", True) for r in scored))


def bring_back(results: Iterable[Result], options: GateOptions, export: ExportOptions) -> None:
    """Move the images an earlier run moved into the failed folder (`--move`) and that pass now (a
    lower --min-score) back where they came from, with their caption files leaving that folder."""
    if options.failed_dir is None or not options.move:
        return
    aside = _failed_folder(options.failed_dir, export)
    for result in results:
        parked = aside.output_dir / relative_path(result)
        if result.status == "done" and result.extras.get("passed") is not False and (
                not result.path.exists() and parked.exists()):
            _put(parked, result.path, move=True)
            sidecar_path(result, aside).unlink(missing_ok=True)


def place(results: Iterable[Result], options: GateOptions, export: ExportOptions) -> int:
    """Copy listed images into the output folder (`copy_images`, which also removes an earlier run's
    copies of images that fail now), then copy or move failed ones with their caption file into the
    failed folder; returns how many are there. Safe to repeat."""
    set_aside = 0
    aside = None if options.failed_dir is None else _failed_folder(options.failed_dir, export)
    for result in results:
        if result.status != "done":
            continue
        failed = result.extras.get("passed") is False
        parked = None if aside is None else aside.output_dir / relative_path(result)
        copy = export.output_dir / relative_path(result)
        if options.copy_images and listed(result, export):
            _put(result.path, copy, move=False)
        elif options.copy_images and failed:
            _withdraw_copy(copy, result.path if result.path.exists() else parked)
        if parked is not None and failed and _put(result.path, parked, options.move):
            write_sidecar(result, aside)
            set_aside += 1
    return set_aside


def _withdraw_copy(copy: Path, original: Path | None) -> None:
    """Remove an earlier run's copy of an image that fails the gate now: only while the original is
    still there (in place, or moved into the failed folder), and only a file that is not the original
    itself and matches it in size and modification time (the copy `_put` made)."""
    try:
        if (original is not None and copy.exists() and original.exists()
                and not os.path.samefile(copy, original) and _same(original, copy)):
            copy.unlink()
    except OSError as err:
        raise CaptionkitError(f"cannot remove {copy}: {err.strerror or err}") from None


def _failed_folder(failed_dir: Path, export: ExportOptions) -> ExportOptions:
    """How caption files are written into the failed folder: mirrored, named as in the output."""
    return replace(export, output_dir=failed_dir, sidecars_beside_images=False, ours=None,
                   missing=frozenset())


def _put(source: Path, target: Path, move: bool) -> bool:
    """Copy or move `source` to `target` atomically; False when neither holds the file any more."""
    verb = "move" if move else "copy"
    try:
        if not source.exists():
            return target.exists()  # moved there by an earlier run, or deleted by the user
        if target.exists() and (os.path.samefile(source, target) or not move and _same(source, target)):
            return True
        target.parent.mkdir(parents=True, exist_ok=True)
        if move:
            try:
                os.replace(source, target)
                return True
            except OSError as err:
                if err.errno != errno.EXDEV:
                    raise
        _copy(source, target)
        if move:
            source.unlink()
    except OSError as err:
        raise CaptionkitError(f"cannot {verb} {source} to {target}: {err.strerror or err}") from None
    return True


def _same(source: Path, target: Path) -> bool:
    # copy2 keeps the modification time, so an earlier copy matches in size and mtime.
    a, b = source.stat(), target.stat()
    return (a.st_size, a.st_mtime_ns) == (b.st_size, b.st_mtime_ns)


def _copy(source: Path, target: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        shutil.copy2(source, tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class ScoredCaptions:
    """Existing captions with their scores: one Result per image (failed when its image is missing
    or unreadable), and the input rows that could not be used."""

    results: list[Result]
    problems: list[str]
    images: Path
    reused: int = 0
    """Scores taken from the store, scored by an earlier run."""


def locate_images(names: Iterable[str], root: Path) -> dict[str, Path]:
    """Each name's image: `root/name`, else the file with that base name anywhere under `root` (or
    with that stem, for a sidecar's name), the one sharing most of the name's folders when several
    have it; names with no image are left out."""
    names = list(names)
    found = {name: root / name for name in names if (root / name).is_file()}
    rest = [name for name in names if name not in found]
    if rest:
        index: dict[str, list[Path]] = {}
        for directory, subdirectories, files in os.walk(root):
            subdirectories[:] = sorted(d for d in subdirectories if not d.startswith("."))
            for file in sorted(files):
                if Path(file).suffix.lower() in IMAGE_EXTENSIONS:
                    index.setdefault(file, []).append(Path(directory) / file)
        found.update({name: _closest(index[match], name)
                      for name, match in _match_by_base_name(rest, index).items()})
    return found


def _match_by_base_name(names: Iterable[str], referenced: Iterable[str]) -> dict[str, str]:
    """Each name, folders kept (`A/x.jpg`), matched to a referenced name by its base name under
    `match_images`' rule."""
    keys = {name: image_key(name) for name in names}
    matched = match_images(dict.fromkeys(keys.values()), referenced)
    return {name: matched[key] for name, key in keys.items() if key in matched}


def _closest(paths: list[Path], name: str) -> Path:
    """The path ending in most of `name`'s trailing parts (`B/x.jpg` picks `.../B/x.jpg`); the
    first on a tie."""
    parts = PurePosixPath(posix_name(name)).parts[:-1]

    def shared(path: Path) -> int:
        folders = path.parts[:-1]
        count = 0
        while count < min(len(parts), len(folders)) and parts[-1 - count] == folders[-1 - count]:
            count += 1
        return count

    return max(paths, key=shared)


@contextmanager
def _no_progress(total: int) -> Iterator[Callable[[int], object]]:
    yield lambda done: None


def _score_batch(batch: list[Result], scorer: ClipScorer, references: Mapping[str, list[str]] | None,
                 ref_names: Mapping[str, str], pool: Executor) -> None:
    """Score one batch in place: `done` with its scores, or the reason its image did not load.
    The images load in `pool`'s threads, which also make the scorer's inputs when it says how."""
    loaded = []
    for result, image in zip(batch, pool.map(partial(_load_for, scorer), batch), strict=True):
        if isinstance(image, str):
            result.error = image
        else:
            loaded.append((result, image))
    if not loaded:
        return
    wanted = None if references is None else [references.get(ref_names.get(r.name, ""), [])
                                              for r, _ in loaded]
    scores = scorer.score([image for _, image in loaded], [r.caption or "" for r, _ in loaded], wanted)
    for (result, _), score in zip(loaded, scores, strict=True):
        result.status = "done"
        result.extras["clip_score"] = score.clip_score
        if score.ref_clip_score is not None:
            result.extras["ref_clip_score"] = score.ref_clip_score


def _load_for(scorer: ClipScorer, result: Result) -> Image | str:
    """A result's image, whole, carrying the scorer's input when it declares how to make it; or
    the reason it does not load."""
    from captionkit import preprocess

    try:
        image = sources.load_image(result.path)
    except ImageError as err:
        return err.reason
    preprocess.attach_inputs(image, [scorer.preprocess] if scorer.preprocess is not None else [])
    return image


@contextmanager
def _loading_threads(scorer: ClipScorer) -> Iterator[Executor]:
    """Threads that load images (each on one torch thread when they make the scorer's inputs)."""
    from captionkit import preprocess
    from captionkit.device import default_workers

    pinned = preprocess.one_torch_thread if scorer.preprocess is not None else None
    with ThreadPoolExecutor(default_workers(), thread_name_prefix="captionkit-decode",
                            initializer=pinned) as pool:
        yield pool


def score_existing(captions: Path, scorer: ClipScorer, images: Path | None = None,
                   references: Path | None = None, min_score: float | None = None,
                   progress: Callable[[int], AbstractContextManager[Callable[[int], object]]]
                   | None = None, store: Store | None = None) -> ScoredCaptions:
    """Score the captions in a captions.txt, JSONL, CSV or sidecar folder against their images,
    found under `images` (default: the captions file's folder); RefCLIPScore with `references`.
    `progress(total)`, when given, opens a bar (`pipeline.progress_bar`) advanced batch by batch.
    With a `store`, each batch is committed as it is scored, and scores it already holds for the
    same caption, unchanged image, scorer and references are reused: an interrupted run resumes."""
    captions = Path(captions)
    root = Path(images) if images is not None else captions if captions.is_dir() else captions.parent
    if not root.is_dir():
        raise OptionError(f"--images {root}: no such folder")
    predictions = read_predictions(captions, keep_folders=True)
    problems = list(predictions.problems)
    refs = read_references(references) if references is not None else None
    ref_names: Mapping[str, str] = {}
    if refs is not None:
        problems += refs.problems
        ref_names = {sources.printable(name): ref
                     for name, ref in _match_by_base_name(predictions.captions, refs.captions).items()}
    paths = locate_images(predictions.captions, root)
    # Names read from a folder keep the bytes of caption files' names; shown and stored, they are printable.
    results = [Result(path=paths.get(name, root / name), name=sources.printable(name), status="failed",
                      caption=text, error=None if name in paths else f"no image file for it under {root}")
               for name, text in predictions.captions.items()]
    todo = [result for result in results if result.error is None]
    ref_captions = refs.captions if refs is not None else None
    key = score_key(scorer, ref_captions)
    reused = _reuse_scores(todo, store.previous(key)) if store is not None else 0
    todo = [result for result in todo if result.status != "done"]
    run_id = store.start_run(scorer.name, key, {"captions": str(captions)},
                             kind="score") if store else 0
    with (progress or _no_progress)(len(todo)) as advance, _loading_threads(scorer) as pool:
        for start in range(0, len(todo), scorer.batch_size):
            batch = todo[start:start + scorer.batch_size]
            _score_batch(batch, scorer, ref_captions, ref_names, pool)
            if store is not None:
                store.record(batch, key, run_id)
            advance(len(batch))
    mark(results, min_score)
    if store is not None:
        store.finish_run(run_id, {"scored": len(todo), "reused": reused})
    return ScoredCaptions(results, problems, root, reused)


def score_key(scorer: ClipScorer, references: Mapping[str, list[str]] | None) -> str:
    """What a stored score depends on besides its caption and image: the scorer and references."""
    key = f"score#{scorer.name}@{scorer.scale}"
    if references is None:
        return key
    listed = json.dumps(sorted(references.items()), ensure_ascii=False).encode("utf-8", "replace")
    return f"{key}+refs:{sources.content_hash(listed)}"


def _reuse_scores(results: list[Result], previous: Mapping[bytes, sqlite3.Row]) -> int:
    """Mark done the results whose stored score still holds; return how many."""
    reused = 0
    for result in results:
        row, result.size, result.mtime_ns = unchanged_row(previous, result.path)
        if row is not None and row["status"] == "done" and row["caption"] == result.caption:
            result.status, result.extras = "done", extras_of(row)
            reused += 1
    return reused
