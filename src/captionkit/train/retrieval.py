"""The baseline a trained captioner must beat: the caption of the nearest training image.

Nearest by cosine similarity in the trained model's own encoder's feature space, either the whole
feature map flattened (it keeps where things are) or its mean over regions (it keeps what is there).
"""

from __future__ import annotations

from pathlib import Path

import torch

from captionkit.train.data import Example
from captionkit.train.encoders import ImageEncoder
from captionkit.train.features import cached_features

CHUNK = 256


def nearest_captions(encoder: ImageEncoder, train: list[Example], queries: list[Example], cache_dir: Path,
                     device: torch.device, pooled: bool = False, cached_with: list[Example] | None = None,
                     progress: bool = False) -> dict[str, str]:
    """Each query image's caption: the first reference of the most similar training image.

    `cached_with` is the image set whose cached features hold the training images (a training run
    caches its training and validation images together), so they are not encoded again.
    """
    bank = cached_features(encoder, cached_with or train, cache_dir, device, progress=progress)
    asked = cached_features(encoder, queries, cache_dir, device, progress=progress)
    usable = [e for e in train if e.name not in bank.failed]
    keys = _vectors(bank.take([e.name for e in usable]), pooled)
    found = {}
    wanted = [e for e in queries if e.name not in asked.failed]
    for start in range(0, len(wanted), CHUNK):
        chunk = wanted[start:start + CHUNK]
        nearest = (_vectors(asked.take([e.name for e in chunk]), pooled) @ keys.T).argmax(1)
        found.update({e.name: usable[i].captions[0] for e, i in zip(chunk, nearest.tolist(), strict=True)})
    return found


def _vectors(features: torch.Tensor, pooled: bool) -> torch.Tensor:
    """Unit vectors: the regions' mean, or all regions flattened."""
    flat = features.mean(1) if pooled else features.flatten(1)
    return torch.nn.functional.normalize(flat, dim=-1)
