"""Caption metrics computed the way papers compute them: pycocoevalcap on PTB-tokenized text.

BLEU-1..4, METEOR, ROUGE-L, CIDEr-D and SPICE come from pycocoevalcap itself (its `Cider` is
CIDEr-D: clipped tf-idf n-grams, a Gaussian length penalty, times 10), so the numbers equal its own.
`evaluate_files` and `evaluate_dataset` are the two halves of `captionkit evaluate`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from captionkit.datasets import (
    DATASETS,
    Predictions,
    References,
    find_images,
    image_key,
    load_dataset,
    match_images,
    read_predictions,
    read_references,
)
from captionkit.errors import CaptionkitError, ImageError, OptionError
from captionkit.eval_result import TOKENIZERS, EvalResult
from captionkit.report import write_report
from captionkit.sources import load_image

if TYPE_CHECKING:
    from pycocoevalcap.meteor.meteor import Meteor

    from captionkit.models.base import Captioner
    from captionkit.options import GenerationOptions, LoadOptions
    from captionkit.pipeline import RunSummary
    from captionkit.scoring import ClipScorer

METRICS = ("bleu", "meteor", "rouge", "cider", "spice")
COLUMNS: dict[str, tuple[str, ...]] = {
    "bleu": ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"),
    "meteor": ("METEOR",),
    "rouge": ("ROUGE-L",),
    "cider": ("CIDEr-D",),
    "spice": ("SPICE",),
    "clip": ("CLIPScore", "RefCLIPScore"),
}
JAVA_MISSING = ("METEOR, SPICE and the PTB tokenizer need Java: install a JRE "
                "(e.g. `apt install openjdk-17-jre-headless`) and put `java` on PATH")
CLIP_BATCH = 16
DEFAULT_OUTPUT_DIR = Path("captionkit-eval")


class EvaluationError(CaptionkitError):
    """Scoring cannot start: pycocoevalcap is absent, or no prediction matches a reference."""


class MetricUnavailable(Exception):
    """One metric cannot run here; the message says what to install or download."""


def java_missing() -> str | None:
    """Why the Java metrics cannot run here, or None when `java` is on PATH."""
    return None if shutil.which("java") else JAVA_MISSING


def _evalcap_dir() -> Path:
    try:
        import pycocoevalcap.spice
    except ImportError:
        raise EvaluationError("scoring needs pycocoevalcap: pip install 'captionkit[eval]'") from None
    return Path(pycocoevalcap.spice.__file__).parent.parent


def spice_missing(spice_dir: Path | None = None) -> str | None:
    """Why SPICE cannot run (the Stanford CoreNLP 3.6.0 jars are absent), or None."""
    lib = (spice_dir or _evalcap_dir() / "spice") / "lib"
    needed = ["stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar"]
    absent = [name for name in needed if not (lib / name).is_file()]
    if not absent:
        return None
    return (f"SPICE needs {' and '.join(absent)} in {lib}: take {'them' if len(absent) > 1 else 'it'}"
            " from stanford-corenlp-full-2015-12-09.zip (nlp.stanford.edu/software); "
            "captionkit never downloads them")


# PTB writes brackets as -lrb- and friends, which pycocoevalcap keeps; other punctuation it drops.
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "{": "-lcb-", "}": "-rcb-", "[": "-lsb-", "]": "-rsb-"}


def simple_tokenize(text: str) -> str:
    """Lowercase, split off clitics (`do n't`, `dog 's`) and drop punctuation, like PTB mostly."""
    text = text.lower()
    text = re.sub(r"(\w)n't\b", r"\1 n't", text)
    text = re.sub(r"(\w)'(s|re|ve|ll|d|m)\b", r"\1 '\2", text)
    tokens = re.findall(
        r"n't|'(?:s|re|ve|ll|d|m)\b|(?:[a-z]\.){2,}|[^\W_]+(?:[-.'/&][^\W_]+)*|\S", text)
    kept = (_BRACKETS.get(t, t) for t in tokens)
    return " ".join(t for t in kept if re.search(r"\w", t))


def _ptb_tokenize(texts: dict[tuple[str, str], list[str]]) -> dict[tuple[str, str], list[str]]:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenized = PTBTokenizer().tokenize({key: [{"caption": c} for c in captions]
                                         for key, captions in texts.items()})
    if any(len(tokenized.get(key, [])) != len(captions) for key, captions in texts.items()):
        raise MetricUnavailable("the PTB tokenizer returned fewer lines than it was given")
    return tokenized


def _tokenize(
    texts: dict[tuple[str, str], list[str]], java_problem: str | None
) -> tuple[dict[tuple[str, str], list[str]], str, list[str]]:
    if java_problem is None:
        try:
            return _ptb_tokenize(texts), "ptb", []
        except (OSError, subprocess.SubprocessError, MetricUnavailable) as error:
            note = f"the PTB tokenizer failed ({error}); used the {TOKENIZERS['simple']}"
            return _simple(texts), "simple", [note]
    return _simple(texts), "simple", []


def _simple(texts: dict[tuple[str, str], list[str]]) -> dict[tuple[str, str], list[str]]:
    return {key: [simple_tokenize(c) for c in captions] for key, captions in texts.items()}


Scores = list[tuple[str, float, list[float]]]
Tokens = dict[str, list[str]]


def _bleu(gts: Tokens, res: Tokens) -> Scores:
    from pycocoevalcap.bleu.bleu import Bleu

    corpus, per_image = Bleu(4).compute_score(gts, res, verbose=0)
    return [(column, corpus[n], per_image[n]) for n, column in enumerate(COLUMNS["bleu"])]


def _start_meteor() -> Meteor | None:
    """Start METEOR's JVM; it spends about ten seconds loading paraphrases, so start it early."""
    from pycocoevalcap.meteor.meteor import Meteor

    try:
        return Meteor()
    except OSError:
        return None


