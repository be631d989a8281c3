"""Features of a frozen encoder, computed once per image and kept on disk.

A frozen encoder gives the same features every epoch, so they are computed in one pass and written
to a memory-mapped `.npy` file (float16) that later epochs, a resumed run and the next run over the
same images read instead of decoding and encoding again. The file's name is a digest of the
encoder and of every image's path, size and modification time, so a changed image set gets new
features. A killed pass resumes where its last flushed batch ended.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from captionkit import sources
from captionkit.errors import ImageError
from captionkit.train.checkpoint import write_atomic
from captionkit.train.data import Example
from captionkit.train.encoders import ImageEncoder
from captionkit.ui import progress_bar


@dataclass
class CachedFeatures:
    """Rows of features by image name, and the images that could not be read."""

    array: np.ndarray
    """`[images, regions, channels]` float16, memory-mapped."""
    rows: dict[str, int]
    failed: dict[str, str]
    """Image name -> `path: reason`."""
    seconds: float
    """How long computing them took (the pass a cached epoch no longer makes)."""
    path: Path

    def take(self, names: list[str]) -> torch.Tensor:
        """The features of `names` as a float32 tensor, in that order."""
        return torch.from_numpy(self.array[[self.rows[n] for n in names]].astype(np.float32))


def cache_file(encoder: ImageEncoder, examples: list[Example], cache_dir: Path) -> Path:
    """Where the features of `examples` under `encoder` live (one name per image set and encoder)."""
    digest = hashlib.sha256(encoder.key().encode())
    for example in sorted(examples, key=lambda e: e.name):
        stat = example.path.stat()
        digest.update(f"{example.name}\0{example.path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n"
                      .encode(errors="surrogateescape"))
    return Path(cache_dir) / f"{encoder.key()}-{digest.hexdigest()[:16]}.npy"


def cached_features(encoder: ImageEncoder, examples: list[Example], cache_dir: Path,
                    device: torch.device, batch_size: int = 32, progress: bool = True) -> CachedFeatures:
    """The features of every example's image, computed now only where the cache lacks them."""
    path = cache_file(encoder, examples, cache_dir)
    names = sorted(e.name for e in examples)
    by_name = {e.name: e for e in examples}
    meta_path = path.with_suffix(".json")
    meta = _read_meta(meta_path, len(names))
    if meta.get("done", 0) < len(names):
        meta = _compute(encoder, [by_name[n] for n in names], path, meta, device, batch_size, progress)
    array = np.load(path, mmap_mode="r")
    return CachedFeatures(array, {n: i for i, n in enumerate(names)}, meta["failed"], meta["seconds"],
                          path)


def _read_meta(path: Path, count: int) -> dict:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"done": 0, "failed": {}, "seconds": 0.0}
    return meta if meta.get("count") == count else {"done": 0, "failed": {}, "seconds": 0.0}


def _compute(encoder: ImageEncoder, examples: list[Example], path: Path, meta: dict,
             device: torch.device, batch_size: int, progress: bool) -> dict:
    """Fill the rows from `meta["done"]` on, flushing and recording progress after every batch."""
    path.parent.mkdir(parents=True, exist_ok=True)
    encoder = encoder.to(device).eval()
    done = meta.get("done", 0)
    array = None
    if done:
        array = np.load(path, mmap_mode="r+")
    spent = meta.get("seconds", 0.0)
    with progress_bar(len(examples) - done, progress, "caching features") as advance:
        for start in range(done, len(examples), batch_size):
            began = time.perf_counter()
            batch = examples[start:start + batch_size]
            features = _encode(encoder, batch, meta["failed"], device)
            if array is None:  # the shape is known after the first batch
                array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16,
                                                  shape=(len(examples), *features.shape[1:]))
            array[start:start + len(batch)] = features
            array.flush()
            spent += time.perf_counter() - began
            meta = {"count": len(examples), "done": start + len(batch), "failed": meta["failed"],
                    "seconds": spent, "encoder": encoder.key(), "shape": list(array.shape)}
            write_atomic(path.with_suffix(".json"), json.dumps(meta, indent=1))
            advance(len(batch))
    return meta


def _encode(encoder: ImageEncoder, batch: list[Example], failed: dict[str, str],
            device: torch.device) -> np.ndarray:
    """One batch's features; an unreadable image gets zeros and its reason in `failed`."""
    images, good = [], []
    for i, example in enumerate(batch):
        try:
            images.append(sources.decode(sources.read_bytes(example.path), sources.printable(example.path),
                                         encoder.image_size))
            good.append(i)
        except ImageError as error:
            failed[example.name] = str(error)
    with torch.inference_mode():
        out = encoder(encoder.preprocess(images).to(device)).float().cpu() if images else None
    shape = out.shape[1:] if out is not None else _shape(encoder, device)
    features = np.zeros((len(batch), *shape), dtype=np.float16)
    if out is not None:
        features[good] = out.numpy().astype(np.float16)
    return features


def _shape(encoder: ImageEncoder, device: torch.device) -> tuple[int, ...]:
    """The features' shape per image, from a blank image (when a whole batch was unreadable)."""
    from PIL import Image

    with torch.inference_mode():
        blank = Image.new("RGB", (encoder.image_size, encoder.image_size), sources.WHITE)
        return tuple(encoder(encoder.preprocess([blank]).to(device)).shape[1:])
