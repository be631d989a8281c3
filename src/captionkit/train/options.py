"""What `captionkit train` takes: the loop's options, and one dataclass per architecture.

Each field's docstring is its help text; its CLI spelling is the name with dashes (`fine_tune_encoder`
-> `--fine-tune-encoder`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from captionkit.errors import OptionError

DATASETS = ("folder", "flickr8k", "flickr30k", "coco", "file")
MONITORS = ("CIDEr-D", "BLEU-4", "loss")
PRECISIONS = ("no", "bf16", "fp16")


@dataclass(frozen=True)
class TrainOptions:
    """The data, the loop, validation and checkpoints: the same for every architecture."""

    output: Path = Path("captionkit-train")
    """Folder for the checkpoints (last/, best/), metrics.csv, curves.png and problems.txt."""
    dataset: str = "folder"
    """folder (images with caption .txt sidecars), flickr8k, flickr30k, coco, or file (--captions)."""
    root: Path | None = None
    """The dataset's folder; for `file`, the folder its image names are relative to."""
    captions: Path | None = None
    """With --dataset file: the captions file (CSV, JSONL, JSON, captions.txt)."""
    val_fraction: float = 0.1
    """Share of the images held out for validation when the dataset has no validation split."""
    max_images: int | None = None
    """Train on at most this many images (a seeded sample): for quick trials."""
    max_val_images: int | None = 500
    """Validate on at most this many images (captioning them all each epoch takes a while)."""
    epochs: int = 10
    """Passes over the training captions."""
    batch_size: int = 32
    """Image-caption pairs per optimizer step and process (before --grad-accumulation)."""
    learning_rate: float | None = None
    """The peak learning rate; unset, the architecture's default."""
    weight_decay: float | None = None
    """AdamW weight decay; unset, the architecture's default."""
    grad_accumulation: int = 1
    """Batches whose gradients add up before each optimizer step."""
    mixed_precision: str = "no"
    """no, bf16 or fp16 (CUDA): autocast for the forward pass."""
    monitor: str = "CIDEr-D"
    """The validation number that picks best/ and drives early stopping: CIDEr-D, BLEU-4 or loss."""
    patience: int | None = 3
    """Stop after this many epochs without a better --monitor; unset, never stop early."""
    val_beams: int = 1
    """Beams when captioning the validation images (1: greedy, the fastest)."""
    max_caption_words: int = 50
    """Captions longer than this are reported and left out of training."""
    clip_model: str | None = None
    """A CLIP model (path or Hub id) to add CLIPScore to the validation numbers."""
    cache_dir: Path | None = None
    """Where frozen encoders' features are cached; unset, <output>/cache."""
    seed: int = 0
    """Seeds the validation split, the shuffling, dropout and initial weights."""
    deterministic: bool = False
    """Deterministic kernels only (slower): two runs with one seed give equal weights."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N or mps."""
    workers: int = 0
    """Processes decoding images for architectures that read pixels every epoch (BLIP, a fine-tuned CNN)."""
    resume: bool = False
    """Continue the run in --output from its last checkpoint (model, optimizer, scheduler, RNG)."""
    progress: bool = True
    """Show a progress bar with the loss, images/s and ETA."""

    def __post_init__(self) -> None:
        for name in ("output", "root", "captions", "cache_dir"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value).expanduser())
        if self.dataset not in DATASETS:
            raise OptionError(f"--dataset {self.dataset!r}: choose from {', '.join(DATASETS)}")
        if self.dataset == "file" and self.captions is None:
            raise OptionError("--dataset file needs --captions FILE (and --root for its images)")
        if self.captions is not None and self.dataset != "file":
            raise OptionError(f"--captions is for --dataset file; --dataset {self.dataset} finds its own")
        if not 0 <= self.val_fraction < 1:
            raise OptionError("--val-fraction must be in [0, 1)")
        if self.mixed_precision not in PRECISIONS:
            raise OptionError(f"--mixed-precision {self.mixed_precision!r}: use {', '.join(PRECISIONS)}")
        if self.monitor not in MONITORS:
            raise OptionError(f"--monitor {self.monitor!r}: use {', '.join(MONITORS)}")
        _at_least(self, epochs=1, batch_size=1, grad_accumulation=1, val_beams=1, max_caption_words=1,
                  max_images=1, max_val_images=1, patience=1)
        if self.workers < 0:
            raise OptionError("--workers cannot be negative")
        if self.learning_rate is not None and self.learning_rate <= 0:
            raise OptionError("--learning-rate must be positive")


