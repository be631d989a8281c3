"""CLIPScore and RefCLIPScore (Hessel et al., 2021) of captions, with any CLIP-family model.

CLIP-S(c, v) = w * max(cos(E_v, E_c), 0), w = 2.5, the caption read as "A photo depicts <caption>".
RefCLIP-S(c, R, v) = H-Mean(CLIP-S(c, v), max(max_r cos(E_c, E_r), 0)): the w-scaled image score and
the unscaled best reference cosine, references read with the same prefix, as in the authors' code.
Captions longer than the text encoder's context are embedded in chunks (see `ClipScorer.chunks`).
SigLIP and other families get the same formula, but their cosines live in a different range than
CLIP's: compare scores only between runs of the same model.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from safetensors import SafetensorError

from captionkit import hub
from captionkit.device import pick_device, pick_dtype
from captionkit.errors import ModelNotFoundError, OptionError
from captionkit.preprocess import FixedSize, gathered

if TYPE_CHECKING:
    from PIL.Image import Image

DEFAULT_MODEL = "openai/clip-vit-base-patch32"
PREFIX = "A photo depicts "
PAPER_W = 2.5
# Both scales are w * max(cos, 0); cosine100 is the figure the seed scripts (and torchmetrics) use.
SCALES = {"clipscore": PAPER_W, "cosine100": 100.0}
OPEN_CLIP = "open_clip:"
INSTALL_OPEN_CLIP = "pip install 'captionkit[clip]'"

_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+")
_SPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class ScoreResult:
    """One caption's scores on the scorer's scale, the raw image-caption cosine and its chunk count."""

    clip_score: float
    cosine: float
    ref_clip_score: float | None = None
    chunks: int = 1


class Encoder(Protocol):
    """What a model family provides: raw features for a batch, and its text budget in tokens."""

    context_length: int

    def images(self, images: list[Image]) -> torch.Tensor: ...

    def texts(self, texts: list[str]) -> torch.Tensor: ...

    def count_tokens(self, text: str) -> int: ...


class ClipScorer:
    """Scores captions against images; embed an image once, then score as many captions as needed."""

    def __init__(self, encoder: Encoder, scale: str = "clipscore", batch_size: int = 32,
                 prefix: str = PREFIX, name: str = "") -> None:
        if scale not in SCALES:
            raise OptionError(f"--score-scale {scale!r}: use {' or '.join(SCALES)}")
        if batch_size < 1:
            raise OptionError("the scoring batch size must be at least 1")
        self.encoder = encoder
        self.scale = scale
        self.w = SCALES[scale]
        self.batch_size = batch_size
        self.prefix = prefix
        self.name = name

    @property
    def preprocess(self) -> Callable | None:
        """The encoder's image-to-input step for the decoding threads (`preprocess.FixedSize`), if
        it declares one."""
        return getattr(self.encoder, "preprocess", None)

    @torch.inference_mode()
    def embed_images(self, images: Sequence[Image]) -> torch.Tensor:
        """L2-normalized image embeddings, one row per image."""
        rgb = [image if image.mode == "RGB" else image.convert("RGB") for image in images]
        return _normalize(torch.cat([self.encoder.images(batch).float()
                                     for batch in _batches(rgb, self.batch_size)]))

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str], prefix: str | None = None) -> torch.Tensor:
        """L2-normalized embeddings of `prefix + text` (default: the scorer's prefix), one row each."""
        return self._embed_texts(texts, prefix)[0]

    def chunks(self, text: str, prefix: str | None = None) -> list[str]:
        """`text` if `prefix + text` fits the text encoder, else pieces that each fit: cut at sentence
        ends, then spaces, then halves of an overlong word, and packed back together while they fit."""
        prefix = self.prefix if prefix is None else prefix
        limit = self.encoder.context_length

        def fits(piece: str) -> bool:
            return self.encoder.count_tokens(prefix + piece) <= limit

        if fits(text):
            return [text]
        packed: list[str] = []
        for glue, piece in _split_until(text.strip(), fits):
            if packed and fits(packed[-1] + glue + piece):
                packed[-1] += glue + piece
            else:
                packed.append(piece)
        return packed

    @torch.inference_mode()
    def score(self, images: Sequence[Image], captions: Sequence[str],
              references: Sequence[Sequence[str]] | None = None) -> list[ScoreResult]:
        """Score caption i against image i (and references i, when given)."""
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        if not captions:
            return []
        return self.score_embeddings(self.embed_images(images), captions, references)

    @torch.inference_mode()
    def score_embeddings(self, image_emb: torch.Tensor, captions: Sequence[str],
                         references: Sequence[Sequence[str]] | None = None) -> list[ScoreResult]:
        """Score captions against image embeddings, one row per caption or one row for them all;
        a caption with no references gets `ref_clip_score=None`."""
        if references is not None and len(references) != len(captions):
            raise ValueError(f"{len(captions)} captions but {len(references)} reference lists")
        if not captions:
            return []
        text_emb, chunk_counts = self._embed_texts(captions)
        image_emb = image_emb.reshape(-1, image_emb.shape[-1]).to(text_emb)
        if len(image_emb) not in (1, len(captions)):
            raise ValueError(f"{len(image_emb)} image embeddings for {len(captions)} captions")
        cosines = (image_emb * text_emb).sum(dim=-1)
        clamped = cosines.clamp(min=0)
        refs = (self._ref_scores(text_emb, clamped, references) if references is not None
                else [None] * len(captions))
        return [ScoreResult(clip_score=float(self.w * positive), cosine=float(cosine),
                            ref_clip_score=ref, chunks=count)
                for positive, cosine, ref, count in zip(clamped, cosines, refs, chunk_counts,
                                                        strict=True)]

    def rank(self, image_emb: torch.Tensor, candidates: Sequence[str]) -> list[float]:
        """The score of each candidate caption for one image embedding (best-of-N reranking)."""
        return [result.clip_score for result in self.score_embeddings(image_emb, candidates)]

    def _embed_texts(self, texts: Sequence[str],
                     prefix: str | None = None) -> tuple[torch.Tensor, list[int]]:
        prefix = self.prefix if prefix is None else prefix
        pieces = [self.chunks(text, prefix) for text in texts]
        flat = [prefix + piece for text_pieces in pieces for piece in text_pieces]
        flat_emb = _normalize(torch.cat([self.encoder.texts(batch).float()
                                         for batch in _batches(flat, self.batch_size)]))
        # A caption cut into chunks is the mean of its chunks' unit vectors, back on the sphere.
        means, start = [], 0
        for text_pieces in pieces:
            means.append(flat_emb[start:start + len(text_pieces)].mean(dim=0))
            start += len(text_pieces)
        return _normalize(torch.stack(means)), [len(text_pieces) for text_pieces in pieces]

    def _ref_scores(self, text_emb: torch.Tensor, clamped: torch.Tensor,
                    references: Sequence[Sequence[str]]) -> list[float | None]:
        flat = [ref for refs in references for ref in refs]
        ref_emb = self.embed_texts(flat) if flat else text_emb[:0]
        out: list[float | None] = []
        start = 0
        for caption, positive, refs in zip(text_emb, clamped, references, strict=True):
            if not refs:
                out.append(None)
                continue
            clip = PAPER_W * float(positive)
            best = max(float((ref_emb[start:start + len(refs)] @ caption).max()), 0.0)
            start += len(refs)
            harmonic = 2 * clip * best / (clip + best) if clip + best > 0 else 0.0
            # On another scale the paper's value is multiplied like CLIP-S is (x40 for cosine100).
            out.append(self.w / PAPER_W * harmonic)
        return out


class HFEncoder:
    """A `transformers` dual encoder (CLIP, SigLIP, SigLIP 2, ...) loaded with AutoModel."""

    def __init__(self, path: Path, name: str, device: torch.device, dtype: torch.dtype) -> None:
        import transformers
        from transformers import AutoConfig, AutoModel, AutoProcessor

        try:
            config = AutoConfig.from_pretrained(path)
            # A captioner's checkpoint (BlipForConditionalGeneration) loads into a dual encoder
            # class (BlipModel) with a random text tower: refuse it by what it was saved as.
            saved_as = [getattr(transformers, arch, None) for arch in config.architectures or []]
            if saved_as and all(cls is not None and not _dual_encoder(cls) for cls in saved_as):
                raise OptionError(f"{name} is a {config.model_type} model, not an image-text dual "
                                  f"encoder (it was saved as {config.architectures[0]}): pass a "
                                  "CLIP-family model (CLIP, SigLIP, open_clip)")
            model, loading = AutoModel.from_pretrained(path, output_loading_info=True)
        except (OSError, ValueError, KeyError, SafetensorError) as err:
            raise ModelNotFoundError(f"{name}: cannot load a model from {path} ({err})") from err
        if not _dual_encoder(model):
            raise OptionError(f"{name} is a {model.config.model_type} model, not an image-text "
                              "dual encoder: pass a CLIP-family model (CLIP, SigLIP, open_clip)")
        if loading["missing_keys"]:
            missing = sorted(loading["missing_keys"])
            raise OptionError(f"{name}: {len(missing)} weights of its {type(model).__name__} are not "
                              f"in {path} (such as {missing[0]}), so its scores would be random: "
                              "pass a CLIP-family model (CLIP, SigLIP, open_clip)")
        try:
            self.processor = AutoProcessor.from_pretrained(path)
        except (OSError, ValueError, KeyError) as err:
            raise ModelNotFoundError(f"{name}: no usable processor (image processor and tokenizer) "
                                     f"in {path} ({err})") from err
        self.model = model.to(device=device, dtype=dtype).eval()
        self.tokenizer = self.processor.tokenizer
        self.preprocess = FixedSize.of(getattr(self.processor, "image_processor", None))
        """How the decoding threads make this encoder's pixel values (CLIP's and SigLIP's fixed-size
        processors); None: `images` runs the processor."""
        self.device, self.dtype = device, dtype
        text_config = getattr(model.config, "text_config", model.config)
        self.context_length = int(text_config.max_position_embeddings)

    def images(self, images: list[Image]) -> torch.Tensor:
        pixels = gathered(images, self.preprocess) if self.preprocess is not None else None
        if pixels is not None:  # made in the decoding threads
            inputs = {"pixel_values": pixels.to(self.device, dtype=self.dtype)}
        else:
            inputs = self.processor(images=images, return_tensors="pt").to(self.device, dtype=self.dtype)
        return _features(self.model.get_image_features(**inputs))

    def texts(self, texts: list[str]) -> torch.Tensor:
        # SigLIP pools the last position and was trained on text padded to its full context;
        # CLIP pools at the end-of-text token, so the padding length does not change its output.
        inputs = self.tokenizer(texts, padding="max_length", max_length=self.context_length,
                                return_tensors="pt")
        inputs.pop("token_type_ids", None)
        return _features(self.model.get_text_features(**inputs.to(self.device)))

    def count_tokens(self, text: str) -> int:
        # verbose=False: the "longer than the maximum" warning is moot, chunks() acts on the count.
        return len(self.tokenizer(text, verbose=False)["input_ids"])


class OpenClipEncoder:
    """An open_clip model, loaded from a local `local-dir:` folder that hub.resolve provides."""

    def __init__(self, spec: str, device: torch.device, dtype: torch.dtype) -> None:
        try:
            import open_clip
        except ImportError as err:
            raise OptionError(f"{OPEN_CLIP}{spec} needs open_clip: {INSTALL_OPEN_CLIP}") from err
        source = _open_clip_source(open_clip, spec)
        try:
            model, _, self.preprocess = open_clip.create_model_and_transforms(source)
            self.tokenizer = open_clip.get_tokenizer(source)
        except (OSError, ValueError, RuntimeError) as err:
            raise ModelNotFoundError(f"{OPEN_CLIP}{spec}: cannot load it with open_clip "
                                     f"({err})") from err
        self.model = model.to(device=device, dtype=dtype).eval()
        self.device, self.dtype = device, dtype
        self.context_length = int(model.context_length)

    def images(self, images: list[Image]) -> torch.Tensor:
        pixels = torch.stack([self.preprocess(image) for image in images])
        return self.model.encode_image(pixels.to(self.device, dtype=self.dtype))

    def texts(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(texts).to(self.device))

    def count_tokens(self, text: str) -> int:
        if hasattr(self.tokenizer, "sot_token_id"):
            # open_clip's own BPE: encode() leaves out the start and end tokens it adds.
            return len(self.tokenizer.encode(text)) + 2
        return len(self.tokenizer.tokenizer(text)["input_ids"])


def load_scorer(name: str = DEFAULT_MODEL, device: str = "auto", scale: str = "clipscore",
                dtype: str = "float32", batch_size: int = 32) -> ClipScorer:
    """A scorer for a Hub id or model folder, or `open_clip:ARCH/TAG`, `open_clip:hf-hub:REPO`, or
    `open_clip:FOLDER`."""
    if scale not in SCALES:
        raise OptionError(f"--score-scale {scale!r}: use {' or '.join(SCALES)}")
    torch_device = pick_device(device)
    torch_dtype = pick_dtype(dtype, torch_device)
    encoder: Encoder
    if name.startswith(OPEN_CLIP):
        encoder = OpenClipEncoder(name.removeprefix(OPEN_CLIP), torch_device, torch_dtype)
    else:
        encoder = HFEncoder(_resolve(name), name, torch_device, torch_dtype)
    return ClipScorer(encoder, scale=scale, batch_size=batch_size, name=name)


def histogram(scores: Sequence[float], bins: int = 10) -> list[tuple[float, float, int]]:
    """(low, high, count) for `bins` equal bins from min to max score; the last bin includes max."""
    if not scores:
        return []
    low, high = min(scores), max(scores)
    if high == low:
        return [(low, high, len(scores))]
    width = (high - low) / bins
    counts = [0] * bins
    for score in scores:
        counts[min(int((score - low) / width), bins - 1)] += 1
    return [(low + i * width, low + (i + 1) * width, count) for i, count in enumerate(counts)]


def histogram_text(scores: Sequence[float], bins: int = 10, width: int = 40,
                   threshold: float | None = None) -> str:
    """A plain-text bar chart (fine for rich); bins entirely below `threshold` are drawn shaded."""
    rows = histogram(scores, bins)
    if not rows:
        return "no scores"
    peak = max(count for _, _, count in rows)
    lines = []
    for low, high, count in rows:
        below = threshold is not None and high <= threshold and high > low
        bar = ("░" if below else "█") * round(width * count / peak)
        lines.append(f"{low:8.3f} - {high:8.3f} | {bar:<{width}} {count}")
    if threshold is not None:
        failed = sum(score < threshold for score in scores)
        lines.append(f"{failed} of {len(scores)} below {threshold:g}")
    return "\n".join(lines)


def _dual_encoder(model: object) -> bool:
    """Whether a transformers model (or its class) embeds both images and texts."""
    return hasattr(model, "get_image_features") and hasattr(model, "get_text_features")


def _resolve(name: str) -> Path:
    """hub.resolve for a CLIP model, whose errors name --clip-model."""
    return hub.resolve(name, option="--clip-model")


def _open_clip_source(open_clip, spec: str) -> str:
    """An open_clip `local-dir:` name for `hf-hub:REPO`, a folder, or `ARCH/TAG`, via hub.resolve."""
    if spec.startswith("hf-hub:"):
        return f"local-dir:{_resolve(spec.removeprefix('hf-hub:'))}"
    if Path(spec).expanduser().is_dir() or hub.looks_like_path(spec):
        return f"local-dir:{_resolve(spec)}"
    arch, _, tag = spec.partition("/")
    hub_path = (open_clip.get_pretrained_cfg(arch, tag) or {}).get("hf_hub", "") if tag else ""
    if not hub_path:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(arch)) or "none"
        raise ModelNotFoundError(f"{OPEN_CLIP}{spec}: use open_clip:ARCH/TAG with a tag open_clip "
                                 f"knows for {arch} ({tags}), open_clip:hf-hub:ORG/REPO, or "
                                 "open_clip:FOLDER")
    # Tags name an 'org/repo/' folder or an 'org/repo/file' on the Hub; the repo is enough.
    return f"local-dir:{_resolve('/'.join(hub_path.split('/')[:2]))}"


def _split_until(text: str, fits: Callable[[str], bool],
                 glue: str = " ") -> list[tuple[str, str]]:
    """(glue, piece) pairs that each fit; glue rejoins a piece to the one before it."""
    if fits(text) or len(text) < 2:
        return [(glue, text)]
    for boundary in (_SENTENCE_END, _SPACE):
        parts = [part for part in boundary.split(text) if part]
        if len(parts) > 1:
            return [pair for i, part in enumerate(parts)
                    for pair in _split_until(part, fits, glue if i == 0 else " ")]
    middle = len(text) // 2
    return _split_until(text[:middle], fits, glue) + _split_until(text[middle:], fits, "")


def _batches(items: Sequence, size: int) -> list:
    return [list(items[start:start + size]) for start in range(0, len(items), size)]


def _features(output) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _normalize(features: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(features, dim=-1)
