"""Metric values against pycocoevalcap run here on the same inputs, fallbacks, and the reports."""

from __future__ import annotations

import csv
import json
import random
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageStat
from rich.console import Console

from captionkit import evaluate, report
from captionkit.datasets import References
from captionkit.errors import OptionError
from captionkit.evaluate import (
    JAVA_MISSING,
    EvalResult,
    EvaluationError,
    score_captions,
    simple_tokenize,
    spice_missing,
)

pytest.importorskip("pycocoevalcap")
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap needs Java")

SUBJECTS = ["a young boy", "two dogs", "a woman in a red jacket", "an old man", "three children",
            "a brown horse", "a girl with a pink umbrella", "a group of cyclists", "a black cat",
            "a surfer", "two women", "a man wearing a hat"]
ACTIONS = ["is running", "are playing", "sits", "is jumping", "stands", "is walking",
           "is riding a bike", "are laughing", "is holding a ball", "looks at the camera"]
PLACES = ["on the beach", "in a park", "near a fountain", "on a busy street", "in the snow",
          "at the edge of a lake", "inside a kitchen", "under a tree", "on a wooden bridge",
          "next to a blue car"]
EXTRAS = ["", "", " , smiling", " while it rains", " (at sunset)", " in the U.S. capital",
          " and doesn't look happy", " ; it's a sunny day"]


def sentence(rng: random.Random, subject: str) -> str:
    text = f"{subject} {rng.choice(ACTIONS)} {rng.choice(PLACES)}{rng.choice(EXTRAS)}"
    text = text[0].upper() + text[1:] if rng.random() < 0.7 else text
    return text + rng.choice([" .", ".", "", "!"])


