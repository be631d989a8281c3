"""`captionkit evaluate`: caption a synthetic Flickr8k split and score it, and the command itself."""

from __future__ import annotations

import csv
import json
import re
import sqlite3
import subprocess
from pathlib import Path

import pytest
from forked_cli import captionkit
from PIL import Image

from captionkit.datasets import read_predictions, read_references
from captionkit.evaluate import evaluate_dataset, score_captions
from captionkit.options import GenerationOptions, LoadOptions

pytest.importorskip("pycocoevalcap")

METRICS = ("bleu", "rouge", "cider")
SUBJECTS = ["a woman in a space suit", "a ginger cat", "a cup of coffee", "a rocket on its pad",
            "a man holding a camera", "a pile of old coins", "a horse jumping a fence",
            "galaxies in deep space"]
PHRASES = ["in a photo", "seen up close", "on a plain background", "in bright light",
           "in the middle of the picture"]


def evaluate(*args, **options) -> subprocess.CompletedProcess:
    """`captionkit evaluate ARGS` in a process of its own."""
    return captionkit("evaluate", *args, **options)


def _name(index: int) -> str:
    return f"{3000000 + index * 1117}_{index * 2654435761 % 2**32:08x}.jpg"


@pytest.fixture(scope="module")
def flickr8k(tmp_path_factory, photos) -> Path:
    """Twelve real photos, each cropped and sized its own way, in Flickr8k's native layout."""
    root = tmp_path_factory.mktemp("flickr8k")
    (root / "Flicker8k_Dataset").mkdir()
    tokens = []
    for index in range(12):
        photo = photos[index % len(photos)]
        width, height = photo.size
        left, top = (index * width) // 40, (index * height) // 50
        crop = photo.crop((left, top, width - left // 2, height - top // 3))
        crop.resize((96 + 12 * index, 80 + 8 * index), Image.Resampling.BICUBIC).save(
            root / "Flicker8k_Dataset" / _name(index), quality=90)
        subject = SUBJECTS[index % len(SUBJECTS)]
        tokens += [f"{_name(index)}#{n}\t{subject.capitalize()} {PHRASES[(n + index) % 5]} ."
                   for n in range(5)]
    (root / "Flickr8k.token.txt").write_text("\n".join(tokens) + "\n")
    test = [_name(index) for index in (7, 2, 11, 4, 9, 3, 10, 5, 8, 6)]
    (root / "Flickr_8k.testImages.txt").write_text("\n".join(test) + "\n")
    (root / "Flickr_8k.trainImages.txt").write_text(f"{_name(0)}\n{_name(1)}\n")
    return root


def _test_split(root: Path) -> list[str]:
    return (root / "Flickr_8k.testImages.txt").read_text().split()


def _stored_captions(db: Path) -> dict[str, str]:
    with sqlite3.connect(db) as connection:
        rows = connection.execute("SELECT path, caption, status FROM results").fetchall()
    assert all(status == "done" for _, _, status in rows)
    return {Path(bytes(path).decode()).name: caption for path, caption, _ in rows}


def test_one_call_captions_the_split_scores_it_and_resumes(flickr8k, blip_dir, tmp_path):
    out = tmp_path / "eval"
    options = {"split": "test", "generation": GenerationOptions(max_new_tokens=6),
               "load_options": LoadOptions(device="cpu", dtype="float32"), "metrics": METRICS}
    first = evaluate_dataset("flickr8k", flickr8k, str(blip_dir), out, **options)
    assert (first.run.done, first.run.skipped, first.run.failed) == (10, 0, [])
    assert sorted(first.files) == ["metrics.json", "per_image.csv", "report.html"]
    assert all(path.is_file() and path.parent == out for path in first.files.values())
    assert (out / "captions.txt").is_file()

    captions = _stored_captions(out / "captionkit.db")
    assert sorted(captions) == sorted(_test_split(flickr8k))
    refs = read_references(flickr8k / "Flickr8k.token.txt",
                           split_file=flickr8k / "Flickr_8k.testImages.txt")
    expected = score_captions(captions, refs, METRICS)
    assert expected.tokenizer == first.result.tokenizer
    metrics = json.loads(first.files["metrics.json"].read_text())
    assert metrics["corpus"] == pytest.approx(expected.corpus, abs=1e-9)
    assert set(metrics["corpus"]) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr-D"}
    assert metrics["images_scored"] == 10 and metrics["problems"] == []
    with open(first.files["per_image.csv"], newline="", encoding="utf-8") as handle:
        rows = {row["image"]: row for row in csv.DictReader(handle)}
    assert sorted(rows) == sorted(captions)
    for name, row in rows.items():
        assert row["prediction"] == " ".join(captions[name].split())
        assert float(row["CIDEr-D"]) == pytest.approx(expected.per_image[name]["CIDEr-D"])
    page = first.files["report.html"].read_text()
    assert page.count("data:image/jpeg;base64,") == 10 and "image not found" not in page

    again = evaluate_dataset("flickr8k", flickr8k, str(blip_dir), out, **options)
    assert (again.run.done, again.run.skipped) == (0, 10)
    assert again.result.corpus == pytest.approx(first.result.corpus, abs=1e-9)

    few = evaluate_dataset("flickr8k", flickr8k, str(blip_dir), out, limit=4, **options)
    assert (few.run.done, few.run.skipped) == (0, 4)
    assert sorted(few.result.per_image) == sorted(_test_split(flickr8k)[:4])
    assert few.result.unpredicted == []


@pytest.mark.slow
def test_command_scores_a_captions_file(flickr8k, tiny_clip, blip_dir, tmp_path):
    split = _test_split(flickr8k)
    subjects = {_name(index): SUBJECTS[index % len(SUBJECTS)] for index in range(12)}
    lines = [f"photos/{name}: {subjects[name]} in a photo" for name in split[:5]]
    lines += [f"{name}: a blurry picture of something" for name in split[5:]]
    lines.append(f"{_name(0)}: an image from the train split")
    predictions = tmp_path / "captions.txt"
    predictions.write_text("\n".join(lines) + "\n")
    out = tmp_path / "report"
    args = ["--predictions", predictions, "--references", flickr8k / "Flickr8k.token.txt",
            "--split-file", flickr8k / "Flickr_8k.testImages.txt",
            "--images", flickr8k / "Flicker8k_Dataset", "-o", out, "--metrics", ",".join(METRICS)]
    proc = evaluate(*args)
    assert "10 images, pycocoevalcap scale" in proc.stdout
    assert all(column in proc.stdout for column in ("BLEU-4", "ROUGE-L", "CIDEr-D"))
    assert "1 predicted image without references" in proc.stderr
    assert f"wrote {out / 'metrics.json'}" in proc.stderr

    refs = read_references(flickr8k / "Flickr8k.token.txt",
                           split_file=flickr8k / "Flickr_8k.testImages.txt")
    expected = score_captions(read_predictions(predictions), refs, METRICS)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["corpus"] == pytest.approx(expected.corpus, abs=1e-9)
    assert metrics["predicted_without_references"] == [_name(0)]
    assert expected.corpus["CIDEr-D"] > 0.5
    page = (out / "report.html").read_text()
    assert page.count("data:image/jpeg;base64,") == 10

    with_clip = evaluate(*args, "--clip-model", tiny_clip, "--metrics", "bleu")
    assert re.search(r"CLIPScore .* 10/10", with_clip.stderr), with_clip.stderr  # its progress bar
    assert "RefCLIPScore" in with_clip.stdout

    # a captioner is no CLIP: its text tower would load random
    not_clip = evaluate(*args, "--clip-model", blip_dir, "--metrics", "bleu", check=False)
    assert not_clip.returncode == 2, not_clip.stderr
    assert not_clip.stderr.strip().count("\n") == 0
    assert "not an image-text dual encoder" in not_clip.stderr


@pytest.mark.parametrize(("args", "says"), [
    (["--predictions", "p.txt", "--dataset", "flickr8k", "--root", ".", "--model", "m"], "not both"),
    (["--dataset", "flickr8k", "--root", "."], "--dataset flickr8k also needs --model"),
    (["--dataset", "flickr9k", "--root", ".", "--model", "m"], "choose from flickr8k"),
    (["--predictions", "p.txt"], "pass --predictions and --references"),
    (["--predictions", "p.txt", "--references", "r.txt", "--limit", "3"], "--limit only apply"),
    (["--predictions", "p.txt", "--references", "r.txt", "--metrics", "bleu,cider-d"],
     "--metrics cider-d: choose from"),
    (["--predictions", "p.txt", "--references", "r.txt", "--clip-model", "c"], "--images"),
    (["--predictions", "absent [1].txt", "--references", "absent [1].txt"],
     "absent [1].txt: no such file"),
    (["--predictions", "p.txt", "--references", "r.txt", "--num-beams", "3", "--prompt", "a"],
     "--num-beams and --prompt only apply with --dataset"),
])
def test_bad_combinations_are_one_line_and_exit_2(args, says, tmp_path):
    proc = evaluate(*args, check=False, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and says in proc.stderr
    assert not (tmp_path / "captionkit-eval").exists()


def test_caption_options_reach_evaluate_dataset(flickr8k, blip_dir, tmp_path):
    """`evaluate --dataset` takes caption's generation and model flags: a run with them resumes under
    the Python API given the same options, and not under other ones."""
    out = tmp_path / "eval"
    generation = {"prompt": "a picture of", "num_beams": 2, "no_repeat_ngram_size": 2, "max_new_tokens": 5}
    proc = evaluate("--dataset", "flickr8k", "--root", flickr8k, "--model", blip_dir, "-o", out,
                    "--limit", "3", "--metrics", "bleu", "--prompt", "a picture of", "--num-beams", "2",
                    "--no-repeat-ngram-size", "2", "--max-new-tokens", "5", "--device", "cpu", "--dtype",
                    "float32", "--batch-size", "2", "-q")
    assert "3 captioned" in proc.stderr
    options = {"limit": 3, "metrics": ("bleu",), "load_options": LoadOptions(device="cpu", dtype="float32")}
    same = evaluate_dataset("flickr8k", flickr8k, str(blip_dir), out,
                            generation=GenerationOptions(**generation), **options)
    assert (same.run.done, same.run.skipped) == (0, 3)
    other = evaluate_dataset("flickr8k", flickr8k, str(blip_dir), out,
                             generation=GenerationOptions(max_new_tokens=5), **options)
    assert (other.run.done, other.run.skipped) == (3, 0)