def _meteor(gts: Tokens, res: Tokens, meteor: Meteor | None = None) -> Scores:
    meteor = meteor or _start_meteor()
    if meteor is None:
        raise MetricUnavailable("METEOR could not start Java")
    try:
        corpus, per_image = meteor.compute_score(gts, res)
    except (OSError, ValueError) as error:
        # compute_score keeps its lock when Java dies, and Meteor.__del__ would then wait forever.
        if meteor.lock.locked():
            meteor.lock.release()
        raise MetricUnavailable(f"METEOR's Java process failed ({error})") from None
    return [("METEOR", corpus, per_image)]


def _rouge(gts: Tokens, res: Tokens) -> Scores:
    from pycocoevalcap.rouge.rouge import Rouge

    corpus, per_image = Rouge().compute_score(gts, res)
    return [("ROUGE-L", corpus, list(per_image))]


def _cider(gts: Tokens, res: Tokens) -> Scores:
    from pycocoevalcap.cider.cider import Cider

    corpus, per_image = Cider().compute_score(gts, res)
    return [("CIDEr-D", corpus, list(per_image))]


def _spice(gts: Tokens, res: Tokens) -> Scores:
    reason = spice_missing()
    if reason:
        raise MetricUnavailable(reason)
    from pycocoevalcap.spice.spice import Spice

    try:
        corpus, per_image = Spice().compute_score(gts, res)
    except subprocess.CalledProcessError as error:
        raise MetricUnavailable(
            f"SPICE's Java process failed (exit {error.returncode}); SPICE 1.0 runs on Java 8 or "
            "11 and is known to fail on Java 17 and newer") from None
    except (OSError, ValueError) as error:
        raise MetricUnavailable(f"SPICE failed ({error})") from None
    return [("SPICE", corpus, [s["All"]["f"] for s in per_image])]


SCORERS: dict[str, Callable[[Tokens, Tokens], Scores]] = {
    "bleu": _bleu,
    "meteor": _meteor,
    "rouge": _rouge,
    "cider": _cider,
    "spice": _spice,
}
NEEDS_JAVA = frozenset({"meteor", "spice"})


