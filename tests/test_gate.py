"""The quality gate in the captioning pass: stored scores, the threshold, the failed and output
folders, best-of-N candidates, resume, and `captionkit score`, with a tiny CLIP built locally."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import sqlite3
import subprocess
from pathlib import Path

import made_in_threads
import pytest
import torch
from forked_cli import captionkit
from test_scoring import LONG
from typer.testing import CliRunner

from captionkit import sources
from captionkit.cli import app
from captionkit.errors import ModelUnavailableError, OptionError
from captionkit.gate import GateOptions, locate_images, score_existing
from captionkit.models.base import Caption, Captioner, CaptionerWrapper
from captionkit.options import GenerationOptions
from captionkit.pipeline import Pipeline, RunOptions
from captionkit.scoring import ClipScorer
from captionkit.store import Store

GEN = GenerationOptions(max_new_tokens=6)


@pytest.fixture(scope="module")
def captioner(blip_fp32):
    return blip_fp32


def run(captioner, scorer, inputs, out, generation=GEN, **gate):
    """A pipeline run scored with the tiny CLIP; `gate` holds GateOptions fields and `formats`."""
    formats = gate.pop("formats", ("captions.txt", "jsonl"))
    options = RunOptions(output_dir=out, progress=False, formats=formats, batch_size=gate.pop(
        "batch_size", None), prefix=gate.pop("prefix", ""), sidecars_beside_images=gate.pop(
        "beside_images", False), gate=GateOptions(clip_model=scorer.name, **gate))
    return Pipeline(captioner, generation, options, scorer).run([str(i) for i in inputs])


def records(out: Path) -> dict[str, dict]:
    return {r["image"]: r for r in map(json.loads, (out / "captions.jsonl").read_text().splitlines())}


def listed(out: Path) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in (out / "captions.txt").read_text().splitlines())


@pytest.fixture(scope="module")
def baseline(captioner, scorer, photo_dir, tmp_path_factory):
    """One scored run of the photos, and a threshold that splits them into two non-empty groups."""
    out = tmp_path_factory.mktemp("baseline") / "out"
    run(captioner, scorer, [photo_dir], out)
    scores = sorted({r["clip_score"] for r in records(out).values()})
    assert len(scores) >= 2, "the tiny CLIP should give different images different scores"
    middle = len(scores) // 2
    return out, (scores[middle - 1] + scores[middle]) / 2


def test_failed_images_caption_files_carry_the_prefix_too(baseline, captioner, scorer, photo_dir, tmp_path):
    out, failed = resumed(baseline, tmp_path), tmp_path / "failed"
    run(captioner, scorer, [photo_dir], out, min_score=baseline[1], failed_dir=failed, prefix="ohwx, ",
        formats=("txt",))
    done = records(out)
    for name, record in done.items():
        folder = out if record["clip_score"] >= baseline[1] else failed
        assert (folder / name).with_suffix(".txt").read_text() == f"ohwx, {record['caption']}\n"


def test_a_gated_rerun_takes_back_what_an_ungated_run_put_in_the_dataset(baseline, captioner, scorer,
                                                                         photo_dir, tmp_path):
    out = tmp_path / "out"
    run(captioner, scorer, [photo_dir], out, formats=("txt", "jsonl"), copy_images=True)
    assert len(list(out.glob("*.png"))) == len(list(out.glob("*.txt"))) == 8
    run(captioner, scorer, [photo_dir], out, formats=("txt", "jsonl"), copy_images=True,
        min_score=baseline[1])
    passing = {name for name, r in records(out).items() if r["passed"]}
    assert 0 < len(passing) < 8
    assert {p.name for p in out.glob("*.png")} == passing
    assert {p.stem for p in out.glob("*.txt")} == {Path(name).stem for name in passing}
    assert all((photo_dir / name).is_file() for name in records(out))  # the originals stay

    # beside the images (a LoRA folder): only caption files captionkit wrote go
    images = tmp_path / "images"
    shutil.copytree(photo_dir, images)
    failing = sorted(set(records(out)) - passing)
    (images / failing[0]).with_suffix(".txt").write_text("my own caption\n")
    beside = {"formats": ("txt", "jsonl"), "beside_images": True}
    run(captioner, scorer, [images], tmp_path / "store", **beside)
    assert len(list(images.glob("*.txt"))) == 8
    run(captioner, scorer, [images], tmp_path / "store", min_score=baseline[1], **beside)
    assert {p.stem for p in images.glob("*.txt")} == {Path(n).stem for n in passing} | {Path(failing[0]).stem}
    assert (images / failing[0]).with_suffix(".txt").read_text() == "my own caption\n"
    assert len(list(images.glob("*.png"))) == 8
    run(captioner, scorer, [images], tmp_path / "store", **beside)  # no threshold: all listed again
    assert len(list(images.glob("*.txt"))) == 8


def resumed(baseline, tmp_path) -> Path:
    """A copy of the baseline's output folder: runs into it only re-gate, they caption nothing."""
    out = tmp_path / "out"
    shutil.copytree(baseline[0], out)
    return out


