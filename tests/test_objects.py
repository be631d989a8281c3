"""The offline `objects` captioner: real bundled weights on the bundled example photos."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from captionkit.models.base import Caption, Captioner
from captionkit.models.objects import (
    COCO_LABELS,
    HINT_PHRASES,
    IMAGENET_GROUPS,
    IMAGENET_TO_COCO,
    REFINEMENTS,
    SCENES,
    TEXTURES,
    WORN,
    Detection,
    Hint,
    ObjectsCaptioner,
    compose,
    count_phrase,
    load,
)
from captionkit.options import GenerationOptions, LoadOptions

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
OPTIONS = GenerationOptions()


def _expected() -> dict[str, str]:
    lines = (EXAMPLES / "expected_objects_captions.txt").read_text(encoding="utf-8").splitlines()
    return dict(line.split(": ", 1) for line in lines if line.strip())


@pytest.fixture(scope="module")
def captioner() -> ObjectsCaptioner:
    return load(LoadOptions(device="cuda"))


@pytest.fixture(scope="module")
def examples() -> dict[str, Image.Image]:
    return {p.name: Image.open(p).convert("RGB")
            for p in sorted((EXAMPLES / "images").glob("*.jpg"))}


@pytest.fixture(scope="module")
def captions(captioner, examples) -> dict[str, Caption]:
    return dict(zip(examples, captioner.caption(list(examples.values()), OPTIONS), strict=True))


def test_implements_the_captioner_protocol(captioner):
    assert isinstance(captioner, Captioner)
    assert captioner.model_id == "objects"
    assert captioner.input_size == 300
    assert captioner.caption([], OPTIONS) == []


def test_the_wording_tables_name_real_classes(captioner):
    names = set(captioner.imagenet_names)
    assert len(captioner.imagenet_names) == 1000
    assert not names & set(IMAGENET_GROUPS)
    for table in (IMAGENET_TO_COCO, REFINEMENTS, WORN, SCENES, TEXTURES, HINT_PHRASES):
        assert set(table) <= names | set(IMAGENET_GROUPS)
    assert set(IMAGENET_TO_COCO.values()) <= set(COCO_LABELS.values())
    assert set(REFINEMENTS) <= set(IMAGENET_TO_COCO)


def test_every_example_has_an_expected_caption(examples):
    assert 6 <= len(examples) <= 8
    assert sorted(_expected()) == sorted(examples)


def test_example_captions_match_the_expected_file(captions):
    assert {name: c.text for name, c in captions.items()} == _expected()


def test_captions_state_what_is_in_the_photos(captions):
    assert "cat" in captions["cat.jpg"].text
    assert "person" in captions["astronaut.jpg"].text
    assert "espresso" in captions["coffee.jpg"].text
    assert "rocket" in captions["rocket.jpg"].text
    cameraman = captions["cameraman.jpg"].text
    assert "black-and-white" in cameraman and "person" in cameraman and "tripod" in cameraman
    assert captions["hubble_deep_field.jpg"].extras["objects"] == []


def test_extras_have_the_documented_structure(captions):
    labels = set(COCO_LABELS.values())
    for caption in captions.values():
        assert set(caption.extras) == {"objects", "imagenet"}
        for obj in caption.extras["objects"]:
            assert set(obj) == {"label", "score", "box"}
            assert obj["label"] in labels
            assert 0.0 <= obj["score"] <= 1.0
            x0, y0, x1, y1 = obj["box"]
            assert 0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0
        top = caption.extras["imagenet"]
        assert len(top) == 3 and all(set(t) == {"label", "score"} for t in top)
        assert [t["score"] for t in top] == sorted((t["score"] for t in top), reverse=True)
    assert captions["cat.jpg"].extras["objects"][0]["label"] == "cat"


def test_a_batch_captions_like_one_image_at_a_time(captioner, examples, captions):
    for name, image in examples.items():
        assert captioner.caption([image], OPTIONS)[0].text == captions[name].text


@pytest.mark.parametrize(("colour", "size", "said"), [
    ((128, 128, 128), (320, 240), "gray"),
    ((255, 0, 0), (320, 240), "red"),  # the detector saw a refrigerator in it
    ((255, 0, 0), (1, 1), "red"),
    ((0, 0, 255), (640, 480), "blue"),
])
def test_a_plain_image_gets_a_plain_sentence(captioner, colour, size, said):
    [caption] = captioner.caption([Image.new("RGB", size, colour)], OPTIONS)
    assert caption.text == f"a plain {said} image"
    assert caption.extras["objects"] == []


def test_counts_are_number_words_with_plurals():
    assert count_phrase("person", 1) == "a person"
    assert count_phrase("horse", 2) == "two horses"
    assert count_phrase("cup", 3) == "three cups"
    assert count_phrase("apple", 1) == "an apple"
    assert count_phrase("knife", 4, exact=False) == "at least four knives"
    assert count_phrase("sheep", 12) == "many sheep"


def test_compose_places_counts_and_hints():
    left = Detection("person", 0.9, (0.05, 0.1, 0.3, 0.9))
    right = Detection("dog", 0.8, (0.6, 0.5, 0.9, 0.95))
    assert compose([left, right], [], None) == "a person on the left and a dog on the right"
    assert compose([left], [], Hint("seashore", 0.8)) == "a person on a beach"
    assert compose([left], [], Hint("suit", 0.8)) == "a person wearing a suit"
    assert compose([left], [], Hint("space shuttle", 0.8)) == "a person and a space shuttle"
    # The hint names the detected dog again, so it adds nothing.
    assert compose([right], [], Hint("dog", 0.9)) == "a dog on the right"
    # A doubtful third box makes the count a floor, not an exact number.
    other = Detection("person", 0.4, (0.7, 0.1, 0.9, 0.9))
    two = [left, Detection("person", 0.9, (0.4, 0.1, 0.6, 0.9))]
    assert compose(two, [other], None) == "at least two people"


def test_compose_describes_tables_tones_and_empty_photos():
    table = Detection("dining table", 0.7, (0.0, 0.3, 1.0, 1.0))
    cups = [Detection("cup", 0.9, (0.1, 0.4, 0.3, 0.6)), Detection("cup", 0.9, (0.6, 0.4, 0.8, 0.6))]
    assert compose([table, *cups], [], None) == "two cups on a table"
    horse = Detection("horse", 0.9, (0.0, 0.0, 1.0, 0.9))
    assert compose([horse], [], None, "black-and-white") == "a black-and-white close-up of a horse"
    assert compose([], [], Hint("rocket", 0.6)) == "a photo of a rocket"
    assert compose([], [], None, "dark") == "a dark photo"


def test_text_instructions_are_refused_not_ignored(captioner, examples):
    from captionkit.errors import OptionError

    image = examples["cat.jpg"]
    with pytest.raises(OptionError, match="drop --prompt"):
        captioner.caption([image], GenerationOptions(prompt="Question: what is it? Answer:"))
    with pytest.raises(OptionError, match="--detail"):
        captioner.caption([image], GenerationOptions(detail="detailed"))


def test_an_opencv_that_cannot_read_the_detector_says_what_to_install(monkeypatch):
    import cv2

    from captionkit.errors import ModelUnavailableError

    monkeypatch.delattr(cv2.dnn, "readNetFromTensorflow")  # as in OpenCV 5
    with pytest.raises(ModelUnavailableError,
                       match=r"TensorFlow graph.*pip install 'opencv-python-headless<5'"):
        load(LoadOptions())


def test_generation_options_it_ignores_do_not_caption_again(captioner, tmp_path):
    from captionkit.pipeline import Pipeline, RunOptions

    options = RunOptions(output_dir=tmp_path / "out", progress=False)
    inputs = [str(EXAMPLES / "images")]
    assert Pipeline(captioner, OPTIONS, options).run(inputs).done == 6
    again = Pipeline(captioner, GenerationOptions(max_new_tokens=5, num_beams=3, seed=1), options).run(inputs)
    assert (again.done, again.skipped) == (0, 6)
