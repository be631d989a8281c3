"""A word vocabulary built from the training captions, for the CNN-LSTM."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from captionkit.evaluate import simple_tokenize

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)


class Vocabulary:
    """Words by index: the four specials first, then the words by falling frequency."""

    def __init__(self, words: list[str]) -> None:
        self.words = list(words)
        self.index = {word: i for i, word in enumerate(self.words)}

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 1) -> Vocabulary:
        """The words seen at least `min_count` times; ties in frequency sorted alphabetically."""
        counts = Counter(word for caption in captions for word in tokenize(caption))
        kept = sorted((w for w, n in counts.items() if n >= min_count and w not in SPECIALS),
                      key=lambda w: (-counts[w], w))
        return cls([*SPECIALS, *kept])

    def __len__(self) -> int:
        return len(self.words)

    @property
    def pad(self) -> int:
        return self.index[PAD]

    @property
    def start(self) -> int:
        return self.index[START]

    @property
    def end(self) -> int:
        return self.index[END]

    @property
    def unk(self) -> int:
        return self.index[UNK]

    def encode(self, caption: str, max_length: int) -> list[int]:
        """<start> words <end>, the words cut to `max_length`."""
        ids = [self.index.get(word, self.unk) for word in tokenize(caption)][:max_length]
        return [self.start, *ids, self.end]

    def decode(self, ids: Iterable[int]) -> str:
        """The words up to the first <end>, specials dropped."""
        words = []
        for i in ids:
            if i == self.end:
                break
            if i >= len(SPECIALS):
                words.append(self.words[i])
        return " ".join(words)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.words, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> Vocabulary:
        words = json.loads(Path(path).read_text(encoding="utf-8"))
        if list(words[: len(SPECIALS)]) != list(SPECIALS):
            raise ValueError(f"{path}: not a captionkit vocabulary (it must start with {SPECIALS})")
        return cls(words)


def tokenize(caption: str) -> list[str]:
    """Lower-case words without punctuation, the way captionkit's metrics' fallback tokenizer splits."""
    return simple_tokenize(caption).split()
