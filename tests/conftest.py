"""Shared fixtures: tiny random-weight models of every family and real photos on disk.

Everything expensive is session-scoped and built on first use, so a test file or a `-m "not slow"`
run builds only the models it needs. Under pytest-xdist each worker is its own session.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))

import tiny  # noqa: E402

PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "horse",
          "hubble_deep_field"]


def pytest_configure(config) -> None:
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        # Each xdist worker gets its share of the cores; torch would otherwise start one thread
        # per core in every worker, and the workers' threads would fight over the same cores.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def pytest_collection_modifyitems(config, items) -> None:
    """Under xdist's `--dist loadgroup` a file's tests stay on one worker, so its module fixtures
    are built once, and the tests that start Ray (marked `ray`) run on one worker, one at a time."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        group = "ray" if item.get_closest_marker("ray") else item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session", autouse=True)
def _quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch thread for a test module (`pytestmark = pytest.mark.usefixtures(...)`): on a loaded
    machine more threads only wait on each other."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


class LazyCheckpoints(Mapping[str, Path]):
    """Checkpoint directories by family, each built the first time a test asks for it."""

    def __init__(self, root: Path, builders: Mapping[str, Callable[[Path], Path]]) -> None:
        self.root = root
        self.builders = builders
        self.built: dict[str, Path] = {}

    def __getitem__(self, family: str) -> Path:
        if family not in self.built:
            self.built[family] = self.builders[family](self.root / family)
        return self.built[family]

    def __iter__(self) -> Iterator[str]:
        return iter(self.builders)

    def __len__(self) -> int:
        return len(self.builders)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> LazyCheckpoints:
    """One saved checkpoint directory per family, built once per test session when first used."""
    return LazyCheckpoints(tmp_path_factory.mktemp("models"), tiny.BUILDERS)


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
