"""Shared fixtures: tiny random-weight models of every family and real photos on disk."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))

import tiny  # noqa: E402

PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "horse",
          "hubble_deep_field"]


@pytest.fixture(scope="session", autouse=True)
def _quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


@pytest.fixture(scope="session")
def photos() -> list[Image.Image]:
    """Real photographs from scikit-image, as RGB PIL images."""
    from skimage import data

    return [Image.fromarray(getattr(data, name)()).convert("RGB") for name in PHOTOS]


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory, photos) -> Path:
    """The photos saved as PNG files (lossless, so every decoder sees the same pixels)."""
    folder = tmp_path_factory.mktemp("photos")
    for name, image in zip(PHOTOS, photos, strict=True):
        image.save(folder / f"{name}.png")
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """One saved checkpoint directory per family, built once per test session."""
    root = tmp_path_factory.mktemp("models")
    return {family: build(root / family) for family, build in tiny.BUILDERS.items()}


@pytest.fixture(scope="session")
def blip_dir(tiny_models) -> Path:
    return tiny_models["blip"]


@pytest.fixture(scope="session")
def blip_fp32(blip_dir):
    """The tiny BLIP loaded once in float32 on the CPU, for tests that only caption with it."""
    from captionkit.models import load
    from captionkit.options import LoadOptions

    return load(str(blip_dir), LoadOptions(device="cpu", dtype="float32"))


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    return tiny.build_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def scorer(tiny_clip):
    from captionkit.scoring import load_scorer

    return load_scorer(str(tiny_clip), device="cpu")
