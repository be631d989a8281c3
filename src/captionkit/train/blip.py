"""Fine-tune BlipForConditionalGeneration the way LAVIS fine-tunes BLIP on COCO captions.

AdamW (lr 1e-5, weight decay 0.05), linear warmup then cosine decay, 384 px, every caption after
the prompt "a picture of " with the prompt and the pads masked out of the loss (-100), and the
training images randomly cropped and resized, flipped and colour-jittered. The result is saved as
a standard transformers checkpoint (model type `blip`), so plain transformers loads it and
captionkit serves it with its BLIP adapter.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch import nn

from captionkit import hub
from captionkit.errors import ModelUnavailableError, OptionError
from captionkit.train.data import Example, Splits, decode_example, unreadable
from captionkit.train.options import BlipOptions, TrainOptions

EVAL_BATCH = 16


class _Loss(nn.Module):
    """The BLIP model, returning its loss, so the loop can call `module(**batch)`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **batch) -> torch.Tensor:
        return self.model(**batch).loss


def resolve_model(name: str) -> Path:
    """A BLIP checkpoint folder for an alias (blip-base), a Hub id or a path."""
    from captionkit.models.registry import MODELS

    spec = MODELS.get(name)
    if spec is not None and spec.family != "blip":
        raise OptionError(f"--model {name} is a {spec.family} model; `train blip` fine-tunes BLIP "
                          "(blip-base, blip-large or a BlipForConditionalGeneration checkpoint)")
    return hub.resolve(spec.source if spec else name)


def resize_positions(model: nn.Module, size: int) -> None:
    """Interpolate the vision transformer's position embeddings to `size` px, for good: the saved
    checkpoint then expects that size, as LAVIS does when it fine-tunes at a new resolution."""
    embeddings = model.vision_model.embeddings
    if embeddings.image_size == size:
        return
    patches = (size // embeddings.patch_size) ** 2
    dummy = torch.zeros(1, patches + 1, embeddings.embed_dim)
    with torch.no_grad():
        positions = embeddings.interpolate_pos_encoding(dummy, size, size).clone()
    embeddings.position_embedding = nn.Parameter(positions)
    embeddings.image_size, embeddings.num_patches, embeddings.num_positions = size, patches, patches + 1
    model.config.vision_config.image_size = size


def _transforms(processor, size: int, augment: bool):
    """Training transforms: LAVIS's crop and flip, the seed projects' colour jitter, the processor's
    normalisation."""
    from torchvision.transforms import v2

    image_processor = processor.image_processor
    bicubic = v2.InterpolationMode.BICUBIC
    steps = [v2.RandomResizedCrop(size, scale=(0.5, 1.0), interpolation=bicubic), v2.RandomHorizontalFlip(),
             v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2)] if augment \
        else [v2.Resize((size, size), interpolation=bicubic)]
    return v2.Compose([v2.PILToTensor(), *steps, v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(image_processor.image_mean, image_processor.image_std)])


