"""Typed options shared by the Python API, the CLI and the server, so each flag exists once."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from captionkit.errors import OptionError


@dataclass(frozen=True)
class GenerationOptions:
    """How captions are generated. Only fields a model honours change its output."""

    max_new_tokens: int = 30
    min_new_tokens: int | None = None
    num_beams: int = 1
    repetition_penalty: float | None = None
    length_penalty: float | None = None
    no_repeat_ngram_size: int | None = None
    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    prompt: str | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise OptionError("--max-new-tokens must be at least 1")
        if self.min_new_tokens is not None and self.min_new_tokens > self.max_new_tokens:
            raise OptionError("--min-new-tokens cannot exceed --max-new-tokens")
        if self.num_beams < 1:
            raise OptionError("--num-beams must be at least 1")
        if (self.temperature is not None or self.top_p is not None) and not self.do_sample:
            raise OptionError("--temperature and --top-p only apply with --do-sample")
        if self.temperature is not None and self.temperature <= 0:
            raise OptionError("--temperature must be positive")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise OptionError("--top-p must be in (0, 1]")

    def generate_kwargs(self) -> dict:
        """Keyword arguments for `transformers` `generate`, leaving unset ones to the model."""
        kwargs: dict = {"max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams,
                        "do_sample": self.do_sample}
        optional = {
            "min_new_tokens": self.min_new_tokens,
            "repetition_penalty": self.repetition_penalty,
            "length_penalty": self.length_penalty,
            "no_repeat_ngram_size": self.no_repeat_ngram_size,
            "temperature": self.temperature,
            "top_p": self.top_p,
        }
        kwargs.update({k: v for k, v in optional.items() if v is not None})
        return kwargs

    def key(self) -> str:
        """A short stable digest: two runs with equal keys produce the same captions."""
        blob = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class LoadOptions:
    """Where and how a model runs."""

    device: str = "auto"
    dtype: str = "auto"
    load_in_8bit: bool = False
    load_in_4bit: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise OptionError(f"--dtype {self.dtype!r}: use auto, float32, bfloat16 or float16")
        if self.load_in_8bit and self.load_in_4bit:
            raise OptionError("--load-in-8bit and --load-in-4bit are mutually exclusive")
