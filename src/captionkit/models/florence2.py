"""Florence-2 through transformers' native implementation: the caption tasks as --detail levels."""

from __future__ import annotations

import json
from pathlib import Path

from captionkit.errors import ModelNotFoundError, OptionError
from captionkit.models.hf import HFCaptioner
from captionkit.options import GenerationOptions, LoadOptions


class Florence2Captioner(HFCaptioner):
    """Florence-2 (DaViT + BART): task tokens such as `<CAPTION>` are its prompts."""

    model_class = "Florence2ForConditionalGeneration"
    pixels_in_threads = True
    default_prompt = "<CAPTION>"
    detail_prompts = {"brief": "<CAPTION>", "detailed": "<DETAILED_CAPTION>",
                      "more-detailed": "<MORE_DETAILED_CAPTION>"}

    def __init__(self, path: Path, model_id: str, options: LoadOptions) -> None:
        import transformers

        if not hasattr(transformers, self.model_class):
            raise ModelNotFoundError(f"{model_id}: Florence-2 needs transformers 4.56 or newer, "
                                     "which implements it natively: pip install -U transformers")
        config = json.loads((path / "config.json").read_text())
        if "auto_map" in config:
            # the original Microsoft repos ship their own modeling code, which transformers'
            # native Florence-2 cannot read; the converted copies load without remote code
            name = Path(model_id).name
            raise ModelNotFoundError(
                f"{model_id}: this is the remote-code Florence-2 checkpoint; captionkit runs "
                f"transformers' native Florence-2, which needs the converted weights: use "
                f"--model florence-community/{name} (or the florence-2-base/-large aliases)")
        super().__init__(path, model_id, options)

    def prompt_for(self, prompt: str | None, options: GenerationOptions) -> str | None:
        asked = super().prompt_for(prompt, options)
        task = asked.split(">", 1)[0] + ">" if asked and asked.startswith("<") else None
        kind = self.processor.tasks_answer_post_processing_type.get(task, "pure_text")
        if kind != "pure_text":
            raise OptionError(f"{self.model_id}: {task} answers with regions ({kind}), not text; "
                              "captionkit runs Florence-2's text tasks: <CAPTION>, "
                              "<DETAILED_CAPTION>, <MORE_DETAILED_CAPTION>, <OCR>")
        return asked
