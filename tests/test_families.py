"""Kosmos-2, Florence-2, InstructBLIP and chat VLMs, each checked against plain transformers."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import pytest
import tiny
import torch
from PIL import Image
from typer.testing import CliRunner

from captionkit import sources
from captionkit.cli import app
from captionkit.errors import InputError, ModelNotFoundError, OptionError, OutputError
from captionkit.models import FAMILIES, MODELS, Caption, Captioner, load
from captionkit.models.registry import VLM_FAMILY, detect_family
from captionkit.options import GenerationOptions, LoadOptions
from captionkit.pipeline import Pipeline, RunOptions
from captionkit.predictions import Region, phrase_regions
from captionkit.prompts import read_prompt_file

FP32 = LoadOptions(device="cpu", dtype="float32")
BUILDERS = {"kosmos2": tiny.build_kosmos2, "florence2": tiny.build_florence2,
            "instructblip": tiny.build_instructblip, "llava": tiny.build_llava,
            "qwen2vl": tiny.build_qwen2_vl, "paligemma": tiny.build_paligemma}
CHAT = ("llava", "qwen2vl")
QUESTION = "Question: what is in the picture? Answer:"


@pytest.fixture(scope="session")
def family_models(tmp_path_factory) -> dict[str, Path]:
    """One tiny checkpoint per family, built once per session."""
    root = tmp_path_factory.mktemp("family-models")
    return {name: build(root / name) for name, build in BUILDERS.items()}


@pytest.fixture(scope="module")
def captioner(family_models):
    """Captioners loaded through captionkit, once per family."""
    loaded: dict = {}

    def get(name: str):
        if name not in loaded:
            loaded[name] = load(str(family_models[name]), FP32)
        return loaded[name]

    return get


@functools.cache
def _reference_model(path: Path):
    """Plain transformers' processor and model for a checkpoint, loaded once per test session."""
    import transformers

    processor = transformers.AutoProcessor.from_pretrained(path)
    return processor, transformers.AutoModelForImageTextToText.from_pretrained(path).eval()