@dataclass(frozen=True)
class CnnLstmOptions:
    """Show, Attend and Tell: an attention LSTM over a CNN's spatial feature map."""

    encoder: str = "efficientnet-lite0"
    """efficientnet-lite0 (ships with captionkit), or resnet50/resnet101/resnet152 when torchvision's
    weights are in its cache."""
    fine_tune_encoder: bool = False
    """Train the CNN too (every epoch reads the images); frozen, its features are cached once."""
    encoder_learning_rate: float = 1e-4
    """The CNN's learning rate with --fine-tune-encoder."""
    image_size: int = 224
    """The side images are resized to for the CNN."""
    embed_dim: int = 256
    """Word embedding size."""
    attention_dim: int = 256
    """Size of the attention layer."""
    hidden_dim: int = 512
    """LSTM state size."""
    dropout: float = 0.5
    """Dropout before the word classifier."""
    min_word_count: int = 2
    """Words seen fewer times in the training captions become <unk> (and are never generated)."""
    max_length: int = 30
    """Caption tokens learned per caption; longer ones are cut."""
    attention_regularization: float = 1.0
    """Weight of the "doubly stochastic" term that makes every region get attention over a caption."""
    grad_clip: float = 5.0
    """Gradients are clipped to this norm."""
    lr_factor: float = 0.8
    """ReduceLROnPlateau: the learning rate is multiplied by this when --monitor stalls."""
    lr_patience: int = 0
    """ReduceLROnPlateau: epochs without improvement before the rate drops."""

    def __post_init__(self) -> None:
        _at_least(self, image_size=32, embed_dim=1, attention_dim=1, hidden_dim=1, min_word_count=1,
                  max_length=2)
        if not 0 <= self.dropout < 1:
            raise OptionError("--dropout must be in [0, 1)")
        if not 0 < self.lr_factor < 1:
            raise OptionError("--lr-factor must be in (0, 1)")


@dataclass(frozen=True)
class ClipCapOptions:
    """ClipCap: a frozen image embedding, mapped to a prefix of a causal language model."""

    image_encoder: str = "efficientnet-lite0"
    """efficientnet-lite0 (ships with captionkit), or a CLIP/SigLIP model's path or Hub id."""
    lm: str = "gpt2"
    """The causal language model: a path, a Hub id, or a .gguf file (e.g. SmolLM2's)."""
    mapping: str = "mlp"
    """mlp (the LM is fine-tuned) or transformer (the LM stays frozen)."""
    fine_tune_lm: bool | None = None
    """Train the LM too; unset, as the paper pairs it: with mlp yes, with transformer no."""
    prefix_length: int = 10
    """Prefix embeddings the image becomes."""
    mapper_layers: int = 8
    """Transformer mapper: its layers."""
    image_size: int = 224
    """The side images are resized to for EfficientNet-Lite0 (CLIP towers use their own)."""
    max_length: int = 40
    """Caption tokens learned per caption; longer ones are cut."""
    warmup_steps: int = 100
    """Linear warmup steps before the learning rate decays linearly to zero."""

    def __post_init__(self) -> None:
        if self.mapping not in ("mlp", "transformer"):
            raise OptionError(f"--mapping {self.mapping!r}: use mlp or transformer")
        _at_least(self, prefix_length=1, mapper_layers=1, image_size=32, max_length=2)
        if self.warmup_steps < 0:
            raise OptionError("--warmup-steps cannot be negative")

    @property
    def trains_lm(self) -> bool:
        return self.mapping == "mlp" if self.fine_tune_lm is None else self.fine_tune_lm


@dataclass(frozen=True)
class BlipOptions:
    """Fine-tune BLIP after LAVIS's COCO caption recipe, or BLIP-2 with LoRA adapters."""

    model: str = "blip-base"
    """The model to start from: an alias (blip-base, blip-large, blip2-opt-2.7b), a Hub id or a
    local BLIP or BLIP-2 checkpoint."""
    image_size: int | None = None
    """The side images are resized to; unset, the checkpoint's own (384 for blip-base and blip-large).
    Another size interpolates the position embeddings, and the checkpoint keeps the new size."""
    prompt: str = "a picture of "
    """Text every caption starts with; the model learns what follows it."""
    augment: bool = True
    """Random resized crop, horizontal flip and colour jitter on training images."""
    warmup_steps: int = 100
    """Linear warmup steps before the cosine decay."""
    max_length: int = 40
    """Caption tokens learned per caption, the prompt included; longer ones are cut."""
    lora: bool | None = None
    """Train LoRA adapters (peft) instead of every weight; unset, for BLIP-2 yes, for BLIP no."""
    lora_rank: int = 8
    """The adapters' rank (their alpha is twice it)."""
    lora_targets: str | None = None
    """Comma-separated module names to adapt; unset, the LM's q_proj,v_proj (BLIP-2) or the text
    decoder's query,value (BLIP)."""

    def __post_init__(self) -> None:
        _at_least(self, image_size=32, max_length=4, lora_rank=1)
        if self.warmup_steps < 0:
            raise OptionError("--warmup-steps cannot be negative")


ARCHITECTURES: dict[str, type] = {"cnn-lstm": CnnLstmOptions, "clipcap": ClipCapOptions,
                                  "blip": BlipOptions}
"""`captionkit train <name>`: each architecture's options class."""

DEFAULT_RATES = {"cnn-lstm": (4e-4, 0.0), "clipcap": (2e-5, 0.01), "blip": (1e-5, 0.05)}
"""(learning rate, weight decay) when --learning-rate and --weight-decay are unset."""


def architecture_of(options: object) -> str:
    for name, cls in ARCHITECTURES.items():
        if isinstance(options, cls):
            return name
    raise TypeError(f"not an architecture's options: {type(options).__name__}")


def _at_least(options: object, **minimums: int) -> None:
    for name, minimum in minimums.items():
        value = getattr(options, name)
        if value is not None and value < minimum:
            raise OptionError(f"--{name.replace('_', '-')} must be at least {minimum}")


def to_dict(options: object) -> dict:
    """The options as JSON values (paths as strings), for train.json."""
    return {f.name: str(v) if isinstance(v := getattr(options, f.name), Path) else v
            for f in fields(options)}  # type: ignore[arg-type]
