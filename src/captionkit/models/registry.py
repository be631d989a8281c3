"""Which class serves a model name: aliases, families detected from config.json, built-ins."""

from __future__ import annotations

import difflib
import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError

from captionkit import hub
from captionkit.errors import ModelNotFoundError, ModelUnavailableError, OptionError
from captionkit.models.base import Captioner
from captionkit.options import LoadOptions


@dataclass(frozen=True)
class ModelSpec:
    """A known model: where its weights live and what it costs to run."""

    alias: str
    source: str
    family: str
    params: str
    license: str
    memory: str
    notes: str = ""


# Checkpoints of any other image-text-to-text model type are served by the chat VLM adapter.
VLM_FAMILY = "image-text-to-text"

MODELS: dict[str, ModelSpec] = {spec.alias: spec for spec in [
    ModelSpec("objects", "built-in", "objects", "21.5M", "Apache-2.0 + SSD weights: unstated",
              "0.3 GB RAM", "offline default: COCO detector + ImageNet classifier, no download"),
    ModelSpec("blip-base", "Salesforce/blip-image-captioning-base", "blip", "247M", "BSD-3-Clause",
              "1.5 GB RAM / 1 GB VRAM"),
    ModelSpec("blip-large", "Salesforce/blip-image-captioning-large", "blip", "470M",
              "BSD-3-Clause", "2.5 GB RAM / 1.5 GB VRAM", "`auto` picks it when cached"),
    ModelSpec("blip2-opt-2.7b", "Salesforce/blip2-opt-2.7b", "blip-2", "3.9B", "MIT",
              "16 GB RAM / 8 GB VRAM fp16 (4 GB in 8-bit)"),
    ModelSpec("blip2-flan-t5-xl", "Salesforce/blip2-flan-t5-xl", "blip-2", "3.9B", "MIT",
              "16 GB RAM / 8 GB VRAM fp16 (4 GB in 8-bit)"),
    ModelSpec("git-base", "microsoft/git-base-coco", "git", "177M", "MIT",
              "1 GB RAM / 0.7 GB VRAM"),
    ModelSpec("git-large", "microsoft/git-large-coco", "git", "394M", "MIT",
              "2 GB RAM / 1.2 GB VRAM"),
    ModelSpec("vit-gpt2", "nlpconnect/vit-gpt2-image-captioning", "vision-encoder-decoder",
              "239M", "Apache-2.0", "1.5 GB RAM / 1 GB VRAM"),
    ModelSpec("kosmos-2", "microsoft/kosmos-2-patch14-224", "kosmos-2", "1.7B", "MIT",
              "7 GB RAM / 4 GB VRAM fp16", "grounded: phrases with boxes (--draw-boxes)"),
    ModelSpec("florence-2-base", "florence-community/Florence-2-base", "florence2", "232M", "MIT",
              "1 GB RAM / 1 GB VRAM", "native transformers weights; --detail up to more-detailed"),
    ModelSpec("florence-2-large", "florence-community/Florence-2-large", "florence2", "771M",
              "MIT", "3 GB RAM / 2 GB VRAM", "native transformers weights"),
    ModelSpec("instructblip-vicuna-7b", "Salesforce/instructblip-vicuna-7b", "instructblip",
              "7.9B", "non-commercial (Vicuna/LLaMA terms)",
              "32 GB RAM / 16 GB VRAM fp16 (9 GB in 8-bit)"),
    ModelSpec("instructblip-flan-t5-xl", "Salesforce/instructblip-flan-t5-xl", "instructblip",
              "4.0B", "MIT", "16 GB RAM / 8 GB VRAM fp16 (5 GB in 8-bit)"),
    ModelSpec("qwen2-vl-2b", "Qwen/Qwen2-VL-2B-Instruct", VLM_FAMILY, "2.2B", "Apache-2.0",
              "9 GB RAM / 5 GB VRAM bf16", "more memory for large images (dynamic resolution)"),
    ModelSpec("qwen2.5-vl-3b", "Qwen/Qwen2.5-VL-3B-Instruct", VLM_FAMILY, "3.8B",
              "Qwen Research License (non-commercial)", "15 GB RAM / 8 GB VRAM bf16"),
    ModelSpec("smolvlm", "HuggingFaceTB/SmolVLM-Instruct", VLM_FAMILY, "2.2B", "Apache-2.0",
              "9 GB RAM / 5 GB VRAM bf16"),
    ModelSpec("llava-1.5-7b", "llava-hf/llava-1.5-7b-hf", VLM_FAMILY, "7.1B",
              "Llama 2 Community License", "28 GB RAM / 15 GB VRAM fp16 (8 GB in 8-bit)"),
    ModelSpec("paligemma-3b", "google/paligemma-3b-mix-224", VLM_FAMILY, "2.9B",
              "Gemma Terms of Use (gated)", "12 GB RAM / 6 GB VRAM bf16",
              "plain prompts ('caption en'), no chat template"),
]}

AUTO_PREFERRED = "blip-large"

# config.json `model_type` -> "module:factory"; imported lazily so `objects` never loads transformers.
FAMILIES: dict[str, str | Callable[..., Captioner]] = {
    "objects": "captionkit.models.objects:load",
    "blip": "captionkit.models.hf:BlipCaptioner",
    "blip-2": "captionkit.models.hf:Blip2Captioner",
    "git": "captionkit.models.hf:GitCaptioner",
    "vision-encoder-decoder": "captionkit.models.hf:VisionEncoderDecoderCaptioner",
    "instructblip": "captionkit.models.hf:InstructBlipCaptioner",
    "kosmos-2": "captionkit.models.kosmos2:Kosmos2Captioner",
    "florence2": "captionkit.models.florence2:Florence2Captioner",
    VLM_FAMILY: "captionkit.models.vlm:VLMCaptioner",
    "captionkit-cnn-lstm": "captionkit.train.cnn_lstm:CnnLstmCaptioner",
    "captionkit-clipcap": "captionkit.train.clipcap:ClipCapCaptioner",
}

