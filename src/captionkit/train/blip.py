"""Fine-tune BLIP the way LAVIS fine-tunes it on COCO captions, and BLIP-2 with LoRA.

AdamW (lr 1e-5, weight decay 0.05), linear warmup then cosine decay, 384 px, every caption after
the prompt "a picture of " with the prompt and the pads masked out of the loss (-100), and the
training images randomly cropped and resized, flipped and colour-jittered. BLIP-2 (with a
decoder-only LM such as OPT) trains LoRA adapters on its language model through `peft`. The
result is a standard transformers checkpoint (model type `blip` or `blip-2`, LoRA merged in), so
plain transformers loads it and captionkit serves it with its BLIP adapters; `last/lora/` keeps the
adapters themselves for `--resume`.
"""

from __future__ import annotations

import json
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
    """A BLIP or BLIP-2 checkpoint folder for an alias (blip-base), a Hub id or a path."""
    from captionkit.models.registry import MODELS

    spec = MODELS.get(name)
    if spec is not None and spec.family not in ("blip", "blip-2"):
        raise OptionError(f"--model {name} is a {spec.family} model; `train blip` fine-tunes BLIP "
                          "and BLIP-2 (blip-base, blip-large, blip2-opt-2.7b or such a checkpoint)")
    return hub.resolve(spec.source if spec else name)


def blip_task(options: TrainOptions, model: BlipOptions) -> BlipTask:
    """The task for the checkpoint `model.model` names: BLIP, or BLIP-2."""
    config = json.loads((resolve_model(model.model) / "config.json").read_text())
    if config.get("model_type") == "blip-2":
        return Blip2Task(options, model)
    if config.get("model_type") != "blip":
        raise OptionError(f"--model {model.model} is a {config.get('model_type')!r} model; `train blip` "
                          "fine-tunes BLIP and BLIP-2")
    return BlipTask(options, model)


def merged_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of a model with LoRA layers as the plain model's: each adapted weight plus
    its adapter's delta, under the original names. Computed aside, so training is untouched."""
    from peft.tuners.lora import LoraLayer

    deltas = {name: module.get_delta_weight("default") for name, module in model.named_modules()
              if isinstance(module, LoraLayer)}
    state = {}
    for key, value in model.state_dict().items():
        if ".lora_" in key:
            continue
        if ".base_layer." in key:
            layer, leaf = key.split(".base_layer.")
            key = f"{layer}.{leaf}"
            if leaf == "weight" and layer in deltas:
                value = value + deltas[layer].to(value.dtype)
        state[key] = value.detach()
    return state


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
    model_class = "BlipForConditionalGeneration"
    processor_class = "BlipProcessor"
    lora_targets = ("query", "value")
    """The text decoder's attention projections, when --lora asks for adapters."""
    lora_by_default = False

    def __init__(self, options: TrainOptions, model: BlipOptions) -> None:
        self.options, self.arch = options, model
        self.lora = model.lora if model.lora is not None else self.lora_by_default

    def prepare(self, splits: Splits, device: torch.device) -> None:
        model = self._load()
        self.size = self.arch.image_size or model.config.vision_config.image_size
        resize_positions(model, self.size)
        self.processor.image_processor.size = {"height": self.size, "width": self.size}
        if self.lora:
            model = self._with_adapters(model)
        self.device = device
        failed = unreadable(splits.train + splits.val, self.size)
        splits.problems += [f"{reason}; image left out" for reason in failed.values()]
        splits.drop(set(failed))
        self.module = _Loss(model).to(device)
        self.examples = splits.train
        self.pairs = [(i, c) for i, e in enumerate(splits.train) for c in e.captions]
        self.train_transform = _transforms(self.processor, self.size, self.arch.augment)
        self.eval_transform = _transforms(self.processor, self.size, augment=False)

    def _load(self) -> nn.Module:
        import transformers

        path = resolve_model(self.arch.model)
        try:
            self.processor = getattr(transformers, self.processor_class).from_pretrained(path)
            model = getattr(transformers, self.model_class).from_pretrained(path, dtype=torch.float32)
        except (OSError, ValueError, KeyError) as error:
            raise ModelUnavailableError(f"--model {self.arch.model}: cannot load it from {path} "
                                        f"({error})") from error
        if self.processor.tokenizer.pad_token is None:
            self.processor.tokenizer.pad_token = self.processor.tokenizer.eos_token
        return model

    def _with_adapters(self, model: nn.Module) -> nn.Module:
        import peft

        targets = self.arch.lora_targets.split(",") if self.arch.lora_targets else list(self.lora_targets)
        config = peft.LoraConfig(r=self.arch.lora_rank, lora_alpha=2 * self.arch.lora_rank,
                                 lora_dropout=0.05, target_modules=targets)
        try:
            return peft.get_peft_model(model, config)
        except ValueError as error:  # no module matched the targets
            raise OptionError(f"--lora-targets {','.join(targets)}: {error}") from error

    @property
    def model(self) -> nn.Module:
        """The transformers model (inside its LoRA wrapper, if any)."""
        model = self.module.model
        return model.get_base_model() if self.lora else model

    def train_size(self) -> int:
        return len(self.pairs)

    def _text(self, captions: list[str]) -> dict:
        """BLIP's decoder input: [DEC] prompt caption [SEP], learning only the caption and [SEP]."""
        tokenizer = self.processor.tokenizer
        text = tokenizer([self.arch.prompt + c.lower() for c in captions], padding="longest", truncation=True,
                         max_length=self.arch.max_length, return_tensors="pt")
        ids = text["input_ids"]
        ids[:, 0] = self.model.config.text_config.bos_token_id  # generate starts from it too
        labels = ids.masked_fill(text["attention_mask"] == 0, -100)
        prompt = len(tokenizer(self.arch.prompt, add_special_tokens=False)["input_ids"]) + 1
        labels[:, :prompt] = -100  # the prompt is given, not learned
        return {"input_ids": ids, "attention_mask": text["attention_mask"], "labels": labels}

    def _batch(self, images: list[Image.Image], captions: list[str], transform) -> dict:
        return {"pixel_values": torch.stack([transform(image) for image in images]), **self._text(captions)}

    def collate(self, indices: list[int]) -> dict:
        chosen = [self.pairs[i] for i in indices]
        images = [decode_example(self.examples[i], self.size) for i, _ in chosen]
        return self._batch(images, [c for _, c in chosen], self.train_transform)

    def optimizer(self, learning_rate: float, weight_decay: float) -> torch.optim.Optimizer:
        trained = [p for p in self.module.parameters() if p.requires_grad]
        return torch.optim.AdamW(trained, lr=learning_rate, weight_decay=weight_decay)

    def scheduler(self, optimizer: torch.optim.Optimizer, total_steps: int, mode: str):
        from transformers import get_cosine_schedule_with_warmup

        warmup = min(self.arch.warmup_steps, total_steps)
        return get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)

    def _prompt(self, count: int) -> dict:
        # BLIP's generate drops the prompt's closing [SEP] itself
        tokens = self.processor.tokenizer([self.arch.prompt] * count, return_tensors="pt")
        return {"input_ids": tokens["input_ids"]}

    def _generated(self, output: torch.Tensor, prompt: dict) -> list[str]:
        texts = self.processor.tokenizer.batch_decode(output, skip_special_tokens=True)
        return [_after(text, self.arch.prompt) for text in texts]

    def captions(self, examples: list[Example], beams: int) -> dict[str, str]:
        self.module.eval()
        found = {}
        for start in range(0, len(examples), EVAL_BATCH):
            chunk = examples[start:start + EVAL_BATCH]
            pixels = torch.stack([self.eval_transform(decode_example(e, self.size)) for e in chunk])
            prompt = self._prompt(len(chunk))
            with torch.inference_mode():
                output = self.model.generate(pixel_values=pixels.to(self.device),
                                             **{k: v.to(self.device) for k, v in prompt.items()},
                                             num_beams=beams, max_new_tokens=self.arch.max_length)
            found.update({e.name: t for e, t in zip(chunk, self._generated(output, prompt), strict=True)})
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
        """A standard checkpoint (adapters merged in); the adapters themselves in lora/."""
        if self.lora:
            self.model.save_pretrained(folder, state_dict=merged_state(self.model))
            self.module.model.save_pretrained(folder / "lora")
        else:
            self.model.save_pretrained(folder)
        self.processor.save_pretrained(folder)

    def restore(self, folder: Path) -> None:
        import transformers

        if self.lora:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            adapters = load_file(str(folder / "lora" / "adapter_model.safetensors"))
            set_peft_model_state_dict(self.module.model, adapters)
            return
        saved = getattr(transformers, self.model_class).from_pretrained(folder, dtype=torch.float32)
        self.model.load_state_dict(saved.state_dict())


