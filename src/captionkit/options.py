"""Typed options shared by the Python API, the CLI and the server, so each flag exists once."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from captionkit import sources
from captionkit.errors import OptionError
from captionkit.prompts import read_prompt_file

if TYPE_CHECKING:
    from captionkit.exporters import ExportOptions

DETAIL_LEVELS = ("brief", "detailed", "more-detailed")
QUANTIZE_MODES = ("int8",)


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
    candidates: int = 1
    """Captions generated per image; with a CLIP scorer the best-scoring one is kept."""
    detail: str | None = None
    """brief, detailed or more-detailed: each family asks for that level with its own prompt."""
    system: str | None = None
    """Chat VLMs: a system message before the prompt."""
    language: str | None = None
    """Chat VLMs: the language captions are asked in ("Answer in {language}.")."""

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
        if self.candidates < 1:
            raise OptionError("--candidates must be at least 1")
        if self.candidates > self.num_beams and not self.do_sample:
            if self.num_beams != 1:
                raise OptionError(f"--candidates {self.candidates} needs --num-beams of at least "
                                  f"{self.candidates} (beam search returns one caption per beam), "
                                  "or --do-sample")
            # Greedy search cannot return several captions, so an unset --num-beams follows them.
            object.__setattr__(self, "num_beams", self.candidates)
        if self.detail is not None and self.detail not in DETAIL_LEVELS:
            raise OptionError(f"--detail {self.detail!r}: use {', '.join(DETAIL_LEVELS)}")
        if self.detail is not None and self.prompt is not None:
            raise OptionError("--detail and --prompt both choose what the model is asked: pass one")
        if self.language is not None and not self.language.strip():
            raise OptionError("--language needs a language name, e.g. --language French")

    def generate_kwargs(self) -> dict:
        """Keyword arguments for `transformers` `generate`, leaving unset ones to the model."""
        kwargs: dict = {"max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams,
                        "do_sample": self.do_sample, "num_return_sequences": self.candidates}
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
    quantize: str | None = None
    """CPU only: "int8" runs linear layers as dynamically quantized int8 (faster; captions may change)."""
    api_base: str | None = None
    """Remote endpoints (`openai:`, `hf-api:`): the server's base URL."""
    concurrency: int = 4
    """Remote endpoints: requests in flight at once."""
    timeout: float = 60.0
    """Remote endpoints: seconds one request may take before it is retried."""
    max_retries: int = 5
    """Remote endpoints: retries of a request that met 429, 5xx, a timeout or a dropped connection."""
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise OptionError(f"--dtype {self.dtype!r}: use auto, float32, bfloat16 or float16")
        if self.load_in_8bit and self.load_in_4bit:
            raise OptionError("--load-in-8bit and --load-in-4bit are mutually exclusive")
        if self.quantize is not None and self.quantize not in QUANTIZE_MODES:
            raise OptionError(f"--quantize {self.quantize!r}: use {', '.join(QUANTIZE_MODES)}")
        if self.quantize and (self.load_in_8bit or self.load_in_4bit):
            raise OptionError("--quantize is for the CPU; --load-in-8bit/--load-in-4bit for CUDA: pass one")
        if self.quantize and self.device not in ("auto", "cpu"):
            raise OptionError(f"--quantize {self.quantize} runs on the CPU: use --device cpu, or on a GPU "
                              "--load-in-8bit or --dtype bfloat16")
        if self.quantize and self.dtype not in ("auto", "float32"):
            raise OptionError(f"--quantize {self.quantize} starts from float32 weights: "
                              f"drop --dtype {self.dtype}")
        if self.api_base is not None and not self.api_base.startswith(("http://", "https://")):
            raise OptionError("--api-base must be an http:// or https:// URL, e.g. http://localhost:8000/v1")
        if self.concurrency < 1:
            raise OptionError("--concurrency must be at least 1")
        if self.timeout <= 0:
            raise OptionError("--timeout must be positive")
        if self.max_retries < 0:
            raise OptionError("--max-retries cannot be negative")