def _inputs(
    predictions: Mapping[str, str] | Predictions,
    references: Mapping[str, list[str]] | References,
    image_paths: Mapping[str, Path] | None,
) -> tuple[dict[str, str], dict[str, list[str]], list[str], dict[str, Path]]:
    problems: list[str] = []
    if isinstance(predictions, Predictions):
        problems += predictions.problems
        predictions = predictions.captions
    if isinstance(references, References):
        problems += references.problems
        image_paths = references.image_paths() if image_paths is None else image_paths
        references = references.captions
    preds: dict[str, str] = {}
    for name, caption in predictions.items():
        if not isinstance(caption, str):
            raise TypeError(f"predictions[{name!r}] is a {type(caption).__name__}; give one caption "
                            "string per image")
        key = image_key(name)
        if key in preds:
            problems.append(f"predictions: {name} has the same base name as another; "
                            "the first is kept")
            continue
        preds[key] = " ".join(caption.split())
    refs: dict[str, list[str]] = {}
    for name, captions in references.items():
        # a str would be iterated as one reference per character
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise TypeError(f"references[{name!r}] must be a list of caption strings, such as "
                            f"[{captions!r}], not a {type(captions).__name__}")
        texts = [" ".join(c.split()) for c in captions]
        if not texts:
            problems.append(f"references: {name} has no reference captions")
            continue
        refs.setdefault(image_key(name), []).extend(texts)
    paths = {image_key(name): Path(path) for name, path in (image_paths or {}).items()}
    return preds, refs, problems, paths


def score_captions(
    predictions: Mapping[str, str] | Predictions,
    references: Mapping[str, list[str]] | References,
    metrics: Sequence[str] = METRICS,
    *,
    clip_scorer: ClipScorer | None = None,
    image_paths: Mapping[str, Path] | None = None,
    progress: bool = False,
) -> EvalResult:
    """Score predictions against references, per image and over the corpus.

    Only images with both are scored; the others are listed in the result. Metrics that cannot
    run here (no Java, no SPICE models) are in `missing` with the reason. CIDEr-D's idf comes from
    the scored images' references, so per-image CIDEr-D depends on the whole set.
    """
    metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    unknown = [m for m in metrics if m not in SCORERS]
    if unknown:
        raise OptionError(f"metrics {', '.join(unknown)}: choose from {', '.join(SCORERS)}")
    _evalcap_dir()
    preds, refs, problems, paths = _inputs(predictions, references, image_paths)
    matched = match_images(preds, refs)
    names = sorted(set(matched.values()))
    if not names:
        raise EvaluationError(
            f"no prediction matches a reference image ({len(preds)} predictions such as "
            f"{next(iter(preds), '-')!r}, {len(refs)} references such as "
            f"{next(iter(refs), '-')!r}); images are matched by base file name")
    result = EvalResult(
        corpus={}, per_image={name: {} for name in names},
        predictions={ref: preds[pred] for pred, ref in sorted(matched.items(), key=lambda i: i[1])},
        references={name: refs[name] for name in names},
        unreferenced=sorted(set(preds) - set(matched)),
        unpredicted=sorted(set(refs) - set(names)),
        problems=problems,
        image_paths={name: paths[name] for name in names if name in paths},
    )
    java_problem = java_missing()
    scorers = dict(SCORERS)
    if "meteor" in metrics and java_problem is None:
        scorers["meteor"] = partial(_meteor, meteor=_start_meteor())
    texts = {("ref", name): result.references[name] for name in names}
    texts.update({("pred", name): [result.predictions[name]] for name in names})
    tokens, result.tokenizer, notes = _tokenize(texts, java_problem)
    result.problems += notes
    gts = {name: tokens[("ref", name)] for name in names}
    res = {name: tokens[("pred", name)] for name in names}
    for metric in dict.fromkeys(metrics):
        try:
            if java_problem and metric in NEEDS_JAVA:
                raise MetricUnavailable(java_problem)
            scores = scorers[metric](gts, res)
        except MetricUnavailable as reason:
            result.missing.update({column: str(reason) for column in COLUMNS[metric]})
            continue
        for column, corpus, per_image in scores:
            _record(result, column, corpus, per_image)
    if clip_scorer is not None:
        _clip(result, clip_scorer, progress)
    return result