def test_every_caption_is_stored_with_the_score_the_library_gives(baseline, captioner, scorer):
    out, _ = baseline
    done = records(out)
    assert len(done) == 8 and all(r["status"] == "done" for r in done.values())
    for record in done.values():
        image = sources.load_image(record["path"], captioner.input_size)  # as the pipeline decodes
        expected = scorer.score([image], [record["caption"]])[0].clip_score
        assert record["clip_score"] == pytest.approx(expected, abs=1e-6)
        assert "passed" not in record  # no threshold, no verdict


def test_the_scorers_inputs_are_made_in_the_decoding_threads(captioner, scorer, photo_dir, tmp_path,
                                                               monkeypatch):
    """A CLIP whose processor `FixedSize` reproduces gets its pixel values made beside the
    captioner's, in the decoding threads, and scores exactly as through its processor."""
    from captionkit import scoring
    from captionkit.preprocess import FixedSize

    assert isinstance(scorer.preprocess, FixedSize) and scorer.preprocess.shortest_edge == 32
    made_in, used = made_in_threads.record(monkeypatch, scorer.encoder, scoring)
    run(captioner, scorer, [photo_dir], tmp_path / "threads")
    assert made_in == {"captionkit-decode"} and used and all(used)
    monkeypatch.setattr(scorer.encoder, "preprocess", None)
    run(captioner, scorer, [photo_dir], tmp_path / "processor")
    scored = [{name: (r["caption"], r["clip_score"]) for name, r in records(out).items()}
              for out in (tmp_path / "threads", tmp_path / "processor")]
    assert scored[0] == scored[1] and len(scored[0]) == 8


def test_threshold_splits_images_exactly_by_the_stored_score(baseline, captioner, scorer, photo_dir,
                                                             tmp_path):
    threshold = baseline[1]
    out, failed = resumed(baseline, tmp_path), tmp_path / "failed"
    summary = run(captioner, scorer, [photo_dir], out, min_score=threshold, failed_dir=failed,
                  formats=("captions.txt", "jsonl", "csv", "txt"))
    assert summary.done == 0 and summary.skipped == 8  # the scores came from the store
    done = records(out)
    passing = {name for name, r in done.items() if r["clip_score"] >= threshold}
    assert 0 < len(passing) < 8
    assert {name for name, r in done.items() if r["passed"]} == passing
    assert set(listed(out)) == passing
    assert {p.name for p in out.glob("*.txt")} == {"captions.txt"} | {
        Path(n).with_suffix(".txt").name for n in passing}
    assert summary.passed == len(passing) and summary.set_aside == 8 - len(passing)
    assert sorted(summary.scores) == sorted(r["clip_score"] for r in done.values())
    # the failed folder: each failing image, untouched, with its caption beside it
    for name in set(done) - passing:
        assert (failed / name).read_bytes() == (photo_dir / name).read_bytes()
        assert (failed / name).with_suffix(".txt").read_text() == done[name]["caption"] + "\n"
    assert len(list(failed.iterdir())) == 2 * (8 - len(passing))
    rows = {row["image"]: row for row in csv.DictReader((out / "captions.csv").open())}
    for name, record in done.items():
        assert float(rows[name]["clip_score"]) == pytest.approx(record["clip_score"])
        assert rows[name]["passed"] == str(record["passed"])
    # --keep-failed lists every image again; a run without a threshold drops the verdicts
    run(captioner, scorer, [photo_dir], out, min_score=threshold, keep_failed=True)
    assert set(listed(out)) == set(done)
    run(captioner, scorer, [photo_dir], out)
    assert all("passed" not in r for r in records(out).values())