@dataclass(frozen=True)
class GateOptions:
    """Whether captions are scored, the threshold they must reach, and where images go."""

    clip_model: str | None = None
    """The scoring model; a threshold or candidates without one use `scoring.DEFAULT_MODEL`."""
    min_score: float | None = None
    score_scale: str = "clipscore"
    failed_dir: Path | None = None
    move: bool = False
    keep_failed: bool = False
    copy_images: bool = False
    """Copy the images that get a caption file into the output folder, the caption beside each."""

    def __post_init__(self) -> None:
        from captionkit.scoring import SCALES

        if self.failed_dir is not None:
            object.__setattr__(self, "failed_dir", Path(self.failed_dir))  # the Python API passes str
        if self.score_scale not in SCALES:
            raise OptionError(f"--score-scale {self.score_scale!r}: use {' or '.join(SCALES)}")
        if self.min_score is None and (self.failed_dir is not None or self.keep_failed):
            raise OptionError("--failed-dir and --keep-failed need a threshold: add --min-score")
        if self.move and self.failed_dir is None:
            raise OptionError("--move moves images into --failed-dir: add --failed-dir")

    def scorer_name(self, generation: GenerationOptions) -> str | None:
        """The CLIP model a run with these options scores with, or None when it does not score."""
        from captionkit.scoring import DEFAULT_MODEL

        if self.clip_model is not None:
            return self.clip_model
        return DEFAULT_MODEL if self.min_score is not None or generation.candidates > 1 else None


@dataclass(frozen=True)
class RunOptions:
    """Everything about a captioning run that is not the model or generation."""

    output_dir: Path = Path("captionkit-out")
    recursive: bool = False
    extensions: tuple[str, ...] | None = None
    formats: tuple[str, ...] = ("captions.txt", "jsonl")
    caption_extension: str = ".txt"
    sidecars_beside_images: bool = False
    batch_size: int | None = None
    workers: int | None = None
    overwrite: bool = False
    retry_failed: bool = False
    max_pixels: int = sources.DEFAULT_MAX_PIXELS
    full_decode: bool = False
    """Decode every pixel of big JPEGs, as the model's own processor would, instead of DCT drafts."""
    progress: bool = True
    gate: GateOptions = field(default_factory=GateOptions)
    prompt_file: Path | None = None
    """A CSV of `image path,prompt` rows: each listed image is asked its own prompt."""
    draw_boxes: Path | None = None
    """Where annotated copies of grounded images (Kosmos-2 entities) go."""
    prefix: str = ""
    """Text put before every exported caption (a LoRA trigger word); the store keeps the model's."""
    suffix: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "output_dir", Path(self.output_dir))  # the Python API passes str
        if self.draw_boxes is not None:
            object.__setattr__(self, "draw_boxes", Path(self.draw_boxes))
        # checked now, before a model loads: --ext, and a caption extension that would overwrite images
        sources.normalise_extensions(self.extensions)
        self.export_options()
        self.read_prompts()  # now, so that a bad --prompt-file is reported before a model loads
        if self.gate.copy_images and self.sidecars_beside_images:
            raise OptionError("--copy-images writes each caption file beside the image's copy in "
                              "--output-dir: drop --beside-images")
        self._check_image_folders()

    def _check_image_folders(self) -> None:
        """The folders images are written into must differ, or one kind would replace the other."""
        folders = {"--failed-dir": self.gate.failed_dir, "--draw-boxes": self.draw_boxes,
                   "--output-dir": self.output_dir}
        clashes = [("--failed-dir", "--output-dir"), ("--failed-dir", "--draw-boxes")]
        if self.gate.copy_images:
            clashes.append(("--draw-boxes", "--output-dir"))
        for first, second in clashes:
            one, other = folders[first], folders[second]
            if one is not None and other is not None and one.resolve() == other.resolve():
                raise OptionError(f"{first} and {second} are the same folder ({one}): pick another "
                                  f"{first}")

    def check_inputs(self, inputs: Sequence[str]) -> None:
        """No input folder may receive annotated copies or failed images."""
        for flag, folder, why in (
                ("--draw-boxes", self.draw_boxes, "the annotated copies would replace the images"),
                ("--failed-dir", self.gate.failed_dir, "failed images would stay among the others")):
            if folder is not None and any(
                    Path(i).is_dir() and Path(i).resolve() == folder.resolve() for i in inputs):
                raise OptionError(f"{flag} {folder} is an input folder: {why}; pick another folder")

    def read_prompts(self) -> dict[str, str]:
        """`--prompt-file`'s prompts by absolute image path (none without one), as the file is now."""
        return read_prompt_file(Path(self.prompt_file)) if self.prompt_file is not None else {}

    def export_options(self) -> ExportOptions:
        from captionkit.exporters import ExportOptions

        return ExportOptions(self.output_dir, self.caption_extension, self.sidecars_beside_images,
                             self.gate.keep_failed, prefix=self.prefix, suffix=self.suffix)

    def export_formats(self) -> tuple[str, ...]:
        """The formats asked for, plus the copies' caption files with `--copy-images`."""
        needs_sidecars = self.gate.copy_images and "txt" not in self.formats
        return (*self.formats, "txt") if needs_sidecars else self.formats