class Blip2Task(BlipTask):
    """BLIP-2 with a decoder-only LM (OPT): LoRA adapters on the LM by default, the rest frozen."""

    model_class = "Blip2ForConditionalGeneration"
    processor_class = "Blip2Processor"
    lora_targets = ("q_proj", "v_proj")
    lora_by_default = True

    def _load(self) -> nn.Module:
        model = super()._load()
        if model.config.text_config.is_encoder_decoder:
            raise OptionError(f"--model {self.arch.model}: BLIP-2 with an encoder-decoder LM (Flan-T5) "
                              "cannot be fine-tuned here yet; use an OPT one such as blip2-opt-2.7b")
        return model

    def _text(self, captions: list[str]) -> dict:
        """The query tokens' places, <bos>, the prompt, the caption and <eos>; only the caption and
        <eos> are learned."""
        tokenizer, queries = self.processor.tokenizer, self.processor.num_query_tokens
        image = [self.model.config.image_token_index] * queries
        prompt = len(tokenizer(self.arch.prompt)["input_ids"])  # with the <bos> the tokenizer adds
        rows = [image + tokenizer(self.arch.prompt + c.lower() + tokenizer.eos_token)["input_ids"]
                [:self.arch.max_length] for c in captions]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :queries + prompt] = -100
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def _prompt(self, count: int) -> dict:
        text = self._text([""] * count)  # the prompt with its <eos> after it: drop that
        return {"input_ids": text["input_ids"][:, :-1], "attention_mask": text["attention_mask"][:, :-1]}

    def _generated(self, output: torch.Tensor, prompt: dict) -> list[str]:
        new = output[:, prompt["input_ids"].shape[1]:]
        texts = self.processor.tokenizer.batch_decode(new, skip_special_tokens=True)
        return [" ".join(text.split()) for text in texts]


def _after(text: str, prompt: str) -> str:
    """The caption without the prompt it was asked to continue."""
    text, prompt = " ".join(text.split()), " ".join(prompt.lower().split())
    return text[len(prompt):].strip() if text.lower().startswith(prompt) else text
