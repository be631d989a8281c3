"""What the pipeline asks of every model: the `Captioner` base class."""

from __future__ import annotations

from typing import Any

from PIL import Image

from captionkit.options import GenerationOptions
from captionkit.predictions import Caption, Prediction
from captionkit.sources import FULL_SIZE

__all__ = ["Caption", "Captioner", "Prediction"]


class Captioner:
    """Takes decoded RGB images and generation options, returns one Prediction per image.

    Adapters subclass it and set what applies; the defaults describe a plain local model. Every
    attribute that changes what a model outputs (`variant`, `fingerprint`, `generates`) is part of
    the resume key, so a wrapper must pass them on.
    """

    model_id: str = ""
    """The name results are recorded under: a Hub id, a local path or a built-in name."""
    input_size: int | None = None
    """The side in pixels the model looks at; decoders may shrink images to about this size."""
    device: Any = "cpu"
    """Where it runs (a torch.device or its name): picks the default batch size."""
    preferred_batch_size: int | None = None
    """Images per batch this model wants (remote endpoints: requests in flight); None: the default."""
    generates: bool = True
    """False for models whose output ignores the generation options (the built-in `objects`)."""
    grounded: bool = False
    """True when predictions carry regions for the caption's phrases (`--draw-boxes`)."""
    variant: str = ""
    """How the weights run when not plain float32 (int8, bfloat16...): outputs differ."""
    fingerprint: str = ""
    """A digest of a local checkpoint's files: replaced weights give other outputs."""
    run_kind: str = "caption"
    """What a run of it records itself as in the store: caption, or segment for segmenters."""
    preprocess: Any = None
    """How the decoding threads turn a decoded image into this model's input (a
    `preprocess.FixedSize`); None: `caption` makes its inputs itself."""
    decodes_again: bool = False
    """True when `caption` decodes some images again for another size (`sources.at_least`): the
    decoders then keep what each shrunk image came from."""
    regions_at_full_size: bool = False
    """True when its regions are already in the pixels of the file an image was decoded from
    (`sources.FULL_SIZE`), not of the smaller image it was given (a JPEG draft)."""
    label_maps: dict[str, list[str]] | None = None
    """For segmenters: each region kind's label-map classes (`segment.labelmaps.vocabularies`),
    recorded with the run so that `captionkit export` writes the same label maps."""

    def caption(self, images: list[Image.Image], options: GenerationOptions,
                prompts: list[str | None] | None = None) -> list[Prediction]:
        raise NotImplementedError

    def identity(self) -> dict:
        """What makes this model's outputs differ from another's, for the resume key."""
        return {"model": self.model_id, "variant": self.variant, "fingerprint": self.fingerprint}

    def takes_jpeg_bytes(self) -> bool:
        """Whether its `preprocess` also makes inputs from a JPEG's bytes on the model's device
        (`from_jpeg`: nvJPEG on CUDA, for `--gpu-jpeg`)."""
        return hasattr(self.preprocess, "from_jpeg")


class CaptionerWrapper(Captioner):
    """A captioner that adds behaviour around another: every declared attribute is the inner
    model's, so the wrapper keeps its resume key."""

    def __init__(self, inner: Captioner) -> None:
        self.inner = inner

    def __getattribute__(self, name: str):
        if name in DECLARED:
            return getattr(object.__getattribute__(self, "inner"), name)
        return object.__getattribute__(self, name)

    def caption(self, images: list[Image.Image], options: GenerationOptions,
                prompts: list[str | None] | None = None) -> list[Prediction]:
        return self.inner.caption(images, options, prompts)


DECLARED = frozenset({"model_id", "input_size", "device", "preferred_batch_size", "generates",
                       "grounded", "variant", "fingerprint", "run_kind", "preprocess",
                      "decodes_again", "regions_at_full_size", "label_maps"})
"""The attributes every Captioner declares (see the class body), which wrappers pass on."""


def at_full_size(captioner: Captioner, image: Image.Image, prediction: Prediction) -> Prediction:
    """`prediction` for `image` with its regions in the pixels of the file it was decoded from."""
    if captioner.regions_at_full_size:
        return prediction
    return prediction.scaled(image.size, full_size(image))


def full_size(image: Image.Image) -> tuple[int, int]:
    """The (width, height) of the file `image` was decoded from (itself when not drafted)."""
    return image.info.get(FULL_SIZE, image.size)
