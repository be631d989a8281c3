"""Kosmos-2: captions whose phrases come grounded to boxes in the image.

The model answers in text with `<phrase>` and `<patch_index_NNNN>` tags; the processor turns those
into a clean caption plus entities, and the entities travel in `Caption.extras["entities"]`.
"""

from __future__ import annotations

from PIL import Image

from captionkit.models.base import Caption
from captionkit.models.hf import HFCaptioner
from captionkit.options import GenerationOptions

GROUNDING = "<grounding>"


class Kosmos2Captioner(HFCaptioner):
    """Kosmos-2 with its `<grounding>` prompts; the prompt is cut from the front of the caption."""

    model_class = "Kosmos2ForConditionalGeneration"
    default_prompt = "<grounding>An image of"
    detail_prompts = {"brief": "<grounding>An image of",
                      "detailed": "<grounding> Describe this image in detail:"}

    def caption(self, images: list[Image.Image], options: GenerationOptions,
                prompts: list[str | None] | None = None) -> list[Caption]:
        """Captions with `extras["entities"]`; candidates, if asked for, carry their own."""
        prompts = prompts or [options.prompt] * len(images)
        raw = super().caption(images, options, prompts)
        return [self._grounded(caption, self.instruction(prompt, options))
                for caption, prompt in zip(raw, prompts, strict=True)]

    def _grounded(self, caption: Caption, prompt: str | None) -> Caption:
        text, entities = self.ground(caption.text, prompt)
        extras = {**caption.extras, "entities": entities}
        if "candidates" in extras:
            extras["candidates"] = [dict(zip(("text", "entities"), self.ground(c["text"], prompt),
                                             strict=True)) for c in extras["candidates"]]
        return Caption(text, extras)

    def ground(self, decoded: str, prompt: str | None) -> tuple[str, list[dict]]:
        """The caption without the prompt, and its entities as JSON-friendly dicts."""
        text, found = self.processor.post_process_generation(decoded)
        asked = (prompt or "").replace(GROUNDING, "").strip()
        cut = 0
        if asked and text.startswith(asked):
            cut = len(text) - len(text[len(asked):].lstrip())
        entities = [{"phrase": phrase, "span": [start - cut, end - cut],
                     "boxes": [[round(float(v), 6) for v in box] for box in boxes]}
                    for phrase, (start, end), boxes in found if start >= cut]
        return text[cut:], entities
