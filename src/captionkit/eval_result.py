"""What `captionkit evaluate` computes: corpus and per-image scores, and what was left unscored.

Its own module so that `evaluate` (which computes it) and `report` (which shows it) both import it
and neither imports the other's caller.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

TOKENIZERS = {
    "ptb": "PTB (Stanford CoreNLP 3.4.1 through pycocoevalcap), as papers use",
    "simple": "simple pure-Python tokenizer: close to PTB but not identical, so scores are not "
              "exactly comparable with published ones",
}


@dataclass
class EvalResult:
    """Corpus and per-image scores, plus everything needed to say what was and wasn't scored."""

    corpus: dict[str, float]
    per_image: dict[str, dict[str, float]]
    predictions: dict[str, str]
    references: dict[str, list[str]]
    missing: dict[str, str] = field(default_factory=dict)
    tokenizer: str = "ptb"
    unreferenced: list[str] = field(default_factory=list)
    unpredicted: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    image_paths: dict[str, Path] = field(default_factory=dict)