def reference(name: str, path: Path, images, max_new_tokens: int, prompt: str,
              system: str | None = None) -> list[str]:
    """The model cards' recipes, one image at a time: processor + generate + decode."""
    processor, model = _reference_model(path)
    texts = []
    for image in images:
        text = prompt
        if name in CHAT:
            messages = [{"role": "system", "content": [{"type": "text", "text": system}]}] \
                if system else []
            messages.append({"role": "user", "content": [{"type": "image"},
                                                         {"type": "text", "text": prompt}]})
            text = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(images=image, text=text, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        if name in (*CHAT, "instructblip", "paligemma"):
            ids = ids[:, inputs["input_ids"].shape[1]:]
        decoded = processor.batch_decode(ids, skip_special_tokens=True)[0].strip()
        if name == "kosmos2":
            decoded, _ = processor.post_process_generation(decoded)
            # the caption is what follows the prompt
            decoded = decoded.removeprefix(prompt.removeprefix("<grounding>").strip()).lstrip()
        texts.append(decoded)
    return texts


DEFAULTS = {"kosmos2": "<grounding>An image of", "florence2": "<CAPTION>",
            "instructblip": "A short image description:",
            "llava": "Describe this image in one sentence.",
            "qwen2vl": "Describe this image in one sentence.", "paligemma": "caption en"}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_captions_equal_the_transformers_reference(name, family_models, captioner, photos):
    ours = [c.text for c in captioner(name).caption(photos[:3], GenerationOptions(max_new_tokens=8))]
    assert ours == reference(name, family_models[name], photos[:3], 8, DEFAULTS[name])


@pytest.mark.parametrize(("name", "options", "prompt", "system"), [
    ("kosmos2", {"detail": "detailed"}, "<grounding> Describe this image in detail:", None),
    ("florence2", {"detail": "detailed"}, "<DETAILED_CAPTION>", None),
    ("florence2", {"detail": "more-detailed"}, "<MORE_DETAILED_CAPTION>", None),
    ("instructblip", {"prompt": QUESTION}, QUESTION, None),
    ("llava", {"detail": "detailed", "system": "Be brief.", "language": "French"},
     "Describe this image in detail. Answer in French.", "Be brief."),
    ("paligemma", {"detail": "detailed"}, "describe en", None),
])
def test_prompts_and_detail_levels_equal_the_reference(name, options, prompt, system,
                                                       family_models, captioner, photos):
    generation = GenerationOptions(max_new_tokens=6, **options)
    ours = [c.text for c in captioner(name).caption(photos[3:5], generation)]
    assert ours == reference(name, family_models[name], photos[3:5], 6, prompt, system)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_batch_equals_one_at_a_time_in_float32(name, captioner, photos):
    model = captioner(name)
    options = GenerationOptions(max_new_tokens=8)
    batched = [c.text for c in model.caption(photos, options)]
    alone = [model.caption([image], options)[0].text for image in photos]
    assert batched == alone
    assert len(set(batched)) > 1, "the tiny model should see differences between photos"


def test_kosmos2_returns_grounded_entities_without_the_prompt(captioner, photos):
    model = captioner("kosmos2")
    decoded = ("<image>.</image><grounding> An image of<phrase> a dog</phrase><object>"
               "<patch_index_0000><patch_index_1023></object> on<phrase> the grass</phrase>"
               "<object><patch_index_0992><patch_index_1023></object>.")
    text, entities = model.ground(decoded, "<grounding>An image of")
    assert text == "a dog on the grass."
    assert [e["phrase"] for e in entities] == ["a dog", "the grass"]
    for entity in entities:
        start, end = entity["span"]
        assert text[start:end] == entity["phrase"]
        for x0, y0, x1, y1 in entity["boxes"]:
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
    regions = phrase_regions(entities, (640, 480))  # what a prediction carries: pixel boxes
    assert [(r.label, r.span, r.kind) for r in regions] == [
        ("a dog", tuple(entities[0]["span"]), "phrase"), ("the grass", tuple(entities[1]["span"]), "phrase")]
    assert all(0 <= r.box[0] < r.box[2] <= 640 and 0 <= r.box[1] < r.box[3] <= 480 for r in regions)
    json.dumps([r.to_dict() for r in regions])  # stored as JSON in the run store and captions.jsonl
    caption = model.caption(photos[:1], GenerationOptions(max_new_tokens=4))[0]
    assert isinstance(caption.regions, list) and all(r.kind == "phrase" for r in caption.regions)
    assert model.grounded


def test_kosmos2_predict_gives_regions_in_the_images_own_pixels(family_models, photos):
    from captionkit import load

    model = load(str(family_models["kosmos2"]), device="cpu", dtype="float32")
    big = photos[0].resize((photos[0].width * 3, photos[0].height * 3))
    found = model.predict(big, max_new_tokens=8)
    seen = sources.load_image(big, model.captioner.input_size)  # shrunk toward the model's input
    assert seen.width < big.width
    direct = model.captioner.caption([seen], GenerationOptions(max_new_tokens=8))[0]
    assert found.text == direct.text
    factor = big.width / seen.width
    assert [r.box for r in found.regions] == pytest.approx(
        [[v * factor for v in r.box] for r in direct.regions], abs=1e-3)


class Grounded(Captioner):
    """A captioner that grounds one phrase to the left half of every image."""

    model_id, input_size, grounded = "grounded", None, True
    phrase, box = "left", (0.1, 0.2, 0.5, 0.8)

    def caption(self, images, options, prompts=None):
        return [Caption(f"{self.phrase} half", regions=[Region(
            box=[v * image.size[i % 2] for i, v in enumerate(self.box)], label=self.phrase,
            span=(0, len(self.phrase)), kind="phrase")]) for image in images]


class Regrounded(Grounded):
    """The same phrase grounded to the right half instead."""

    model_id = "regrounded"
    phrase, box = "right", (0.6, 0.2, 0.9, 0.8)


def test_draw_boxes_writes_annotated_copies(tmp_path, photo_dir):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    shutil.copy(photo_dir / "coffee.png", images / "sub" / "coffee.png")
    shutil.copy(photo_dir / "horse.png", images / "horse.png")
    out, drawn = tmp_path / "out", tmp_path / "boxes"
    summary = Pipeline(Grounded(), GenerationOptions(), RunOptions(
        output_dir=out, recursive=True, progress=False, draw_boxes=drawn)).run([str(images)])
    assert sorted(p.relative_to(drawn).as_posix() for p in drawn.rglob("*.png")) == [
        "horse.png", "sub/coffee.png"]
    assert set(drawn.rglob("*.png")) <= set(summary.outputs)
    original = Image.open(images / "sub" / "coffee.png").convert("RGB")
    annotated = Image.open(drawn / "sub" / "coffee.png").convert("RGB")
    assert annotated.size == original.size
    width, height = original.size
    edge = (round(0.1 * width), round(0.5 * height))  # on the box's left side
    far = (round(0.9 * width), round(0.5 * height))  # outside the box
    assert annotated.getpixel(edge) != original.getpixel(edge)
    assert annotated.getpixel(far) == original.getpixel(far)
    records = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    for record in records:
        width, height = Image.open(record["path"]).size
        assert record["regions"][0]["box"] == pytest.approx([0.1 * width, 0.2 * height, 0.5 * width,
                                                             0.8 * height], abs=0.01)

    # A resumed run redraws nothing, except a copy that went missing; other boxes are drawn anew.
    def rerun(model=None):
        return Pipeline(model or Grounded(), GenerationOptions(), RunOptions(
            output_dir=out, recursive=True, progress=False, draw_boxes=drawn)).run([str(images)])

    before = {p: p.stat().st_mtime_ns for p in drawn.rglob("*.png")}
    assert not set(rerun().outputs) & set(before)
    assert {p: p.stat().st_mtime_ns for p in drawn.rglob("*.png")} == before
    (drawn / "horse.png").unlink()
    assert set(rerun().outputs) & set(before) == {drawn / "horse.png"}
    moved = rerun(Regrounded())
    assert set(moved.outputs) & set(before) == set(before)
    annotated = Image.open(drawn / "sub" / "coffee.png").convert("RGB")
    assert annotated.getpixel(edge) == original.getpixel(edge)  # the old box is gone


def test_draw_boxes_never_replaces_the_images_themselves(tmp_path, photo_dir):
    images = tmp_path / "images"
    shutil.copytree(photo_dir, images)
    before = {p.name: p.read_bytes() for p in images.iterdir()}
    options = RunOptions(output_dir=tmp_path / "out", progress=False, draw_boxes=images)
    with pytest.raises(OptionError, match="--draw-boxes .* is an input folder"):
        Pipeline(Grounded(), GenerationOptions(), options).run([str(images)])
    with pytest.raises(OutputError, match="the annotated copy would replace the image itself"):
        Pipeline(Grounded(), GenerationOptions(), options).run([str(images / "horse.png")])
    assert {p.name: p.read_bytes() for p in images.iterdir()} == before


def test_kosmos2_through_the_cli_with_detail_and_boxes(family_models, photo_dir, tmp_path):
    out, drawn = tmp_path / "out", tmp_path / "boxes"
    result = CliRunner().invoke(app, [
        "caption", str(photo_dir), "--model", str(family_models["kosmos2"]), "-o", str(out),
        "--detail", "detailed", "--draw-boxes", str(drawn), "--max-new-tokens", "4",
        "--device", "cpu", "--dtype", "float32", "-q"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert len(records) == 8 and all(isinstance(r.get("regions", []), list) for r in records)
    assert len(list(drawn.glob("*.png"))) == 8


def test_prompt_file_asks_each_image_its_own_prompt(captioner, photo_dir, tmp_path):
    model = captioner("instructblip")
    images = tmp_path / "images"
    images.mkdir()
    for name in ("astronaut", "rocket", "coffee"):
        shutil.copy(photo_dir / f"{name}.png", images / f"{name}.png")
    shutil.copy(photo_dir / "coffee.png", images / "coffee copy.png")
    prompts = {"astronaut.png": QUESTION, "coffee.png": "What is in the cup?",
               "coffee copy.png": "What color is the cup?"}
    csv_file = tmp_path / "questions.csv"
    csv_file.write_text("path,prompt\n" + "".join(f"images/{name},\"{prompt}\"\n"
                                                  for name, prompt in prompts.items()))
    generation = GenerationOptions(max_new_tokens=5)
    options = RunOptions(output_dir=tmp_path / "out", progress=False, prompt_file=csv_file)
    summary = Pipeline(model, generation, options).run([str(images)])
    assert summary.done == 4 and summary.duplicates == 0  # same bytes, different questions
    records = {r["image"]: r for r in map(json.loads, (tmp_path / "out" / "captions.jsonl")
                                          .read_text().splitlines())}
    for name, record in records.items():
        asked = prompts.get(name)
        assert record.get("prompt") == asked
        image = sources.load_image(images / name, model.input_size)  # as the pipeline decodes
        alone = model.caption([image], GenerationOptions(max_new_tokens=5, prompt=asked))
        assert record["caption"] == alone[0].text
    again = Pipeline(model, generation, options).run([str(images)])
    assert (again.done, again.skipped) == (0, 4)
    csv_file.write_text(csv_file.read_text().replace("What is in the cup?", "What is it?"))
    changed = Pipeline(model, generation, options).run([str(images)])
    assert (changed.done, changed.skipped) == (1, 3)


def test_prompt_file_problems_are_clear(tmp_path):
    missing = tmp_path / "nope.csv"
    with pytest.raises(InputError, match="cannot read"):
        read_prompt_file(missing)
    bad = tmp_path / "bad.csv"
    bad.write_text("a.jpg,what is this, really?\n")
    with pytest.raises(InputError, match="row 1.*quote prompts"):
        read_prompt_file(bad)
    bad.write_text("image,prompt\na.jpg,what is this?\nb.jpg, \n")
    with pytest.raises(InputError, match="row 3: expected `image path,prompt`, found an empty prompt"):
        read_prompt_file(bad)
    good = tmp_path / "sub" / "good.csv"
    good.parent.mkdir()
    good.write_text("photo.jpg,what is this?\n\n")
    assert read_prompt_file(good) == {str((good.parent / "photo.jpg").absolute()): "what is this?"}
    for header in ("path,prompt", "image,prompt", "Image Path,Question", "file,instruction"):
        good.write_text(f"{header}\nphoto.jpg,what is this?\n")
        assert read_prompt_file(good) == {str((good.parent / "photo.jpg").absolute()): "what is this?"}


def test_families_are_detected_from_config(family_models, tmp_path):
    expected = {"kosmos2": "kosmos-2", "florence2": "florence2", "instructblip": "instructblip",
                "llava": VLM_FAMILY, "qwen2vl": VLM_FAMILY, "paligemma": VLM_FAMILY}
    for name, family in expected.items():
        assert detect_family(family_models[name]) == family
    for model_type in ("qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm", "paligemma"):
        (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
        assert detect_family(tmp_path) == VLM_FAMILY


def test_impossible_detail_and_chat_options_are_refused(captioner, photos, tmp_path):
    with pytest.raises(OptionError, match="--detail 'huge'"):
        GenerationOptions(detail="huge")
    with pytest.raises(OptionError, match="pass one"):
        GenerationOptions(detail="brief", prompt="a photo of")
    with pytest.raises(OptionError, match="no --detail more-detailed.*brief, detailed"):
        captioner("kosmos2").caption(photos[:1], GenerationOptions(detail="more-detailed"))
    with pytest.raises(OptionError, match="need a chat model"):
        captioner("instructblip").caption(photos[:1], GenerationOptions(language="French"))
    with pytest.raises(OptionError, match="no chat template.*caption fr"):
        captioner("paligemma").caption(photos[:1], GenerationOptions(system="Be brief."))
    with pytest.raises(OptionError, match="<OD> answers with regions"):
        captioner("florence2").caption(photos[:1], GenerationOptions(prompt="<OD>"))
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "florence2", "auto_map": {"AutoConfig": "configuration_florence2.X"}}))
    with pytest.raises(ModelNotFoundError, match="florence-community"):
        load(str(tmp_path), FP32)


def test_every_family_is_listed_with_its_aliases():
    required = {"kosmos-2", "florence-2-base", "florence-2-large", "instructblip-vicuna-7b",
                "instructblip-flan-t5-xl", "qwen2-vl-2b", "qwen2.5-vl-3b", "smolvlm",
                "llava-1.5-7b", "paligemma-3b"}
    assert required <= set(MODELS)
    assert all(MODELS[alias].family in FAMILIES for alias in required)
    result = CliRunner().invoke(app, ["models"])
    assert result.exit_code == 0
    for family in ("kosmos-2", "florence2", "instructblip", VLM_FAMILY):
        assert family in result.output
    for alias in required:
        assert alias in result.output