def make_fixture(images: int = 60) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Deterministic references (5 per image) and predictions of every quality."""
    rng = random.Random(6)
    predictions, references = {}, {}
    for index in range(images):
        name = f"{index:04d}_{rng.randrange(16**8):08x}.jpg"
        subject = rng.choice(SUBJECTS)
        references[name] = [sentence(rng, subject) for _ in range(5)]
        kind = index % 5
        if kind == 0:
            predictions[name] = references[name][rng.randrange(5)].lower()
        elif kind == 1:
            predictions[name] = sentence(rng, subject)
        elif kind == 2:
            predictions[name] = sentence(rng, rng.choice(SUBJECTS))
        elif kind == 3:
            predictions[name] = f"{subject}  {rng.choice(PLACES)}"
        else:
            predictions[name] = rng.choice(["a photo", "there is a picture of something",
                                            "A dog's toy (red)", "it's   nothing  "])
    references[next(iter(references))][0] += "  with   extra spaces "
    return predictions, references


def pycocoevalcap_scores(
    predictions: dict[str, str], references: dict[str, list[str]]
) -> tuple[dict[str, float], dict[str, dict[str, float]], dict]:
    """What pycocoevalcap's own COCOEvalCap.evaluate computes, minus SPICE."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    names = sorted(predictions)
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({n: [{"caption": c} for c in references[n]] for n in names})
    res = tokenizer.tokenize({n: [{"caption": predictions[n]}] for n in names})
    corpus, per_image = {}, {n: {} for n in names}
    scorers = [(Bleu(4), ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"]), (Meteor(), ["METEOR"]),
               (Rouge(), ["ROUGE-L"]), (Cider(), ["CIDEr-D"])]
    for scorer, columns in scorers:
        score, scores = scorer.compute_score(gts, res)
        if len(columns) == 1:
            score, scores = [score], [scores]
        for column, value, values in zip(columns, score, scores, strict=True):
            corpus[column] = float(value)
            for name, one in zip(names, values, strict=True):
                per_image[name][column] = float(one)
    return corpus, per_image, {"gts": gts, "res": res}


@pytest.fixture(scope="module")
def fixture() -> tuple[dict[str, str], dict[str, list[str]]]:
    return make_fixture()


@pytest.fixture(scope="module")
def both(fixture) -> tuple[EvalResult, tuple]:
    """Ours and pycocoevalcap's, side by side: each waits mostly on its own JVMs."""
    if shutil.which("java") is None:
        pytest.skip("pycocoevalcap needs Java")
    with ThreadPoolExecutor(1) as pool:
        reference = pool.submit(pycocoevalcap_scores, *fixture)
        result = score_captions(*fixture)
        return result, reference.result()


@pytest.fixture(scope="module")
def ours(both) -> EvalResult:
    return both[0]


@pytest.fixture(scope="module")
def theirs(both) -> tuple:
    return both[1]


def test_fixture_is_big_and_varied(fixture):
    predictions, references = fixture
    assert len(references) >= 50 and all(len(r) == 5 for r in references.values())
    assert len({c for r in references.values() for c in r}) > 250


@needs_java
def test_corpus_scores_equal_pycocoevalcap(ours, theirs):
    corpus, _, _ = theirs
    assert ours.tokenizer == "ptb"
    assert set(corpus) <= set(ours.corpus)
    for column, value in corpus.items():
        assert ours.corpus[column] == pytest.approx(value, abs=1e-6), column
    assert 0 < ours.corpus["BLEU-4"] < ours.corpus["BLEU-1"] < 1
    assert 0 < ours.corpus["CIDEr-D"] < 10


@needs_java
def test_per_image_scores_equal_pycocoevalcap(ours, theirs):
    _, per_image, _ = theirs
    assert list(ours.per_image) == list(per_image)
    for name, scores in per_image.items():
        for column, value in scores.items():
            assert ours.per_image[name][column] == pytest.approx(value, abs=1e-6), (name, column)


@needs_java
def test_everything_was_scored(ours, fixture):
    assert len(ours.per_image) == len(fixture[1])
    assert ours.unreferenced == [] and ours.unpredicted == [] and ours.problems == []


@needs_java
def test_spice_missing_says_what_to_download_and_never_downloads(monkeypatch, fixture):
    if spice_missing() is None:
        pytest.skip("SPICE's CoreNLP models are installed here")
    import pycocoevalcap.spice.get_stanford_models as models

    def no_download(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(models, "urlretrieve", no_download)
    predictions, references = fixture
    result = score_captions(predictions, references, metrics=("spice",))
    reason = result.missing["SPICE"]
    assert "stanford-corenlp-3.6.0-models.jar" in reason and "stanford-corenlp-full" in reason
    assert "never downloads" in reason and "\n" not in reason
    assert result.corpus == {}


def test_spice_detection_looks_for_the_jars(tmp_path):
    (tmp_path / "lib").mkdir()
    assert "stanford-corenlp-3.6.0.jar and stanford-corenlp-3.6.0-models.jar in " \
        f"{tmp_path / 'lib'}: take them from" in spice_missing(tmp_path)
    (tmp_path / "lib" / "stanford-corenlp-3.6.0.jar").write_bytes(b"")
    assert "needs stanford-corenlp-3.6.0-models.jar in" in spice_missing(tmp_path)
    (tmp_path / "lib" / "stanford-corenlp-3.6.0-models.jar").write_bytes(b"")
    assert spice_missing(tmp_path) is None


def test_without_java_the_python_metrics_still_run(monkeypatch, fixture):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    which = shutil.which
    monkeypatch.setattr(evaluate.shutil, "which",
                        lambda cmd, *a, **k: None if cmd == "java" else which(cmd, *a, **k))
    popen = subprocess.Popen

    def no_java(cmd, *args, **kwargs):
        assert cmd[0] != "java", "Java was started although it is 'missing'"
        return popen(cmd, *args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", no_java)
    predictions, references = fixture
    result = score_captions(predictions, references)
    assert result.missing == {"METEOR": JAVA_MISSING, "SPICE": JAVA_MISSING}
    assert "Java" in JAVA_MISSING and "install a JRE" in JAVA_MISSING
    assert result.tokenizer == "simple"
    names = sorted(predictions)
    gts = {n: [simple_tokenize(" ".join(c.split())) for c in references[n]] for n in names}
    res = {n: [simple_tokenize(" ".join(predictions[n].split()))] for n in names}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    assert [result.corpus[f"BLEU-{n}"] for n in range(1, 5)] == pytest.approx(bleu, abs=1e-9)
    assert result.corpus["ROUGE-L"] == pytest.approx(Rouge().compute_score(gts, res)[0], abs=1e-9)
    assert result.corpus["CIDEr-D"] == pytest.approx(Cider().compute_score(gts, res)[0], abs=1e-9)


@needs_java
def test_simple_tokenizer_agrees_with_ptb_on_the_fixture(theirs, fixture):
    _, _, tokens = theirs
    predictions, references = fixture
    agree = sum(simple_tokenize(c) == t for n in tokens["gts"]
                for c, t in zip(references[n], tokens["gts"][n], strict=True))
    assert agree == sum(len(r) for r in references.values())
    assert simple_tokenize("It's a dog (big), don't U.S. 3.5 black-and-white!") == \
        "it 's a dog -lrb- big -rrb- do n't u.s. 3.5 black-and-white"


@needs_java
def test_unmatched_images_are_reported_not_skipped():
    result = score_captions(
        {"photos/a.jpg": "a dog runs", "b": "a cat sleeps", "stray.jpg": "nothing"},
        References({"a.jpg": ["a dog is running"], "b.jpg": ["a cat is asleep"],
                    "c.jpg": ["a bird"]}, problems=["refs.txt:9: bad row"]),
        metrics=("bleu", "rouge"),
    )
    assert list(result.per_image) == ["a.jpg", "b.jpg"]
    assert result.unreferenced == ["stray.jpg"] and result.unpredicted == ["c.jpg"]
    assert result.problems == ["refs.txt:9: bad row"]


def test_no_overlap_and_unknown_metrics_are_errors():
    with pytest.raises(EvaluationError, match="matched by base file name"):
        score_captions({"x.jpg": "a"}, {"y.jpg": ["b"]})
    with pytest.raises(OptionError, match="bleu4"):
        score_captions({"x.jpg": "a"}, {"x.jpg": ["b"]}, metrics=("bleu4",))


def test_a_reference_given_as_a_str_is_refused_not_read_letter_by_letter():
    with pytest.raises(TypeError, match=r"references\['a.jpg'\] must be a list of caption strings, "
                                        r"such as \['a dog runs'\], not a str"):
        score_captions({"a.jpg": "a dog runs"}, {"a.jpg": "a dog runs"}, ("bleu",))
    with pytest.raises(TypeError, match=r"predictions\['a.jpg'\] is a list"):
        score_captions({"a.jpg": ["a dog runs"]}, {"a.jpg": ["a dog runs"]}, ("bleu",))


class ColourEncoder:
    """A dual encoder whose features are easy to follow: mean colour, and letter counts."""

    context_length = 77

    def images(self, images):
        return torch.tensor([[*(channel / 255 for channel in ImageStat.Stat(image).mean), 0.2]
                             for image in images])

    def texts(self, texts):
        return torch.tensor([[text.count("a") + 1.0, text.count("e"), text.count("o"), len(text) / 9]
                             for text in texts])

    def count_tokens(self, text):
        return len(text.split()) + 2


@needs_java
def test_clip_scores_come_from_the_real_scorer_interface(tmp_path, fixture):
    from captionkit.scoring import ClipScorer

    predictions, references = fixture
    names = sorted(references)[:20]
    for index, name in enumerate(names[:18]):
        Image.new("RGB" if index % 2 else "L", (32, 24), index * 10).save(tmp_path / name)
    scorer = ClipScorer(ColourEncoder(), batch_size=4)
    result = score_captions({n: predictions[n] for n in names}, {n: references[n] for n in names},
                            metrics=("bleu",), clip_scorer=scorer,
                            image_paths={name: tmp_path / name for name in names})
    pictures = [Image.open(tmp_path / name).convert("RGB") for name in names[:18]]
    expected = scorer.score(pictures, [result.predictions[n] for n in names[:18]],
                            references=[result.references[n] for n in names[:18]])
    for name, score in zip(names[:18], expected, strict=True):
        assert result.per_image[name]["CLIPScore"] == pytest.approx(score.clip_score)
        assert result.per_image[name]["RefCLIPScore"] == pytest.approx(score.ref_clip_score)
    assert result.corpus["CLIPScore"] == pytest.approx(sum(s.clip_score for s in expected) / 18)
    assert result.corpus["RefCLIPScore"] == pytest.approx(
        sum(s.ref_clip_score for s in expected) / 18)
    assert 0 < result.corpus["RefCLIPScore"] < result.corpus["CLIPScore"] <= 2.5
    assert "CLIPScore" not in result.per_image[names[19]]
    assert result.problems == [f"no CLIPScore for 2 images whose files are missing or "
                               f"unreadable, such as {names[18]} (file not found)"]


def test_score_and_evaluate_give_an_rgba_image_the_same_clipscore(scorer, photos, tmp_path):
    """Both read images through captionkit.sources: transparency on white, not dropped."""
    from captionkit.gate import score_existing

    rgba = photos[1].resize((96, 64)).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size).rotate(90))
    rgba.save(tmp_path / "cat.png")
    caption = "a cat sitting on a table"
    (tmp_path / "captions.txt").write_text(f"cat.png: {caption}\n")
    (tmp_path / "refs.txt").write_text("cat.png: a small cat\n")
    scored = score_existing(tmp_path / "captions.txt", scorer, images=tmp_path)
    by_score = scored.results[0].extras["clip_score"]
    evaluated = evaluate.evaluate_files(tmp_path / "captions.txt", tmp_path / "refs.txt",
                                        tmp_path / "eval", images=tmp_path, metrics="bleu",
                                        clip_scorer=scorer)
    assert evaluated.result.per_image["cat.png"]["CLIPScore"] == pytest.approx(by_score, abs=1e-6)
    on_white = Image.new("RGB", rgba.size, "white")
    on_white.paste(rgba, mask=rgba.getchannel("A"))
    assert by_score == pytest.approx(scorer.score([on_white], [caption])[0].clip_score, abs=1e-6)
    dropped_alpha = scorer.score([rgba.convert("RGB")], [caption])[0].clip_score
    assert abs(by_score - dropped_alpha) > 1e-4, "the test image must tell the two loaders apart"


@needs_java
def test_report_files(ours, tmp_path):
    written = report.write_report(ours, tmp_path / "eval", n=5)
    assert sorted(written) == ["metrics.json", "per_image.csv", "report.html"]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["corpus"] == pytest.approx(ours.corpus)
    assert metrics["images_scored"] == len(ours.per_image)
    assert metrics["tokenizer"] == "ptb" and set(metrics["missing"]) == set(ours.missing)
    with open(tmp_path / "eval" / "per_image.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(ours.per_image)
    first = rows[0]
    assert first["prediction"] == ours.predictions[first["image"]]
    assert float(first["CIDEr-D"]) == pytest.approx(ours.per_image[first["image"]]["CIDEr-D"])
    page = (tmp_path / "eval" / "report.html").read_text()
    best, worst = report.best_and_worst(ours, 5)
    assert len(best) == len(worst) == 5
    scores = [ours.per_image[n]["CIDEr-D"] for n in best + worst]
    assert min(scores[:5]) >= max(scores[5:])
    assert all(name in page for name in best + worst)
    assert "Best 5 by CIDEr-D" in page and "Worst 5 by CIDEr-D" in page


def small_result(tmp_path: Path) -> EvalResult:
    Image.new("RGB", (640, 480), "navy").save(tmp_path / "good.jpg")
    return EvalResult(
        corpus={"BLEU-4": 0.25, "CIDEr-D": 1.5},
        per_image={"good.jpg": {"BLEU-4": 0.5, "CIDEr-D": 3.0},
                   "bad<b>.jpg": {"BLEU-4": 0.0, "CIDEr-D": 0.0}},
        predictions={"good.jpg": "a navy square", "bad<b>.jpg": "<script>alert('x')</script>"},
        references={"good.jpg": ["a dark blue square"], "bad<b>.jpg": ["Tom & Jerry's \"show\""]},
        missing={"SPICE": "SPICE needs [models]"},
        image_paths={"good.jpg": tmp_path / "good.jpg", "bad<b>.jpg": tmp_path / "absent.jpg"},
    )


def test_html_escapes_text_and_embeds_thumbnails(tmp_path):
    page = report.render_html(small_result(tmp_path), n=1)
    assert "<script>" not in page and "<b>" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "Tom &amp; Jerry&#x27;s &quot;show&quot;" in page
    assert page.count("data:image/jpeg;base64,") == 1 and "image not found" in page
    assert page.index("good.jpg") < page.index("Worst 1") < page.index("bad&lt;b&gt;.jpg")
    assert "<link" not in page and "src=\"http" not in page


def test_terminal_summary(tmp_path):
    result = small_result(tmp_path)
    result.unpredicted = ["lonely.jpg"]
    console = Console(record=True, width=120)
    report.print_summary(result, console)
    text = console.export_text()
    assert "CIDEr-D" in text and "1.5000" in text
    assert "SPICE needs [models]" in text
    assert "1 referenced image without a prediction (such as lonely.jpg)" in text
