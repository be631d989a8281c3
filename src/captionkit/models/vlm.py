"""Any image-text-to-text VLM (Qwen2-VL, SmolVLM, LLaVA, PaliGemma...) through the Auto classes.

The prompt is an instruction wrapped in the checkpoint's own chat template, with an optional system
message; models without a chat template (PaliGemma) take their plain task prompts instead.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from captionkit.errors import OptionError
from captionkit.models.hf import HFCaptioner
from captionkit.options import GenerationOptions, LoadOptions

INSTRUCTIONS = {
    "brief": "Describe this image in one sentence.",
    "detailed": "Describe this image in detail.",
    "more-detailed": "Describe this image in as much detail as you can, in one paragraph.",
}

# Families without a chat template, prompted the way their model cards do.
PLAIN_PROMPTS: dict[str, dict[str, str]] = {
    "paligemma": {"brief": "caption en", "detailed": "describe en"},
}


class VLMCaptioner(HFCaptioner):
    """A chat VLM: left-padded batches, and only the tokens after the prompt are the caption."""

    model_class = "AutoModelForImageTextToText"
    default_prompt = INSTRUCTIONS["brief"]
    detail_prompts = INSTRUCTIONS

    def __init__(self, path: Path, model_id: str, options: LoadOptions) -> None:
        super().__init__(path, model_id, options)
        # decoder-only generation continues from the last position, so padding goes on the left
        self.tokenizer.padding_side = "left"
        self.chat = getattr(self.processor, "chat_template", None) is not None
        plain = PLAIN_PROMPTS.get(self.model.config.model_type)
        if not self.chat and plain:
            self.detail_prompts = plain
            self.default_prompt = plain["brief"]

    def prompt_for(self, prompt: str | None, options: GenerationOptions) -> str | None:
        asked = self.instruction(prompt, options)
        if not self.chat:
            if options.system is not None or options.language is not None:
                raise OptionError(f"{self.model_id} has no chat template, so no --system or "
                                  "--language: put the language in --prompt (PaliGemma: "
                                  "'caption fr')")
            return asked
        if options.language is not None:
            asked = f"{asked} Answer in {options.language.strip()}."
        messages = [] if options.system is None else [
            {"role": "system", "content": [{"type": "text", "text": options.system}]}]
        messages.append({"role": "user", "content": [{"type": "image"},
                                                     {"type": "text", "text": asked}]})
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    def encode(self, images: list[Image.Image], prompt: str | None) -> dict:
        return self.processor(images=[[image] for image in images], text=[prompt] * len(images),
                              padding=True, return_tensors="pt")

    def new_tokens(self, output: torch.Tensor, inputs: dict) -> torch.Tensor:
        return output[:, inputs["input_ids"].shape[1]:]