def test_move_takes_failed_images_out_of_the_input(captioner, scorer, photo_dir, baseline, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(photo_dir, images)
    out, failed = tmp_path / "out", tmp_path / "failed"
    summary = run(captioner, scorer, [images], out, min_score=baseline[1], failed_dir=failed,
                  move=True)
    moved = {name for name, r in records(out).items() if not r["passed"]}
    assert summary.set_aside == len(moved) > 0
    assert {p.name for p in images.iterdir()} == {p.name for p in photo_dir.iterdir()} - moved
    assert {p.name for p in failed.glob("*.png")} == moved
    before = {p.name: p.read_bytes() for p in failed.iterdir()}
    again = run(captioner, scorer, [images], out, min_score=baseline[1], failed_dir=failed, move=True)
    assert again.done == 0 and again.set_aside == len(moved)
    assert again.missing == []  # moved into the failed folder by the gate is not gone
    assert {p.name: p.read_bytes() for p in failed.iterdir()} == before
    # a lower threshold: every image passes, and the moved ones go back with nothing left behind
    lowered = run(captioner, scorer, [images], out, min_score=0.0, failed_dir=failed, move=True)
    assert lowered.done == 0 and lowered.set_aside == 0
    assert list(failed.iterdir()) == []
    assert {p.name: p.read_bytes() for p in images.iterdir()} == {
        p.name: p.read_bytes() for p in photo_dir.iterdir()}


def test_copy_images_reproduces_the_folder_script_layout(baseline, blip_dir, tiny_clip,
                                                         photo_dir, tmp_path):
    out, failed = resumed(baseline, tmp_path), tmp_path / "failed"
    result = CliRunner().invoke(app, [
        "caption", str(photo_dir), "--model", str(blip_dir), "-o", str(out), "--device", "cpu",
        "--dtype", "float32", "--max-new-tokens", "6", "-q", "--clip-model", str(tiny_clip),
        "--min-score", str(baseline[1]), "--failed-dir", str(failed), "--copy-images"])
    assert result.exit_code == 0, result.output
    done = records(out)
    passing = {name for name, r in done.items() if r["passed"]}
    assert f"{len(passing)} of 8 passed (>= {baseline[1]:g})" in result.output
    assert "█" in result.output  # the histogram
    for folder, names in ((out, passing), (failed, set(done) - passing)):
        assert {p.name for p in folder.glob("*.png")} == names
        for name in names:
            assert (folder / name).read_bytes() == (photo_dir / name).read_bytes()
            assert (folder / name).with_suffix(".txt").read_text() == done[name]["caption"] + "\n"


class StopsAfter(CaptionerWrapper):
    """A captioner that is interrupted (Ctrl-C) after a number of batches."""

    def __init__(self, inner, batches: int) -> None:
        super().__init__(inner)  # model_id, input_size, fingerprint: what the resume key reads
        self.batches = batches

    def caption(self, images, options, prompts=None):
        if self.batches == 0:
            raise KeyboardInterrupt
        self.batches -= 1
        return self.inner.caption(images, options, prompts)


def test_an_interrupted_gate_run_resumes_to_the_same_folders(baseline, captioner, scorer,
                                                             photo_dir, tmp_path):
    def gated(model, base, **options):
        return run(model, scorer, [photo_dir], base / "out", min_score=baseline[1],
                   failed_dir=base / "failed", copy_images=True, **options)

    def snapshot(base: Path) -> dict[str, bytes]:
        return {str(p.relative_to(base)): p.read_bytes() for p in sorted(base.rglob("*"))
                if p.is_file() and not p.name.startswith(("captionkit.db", "captions.jsonl"))}

    gated(captioner, tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        gated(StopsAfter(captioner, batches=1), tmp_path / "cut", batch_size=3)
    assert not (tmp_path / "cut" / "out" / "captions.jsonl").exists()  # stopped before exporting
    summary = gated(captioner, tmp_path / "cut")
    assert (summary.skipped, summary.done) == (3, 5)
    assert snapshot(tmp_path / "cut") == snapshot(tmp_path / "whole")
    assert gated(captioner, tmp_path / "cut").skipped == 8
    assert snapshot(tmp_path / "cut") == snapshot(tmp_path / "whole")


def test_candidates_are_all_scored_and_the_best_is_kept(captioner, scorer, photo_dir, tmp_path):
    rows = {"vision": 0}

    def count(module, args, output):
        rows["vision"] += output.last_hidden_state.shape[0]

    generation = GenerationOptions(max_new_tokens=6, candidates=3)
    assert generation.num_beams == 3  # beam search returns at most one caption per beam
    photos = sorted(photo_dir.iterdir())[:5]
    hook = scorer.encoder.model.vision_model.register_forward_hook(count)
    try:
        run(captioner, scorer, photos, tmp_path / "out", generation, batch_size=3)
    finally:
        hook.remove()
    assert rows["vision"] == 5, "each image is embedded once, however many candidates it has"
    reranked = 0
    for name, record in records(tmp_path / "out").items():
        candidates = record["candidates"]
        assert len(candidates) == 3
        image = sources.load_image(photo_dir / name, captioner.input_size)
        texts = [c["text"] for c in candidates]
        assert [c["clip_score"] for c in candidates] == pytest.approx(
            scorer.rank(scorer.embed_images([image])[0], texts), abs=1e-6)
        best = max(candidates, key=lambda c: c["clip_score"])
        assert (record["caption"], record["clip_score"]) == (best["text"], best["clip_score"])
        reranked += record["caption"] != texts[0]
    assert reranked >= 1, "CLIP should overrule beam search's own order somewhere"


def test_candidates_are_the_models_beams_grouped_per_image(captioner, blip_dir, photos):
    from transformers import BlipForConditionalGeneration, BlipProcessor

    model = BlipForConditionalGeneration.from_pretrained(blip_dir).eval()
    processor = BlipProcessor.from_pretrained(blip_dir)
    with torch.no_grad():
        output = model.generate(**processor(images=photos[:2], return_tensors="pt"),
                                max_new_tokens=6, num_beams=3, num_return_sequences=3)
    texts = [t.strip() for t in processor.batch_decode(output, skip_special_tokens=True)]
    captions = captioner.caption(photos[:2], GenerationOptions(max_new_tokens=6, candidates=3))
    assert [[c["text"] for c in caption.extras["candidates"]] for caption in captions] == [
        texts[:3], texts[3:]]
    assert [caption.text for caption in captions] == [texts[0], texts[3]]


def test_candidate_options_are_checked():
    with pytest.raises(OptionError, match="--num-beams of at least 4"):
        GenerationOptions(candidates=4, num_beams=2)
    assert GenerationOptions(candidates=4, do_sample=True).num_beams == 1
    assert GenerationOptions(candidates=4, do_sample=True).generate_kwargs()["num_return_sequences"] == 4
    with pytest.raises(OptionError, match="--candidates"):
        GenerationOptions(candidates=0)
    with pytest.raises(OptionError, match="--min-score"):
        GateOptions(failed_dir=Path("low"))
    with pytest.raises(OptionError, match="--failed-dir"):
        GateOptions(min_score=0.3, move=True)
    with pytest.raises(OptionError, match="--beside-images"):
        RunOptions(sidecars_beside_images=True, gate=GateOptions(copy_images=True))


@pytest.mark.parametrize("folders", [
    {"output_dir": "out", "failed": "out/."},
    {"output_dir": "out", "failed": "low", "draw_boxes": "low"},
    {"output_dir": "out", "failed": None, "draw_boxes": "out", "copy_images": True},
])
def test_folders_that_receive_images_must_differ(folders, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    gate = GateOptions(min_score=0.3, failed_dir=folders.pop("failed"),
                       copy_images=folders.pop("copy_images", False))
    with pytest.raises(OptionError, match="are the same folder"):
        RunOptions(gate=gate, **folders)
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_an_input_folder_is_refused_as_the_failed_folder(captioner, scorer, photo_dir, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(photo_dir, images)
    with pytest.raises(OptionError, match="--failed-dir .* is an input folder"):
        run(captioner, scorer, [images], tmp_path / "out", min_score=0.3, failed_dir=images, move=True)
    assert sorted(p.name for p in images.iterdir()) == sorted(p.name for p in photo_dir.iterdir())


def test_boxes_may_go_into_the_output_folder_when_it_holds_no_copies(tmp_path):
    assert RunOptions(output_dir=tmp_path, draw_boxes=str(tmp_path)).draw_boxes == tmp_path


class Verbose(Captioner):
    """A captioner whose captions overflow the tiny CLIP's 16-token text context."""

    model_id, input_size = "verbose", None

    def caption(self, images, options, prompts=None):
        return [Caption(LONG) for _ in images]


def test_long_captions_are_scored_in_chunks_not_truncated(scorer, photo_dir, tmp_path):
    run(Verbose(), scorer, [photo_dir / "coffee.png"], tmp_path / "out")
    stored = records(tmp_path / "out")["coffee.png"]["clip_score"]
    expected = scorer.score([sources.load_image(photo_dir / "coffee.png")], [LONG])[0]
    assert expected.chunks > 1  # the mean of the chunks' embeddings, as test_scoring checks
    assert stored == pytest.approx(expected.clip_score, abs=1e-6)


def test_min_score_without_clip_model_needs_the_default_model(photo_dir, blip_dir, tmp_path,
                                                              monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    result = CliRunner().invoke(app, ["caption", str(photo_dir), "--model", str(blip_dir), "-o",
                                      str(tmp_path / "out"), "--min-score", "0.3"])
    assert isinstance(result.exception, ModelUnavailableError)
    assert "openai/clip-vit-base-patch32 is not in the Hugging Face cache" in str(result.exception)
    assert str(result.exception).endswith("or pass a local model directory with --clip-model")
    assert not (tmp_path / "out").exists(), "nothing is captioned before the scorer loads"


@pytest.mark.slow
def test_score_command_scores_a_captions_txt(baseline, scorer, tiny_clip, photo_dir,
                                             tmp_path):
    captions = tmp_path / "captions.txt"
    captions.write_text((baseline[0] / "captions.txt").read_text() + "ghost.png: a cat\n")
    output = tmp_path / "scores.csv"
    proc = captionkit("score", captions, "--images", photo_dir, "--clip-model", tiny_clip, "--device", "cpu",
                      "--min-score", baseline[1], "-o", output)
    assert "ghost.png: no image file for it under" in proc.stderr
    assert re.search(r"scoring .* 8/8", proc.stderr), proc.stderr  # the progress bar
    rows_text = output.read_text()
    rows = {row["image"]: row for row in csv.DictReader(output.open())}
    assert rows["ghost.png"]["status"] == "failed" and not rows["ghost.png"]["clip_score"]
    scored = [row for name, row in rows.items() if name != "ghost.png"]
    assert len(scored) == 8
    passed = 0
    for row in scored:
        image = sources.load_image(photo_dir / row["image"])
        expected = scorer.score([image], [row["caption"]])[0].clip_score
        assert float(row["clip_score"]) == pytest.approx(expected, abs=1e-5)
        assert row["passed"] == str(expected >= baseline[1])
        passed += expected >= baseline[1]
    assert f"{passed} of 8 passed" in proc.stderr
    again = subprocess.run(proc.args, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    # rich wraps a long path within words, so compare without whitespace
    assert "".join(f"8 scores reused from {tmp_path / 'scores.db'}".split()) in "".join(again.stderr.split())
    assert output.read_text() == rows_text


def test_score_loads_images_and_makes_the_scorers_inputs_in_threads(baseline, scorer, photo_dir,
                                                                     tmp_path, monkeypatch):
    """`captionkit score` decodes each batch's images in threads, which make the scorer's inputs
    too; the scores are those of the processor on the whole image, exactly."""
    from captionkit import scoring

    captions = tmp_path / "captions.txt"
    captions.write_text((baseline[0] / "captions.txt").read_text() + "broken.png: a cat\n")
    (tmp_path / "images").mkdir()
    for photo in photo_dir.iterdir():
        shutil.copy(photo, tmp_path / "images" / photo.name)
    (tmp_path / "images" / "broken.png").write_bytes(b"not a png")
    made_in, used = made_in_threads.record(monkeypatch, scorer.encoder, scoring)

    def scores() -> dict[str, tuple]:
        return {r.name: (r.status, r.error, r.extras.get("clip_score"))
                for r in score_existing(captions, scorer, tmp_path / "images").results}

    in_threads = scores()
    assert made_in == {"captionkit-decode"} and used and all(used)
    monkeypatch.setattr(scorer.encoder, "preprocess", None)
    assert in_threads == scores()
    status, error, _ = in_threads["broken.png"]
    assert status == "failed" and error, "a file that does not decode says why"
    assert sum(status == "done" for status, _, _ in in_threads.values()) == 8


def test_score_reads_sidecar_folders_and_jsonl_with_references(baseline, scorer, photo_dir,
                                                               tmp_path):
    sidecars = tmp_path / "sidecars"
    shutil.copytree(photo_dir, sidecars)
    captions = {name: r["caption"] for name, r in records(baseline[0]).items()}
    for name, caption in captions.items():
        (sidecars / name).with_suffix(".txt").write_text(caption + "\n")
    from_sidecars = score_existing(sidecars, scorer)
    assert {r.name: r.caption for r in from_sidecars.results} == captions
    assert all(r.status == "done" for r in from_sidecars.results)

    references = tmp_path / "refs.txt"
    references.write_text("coffee.png: a cup of coffee on a table\nhorse.png: a horse\n")
    from_jsonl = score_existing(baseline[0] / "captions.jsonl", scorer, images=photo_dir,
                                references=references)
    by_name = {r.name: r for r in from_jsonl.results}
    assert by_name["coffee.png"].extras["clip_score"] == pytest.approx(
        {r.name: r for r in from_sidecars.results}["coffee.png"].extras["clip_score"])
    assert {n for n, r in by_name.items() if "ref_clip_score" in r.extras} == {"coffee.png",
                                                                              "horse.png"}


class StopAfter(ClipScorer):
    """The tiny scorer, two images a batch, interrupted (Ctrl-C) when asked for batch `calls + 1`."""

    def __init__(self, scorer: ClipScorer, calls: int) -> None:
        super().__init__(scorer.encoder, scorer.scale, batch_size=2, name=scorer.name)
        self.calls = calls

    def score(self, *args, **kwargs):
        if self.calls == 0:
            raise KeyboardInterrupt
        self.calls -= 1
        return super().score(*args, **kwargs)


def test_score_commits_each_batch_and_a_rerun_scores_only_what_changed(baseline, scorer, photo_dir,
                                                                      tmp_path):
    images = tmp_path / "images"
    shutil.copytree(photo_dir, images)
    captions = tmp_path / "captions.txt"
    captions.write_text((baseline[0] / "captions.txt").read_text())
    store = Store(tmp_path / "scores.db")
    with pytest.raises(KeyboardInterrupt):
        score_existing(captions, StopAfter(scorer, calls=2), images, store=store)
    resumed = score_existing(captions, scorer, images, store=store)
    assert resumed.reused == 4  # the two batches scored before the interrupt
    fresh = {r.name: r.extras["clip_score"] for r in score_existing(captions, scorer, images).results}
    assert {r.name: r.extras["clip_score"] for r in resumed.results} == pytest.approx(fresh)

    lines = captions.read_text().splitlines()
    lines[0] = lines[0].split(": ")[0] + ": a different caption"
    captions.write_text("\n".join(lines) + "\n")
    touched = images / lines[1].split(": ")[0]
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    again = score_existing(captions, scorer, images, store=store)
    assert again.reused == 6 and all(r.status == "done" for r in again.results)
    other_references = tmp_path / "refs.txt"
    other_references.write_text("coffee.png: a cup of coffee\n")
    assert score_existing(captions, scorer, images, other_references, store=store).reused == 0


def test_score_keeps_images_that_share_a_base_name_in_two_folders(scorer, photo_dir, tmp_path):
    # captionkit's own captions.txt names them A/x.png and B/x.png when two input folders hold x.png
    for folder, photo in (("A", "coffee.png"), ("B", "horse.png")):
        (tmp_path / "photos" / folder).mkdir(parents=True)
        shutil.copy(photo_dir / photo, tmp_path / "photos" / folder / "x.png")
    captions = tmp_path / "captions.txt"
    captions.write_text("A/x.png: a photo\nB/x.png: a photo\n")
    scored = score_existing(captions, scorer, tmp_path / "photos")
    assert scored.problems == []
    assert {r.name: r.path for r in scored.results} == {
        "A/x.png": tmp_path / "photos/A/x.png", "B/x.png": tmp_path / "photos/B/x.png"}
    first, second = (r.extras["clip_score"] for r in scored.results)
    assert first != second
    # from a folder above, each still finds its own file by its folders
    assert score_existing(captions, scorer, tmp_path).results[1].path == tmp_path / "photos/B/x.png"


def test_score_reads_caption_files_named_not_in_utf8_and_records_them(scorer, photo_dir, tmp_path):
    # Their names reached the store with surrogate escapes, which SQLite cannot take: a traceback.
    shutil.copy(photo_dir / "coffee.png", tmp_path / os.fsdecode(b"caf\xe9.png"))
    (tmp_path / os.fsdecode(b"caf\xe9.txt")).write_text("a cup of coffee\n")
    store = Store(tmp_path / "scores.db")
    scored = score_existing(tmp_path, scorer, store=store)
    assert [(r.name, r.status) for r in scored.results] == [("caf\ufffd.png", "done")]
    assert score_existing(tmp_path, scorer, store=store).reused == 1


def test_images_are_found_by_path_base_name_or_sidecar_stem(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("top.png", "a/b/deep.jpg", "a/side.webp"):
        (tmp_path / name).write_bytes(b"")
    assert locate_images(["top.png", "deep.jpg", "side", "missing.png"], tmp_path) == {
        "top.png": tmp_path / "top.png", "deep.jpg": tmp_path / "a/b/deep.jpg",
        "side": tmp_path / "a/side.webp"}
    (tmp_path / "c" / "b").mkdir(parents=True)
    (tmp_path / "c/b/deep.jpg").write_bytes(b"")
    assert locate_images(["x/c/b/deep.jpg", "x/a/b/deep.jpg"], tmp_path) == {
        "x/c/b/deep.jpg": tmp_path / "c/b/deep.jpg", "x/a/b/deep.jpg": tmp_path / "a/b/deep.jpg"}


@pytest.mark.slow
def test_score_output_named_like_the_run_store_keeps_out_of_it(baseline, tiny_clip, photo_dir, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(baseline[0], run_dir)
    runs_before = sqlite3.connect(run_dir / "captionkit.db").execute("SELECT COUNT(*) FROM runs").fetchone()
    captionkit("score", run_dir / "captions.txt", "--images", photo_dir, "--clip-model", tiny_clip,
               "--device", "cpu", "-o", run_dir / "captionkit.csv", "-q")
    runs_after = sqlite3.connect(run_dir / "captionkit.db").execute("SELECT COUNT(*) FROM runs").fetchone()
    assert runs_after == runs_before and (run_dir / "captionkit.scores.db").is_file()
