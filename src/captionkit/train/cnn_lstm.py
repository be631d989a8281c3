"""Show, Attend and Tell: an LSTM that attends over a CNN's feature map while it writes.

Three parts: the network (`AttentionDecoder`, `CnnLstm`), its checkpoint (config.json naming the
model type `captionkit-cnn-lstm`, vocab.json, model.safetensors) with the captioner captionkit
loads from it, and the training task the shared loop runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional

from captionkit.errors import OptionError
from captionkit.models.base import Caption
from captionkit.options import GenerationOptions, LoadOptions
from captionkit.train.data import Example, Splits, decode_example, unreadable
from captionkit.train.decoding import State, Tokens, search
from captionkit.train.encoders import ImageEncoder, build_encoder, load_encoder
from captionkit.train.features import CachedFeatures, cached_features
from captionkit.train.options import CnnLstmOptions, TrainOptions
from captionkit.train.served import TrainedCaptioner
from captionkit.train.vocab import Vocabulary

MODEL_TYPE = "captionkit-cnn-lstm"
WEIGHTS = "model.safetensors"
EVAL_BATCH = 64


class AttentionDecoder(nn.Module):
    """An LSTM cell fed each step with its last word and a gated, attention-weighted image context."""

    def __init__(self, vocab_size: int, feature_dim: int, embed_dim: int = 256, attention_dim: int = 256,
                 hidden_dim: int = 512, dropout: float = 0.5) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(feature_dim)
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.attend_features = nn.Linear(feature_dim, attention_dim)
        self.attend_hidden = nn.Linear(hidden_dim, attention_dim)
        self.attention = nn.Linear(attention_dim, 1, bias=False)  # softmax ignores a shift
        self.init_h = nn.Linear(feature_dim, hidden_dim)
        self.init_c = nn.Linear(feature_dim, hidden_dim)
        self.gate = nn.Linear(hidden_dim, feature_dim)
        self.lstm = nn.LSTMCell(embed_dim + feature_dim, hidden_dim)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_dim, vocab_size)

    def start(self, features: torch.Tensor) -> State:
        """The state before the first word: the normalised regions, their attention keys, h and c."""
        regions = self.norm(features)
        mean = regions.mean(1)
        h, c = torch.tanh(self.init_h(mean)), torch.tanh(self.init_c(mean))
        return regions, self.attend_features(regions), h, c

    def step(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State, torch.Tensor]:
        """The next word's logits, the new state, and where it looked (attention over regions)."""
        regions, keys, h, c = state
        scores = self.attention(torch.relu(keys + self.attend_hidden(h)[:, None])).squeeze(2)
        alpha = torch.softmax(scores, dim=1)
        context = (regions * alpha[..., None]).sum(1) * torch.sigmoid(self.gate(h))
        h, c = self.lstm(torch.cat([self.embed(tokens), context], dim=1), (h, c))
        return self.out(self.dropout(h)), (regions, keys, h, c), alpha

    def forward(self, features: torch.Tensor, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing: logits `[batch, steps, vocab]` and attention `[batch, steps, regions]`."""
        state = self.start(features)
        logits, alphas = [], []
        for t in range(inputs.shape[1]):
            out, state, alpha = self.step(inputs[:, t], state)
            logits.append(out)
            alphas.append(alpha)
        return torch.stack(logits, 1), torch.stack(alphas, 1)


class CnnLstm(nn.Module):
    """The decoder, and the CNN when it is fine-tuned; `forward` returns the training loss."""

    def __init__(self, decoder: AttentionDecoder, encoder: ImageEncoder | None, pad: int,
                 attention_regularization: float = 1.0) -> None:
        super().__init__()
        self.decoder, self.encoder = decoder, encoder
        self.pad, self.attention_regularization = pad, attention_regularization

    def train(self, mode: bool = True) -> CnnLstm:
        super().train(mode)
        if self.encoder is not None:
            self.encoder.eval()  # a fine-tuned CNN keeps its ImageNet batch-norm statistics
        return self

    def forward(self, captions: torch.Tensor, features: torch.Tensor | None = None,
                pixels: torch.Tensor | None = None) -> torch.Tensor:
        """Cross-entropy of each next word, plus the doubly stochastic attention term."""
        if pixels is not None:
            features = self.encoder(pixels)
        targets = captions[:, 1:]
        logits, alphas = self.decoder(features, captions[:, :-1])
        loss = functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                        ignore_index=self.pad)
        # every region should be looked at about once over the caption (Xu et al., 2015, eq. 14)
        seen = (alphas * (targets != self.pad)[..., None]).sum(1)
        return loss + self.attention_regularization * ((1 - seen) ** 2).mean()


# The checkpoint.

def save_model(folder: Path, model: CnnLstm, encoder: ImageEncoder, vocab: Vocabulary,
               options: CnnLstmOptions) -> None:
    """config.json, vocab.json and model.safetensors (the CNN's weights too when it was fine-tuned)."""
    config = {"model_type": MODEL_TYPE, "encoder": encoder.config(),
              "encoder_trained": model.encoder is not None,
              "decoder": {"vocab_size": len(vocab), "feature_dim": encoder.channels,
                          "embed_dim": options.embed_dim, "attention_dim": options.attention_dim,
                          "hidden_dim": options.hidden_dim, "dropout": options.dropout},
              "max_length": options.max_length}
    (folder / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    vocab.save(folder / "vocab.json")
    state = {f"decoder.{k}": v for k, v in model.decoder.state_dict().items()}
    if model.encoder is not None:
        state.update({f"encoder.{k}": v for k, v in model.encoder.state_dict().items()})
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(folder / WEIGHTS))


def load_model(folder: Path) -> tuple[CnnLstm, ImageEncoder, Vocabulary, dict]:
    """The network, its CNN (always attached, for captioning), its vocabulary and its config."""
    config = json.loads((folder / "config.json").read_text())
    vocab = Vocabulary.load(folder / "vocab.json")
    encoder = load_encoder(config["encoder"], folder, pretrained=not config["encoder_trained"])
    decoder = AttentionDecoder(**config["decoder"])
    state = load_file(str(folder / WEIGHTS))
    decoder.load_state_dict(_part(state, "decoder."))
    if config["encoder_trained"]:
        encoder.load_state_dict(_part(state, "encoder."))
    return CnnLstm(decoder, encoder, vocab.pad), encoder, vocab, config


def _part(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _tokens(vocab: Vocabulary) -> Tokens:
    return Tokens(vocab.start, vocab.end, banned=(vocab.pad, vocab.start, vocab.unk))


def caption_features(decoder: AttentionDecoder, vocab: Vocabulary, features: torch.Tensor,
                     options: GenerationOptions) -> list[list[str]]:
    """Each image's `options.candidates` captions from its encoded features, best first."""
    def step(tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        logits, state, _ = decoder.step(tokens, state)
        return logits, state

    with torch.inference_mode():
        found = search(step, decoder.start(features), _tokens(vocab), options)
    return [[vocab.decode(ids) for ids in sequences] for sequences in found]


class CnnLstmCaptioner(TrainedCaptioner):
    """A trained CNN-LSTM checkpoint behind captionkit's captioner interface."""

    architecture = "CNN-LSTM"

    def __init__(self, path: Path, model_id: str, options: LoadOptions) -> None:
        super().__init__(path, model_id, options)
        model, encoder, self.vocab, config = load_model(Path(path))
        self.model = model.to(self.device).eval()
        self.encoder = encoder.to(self.device).eval()
        self.input_size = encoder.image_size

    def caption(self, images: list[Image.Image], options: GenerationOptions,
                prompts: list[str | None] | None = None) -> list[Caption]:
        """One caption per image (with `options.candidates` of them in extras when asked)."""
        _refuse_instructions(self.model_id, options, prompts)
        if not images:
            return []
        with torch.inference_mode():
            features = self.encoder(self.encoder.preprocess(images).to(self.device))
        found = caption_features(self.model.decoder, self.vocab, features, options)
        return [Caption(texts[0], {"candidates": [{"text": t} for t in texts]} if len(texts) > 1 else {})
                for texts in found]


def _refuse_instructions(model_id: str, options: GenerationOptions, prompts: list[str | None] | None) -> None:
    asked = [name for name, value in (("--prompt", options.prompt or any(prompts or [])),
                                      ("--detail", options.detail), ("--system", options.system),
                                      ("--language", options.language)) if value]
    if asked:
        raise OptionError(f"{model_id} is a CNN-LSTM, which takes no text instructions: "
                          f"drop {', '.join(asked)}")


# Training.

class CnnLstmTask:
    """The CNN-LSTM as the training loop runs it: cached features when the CNN is frozen."""

    architecture = "cnn-lstm"

    def __init__(self, options: TrainOptions, model: CnnLstmOptions) -> None:
        self.options, self.arch = options, model
        self.grad_clip = model.grad_clip
        self.cache: CachedFeatures | None = None

    def prepare(self, splits: Splits, device: torch.device) -> None:
        self.device = device
        self.encoder = build_encoder(self.arch.encoder, self.arch.image_size)
        examples = splits.train + splits.val
        if self.arch.fine_tune_encoder:
            failed = unreadable(examples, self.encoder.image_size)
        else:
            cache_dir = self.options.cache_dir or self.options.output / "cache"
            self.cache = cached_features(self.encoder, examples, cache_dir, device,
                                         progress=self.options.progress)
            failed = self.cache.failed
        splits.problems += [f"{reason}; image left out" for reason in failed.values()]
        splits.drop(set(failed))
        self.vocab = Vocabulary.build((c for e in splits.train for c in e.captions), self.arch.min_word_count)
        self.examples = splits.train
        self.pairs = [(i, self.vocab.encode(c, self.arch.max_length))
                      for i, e in enumerate(splits.train) for c in e.captions]
        decoder = AttentionDecoder(len(self.vocab), self.encoder.channels, self.arch.embed_dim,
                                   self.arch.attention_dim, self.arch.hidden_dim, self.arch.dropout)
        self.module = CnnLstm(decoder, self.encoder if self.arch.fine_tune_encoder else None, self.vocab.pad,
                              self.arch.attention_regularization).to(device)

    def train_size(self) -> int:
        return len(self.pairs)

    def collate(self, indices: list[int]) -> dict:
        chosen = [self.pairs[i] for i in indices]
        return {"captions": self._padded([ids for _, ids in chosen]),
                **self._images([self.examples[i] for i, _ in chosen])}

    def _padded(self, sequences: list[list[int]]) -> torch.Tensor:
        batch = torch.full((len(sequences), max(map(len, sequences))), self.vocab.pad, dtype=torch.long)
        for row, ids in enumerate(sequences):
            batch[row, :len(ids)] = torch.tensor(ids)
        return batch

    def _images(self, examples: list[Example]) -> dict:
        """Cached features, or pixels for the fine-tuned CNN."""
        if self.cache is not None:
            return {"features": self.cache.take([e.name for e in examples])}
        size = self.encoder.image_size
        return {"pixels": self.encoder.preprocess([decode_example(e, size) for e in examples])}

    def optimizer(self, learning_rate: float, weight_decay: float) -> torch.optim.Optimizer:
        groups = [{"params": list(self.module.decoder.parameters()), "lr": learning_rate}]
        if self.module.encoder is not None:
            groups.append({"params": list(self.module.encoder.parameters()),
                           "lr": self.arch.encoder_learning_rate})
        return torch.optim.AdamW(groups, lr=learning_rate, weight_decay=weight_decay)

    def scheduler(self, optimizer: torch.optim.Optimizer, total_steps: int, mode: str):
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=mode, factor=self.arch.lr_factor,
                                                          patience=self.arch.lr_patience)

    def _features(self, examples: list[Example]) -> torch.Tensor:
        batch = self._images(examples)
        if "features" in batch:
            return batch["features"].to(self.device)
        with torch.inference_mode():
            return self.module.encoder(batch["pixels"].to(self.device))

    def captions(self, examples: list[Example], beams: int) -> dict[str, str]:
        self.module.eval()
        options = GenerationOptions(max_new_tokens=self.arch.max_length, num_beams=beams)
        found = {}
        for start in range(0, len(examples), EVAL_BATCH):
            chunk = examples[start:start + EVAL_BATCH]
            texts = caption_features(self.module.decoder, self.vocab, self._features(chunk), options)
            found.update({e.name: t[0] for e, t in zip(chunk, texts, strict=True)})
        return found

    def val_loss(self, examples: list[Example]) -> float:
        self.module.eval()
        pairs = [(e, self.vocab.encode(c, self.arch.max_length)) for e in examples for c in e.captions]
        total = 0.0
        with torch.inference_mode():
            for start in range(0, len(pairs), EVAL_BATCH):
                chunk = pairs[start:start + EVAL_BATCH]
                features = self._features([e for e, _ in chunk])
                loss = self.module(self._padded([ids for _, ids in chunk]).to(self.device), features=features)
                total += loss.item() * len(chunk)
        return total / max(len(pairs), 1)

    def save(self, folder: Path) -> None:
        save_model(folder, self.module, self.encoder, self.vocab, self.arch)

    def restore(self, folder: Path) -> None:
        saved = Vocabulary.load(folder / "vocab.json")
        if saved.words != self.vocab.words:
            raise OptionError(f"{folder}: its vocabulary differs from the one these training captions "
                              "give; the dataset changed since the run began, so it cannot be resumed")
        state = load_file(str(folder / WEIGHTS))
        self.module.decoder.load_state_dict(_part(state, "decoder."))
        if self.module.encoder is not None:
            self.module.encoder.load_state_dict(_part(state, "encoder."))
