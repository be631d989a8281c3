"""Kosmos-2: captions whose phrases come grounded to boxes in the image.

The model answers in text with `<phrase>` and `<patch_index_NNNN>` tags; the processor turns those
into a clean caption plus entities, which become the prediction's phrase regions (boxes in pixels,
the phrase's span in the caption).
"""

from __future__ import annotations

from PIL import Image

from captionkit.models.base import Caption
from captionkit.models.hf import HFCaptioner
from captionkit.options import GenerationOptions
from captionkit.predictions import phrase_regions

GROUNDING = "<grounding>"


class Kosmos2Captioner(HFCaptioner):
    """Kosmos-2 with its `<grounding>` prompts; the prompt is cut from the front of the caption."""

    model_class = "Kosmos2ForConditionalGeneration"
    pixels_in_threads = True
    grounded = True
    default_prompt = "<grounding>An image of"
    detail_prompts = {"brief": "<grounding>An image of",
                      "detailed": "<grounding> Describe this image in detail:"}

    def caption(self, images: list[Image.Image], options: GenerationOptions,
                prompts: list[str | None] | None = None) -> list[Caption]:
        """Captions with phrase regions; candidates, if asked for, carry their own."""
        prompts = prompts or [options.prompt] * len(images)
        raw = super().caption(images, options, prompts)
        return [self._grounded(caption, self.instruction(prompt, options), image.size)
                for caption, prompt, image in zip(raw, prompts, images, strict=True)]

    def _grounded(self, caption: Caption, prompt: str | None, size: tuple[int, int]) -> Caption:
        text, entities = self.ground(caption.text, prompt)
        extras = dict(caption.extras)
        if "candidates" in extras:
            extras["candidates"] = [
                {"text": found, "regions": [r.to_dict() for r in phrase_regions(grounded, size)]}
                for found, grounded in (self.ground(c["text"], prompt) for c in extras["candidates"])]
        return Caption(text, extras, phrase_regions(entities, size))

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

