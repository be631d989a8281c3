"""Validation each epoch: caption the held-out images and score them with `captionkit.evaluate`."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from captionkit.evaluate import score_captions

if TYPE_CHECKING:
    from captionkit.scoring import ClipScorer
    from captionkit.train.data import Example
    from captionkit.train.loop import Task
    from captionkit.train.options import TrainOptions


def validate(task: Task, examples: list[Example], options: TrainOptions,
             scorer: ClipScorer | None = None) -> dict:
    """Validation loss, BLEU-4 and CIDEr-D (pycocoevalcap), and CLIPScore with a scorer."""
    started = time.perf_counter()
    row = {"val_loss": task.val_loss(examples)}
    predictions = task.captions(examples, options.val_beams)
    row.update(score(predictions, examples, scorer))
    row["val_seconds"] = time.perf_counter() - started
    return row


def score(predictions: dict[str, str], examples: list[Example], scorer: ClipScorer | None = None) -> dict:
    """BLEU-4 and CIDEr-D of `predictions` against the examples' references (and CLIPScore)."""
    references = {e.name: list(e.captions) for e in examples}
    result = score_captions(predictions, references, ("bleu", "cider"), clip_scorer=scorer,
                            image_paths={e.name: e.path for e in examples})
    scores = {"BLEU-4": result.corpus["BLEU-4"], "CIDEr-D": result.corpus["CIDEr-D"]}
    if "CLIPScore" in result.corpus:
        scores["CLIPScore"] = result.corpus["CLIPScore"]
    return scores