def _clip_batch(result: EvalResult, scorer: ClipScorer, names: list[str],
                values: dict[str, list[float]], unreadable: list[str]) -> None:
    batch, images = [], []
    for name in names:
        path = result.image_paths.get(name)
        if path is None:
            unreadable.append(f"{name} (no image file found)")
            continue
        try:
            # The loader every path uses, so `score` and `evaluate` see the same pixels.
            images.append(load_image(path))
        except ImageError as error:
            unreadable.append(f"{name} ({error.reason})")
            continue
        batch.append(name)
    if not batch:
        return
    # One call gives both: the images are embedded once, then compared with caption and references.
    scores = scorer.score(images, [result.predictions[name] for name in batch],
                          references=[result.references[name] for name in batch])
    for name, score in zip(batch, scores, strict=True):
        for column, value in (("CLIPScore", score.clip_score), ("RefCLIPScore", score.ref_clip_score)):
            if value is not None:
                result.per_image[name][column] = float(value)
                values[column].append(float(value))


def _record(result: EvalResult, column: str, corpus: float, per_image: Sequence[float]) -> None:
    result.corpus[column] = float(corpus)
    for name, value in zip(result.per_image, per_image, strict=True):
        result.per_image[name][column] = float(value)


def _clip(result: EvalResult, scorer: ClipScorer, progress: bool = False) -> None:
    from captionkit.ui import progress_bar

    unreadable: list[str] = []
    values: dict[str, list[float]] = {"CLIPScore": [], "RefCLIPScore": []}
    names = list(result.per_image)
    with progress_bar(len(names), progress, "CLIPScore") as advance:
        for start in range(0, len(names), CLIP_BATCH):
            chunk = names[start: start + CLIP_BATCH]
            _clip_batch(result, scorer, chunk, values, unreadable)
            advance(len(chunk))
    if unreadable:
        result.problems.append(f"no CLIPScore for {len(unreadable)} images whose files are "
                               f"missing or unreadable, such as {unreadable[0]}")
    for column, scores in values.items():
        if scores:
            result.corpus[column] = sum(scores) / len(scores)
        else:
            result.missing[column] = ("no image files to score: pass `image_paths`, or "
                                      "References whose root holds the images")


@dataclass
class Evaluation:
    """One `captionkit evaluate`: the scores, the files written, and the captioning run if any."""

    result: EvalResult
    files: dict[str, Path]
    run: RunSummary | None = None


def parse_metrics(metrics: str | Sequence[str]) -> tuple[str, ...]:
    """Metric names from `bleu,rouge` or a list, checked before anything slow starts."""
    names = metrics.split(",") if isinstance(metrics, str) else metrics
    chosen = tuple(dict.fromkeys(name.strip().lower() for name in names if name.strip()))
    unknown = [name for name in chosen if name not in SCORERS]
    if unknown or not chosen:
        raise OptionError(f"--metrics {','.join(unknown) or 'is empty'}: choose from "
                          f"{','.join(METRICS)}")
    return chosen


def check_inputs(
    *,
    predictions: Path | None = None,
    references: Path | None = None,
    dataset: str | None = None,
    root: Path | None = None,
    model: str | None = None,
    split_file: Path | None = None,
    images: Path | None = None,
    limit: int | None = None,
    clip_model: str | None = None,
) -> None:
    """Refuse option combinations that cannot work, before a model or dataset is loaded."""

    def given(**flags: object) -> list[str]:
        return [f"--{flag.replace('_', '-')}" for flag, value in flags.items() if value is not None]

    if dataset is not None:
        if given(predictions=predictions, references=references):
            raise OptionError("pass either --dataset (caption a split and score it) or "
                              "--predictions with --references (score captions you have), not both")
        if dataset not in DATASETS:
            raise OptionError(f"--dataset {dataset!r}: choose from {', '.join(DATASETS)}")
        needed = [flag for flag, value in (("--root", root), ("--model", model)) if value is None]
        if needed:
            raise OptionError(f"--dataset {dataset} also needs {' and '.join(needed)}")
        stray = given(split_file=split_file, images=images)
        if stray:
            raise OptionError(f"{' and '.join(stray)} only apply with --references; --dataset "
                              "finds the split lists and the image folder under --root")
        return
    if predictions is None or references is None:
        raise OptionError("pass --predictions and --references, or --dataset with --root and --model")
    stray = given(root=root, model=model, limit=limit)
    if stray:
        raise OptionError(f"{' and '.join(stray)} only apply with --dataset")
    if clip_model is not None and images is None and not Path(references).is_dir():
        raise OptionError("--clip-model scores the images themselves: pass --images DIR")


