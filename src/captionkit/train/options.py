"""What `captionkit train` takes: the loop's options, and one dataclass per architecture.

Each field is declared with `flags.flag`: its help text, help panel and bounds serve both the
`captionkit train ARCHITECTURE` command line and the Python API, which checks the same bounds.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from captionkit.errors import OptionError
from captionkit.flags import declared, flag

DATASETS = ("folder", "flickr8k", "flickr30k", "coco", "file")
MONITORS = ("CIDEr-D", "BLEU-4", "loss")
PRECISIONS = ("no", "bf16", "fp16")

# `captionkit train`'s help panels, shown in the order of their first fields: TrainOptions' three,
# then the architecture's (they all come before the shared `flags.PANELS`, which train takes none of).
DATA, LOOP, VALIDATION = "Data", "Training loop", "Validation and checkpoints"
CNN_LSTM, CLIPCAP, BLIP = "CNN-LSTM", "ClipCap", "BLIP"


@dataclass(frozen=True)
class TrainOptions:
    """The data, the loop, validation and checkpoints: the same for every architecture."""

    dataset: str = flag("folder", "folder (images with caption .txt sidecars), flickr8k, flickr30k, "
                        "coco, or file (--captions).", panel=DATA, metavar="NAME")
    root: Path | None = flag(None, "The dataset's folder; for `file`, the folder its image names are "
                             "relative to.", panel=DATA, metavar="DIR")
    captions: Path | None = flag(None, "With --dataset file: the captions file (CSV, JSONL, JSON, "
                                 "captions.txt).", panel=DATA, metavar="FILE")
    val_fraction: float = flag(0.1, "Share of the images held out for validation when the dataset has "
                               "no validation split.", panel=DATA, min=0, max=1)
    max_images: int | None = flag(None, "Train on at most this many images (a seeded sample): for "
                                  "quick trials.", panel=DATA, min=1)
    max_caption_words: int = flag(50, "Captions longer than this are reported and left out of "
                                  "training.", panel=DATA, min=1)
    workers: int = flag(0, "Processes decoding images for architectures that read pixels every epoch "
                        "(BLIP, a fine-tuned CNN).", panel=DATA, min=0)
    cache_dir: Path | None = flag(None, "Where frozen encoders' features are cached; unset, "
                                  "<output>/cache.", panel=DATA, metavar="DIR")
    epochs: int = flag(10, "Passes over the training captions.", panel=LOOP, min=1)
    batch_size: int = flag(32, "Image-caption pairs per optimizer step and process (before "
                           "--grad-accumulation).", panel=LOOP, min=1)
    learning_rate: float | None = flag(None, "The peak learning rate; unset, the architecture's "
                                       "default.", panel=LOOP, min=0)
    weight_decay: float | None = flag(None, "AdamW weight decay; unset, the architecture's default.",
                                      panel=LOOP, min=0)
    grad_accumulation: int = flag(1, "Batches whose gradients add up before each optimizer step.",
                                  panel=LOOP, min=1)
    mixed_precision: str = flag("no", "no, bf16 or fp16 (CUDA): autocast for the forward pass.",
                                panel=LOOP, metavar="MODE")
    seed: int = flag(0, "Seeds the validation split, the shuffling, dropout and initial weights.",
                     panel=LOOP)
    deterministic: bool = flag(False, "Deterministic kernels only (slower): two runs with one seed give "
                               "equal weights.", "--deterministic", panel=LOOP)
    device: str = flag("auto", "auto, cpu, cuda, cuda:N or mps.", panel=LOOP, metavar="DEVICE")
    progress: bool = flag(True, "Hide the progress bar (the loss, images/s and ETA).", "--no-progress",
                          panel=LOOP, cli_type=bool, cli_default=False, parse=lambda hide: not hide)
    output: Path = flag(Path("captionkit-train"), "Folder for the checkpoints (last/, best/), "
                        "metrics.csv, curves.png and problems.txt.", "--output", "-o", panel=VALIDATION,
                        metavar="DIR")
    resume: bool | Path = flag(False, "Continue the run in DIR from its last checkpoint, with its saved "
                               "options; flags given change them (--epochs, ...).", panel=VALIDATION,
                               cli_type=Path | None, cli_default=None, metavar="DIR")
    """True: continue the run in `output`; a folder: continue the run there (it becomes `output`)."""
    max_val_images: int | None = flag(500, "Validate on at most this many images (captioning them all "
                                      "each epoch takes a while); 0: all of them.", panel=VALIDATION,
                                      min=0)
    monitor: str = flag("CIDEr-D", "CIDEr-D, BLEU-4 or loss: the validation number that picks best/ "
                        "and drives early stopping.", panel=VALIDATION, metavar="NAME")
    patience: int | None = flag(3, "Stop after this many epochs without a better --monitor; 0: never "
                                "stop early.", panel=VALIDATION, min=0)
    val_beams: int = flag(1, "Beams when captioning the validation images (1: greedy, the fastest).",
                          panel=VALIDATION, min=1)
    clip_model: str | None = flag(None, "A CLIP model (path or Hub id) to add CLIPScore to the "
                                  "validation numbers.", panel=VALIDATION, metavar="MODEL")

    def __post_init__(self) -> None:
        if self.resume not in (True, False, None):  # the folder of the run to continue
            object.__setattr__(self, "output", self.resume)
        object.__setattr__(self, "resume", bool(self.resume))
        for name in ("max_val_images", "patience"):  # 0 on the command line: no limit, as None
            if getattr(self, name) == 0:
                object.__setattr__(self, name, None)
        for name in ("output", "root", "captions", "cache_dir"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value).expanduser())
        _choice(self.dataset, DATASETS, "--dataset")
        if self.dataset == "file" and self.captions is None:
            raise OptionError("--dataset file needs --captions FILE (and --root for its images)")
        if self.captions is not None and self.dataset != "file":
            raise OptionError(f"--captions is for --dataset file; --dataset {self.dataset} finds its own")
        _choice(self.mixed_precision, PRECISIONS, "--mixed-precision")
        _choice(self.monitor, MONITORS, "--monitor")
        check_bounds(self, above=("learning_rate",), below=("val_fraction",))


@dataclass(frozen=True)
class CnnLstmOptions:
    """Show, Attend and Tell: an attention LSTM over a CNN's spatial feature map."""

    encoder: str = flag("efficientnet-lite0", "efficientnet-lite0 (ships with captionkit), or "
                        "resnet50/101/152 when torchvision's weights are in its cache.", panel=CNN_LSTM,
                        metavar="NAME")
    fine_tune_encoder: bool = flag(False, "Train the CNN too (every epoch reads the images); frozen, its "
                                   "features are cached once.", "--fine-tune-encoder", panel=CNN_LSTM)
    encoder_learning_rate: float = flag(1e-4, "The CNN's learning rate with --fine-tune-encoder.",
                                        panel=CNN_LSTM, min=0)
    image_size: int = flag(224, "The side images are resized to for the CNN.", panel=CNN_LSTM, min=32)
    embed_dim: int = flag(256, "Word embedding size.", panel=CNN_LSTM, min=1)
    attention_dim: int = flag(256, "Size of the attention layer.", panel=CNN_LSTM, min=1)
    hidden_dim: int = flag(512, "LSTM state size.", panel=CNN_LSTM, min=1)
    dropout: float = flag(0.5, "Dropout before the word classifier.", panel=CNN_LSTM, min=0, max=1)
    min_word_count: int = flag(2, "Words seen fewer times in the training captions become <unk> (and "
                               "are never generated).", panel=CNN_LSTM, min=1)
    max_length: int = flag(30, "Caption tokens learned per caption; longer ones are cut.", panel=CNN_LSTM,
                           min=2)
    attention_regularization: float = flag(1.0, "Weight of the \"doubly stochastic\" term that makes "
                                           "every region get attention over a caption.", panel=CNN_LSTM,
                                           min=0)
    grad_clip: float = flag(5.0, "Gradients are clipped to this norm.", panel=CNN_LSTM, min=0)
    lr_factor: float = flag(0.8, "ReduceLROnPlateau: the learning rate is multiplied by this when "
                            "--monitor stalls.", panel=CNN_LSTM, min=0, max=1)
    lr_patience: int = flag(0, "ReduceLROnPlateau: epochs without improvement before the rate drops.",
                            panel=CNN_LSTM, min=0)

    def __post_init__(self) -> None:
        check_bounds(self, above=("lr_factor",), below=("dropout", "lr_factor"))


