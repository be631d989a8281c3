"""Typed options shared by the Python API, the CLI and the server: each option is declared once.

Each field carries its command-line flag (`flags.flag`): its help, spelling and help panel.
"""

from __future__ import annotations

import hashlib
import json
import operator
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from captionkit.errors import OptionError
from captionkit.flags import PANELS, flag
from captionkit.prompts import read_prompt_file

if TYPE_CHECKING:
    from captionkit.exporters import ExportOptions

DETAIL_LEVELS = ("brief", "detailed", "more-detailed")
QUANTIZE_MODES = ("int8",)
DEFAULT_MAX_PIXELS = 100_000_000
"""`sources.DEFAULT_MAX_PIXELS`, here so that reading options needs no image library."""
OVERLAY_ALPHA = 0.45
"""How opaque an overlay's mask fill is by default (`segment.overlay`)."""

INPUTS, MODEL, GENERATION, OUTPUTS, GATE, REMOTE, RESUME, SEGMENTATION, ENGINE = PANELS  # in order


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(","))


def _formats(text: str) -> tuple[str, ...]:
    from captionkit.exporters import parse_formats

    return tuple(parse_formats(text))


@dataclass(frozen=True)
class GenerationOptions:
    """How captions are generated. Only fields a model honours change its output."""

    max_new_tokens: int = flag(30, "The most tokens a caption may have.", panel=GENERATION, min=1)
    min_new_tokens: int | None = flag(None, "The fewest tokens a caption may have.", panel=GENERATION, min=0)
    num_beams: int = flag(1, "Beams searched (1: greedy search).", panel=GENERATION, min=1)
    repetition_penalty: float | None = flag(None, "Above 1 discourages repeating tokens.", panel=GENERATION)
    length_penalty: float | None = flag(None, "Beam search: above 0 favours longer captions, below 0 "
                                        "shorter ones.", panel=GENERATION)
    no_repeat_ngram_size: int | None = flag(None, "Never repeat a run of this many tokens.",
                                            panel=GENERATION, min=0)
    do_sample: bool = flag(False, "Sample instead of greedy or beam search.", panel=GENERATION)
    temperature: float | None = flag(None, "With --do-sample: below 1 safer words, above 1 more varied.",
                                     panel=GENERATION)
    top_p: float | None = flag(None, "With --do-sample: sample among the likeliest tokens whose "
                               "probabilities add up to this (0 to 1).", panel=GENERATION)
    seed: int | None = flag(None, "Seed of the random numbers, so that sampled captions repeat.",
                            panel=GENERATION)
    prompt: str | None = flag(None, "Text the caption starts from or answers (models that take text).",
                              panel=GENERATION)
    candidates: int = flag(1, "Generate N captions per image (beams, or samples with --do-sample) and "
                           "keep the best CLIPScore.", panel=GENERATION, min=1)
    detail: str | None = flag(None, "brief, detailed or more-detailed: the family's own prompt for that "
                              "level (Kosmos-2, Florence-2, InstructBLIP, VLMs).", panel=GENERATION,
                              metavar="LEVEL")
    system: str | None = flag(None, "Chat VLMs: a system message before the prompt.", panel=GENERATION)
    language: str | None = flag(None, "Chat VLMs: ask for captions in this language, e.g. French.",
                                panel=GENERATION, metavar="NAME")

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

    device: str = flag("auto", "auto, cpu, cuda, cuda:N or mps.", panel=MODEL, metavar="DEVICE")
    dtype: str = flag("auto", "auto, float32, bfloat16 or float16.", panel=MODEL, metavar="DTYPE")
    load_in_8bit: bool = flag(False, "8-bit weights (CUDA and bitsandbytes).", panel=MODEL)
    load_in_4bit: bool = flag(False, "4-bit weights (CUDA and bitsandbytes).", panel=MODEL)
    cuda_graphs: bool = flag(False, "On CUDA, run the decoder's per-token steps from a static cache "
                             "compiled into CUDA graphs (BLIP, BLIP-2, InstructBLIP); each new batch "
                             "size compiles first. Ignored on other devices and models.", panel=MODEL)
    quantize: str | None = flag(None, "int8: dynamically quantized linear layers on the CPU, ~1.6x "
                                "faster; captions may change.", panel=MODEL, metavar="MODE")
    api_base: str | None = flag(None, "The server's base URL (openai: and hf-api: models), e.g. "
                                "http://localhost:8000/v1.", panel=REMOTE, metavar="URL")
    concurrency: int = flag(4, "Requests in flight at once.", panel=REMOTE, min=1)
    timeout: float = flag(60.0, "Seconds one request may take before it is retried.", panel=REMOTE,
                          metavar="SECONDS")
    max_retries: int = flag(5, "Retries of a request that met 429, 5xx, a timeout or a dropped "
                            "connection.", panel=REMOTE, min=0)
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

    clip_model: str | None = flag(None, "Score captions with this CLIP-family model: Hub id, folder or "
                                  "open_clip:ARCH/TAG.", panel=GATE, metavar="MODEL")
    min_score: float | None = flag(None, "Captions scoring below this fail the quality gate (uses the "
                                   "default CLIP model without --clip-model).", panel=GATE)
    score_scale: str = flag("clipscore", "clipscore (the paper's 2.5 * cos, 0 to 2.5) or cosine100 "
                            "(100 * cos, 0 to 100).", panel=GATE, metavar="SCALE")
    failed_dir: Path | None = flag(None, "Copy images that fail the gate here, with their caption file.",
                                   panel=GATE, metavar="DIR")
    move: bool = flag(False, "Move failed images into --failed-dir instead of copying them.", panel=GATE)
    keep_failed: bool = flag(False, "Keep failed images in captions.txt and the caption files.",
                             panel=GATE)
    copy_images: bool = flag(False, "Copy the captioned (passing) images into --output-dir, a caption "
                             "file beside each.", panel=GATE)

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

    output_dir: Path = flag(Path("captionkit-out"), "Where captions and the run store go.", "-o",
                            panel=OUTPUTS, metavar="DIR")
    recursive: bool = flag(False, "Look for images in subfolders too.", "-r", panel=INPUTS)
    extensions: tuple[str, ...] | None = flag(None, "Only these extensions, e.g. jpg,png.", "--ext",
                                              panel=INPUTS, cli_type=str, parse=_comma_list,
                                              metavar="LIST")
    formats: tuple[str, ...] = flag(("captions.txt", "jsonl"), "Comma-separated: captions.txt, txt "
                                    "(a caption file per image), jsonl, csv, parquet, webdataset, coco, "
                                    "masks, or all.", "--format", "-f",
                                    panel=OUTPUTS, cli_type=str, cli_default="captions.txt,jsonl",
                                    parse=_formats, metavar="LIST")
    caption_extension: str = flag(".txt", "Extension of per-image caption files.", panel=OUTPUTS,
                                  metavar="EXT")
    sidecars_beside_images: bool = flag(False, "Write per-image caption files next to the images "
                                        "instead of under --output-dir.", "--beside-images",
                                        panel=OUTPUTS)
    batch_size: int | None = flag(None, "Images per batch (default: auto).", panel=MODEL, min=1)
    workers: int | None = flag(None, "Decoding threads (default: auto).", panel=INPUTS, min=1)
    overwrite: bool = flag(False, "Start over, ignoring earlier results, and replace caption files "
                           "captionkit did not write.", panel=RESUME)
    retry_failed: bool = flag(False, "Try earlier failures again.", panel=RESUME)
    max_pixels: int = flag(DEFAULT_MAX_PIXELS, "Refuse images with more pixels (decompression bombs).",
                           panel=INPUTS, parse=lambda pixels: pixels or DEFAULT_MAX_PIXELS)
    full_decode: bool = flag(False, "Decode big JPEGs in full, as the model's own processor would "
                             "(slower; by default a reduced scale still >= the model's input).",
                             panel=INPUTS)
    gpu_jpeg: bool = flag(False, "Decode JPEGs with nvJPEG on the model's GPU (CUDA; the transformers "
                          "families but the chat VLMs, without a CLIP gate); other files stay on "
                          "the CPU. "
                          "Pixels differ from libjpeg's by rounding.", panel=INPUTS)
    progress: bool = flag(True, "No progress bar.", "--quiet", "-q", panel=OUTPUTS, cli_type=bool,
                          cli_default=False, parse=operator.not_)
    gate: GateOptions = field(default_factory=GateOptions)
    prompt_file: Path | None = flag(None, "CSV of `image path,prompt` rows (paths relative to it): each "
                                    "listed image is asked its own prompt, others --prompt.",
                                    panel=GENERATION, metavar="CSV")
    draw_boxes: Path | None = flag(None, "Write copies of the images with their grounded phrases' boxes "
                                   "here (Kosmos-2).", panel=OUTPUTS, metavar="DIR")
    overlays: Path | None = flag(None, "Write copies of the images with their masks, boxes and labels "
                                 "drawn here (with --segment, or captionkit segment).", panel=OUTPUTS,
                                 metavar="DIR")
    overlay_alpha: float = flag(OVERLAY_ALPHA, "How opaque the overlays' mask fill is, 0 (outlines "
                                "only) to 1.", panel=OUTPUTS, min=0, max=1)
    prefix: str = flag("", "Text before every exported caption, as written: a LoRA trigger word such as "
                       "'ohwx, '. The store keeps the model's caption.", panel=OUTPUTS)
    suffix: str = flag("", "Text after every exported caption, as written.", panel=OUTPUTS)

    def __post_init__(self) -> None:
        object.__setattr__(self, "output_dir", Path(self.output_dir))  # the Python API passes str
        for name in ("draw_boxes", "overlays"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        if not 0 <= self.overlay_alpha <= 1:
            raise OptionError(f"--overlay-alpha {self.overlay_alpha}: use a number from 0 to 1")
        from captionkit import sources

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
                   "--output-dir": self.output_dir, "--overlays": self.overlays}
        clashes = [("--failed-dir", "--output-dir"), ("--failed-dir", "--draw-boxes"),
                   ("--overlays", "--draw-boxes"), ("--overlays", "--failed-dir")]
        if self.gate.copy_images:
            clashes.append(("--draw-boxes", "--output-dir"))
        for first, second in clashes:
            one, other = folders[first], folders[second]
            if one is not None and other is not None and one.resolve() == other.resolve():
                raise OptionError(f"{first} and {second} are the same folder ({one}): pick another "
                                  f"{first}")

    def check_inputs(self, inputs: Sequence[str]) -> None:
        """No input folder may receive annotated copies or failed images."""
        for name, folder, why in (
                ("--draw-boxes", self.draw_boxes, "the annotated copies would replace the images"),
                ("--overlays", self.overlays, "the overlays would replace the images"),
                ("--failed-dir", self.gate.failed_dir, "failed images would stay among the others")):
            if folder is not None and any(
                    Path(i).is_dir() and Path(i).resolve() == folder.resolve() for i in inputs):
                raise OptionError(f"{name} {folder} is an input folder: {why}; pick another folder")

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


