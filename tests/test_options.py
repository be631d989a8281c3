"""Options declared once (`flags`): dataclass fields become command-line flags, and back."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import pytest
import typer
from typer.testing import CliRunner

import captionkit
from captionkit import flags, sources
from captionkit.errors import OptionError
from captionkit.flags import Select, changed, flag, with_options
from captionkit.options import DEFAULT_MAX_PIXELS, GateOptions, GenerationOptions, LoadOptions, RunOptions


@dataclass(frozen=True)
class Lamp:
    colour: str = flag("white", "The light's colour.", panel="Light")


@dataclass(frozen=True)
class Knobs:
    level: int = flag(3, "How loud.", "-l", min=0)
    tags: tuple[str, ...] = flag((), "Comma-separated tags.", "--tag", cli_type=str, cli_default="",
                                 parse=lambda text: tuple(t for t in text.split(",") if t))
    progress: bool = flag(True, "No progress.", "--quiet", "-q", cli_type=bool, cli_default=False,
                          parse=lambda quiet: not quiet)
    note: str | None = flag(None, "A note.")
    lamp: Lamp = field(default_factory=Lamp)
    hidden: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.level > 10:
            raise OptionError("--level goes up to 10")


def app_of(command) -> typer.Typer:
    app = typer.Typer()
    app.command()(with_options(command))
    app.command("other")(lambda: None)  # with two commands, typer keeps the command's name
    return app


def test_a_command_receives_built_options_from_its_flags():
    received = {}

    def run(name: str, *, knobs: Knobs) -> None:
        received.update(name=name, knobs=knobs)

    app = app_of(run)
    result = CliRunner().invoke(app, ["run", "x", "-l", "7", "--tag", "a,b", "-q",
                                      "--colour", "red"])
    assert result.exit_code == 0, result.output
    assert received == {"name": "x", "knobs": Knobs(level=7, tags=("a", "b"), progress=False,
                                                    lamp=Lamp("red"))}
    assert CliRunner().invoke(app, ["run", "y"]).exit_code == 0
    assert received["knobs"] == Knobs(), "flags left out keep the dataclass's defaults"
    refused = CliRunner().invoke(app, ["run", "y", "-l", "11"])
    assert isinstance(refused.exception, OptionError), "the dataclass still validates"
    usage = CliRunner().invoke(app, ["run", "y", "-l", "-1"])
    assert usage.exit_code == 2 and "Invalid value" in usage.output
    assert CliRunner().invoke(app, ["run", "y", "--hidden", "x"]).exit_code == 2


def test_select_takes_some_flags_and_changes_how_they_read():
    received = {}

    def run(*, knobs: Annotated[Knobs, Select("level", "tags", level={"help": "Loudness here."},
                                              tags={"cli_default": "c"})]) -> None:
        received["knobs"] = knobs

    app = app_of(run)
    assert CliRunner().invoke(app, ["run"]).exit_code == 0
    assert received["knobs"] == Knobs(tags=("c",))
    help_text = CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "120"}).output
    assert "Loudness here." in help_text and "--quiet" not in help_text and "--colour" not in help_text
    assert CliRunner().invoke(app, ["run", "--quiet"]).exit_code == 2
    with pytest.raises(TypeError, match="declares no flag volume"):
        Select("volume").flags_of(Knobs)


def test_two_flags_of_one_name_are_refused_when_the_command_is_declared():
    def run(level: int = 1, *, knobs: Knobs) -> None: ...

    with pytest.raises(TypeError, match="more than one parameter named level"):
        with_options(run)


def test_changed_names_the_flags_given():
    assert changed(GenerationOptions()) == []
    assert changed(GenerationOptions(num_beams=3, prompt="a photo of")) == ["--num-beams", "--prompt"]
    assert changed(RunOptions(progress=False, gate=GateOptions(min_score=0.2))) == ["--quiet", "--min-score"]


def test_every_field_of_the_shared_options_has_a_flag_with_help():
    for cls in (GenerationOptions, LoadOptions, GateOptions, RunOptions):
        declared = {item.name for item in flags.declared(cls)}
        fields = {f.name for f in dataclasses.fields(cls)}
        assert fields - declared <= {"extra", "gate"}, cls
        assert all(item.flag.help.strip() for item in flags.declared(cls))
    assert RunOptions().max_pixels == DEFAULT_MAX_PIXELS == sources.DEFAULT_MAX_PIXELS


NEW_FIELD = '''    glossiness: float | None = flag(None, "How glossy captions read (a test's new option).",
                                    panel=GENERATION)
'''


def test_an_option_added_to_a_dataclass_reaches_caption_and_evaluate(tmp_path, photo_dir):
    """One new field in options.py and no other edit: both commands list it, and take it."""
    package = tmp_path / "captionkit"
    shutil.copytree(Path(captionkit.__file__).parent, package,
                    ignore=shutil.ignore_patterns("__pycache__"))
    options = package / "options.py"
    text = options.read_text()
    anchor = '    system: str | None = flag(None, "Chat VLMs'
    assert anchor in text
    options.write_text(text.replace(anchor, NEW_FIELD + anchor, 1))
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "COLUMNS": "100"}
    for command in ("caption", "evaluate"):
        shown = subprocess.run([sys.executable, "-m", "captionkit", command, "--help"], env=env,
                               capture_output=True, text=True, timeout=60)
        assert shown.returncode == 0, shown.stderr
        assert "--glossiness" in shown.stdout
        assert "How glossy captions read (a test's new option)." in " ".join(shown.stdout.split())
    taken = subprocess.run([sys.executable, "-m", "captionkit", "caption", str(photo_dir), "--model",
                            "./missing-model", "--glossiness", "0.5", "-o", str(tmp_path / "out")],
                           env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert taken.returncode == 2 and "missing-model" in taken.stderr, taken.stderr
    assert "No such option" not in taken.stderr


PROBE = """
import json, sys
from captionkit.cli import main
sys.argv = ["captionkit", *sys.argv[1:]]
try:
    main()
except SystemExit:
    pass
heavy = ("torch", "transformers", "numpy", "PIL", "cv2", "open_clip")
print(json.dumps(sorted(name for name in heavy if name in sys.modules)), file=sys.stderr)
"""


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["caption", "--help"],
                                  ["evaluate", "--help"], ["export", "--help"], ["score", "--help"]])
def test_help_and_version_import_no_heavy_library(args):
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True,
                          timeout=60)
    assert "Usage:" in proc.stdout or proc.stdout.startswith("captionkit ")
    assert json.loads(proc.stderr.strip().splitlines()[-1]) == []


def test_options_need_no_image_library_until_they_are_built():
    code = ("import sys; import captionkit.options; "
            "print(sorted(m for m in ('torch', 'PIL', 'numpy') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "[]", proc.stderr


def test_the_shared_panels_come_in_their_order():
    proc = subprocess.run([sys.executable, "-m", "captionkit", "caption", "--help"], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "COLUMNS": "80"})
    titles = re.findall(r"╭─ (.+?) ─", proc.stdout)
    assert titles == ["Arguments", "Options", *flags.PANELS]