def evaluate_files(
    predictions: Path,
    references: Path,
    output_dir: Path = DEFAULT_OUTPUT_DIR,
    *,
    split: str | None = None,
    split_file: Path | None = None,
    images: Path | None = None,
    metrics: str | Sequence[str] = METRICS,
    clip_scorer: ClipScorer | None = None,
    progress: bool = False,
) -> Evaluation:
    """Score a predictions file against a references file; write metrics.json, CSV and HTML."""
    metrics = parse_metrics(metrics)
    refs = read_references(references, split=None if split == "all" else split,
                           split_file=split_file)
    preds = read_predictions(predictions, ids=refs.ids)
    paths = find_images(refs, images) if images is not None else None
    result = score_captions(preds, refs, metrics, clip_scorer=clip_scorer, image_paths=paths,
                            progress=progress)
    return Evaluation(result, write_report(result, Path(output_dir)))


def evaluate_dataset(
    dataset: str,
    root: Path,
    model: str | Captioner,
    output_dir: Path = DEFAULT_OUTPUT_DIR,
    *,
    split: str = "test",
    limit: int | None = None,
    generation: GenerationOptions | None = None,
    load_options: LoadOptions | None = None,
    batch_size: int | None = None,
    progress: bool = False,
    metrics: str | Sequence[str] = METRICS,
    clip_scorer: ClipScorer | None = None,
) -> Evaluation:
    """Caption a dataset split with `model` and score it; the store in `output_dir` makes it resumable.

    `limit` keeps the split's first images only. Images already captioned there with the same
    model and options are not captioned again.
    """
    from captionkit.models import load
    from captionkit.options import GenerationOptions, LoadOptions
    from captionkit.pipeline import Pipeline, RunOptions

    metrics = parse_metrics(metrics)
    if limit is not None and limit < 1:
        raise OptionError("--limit must be at least 1")
    refs = load_dataset(dataset, root, split)
    if limit is not None:
        refs.captions = dict(list(refs.captions.items())[:limit])
        refs.ids = {i: name for i, name in refs.ids.items() if name in refs.captions}
    paths, absent = {}, []
    for name, path in refs.image_paths().items():
        if path.is_file():
            paths[name] = path
        else:
            absent.append(f"{path}: image file not found; {name} is not captioned")
    captioner = load(model, load_options or LoadOptions()) if isinstance(model, str) else model
    output_dir = Path(output_dir)
    pipeline = Pipeline(captioner, generation or GenerationOptions(),
                        RunOptions(output_dir=output_dir, batch_size=batch_size, progress=progress))
    run = pipeline.run([str(path) for path in paths.values()])
    preds = _stored_predictions(output_dir, pipeline.key, paths)
    preds.problems[:0] = absent
    if not preds.captions:
        raise EvaluationError(f"{output_dir}: no image of the split was captioned; first problem: "
                              f"{preds.problems[0] if preds.problems else 'none recorded'}")
    result = score_captions(preds, refs, metrics, clip_scorer=clip_scorer, progress=progress)
    return Evaluation(result, write_report(result, Path(output_dir)), run)


def _stored_predictions(output_dir: Path, key: str, paths: Mapping[str, Path]) -> Predictions:
    """The pipeline's captions of `paths`, by reference name; failed images become problems."""
    from captionkit.store import DB_NAME, Store

    names = {os.path.abspath(path): name for name, path in paths.items()}
    preds = Predictions({}, fmt="store", source=output_dir / DB_NAME)
    store = Store(output_dir / DB_NAME)
    try:
        for row in store.results(key):
            name = names.get(os.path.abspath(row.path))
            if name is None:
                continue
            if row.status == "done":
                preds.captions[name] = row.caption or ""
            else:
                preds.problems.append(f"{row.path}: captioning failed: {row.error}")
    finally:
        store.close()
    return preds

