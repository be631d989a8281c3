"""The Python entry point: `captionkit.load(name).caption([...])`."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image

from captionkit import sources
from captionkit.models import Captioner
from captionkit.models import load as load_captioner
from captionkit.models.base import at_full_size
from captionkit.options import GenerationOptions, LoadOptions
from captionkit.pipeline import Pipeline, RunOptions, RunSummary, default_batch_size
from captionkit.predictions import Prediction

ImageLike = str | Path | Image.Image | bytes | IO[bytes] | np.ndarray


class Model:
    """A loaded captioner with conveniences for paths, single images and whole folders."""

    def __init__(self, captioner: Captioner) -> None:
        self.captioner = captioner
        self._segmenters: dict[str, Captioner] = {}

    @property
    def model_id(self) -> str:
        return self.captioner.model_id

    def predict(self, images: ImageLike | Sequence[ImageLike], segment: str | None = None,
                **generation) -> Prediction | list[Prediction]:
        """Predict one image (returns a Prediction: text, candidates, regions in the image's own
        pixels) or a list of them (returns a list); `segment` names a segmenter (`maskrcnn-v2`)
        whose masks join the regions."""
        single, batch = _one_or_many(images)
        options = GenerationOptions(**generation)
        model = self._segmenting(segment) if segment else self.captioner
        size = default_batch_size(model)  # a long list goes through in batches, not at once
        found: list[Prediction] = []
        for start in range(0, len(batch), size):
            decoded = [sources.load_image(image, model.input_size, keep_original=model.decodes_again)
                       for image in batch[start:start + size]]
            found += [at_full_size(model, image, prediction)
                      for image, prediction in zip(decoded, model.caption(decoded, options), strict=True)]
        return found[0] if single else found

    def _segmenting(self, name: str) -> Captioner:
        """This captioner with the segmenter `name`, loaded once."""
        from captionkit.segment.captioner import segmenting
        from captionkit.segment.options import SegmenterLoadOptions, SegmentOptions

        if name not in self._segmenters:
            load = SegmenterLoadOptions(device=str(self.captioner.device))
            self._segmenters[name] = segmenting([name], SegmentOptions(), self.captioner, load)
        return self._segmenters[name]

    def caption(self, images: ImageLike | Sequence[ImageLike], **generation) -> str | list[str]:
        """Caption one image (returns a string) or a list of them (returns a list)."""
        found = self.predict(images, **generation)
        return found.text if isinstance(found, Prediction) else [p.text for p in found]

    def run(self, inputs: str | Path | Sequence[str | Path], generation: GenerationOptions | None = None,
            **run_options) -> RunSummary:
        """Caption files/folders into an output folder, resumably (see `RunOptions`)."""
        if isinstance(inputs, str | Path):  # one folder, not its name's characters
            inputs = [inputs]
        return Pipeline(self.captioner, generation or GenerationOptions(),
                        RunOptions(**run_options)).run([str(i) for i in inputs])


def _one_or_many(images: object) -> tuple[bool, list]:
    """Whether `images` is one image, and the images as a list."""
    # an H x W (x C) array is one image, an N x H x W x C array a list of them
    single = isinstance(images, str | Path | Image.Image | bytes | bytearray) or (
        hasattr(images, "read") or len(getattr(images, "shape", ())) in (2, 3))
    if not single and not isinstance(images, Iterable):
        raise TypeError("caption() takes an image (a path, a PIL image, encoded bytes, a binary "
                        f"file or an RGB array) or a list of them, not {type(images).__name__}")
    return single, [images] if single else list(images)


def load(name: str = "auto", device: str = "auto", dtype: str = "auto", **load_options) -> Model:
    """Load a captioner by alias (`blip-base`), Hub id, local directory or `auto`."""
    return Model(load_captioner(name, LoadOptions(device=device, dtype=dtype, **load_options)))
