"""An open registry: model types registered in code or through the `captionkit.models` entry points."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import captionkit
from captionkit.errors import ModelNotFoundError
from captionkit.models import FAMILIES
from captionkit.models.registry import register

PLUGIN = textwrap.dedent('''
    from captionkit.models import Captioner
    from captionkit.predictions import Prediction


    class SizeCaptioner(Captioner):
        """Says how big each image is, after the word in its checkpoint's config."""

        input_size = None

        def __init__(self, path, model_id, options):
            import json
            self.model_id = model_id
            self.word = json.loads((path / "config.json").read_text())["word"]

        def caption(self, images, options, prompts=None):
            return [Prediction(f"{self.word} {image.width}x{image.height}") for image in images]
''')


def _checkpoint(folder: Path, model_type: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": model_type, "word": "an image of"}))
    return folder


def _plugin_package(root: Path) -> Path:
    """A tiny installed package: a module and a dist-info declaring the entry point."""
    root.mkdir()
    (root / "sizeplugin.py").write_text(PLUGIN)
    info = root / "sizeplugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: sizeplugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[captionkit.models]\nsize-captioner = sizeplugin:SizeCaptioner\n")
    return root


def test_a_type_registered_in_code_loads_through_captionkit_load(tmp_path, monkeypatch, photo_dir):
    monkeypatch.syspath_prepend(str(_plugin_package(tmp_path / "plugin")))
    monkeypatch.setattr("captionkit.models.registry.FAMILIES", dict(FAMILIES))  # restored after
    import sizeplugin

    register("in-code-size", sizeplugin.SizeCaptioner)
    checkpoint = _checkpoint(tmp_path / "ckpt", "in-code-size")
    assert captionkit.load(str(checkpoint)).caption(photo_dir / "coffee.png") == "an image of 600x400"


def test_an_entry_point_family_loads_by_model_path_on_the_command_line(tmp_path, photo_dir):
    plugin = _plugin_package(tmp_path / "plugin")
    checkpoint = _checkpoint(tmp_path / "ckpt", "size-captioner")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "captionkit", "caption", str(photo_dir / "coffee.png"),
                           "--model", str(checkpoint), "-o", str(out), "-q"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (out / "captions.txt").read_text() == "coffee.png: an image of 600x400\n"


def test_an_unknown_model_type_still_says_which_families_exist(tmp_path):
    with pytest.raises(ModelNotFoundError, match="model type 'nobody-knows' is not a captioner"):
        captionkit.load(str(_checkpoint(tmp_path / "ckpt", "nobody-knows")))


def test_registering_the_built_in_name_is_refused():
    from captionkit.errors import OptionError

    with pytest.raises(OptionError):
        register("objects", "x:y")