ENGINES = ("local", "ray")


@dataclass(frozen=True)
class EngineOptions:
    """Where the execute step runs: threads in this process, or Ray actors on this machine or a
    cluster. The fields after `engine` apply to `ray` only."""

    engine: str = flag("local", "local: threads and the model in this process; ray: model replicas as "
                       "Ray actors.", panel=ENGINE, metavar="NAME")
    ray_address: str | None = flag(None, "The Ray cluster to join (auto, HOST:6379, ray://HOST:10001); "
                                   "none: start Ray here.", panel=ENGINE, metavar="ADDRESS")
    ray_workers: int | None = flag(None, "Model replicas (Ray actors); default: as many as the GPUs "
                                   "(else CPUs) allow.", panel=ENGINE)
    gpus_per_worker: float | None = flag(None, "GPUs each replica holds (0.5: two share one); default: 1 "
                                         "with GPUs, else 0.", panel=ENGINE)
    cpus_per_worker: float | None = flag(None, "CPUs each replica holds for decoding (and torch without a "
                                         "GPU); default: 8 per GPU replica, 4 per CPU one.", panel=ENGINE)
    local_cpus: int | None = flag(None, "Without --ray-address: the CPUs the Ray started here may use.",
                                  panel=ENGINE)
    object_store_memory: int | None = flag(None, "Without --ray-address: bytes of Ray's object store "
                                           "(default: 30% of RAM; 1 GB is plenty).", panel=ENGINE)
    task_retries: int = flag(3, "Times a batch is retried after its worker died (a kill, a lost node).",
                             panel=ENGINE, min=0)

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise OptionError(f"--engine {self.engine!r}: use {' or '.join(ENGINES)}")
        if self.engine == "local":
            given = [name for name, value in (
                ("--ray-address", self.ray_address), ("--ray-workers", self.ray_workers),
                ("--gpus-per-worker", self.gpus_per_worker), ("--local-cpus", self.local_cpus),
                ("--object-store-memory", self.object_store_memory)) if value is not None]
            if given:
                raise OptionError(f"{given[0]} applies to --engine ray: add --engine ray or drop it")
        for name, value, low in (("--ray-workers", self.ray_workers, 1), ("--local-cpus", self.local_cpus, 1),
                                 ("--object-store-memory", self.object_store_memory, 78_643_200)):
            if value is not None and value < low:
                raise OptionError(f"{name} must be at least {low}, not {value}")
        if self.gpus_per_worker is not None and self.gpus_per_worker < 0:
            raise OptionError("--gpus-per-worker cannot be negative")
        if self.cpus_per_worker is not None and self.cpus_per_worker <= 0:
            raise OptionError("--cpus-per-worker must be positive")
        if self.task_retries < 0:
            raise OptionError("--task-retries cannot be negative")
        if self.ray_address is not None and (self.local_cpus or self.object_store_memory):
            raise OptionError("--local-cpus and --object-store-memory size the Ray started here; a "
                              "cluster joined with --ray-address is sized where it starts (ray start)")