@dataclass(frozen=True)
class ClipCapOptions:
    """ClipCap: a frozen image embedding, mapped to a prefix of a causal language model."""

    image_encoder: str = flag("efficientnet-lite0", "efficientnet-lite0 (ships with captionkit), or a "
                              "CLIP/SigLIP model's path or Hub id.", panel=CLIPCAP, metavar="MODEL")
    lm: str = flag("gpt2", "The causal language model: a path, a Hub id, or a .gguf file (e.g. "
                   "SmolLM2's).", panel=CLIPCAP, metavar="MODEL")
    mapping: str = flag("mlp", "mlp (the LM is fine-tuned) or transformer (the LM stays frozen).",
                        panel=CLIPCAP, metavar="KIND")
    fine_tune_lm: bool | None = flag(None, "Train the LM too; unset, as the paper pairs it: with mlp "
                                     "yes, with transformer no.", "--fine-tune-lm/--no-fine-tune-lm",
                                     panel=CLIPCAP)
    prefix_length: int = flag(10, "Prefix embeddings the image becomes.", panel=CLIPCAP, min=1)
    mapper_layers: int = flag(8, "Transformer mapper: its layers.", panel=CLIPCAP, min=1)
    image_size: int = flag(224, "The side images are resized to for EfficientNet-Lite0 (CLIP towers "
                           "use their own).", panel=CLIPCAP, min=32)
    max_length: int = flag(40, "Caption tokens learned per caption; longer ones are cut.", panel=CLIPCAP,
                           min=2)
    warmup_steps: int = flag(100, "Linear warmup steps before the learning rate decays linearly to "
                             "zero.", panel=CLIPCAP, min=0)

    def __post_init__(self) -> None:
        _choice(self.mapping, ("mlp", "transformer"), "--mapping")
        check_bounds(self)

    @property
    def trains_lm(self) -> bool:
        return self.mapping == "mlp" if self.fine_tune_lm is None else self.fine_tune_lm