# "scheme:rest" names served without local weights (remote endpoints).
SCHEMES: dict[str, str] = {
    "openai": "captionkit.models.remote:OpenAICaptioner",
    "hf-api": "captionkit.models.remote:HFInferenceCaptioner",
}


ENTRY_POINT_GROUP = "captionkit.models"
"""Installed packages add families here: `model_type = "module:factory"` in their entry points."""

Factory = Callable[..., Captioner]
"""Called as `factory(path, model_id, options)` with the checkpoint folder and LoadOptions."""


def register(model_type: str, factory: str | Factory) -> None:
    """Serve checkpoints whose config.json says `model_type` with `factory` (a callable, or a
    "module:attribute" path imported when such a checkpoint loads)."""
    if not model_type or model_type == "objects":
        raise OptionError(f"cannot register model type {model_type!r}")
    FAMILIES[model_type] = factory


def _installed_families() -> dict[str, str]:
    """Families that installed packages declare in the `captionkit.models` entry-point group."""
    from importlib.metadata import entry_points

    return {point.name: point.value for point in entry_points(group=ENTRY_POINT_GROUP)}


def _factory(target: str | Factory) -> Factory:
    if callable(target):
        return target
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def detect_family(path: Path) -> str:
    """The family of a checkpoint directory, read from its config.json."""
    config_file = path / "config.json"
    if not config_file.is_file():
        if (path / "best" / "config.json").is_file():  # the output folder of `captionkit train`
            raise ModelNotFoundError(f"{path}: a training run's folder, not a checkpoint; pass its "
                                     f"best checkpoint, {path / 'best'} (or last/)")
        raise ModelNotFoundError(f"{path}: no config.json, so this is not a transformers checkpoint")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type", "")
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelNotFoundError(f"{config_file}: unreadable config ({err})") from err
    if model_type in FAMILIES:
        return model_type
    installed = _installed_families()
    if model_type in installed:
        FAMILIES.setdefault(model_type, installed[model_type])
        return model_type
    if _image_text_to_text(model_type):
        return VLM_FAMILY
    known = ", ".join(sorted(f for f in FAMILIES if f != "objects"))
    raise ModelNotFoundError(f"{path}: model type {model_type!r} is not a captioner captionkit "
                             f"knows (families: {known})")


def _image_text_to_text(model_type: str) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


def choose_auto() -> tuple[str, str]:
    """The model `auto` stands for, and why, without touching the network."""
    spec = MODELS[AUTO_PREFERRED]
    if hub.cached_snapshot(spec.source) is not None:
        return AUTO_PREFERRED, f"{AUTO_PREFERRED} (its weights are in the Hugging Face cache)"
    return "objects", (f"objects, the built-in offline captioner ({AUTO_PREFERRED} weights are not "
                       "in the Hugging Face cache; pass --model blip-large to download them)")


def recorded_ids(name: str) -> set[str]:
    """The model ids a run may have recorded for `--model name` (an alias's Hub id, a local
    folder's full path), found without loading anything: for `export --model`."""
    spec = MODELS.get(name)
    ids = {name}
    if spec is not None and spec.family != "objects":  # objects records its alias
        ids.add(spec.source)
    if Path(name).expanduser().is_dir():
        ids.add(str(Path(name).expanduser().resolve()))
    return ids


def load(name: str = "auto", options: LoadOptions | None = None) -> Captioner:
    """Load a captioner by alias, Hub id, local directory, `scheme:` name or `auto`."""
    options = options or LoadOptions()
    if name == "auto":
        name, _ = choose_auto()
    scheme, sep, rest = name.partition(":")
    remote = sep and scheme in SCHEMES and not Path(name).exists()
    spec = MODELS.get(name)
    builtin = spec is not None and spec.family == "objects"
    if options.quantize and (remote or builtin):
        raise OptionError(f"--quantize applies to transformers models run here, not to {name}")
    if remote:
        return _factory(SCHEMES[scheme])(rest, options)
    if builtin:
        return _factory(FAMILIES["objects"])(options)
    source = spec.source if spec else name
    try:
        path = hub.resolve(source)
    except (ModelNotFoundError, ModelUnavailableError) as error:
        alias = difflib.get_close_matches(name, MODELS, n=1) if spec is None and "/" not in name else []
        if alias:  # a mistyped alias reads as a Hub id: say which alias it looks like, first
            raise type(error)(f"{name}: not a model alias, a local folder or a cached Hub id; "
                                     f"did you mean --model {alias[0]}? (`captionkit models` lists "
                                     "the aliases)") from error
        raise
    family = detect_family(path)
    if family == "objects":
        raise OptionError(f"{name}: the objects captioner is built in; use --model objects")
    model_id = source if not Path(source).expanduser().is_dir() else str(path.resolve())
    try:
        return _factory(FAMILIES[family])(path, model_id, options)
    except (OSError, ValueError, KeyError, ImportError, SafetensorError) as error:
        # no weights, a truncated weights file, a missing processor file, a missing package
        where = name if Path(name) == path else f"{name} ({path})"
        if not any(next(path.glob(pattern), None) for pattern in hub.WEIGHT_FILES):
            raise ModelUnavailableError(f"{where}: no weights file (model.safetensors or "
                                        "pytorch_model.bin): an interrupted download or copy? "
                                        "Fetch it again") from error
        reason = " ".join(str(error).split()) or type(error).__name__
        raise ModelUnavailableError(f"{where}: cannot load this checkpoint: {reason}") from error