class BlipTask:
    """A BLIP fine-tune as the training loop runs it: images decoded and augmented every epoch."""

    architecture = "blip"
    grad_clip = None

    def __init__(self, options: TrainOptions, model: BlipOptions) -> None:
        self.options, self.arch = options, model

    def prepare(self, splits: Splits, device: torch.device) -> None:
        from transformers import BlipForConditionalGeneration, BlipProcessor

        path = resolve_model(self.arch.model)
        try:
            self.processor = BlipProcessor.from_pretrained(path)
            model = BlipForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
        except (OSError, ValueError, KeyError) as error:
            raise ModelUnavailableError(f"--model {self.arch.model}: cannot load BLIP from {path} "
                                        f"({error})") from error
        self.size = self.arch.image_size or model.config.vision_config.image_size
        resize_positions(model, self.size)
        self.processor.image_processor.size = {"height": self.size, "width": self.size}
        self.device = device
        failed = unreadable(splits.train + splits.val, self.size)
        splits.problems += [f"{reason}; image left out" for reason in failed.values()]
        splits.drop(set(failed))
        self.module = _Loss(model).to(device)
        self.examples = splits.train
        self.pairs = [(i, c) for i, e in enumerate(splits.train) for c in e.captions]
        self.train_transform = _transforms(self.processor, self.size, self.arch.augment)
        self.eval_transform = _transforms(self.processor, self.size, augment=False)

    def train_size(self) -> int:
        return len(self.pairs)

    def _batch(self, images: list[Image.Image], captions: list[str], transform) -> dict:
        tokenizer = self.processor.tokenizer
        text = tokenizer([self.arch.prompt + c.lower() for c in captions], padding="longest", truncation=True,
                         max_length=self.arch.max_length, return_tensors="pt")
        ids = text["input_ids"]
        ids[:, 0] = self.module.model.config.text_config.bos_token_id  # generate starts from it too
        labels = ids.masked_fill(text["attention_mask"] == 0, -100)
        prompt = len(tokenizer(self.arch.prompt, add_special_tokens=False)["input_ids"]) + 1
        labels[:, :prompt] = -100  # the prompt is given, not learned
        return {"pixel_values": torch.stack([transform(image) for image in images]), "input_ids": ids,
                "attention_mask": text["attention_mask"], "labels": labels}

    def collate(self, indices: list[int]) -> dict:
        chosen = [self.pairs[i] for i in indices]
        images = [decode_example(self.examples[i], self.size) for i, _ in chosen]
        return self._batch(images, [c for _, c in chosen], self.train_transform)

    def optimizer(self, learning_rate: float, weight_decay: float) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.module.parameters(), lr=learning_rate, weight_decay=weight_decay)

    def scheduler(self, optimizer: torch.optim.Optimizer, total_steps: int, mode: str):
        from transformers import get_cosine_schedule_with_warmup

        warmup = min(self.arch.warmup_steps, total_steps)
        return get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)

    def captions(self, examples: list[Example], beams: int) -> dict[str, str]:
        model = self.module.model.eval()
        tokenizer = self.processor.tokenizer
        found = {}
        for start in range(0, len(examples), EVAL_BATCH):
            chunk = examples[start:start + EVAL_BATCH]
            pixels = torch.stack([self.eval_transform(decode_example(e, self.size)) for e in chunk])
            # generate drops the prompt's closing [SEP] itself
            prompt = tokenizer([self.arch.prompt] * len(chunk), return_tensors="pt")["input_ids"]
            with torch.inference_mode():
                output = model.generate(pixel_values=pixels.to(self.device), input_ids=prompt.to(self.device),
                                        num_beams=beams, max_new_tokens=self.arch.max_length)
            texts = tokenizer.batch_decode(output, skip_special_tokens=True)
            found.update({e.name: _after(t, self.arch.prompt) for e, t in zip(chunk, texts, strict=True)})
        return found

    def val_loss(self, examples: list[Example]) -> float:
        self.module.eval()
        pairs = [(e, c) for e in examples for c in e.captions]
        total = 0.0
        with torch.inference_mode():
            for start in range(0, len(pairs), EVAL_BATCH):
                chunk = pairs[start:start + EVAL_BATCH]
                batch = self._batch([decode_example(e, self.size) for e, _ in chunk], [c for _, c in chunk],
                                    self.eval_transform)
                total += self.module(**{k: v.to(self.device) for k, v in batch.items()}).item() * len(chunk)
        return total / max(len(pairs), 1)

    def save(self, folder: Path) -> None:
        self.module.model.save_pretrained(folder)
        self.processor.save_pretrained(folder)

    def restore(self, folder: Path) -> None:
        from transformers import BlipForConditionalGeneration

        saved = BlipForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
        self.module.model.load_state_dict(saved.state_dict())


def _after(text: str, prompt: str) -> str:
    """The caption without the prompt it was asked to continue."""
    text, prompt = " ".join(text.split()), " ".join(prompt.lower().split())
    return text[len(prompt):].strip() if text.lower().startswith(prompt) else text