@dataclass(frozen=True)
class BlipOptions:
    """Fine-tune BLIP after LAVIS's COCO caption recipe, or BLIP-2 with LoRA adapters."""

    model: str = flag("blip-base", "The model to start from: an alias (blip-base, blip-large, "
                      "blip2-opt-2.7b), a Hub id or a local BLIP or BLIP-2 checkpoint.", panel=BLIP,
                      metavar="NAME")
    image_size: int | None = flag(None, "The side images are resized to; unset, the checkpoint's own "
                                  "(384 for BLIP). Another size interpolates the position embeddings.",
                                  panel=BLIP, min=32)
    prompt: str = flag("a picture of ", "Text every caption starts with; the model learns what follows "
                       "it.", panel=BLIP)
    augment: bool = flag(True, "Random resized crop, horizontal flip and colour jitter on training "
                         "images.", "--augment/--no-augment", panel=BLIP)
    warmup_steps: int = flag(100, "Linear warmup steps before the cosine decay.", panel=BLIP, min=0)
    max_length: int = flag(40, "Caption tokens learned per caption, the prompt included; longer ones "
                           "are cut.", panel=BLIP, min=4)
    lora: bool | None = flag(None, "Train LoRA adapters (peft) instead of every weight; unset, for "
                             "BLIP-2 yes, for BLIP no.", "--lora/--no-lora", panel=BLIP)
    lora_rank: int = flag(8, "The adapters' rank (their alpha is twice it).", panel=BLIP, min=1)
    lora_targets: str | None = flag(None, "Comma-separated module names to adapt; unset, the LM's "
                                    "q_proj,v_proj (BLIP-2) or the text decoder's query,value (BLIP).",
                                    panel=BLIP, metavar="NAMES")

    def __post_init__(self) -> None:
        check_bounds(self)


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


def check_bounds(options: object, *, above: tuple[str, ...] = (), below: tuple[str, ...] = ()) -> None:
    """The bounds the flags declare (`min=`, `max=`, which the command line checks too), checked for
    options built from Python. A field named in `above` must exceed its min, in `below` stay under
    its max: `below=("dropout",)` with `max=1` is dropout < 1."""
    for item in declared(type(options)):
        value, low, high = getattr(options, item.name), item.flag.min, item.flag.max
        open_low, open_high = item.name in above, item.name in below
        if value is None:
            continue
        too_low = low is not None and (value <= low if open_low else value < low)
        too_high = high is not None and (value >= high if open_high else value > high)
        if too_low or too_high:
            raise OptionError(f"{item.spellings[0]} must be {_range(low, high, open_low, open_high)}")


def _range(low: float | None, high: float | None, open_low: bool, open_high: bool) -> str:
    """`at least 1`, `above 0`, `in [0, 1)`."""
    if high is None:
        return f"{'above' if open_low else 'at least'} {low:g}"
    if low is None:
        return f"{'below' if open_high else 'at most'} {high:g}"
    return f"in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"


def _choice(value: str, choices: tuple[str, ...], name: str) -> None:
    if value not in choices:
        raise OptionError(f"{name} {value!r}: choose from {', '.join(choices)}")


def to_dict(options: object) -> dict:
    """The options as JSON values (paths as strings), for train.json."""
    return {f.name: str(v) if isinstance(v := getattr(options, f.name), Path) else v
            for f in fields(options)}  # type: ignore[arg-type]
