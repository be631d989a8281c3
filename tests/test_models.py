"""The registry and the Hugging Face adapters, checked against plain transformers as the oracle."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import captionkit
from captionkit import hub
from captionkit.errors import ImageError, ModelNotFoundError, ModelUnavailableError, OptionError
from captionkit.models import MODELS, choose_auto, load
from captionkit.models.registry import detect_family
from captionkit.options import GenerationOptions, LoadOptions

FP32 = LoadOptions(device="cpu", dtype="float32")


def reference_captions(family: str, path, images, max_new_tokens: int, prompt=None) -> list[str]:
    """What the model cards' own recipes produce: processor + generate + decode, one image."""
    import transformers

    texts = []
    for image in images:
        if family == "vit-gpt2":
            model = transformers.VisionEncoderDecoderModel.from_pretrained(path).eval()
            pixels = transformers.AutoImageProcessor.from_pretrained(path)(
                images=[image], return_tensors="pt").pixel_values
            ids = model.generate(pixels, max_new_tokens=max_new_tokens)
            tokenizer = transformers.AutoTokenizer.from_pretrained(path)
            texts.append(tokenizer.batch_decode(ids, skip_special_tokens=True)[0].strip())
            continue
        processor = transformers.AutoProcessor.from_pretrained(path)
        model_class = {"blip": transformers.BlipForConditionalGeneration,
                       "git": transformers.GitForCausalLM,
                       "blip2": transformers.Blip2ForConditionalGeneration,
                       "blip2-t5": transformers.Blip2ForConditionalGeneration}[family]
        model = model_class.from_pretrained(path).eval()
        if family == "git" and prompt is not None:
            inputs = {"pixel_values": processor(images=image, return_tensors="pt").pixel_values}
            ids = processor.tokenizer(prompt, add_special_tokens=False).input_ids
            inputs["input_ids"] = torch.tensor([[processor.tokenizer.cls_token_id, *ids]])
        elif prompt is not None or family == "blip2-t5":
            inputs = processor(images=image, text=prompt or "", return_tensors="pt")
        else:
            inputs = processor(images=image, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=max_new_tokens)
        if family in ("git", "blip2") and prompt is not None:
            ids = ids[:, inputs["input_ids"].shape[1]:]
        texts.append(processor.batch_decode(ids, skip_special_tokens=True)[0].strip())
    return texts


@pytest.mark.parametrize("family", ["blip", "git", "vit-gpt2", "blip2", "blip2-t5"])
def test_captions_equal_the_transformers_reference(family, tiny_models, photos):
    captioner = load(str(tiny_models[family]), FP32)
    options = GenerationOptions(max_new_tokens=8)
    ours = [c.text for c in captioner.caption(photos[:3], options)]
    assert ours == reference_captions(family, tiny_models[family], photos[:3], 8)


@pytest.mark.parametrize("family", ["blip", "git", "blip2", "blip2-t5"])
def test_prompted_captions_equal_the_reference(family, tiny_models, photos):
    captioner = load(str(tiny_models[family]), FP32)
    prompt = "a photo of"
    ours = [c.text for c in captioner.caption(photos[:2], GenerationOptions(max_new_tokens=6,
                                                                            prompt=prompt))]
    assert ours == reference_captions(family, tiny_models[family], photos[:2], 6, prompt=prompt)


@pytest.mark.parametrize("family", ["blip", "git", "vit-gpt2", "blip2", "blip2-t5"])
def test_batch_equals_one_at_a_time_in_float32(family, tiny_models, photos):
    captioner = load(str(tiny_models[family]), FP32)
    options = GenerationOptions(max_new_tokens=8)
    batched = [c.text for c in captioner.caption(photos, options)]
    alone = [captioner.caption([image], options)[0].text for image in photos]
    assert batched == alone
    assert len(set(batched)) > 1, "the tiny model should see differences between photos"


@pytest.mark.parametrize("family", ["blip", "git", "blip2", "blip2-t5"])
def test_prompts_of_equal_length_share_a_generate_call(family, tiny_models, photos, monkeypatch):
    captioner = load(str(tiny_models[family]), FP32)
    options = GenerationOptions(max_new_tokens=5)
    by_length: dict[int, list[str]] = {}
    for text in ["a photo of", "a picture of", "an image of", "the photo of", "a view of", "a dog",
                 "a close up photo of a", "two cats on a street"]:
        length = captioner.encode(photos[:1], text)["input_ids"].shape[1]
        by_length.setdefault(length, []).append(text)
    same = next(texts for texts in by_length.values() if len(texts) >= 2)
    other = next(texts[0] for texts in by_length.values() if texts[0] not in same)
    prompts = [same[0], None, same[1], other, same[1], None]
    calls = []
    generate = captioner.model.generate
    monkeypatch.setattr(captioner.model, "generate",
                        lambda **kw: calls.append(len(kw["pixel_values"])) or generate(**kw))
    mixed = [c.text for c in captioner.caption(photos[:6], options, prompts)]
    assert sorted(calls) == [1, 2, 3], "equal-length prompts stack; the others run apart"
    monkeypatch.undo()
    for image, prompt, text in zip(photos[:6], prompts, mixed, strict=True):
        single = captioner.caption([image], GenerationOptions(max_new_tokens=5, prompt=prompt))
        assert single[0].text == text
    if family == "blip":
        assert mixed[0].startswith(same[0]) and mixed[2].startswith(same[1])


def test_family_detected_from_config(tiny_models):
    expected = {"blip": "blip", "git": "git", "vit-gpt2": "vision-encoder-decoder",
                "blip2": "blip-2", "blip2-t5": "blip-2"}
    for name, family in expected.items():
        assert detect_family(tiny_models[name]) == family


def test_unknown_model_type_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelNotFoundError, match="'bert' is not a captioner"):
        load(str(tmp_path), FP32)


def test_missing_local_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such model directory"):
        load("./no/such/checkpoint", FP32)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="a file, not a model directory; --model takes the "
                                                 "folder holding config.json"):
        load(str(weights), FP32)


def test_uncached_hub_model_fails_fast_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailableError, match="not in the Hugging Face cache.*offline") as caught:
        load("blip-base", FP32)
    assert "did you mean" not in str(caught.value)  # not the alias just typed
    with pytest.raises(ModelUnavailableError,
                       match=r"^blip-bse: .*did you mean --model blip-base\?") as caught:
        load("blip-bse", FP32)  # a mistyped alias reads as a Hub id
    assert "hf download" not in str(caught.value)  # no advice to download the typo
    with pytest.raises(ModelUnavailableError) as caught:
        load("Salesforce/blip-bse", FP32)
    assert "did you mean" not in str(caught.value)


def test_uncached_hub_model_fails_fast_when_unreachable(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    with pytest.raises(ModelUnavailableError, match="cannot be reached"):
        load("Salesforce/blip-image-captioning-large", FP32)


def test_cached_hub_snapshot_is_found_without_network(monkeypatch, tmp_path, blip_dir):
    """A snapshot laid out like the Hub cache loads by its repo id with the network off."""
    import shutil

    cache = tmp_path / "hub"
    snapshot = cache / "models--Salesforce--blip-image-captioning-large" / "snapshots" / "abc123"
    shutil.copytree(blip_dir, snapshot)
    refs = snapshot.parent.parent / "refs"
    refs.mkdir()
    (refs / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.cached_snapshot("Salesforce/blip-image-captioning-large") == snapshot
    assert choose_auto()[0] == "blip-large"
    captioner = load("blip-large", FP32)
    assert captioner.model_id == "Salesforce/blip-image-captioning-large"
    assert captioner.fingerprint == "", "a Hub id's cached files are not fingerprinted"


def test_a_local_checkpoint_is_fingerprinted_by_its_weights_and_configs(blip_dir, tmp_path):
    import os

    checkpoint = shutil.copytree(blip_dir, tmp_path / "ck")
    first = load(str(checkpoint), FP32).fingerprint
    assert first and hub.fingerprint(checkpoint) == first
    (checkpoint / "README.md").write_text("notes")
    assert hub.fingerprint(checkpoint) == first, "only what the loader reads counts"
    for name in ("config.json", "model.safetensors"):
        stat = (checkpoint / name).stat()
        os.utime(checkpoint / name, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
        assert hub.fingerprint(checkpoint) != first, name
        os.utime(checkpoint / name, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert hub.fingerprint(checkpoint) == first


def test_auto_falls_back_to_objects_when_blip_large_is_absent(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    name, reason = choose_auto()
    assert name == "objects"
    assert "not in the Hugging Face cache" in reason


def test_registry_lists_required_aliases():
    required = {"blip-base", "blip-large", "blip2-opt-2.7b", "blip2-flan-t5-xl", "git-base",
                "git-large", "vit-gpt2", "objects"}
    assert required <= set(MODELS)
    for spec in MODELS.values():
        assert spec.params and spec.license and spec.memory


def test_python_api_accepts_paths_and_images(blip_dir, photo_dir, photos):
    model = captionkit.load(str(blip_dir), device="cpu", dtype="float32")
    from_path = model.caption(photo_dir / "astronaut.png", max_new_tokens=6)
    from_image = model.caption([photos[0], str(photo_dir / "chelsea.png")], max_new_tokens=6)
    assert isinstance(from_path, str) and from_path == from_image[0]
    assert len(from_image) == 2
    with pytest.raises(TypeError, match="or a list of them, not int"):
        model.caption(42)


def test_python_api_captions_a_long_list_in_batches(blip_dir, photos):
    """A list of thousands must not become one batch (its cross-attention caches alone would be
    tens of GB): it goes through in the pipeline's batch size."""
    model = captionkit.load(str(blip_dir), device="cpu", dtype="float32")
    calls, caption = [], model.captioner.caption
    model.captioner.caption = lambda images, *args: calls.append(len(images)) or caption(images, *args)
    images = [photos[index % len(photos)] for index in range(37)]
    captions = model.caption(images, max_new_tokens=3)
    assert calls == [16, 16, 5] and len(captions) == 37
    assert captions[:len(photos)] == model.caption(photos, max_new_tokens=3)


def test_python_api_accepts_bytes_files_and_arrays(photo_dir):
    """What web handlers and OpenCV/numpy code hold: encoded bytes, file objects, RGB arrays."""
    model = captionkit.load("objects")
    path = photo_dir / "chelsea.png"
    expected = model.caption(path)
    array = np.asarray(Image.open(path).convert("RGB"))
    with open(path, "rb") as file:
        assert model.caption(file) == expected
    assert model.caption(path.read_bytes()) == expected
    assert model.caption(io.BytesIO(path.read_bytes())) == expected
    assert model.caption(array) == expected
    assert model.caption(np.stack([array, array])) == [expected, expected]  # N x H x W x 3: a batch
    with pytest.raises(ImageError, match=r"<array>: an array of shape \(2, 2, 3\) and type <f8"):
        model.caption(np.zeros((2, 2, 3)))
    with pytest.raises(ImageError, match="<bytes>: not an image"):
        model.caption(b"plain text, not a picture")
    with pytest.raises(ImageError, match="https://example.com/a.jpg: a URL: captionkit reads local"):
        model.caption("https://example.com/a.jpg")
    with pytest.raises(TypeError, match="an image is a path, .* not int"):
        model.caption([path, 42])
    with pytest.raises(ImageError, match=r"<array>: an array of shape \(0, 0, 3\) .* not empty"):
        model.caption(np.zeros((0, 0, 3), dtype=np.uint8))  # torch raised its own RuntimeError
    with open(path) as text, pytest.raises(ImageError, match="opened as text: open it in binary mode"):
        model.caption(text)  # a UnicodeDecodeError, before


def test_a_broken_local_checkpoint_is_one_line_saying_what_is_wrong(blip_dir, tmp_path):
    broken = tmp_path / "blip"
    shutil.copytree(blip_dir, broken)
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:1000])  # a copy cut short
    with pytest.raises(ModelUnavailableError, match=r"blip: cannot load this checkpoint: .*header"):
        load(str(broken), LoadOptions(device="cpu"))
    weights.unlink()
    with pytest.raises(ModelUnavailableError, match=r"blip: no weights file \(model.safetensors or "
                                                     r"pytorch_model.bin\): an interrupted download"):
        load(str(broken), LoadOptions(device="cpu"))
    weights.write_bytes(data)
    (broken / "processor_config.json").unlink()
    with pytest.raises(ModelUnavailableError, match="cannot load this checkpoint: .*preprocessor_config"):
        load(str(broken), LoadOptions(device="cpu"))
    shutil.copy(blip_dir / "processor_config.json", broken)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (broken / name).unlink()  # transformers 5 then builds a 5-token tokenizer without a word
    with pytest.raises(ModelUnavailableError, match=r"its tokenizer has \d tokens for a model of 211: "
                                                     r"the tokenizer files .* are missing"):
        load(str(broken), LoadOptions(device="cpu"))


def test_python_api_run_takes_one_folder_as_a_string(photo_dir, tmp_path):
    summary = captionkit.load("objects").run(str(photo_dir), output_dir=tmp_path / "out")
    assert summary.failed == [] and len((tmp_path / "out" / "captions.txt").read_text().splitlines()) == 8


def test_bfloat16_path_runs(blip_dir, photos):
    captioner = load(str(blip_dir), LoadOptions(device="cpu", dtype="bfloat16"))
    assert captioner.model.dtype == torch.bfloat16
    assert len(captioner.caption(photos[:2], GenerationOptions(max_new_tokens=4))) == 2


def test_the_effective_dtype_names_the_weights_in_the_store_key(blip_dir, monkeypatch):
    from captionkit import device
    from captionkit.models.hf import _variant

    assert load(str(blip_dir), FP32).variant == "", "float32 keeps the key it always had"
    # `--dtype auto` is bf16 on a CPU with native bf16 (and on GPUs): that is what gets named
    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: True)
    assert load(str(blip_dir), LoadOptions(device="cpu")).variant == "bfloat16"
    assert _variant(LoadOptions(load_in_8bit=True), torch.float16) == "bnb-8bit+float16"
    assert _variant(LoadOptions(quantize="int8"), torch.float32) == "int8"


def test_impossible_options_are_refused(blip_dir):
    with pytest.raises(OptionError, match="float16 is not supported on the CPU"):
        load(str(blip_dir), LoadOptions(device="cpu", dtype="float16"))
    with pytest.raises(OptionError, match="need a CUDA GPU"):
        load(str(blip_dir), LoadOptions(device="cpu", load_in_8bit=True))
    with pytest.raises(OptionError, match="mutually exclusive"):
        LoadOptions(load_in_8bit=True, load_in_4bit=True)
    with pytest.raises(OptionError, match="only apply with --do-sample"):
        GenerationOptions(temperature=0.7)


def test_vit_gpt2_refuses_a_prompt(tiny_models, photos):
    captioner = load(str(tiny_models["vit-gpt2"]), FP32)
    with pytest.raises(OptionError, match="does not take a text prompt"):
        captioner.caption(photos[:1], GenerationOptions(prompt="a photo of"))


def test_decode_target_follows_each_processor_convention():
    from transformers import BlipImageProcessor, CLIPImageProcessor, Qwen2VLImageProcessor

    from captionkit.models.hf import _input_size

    assert _input_size(BlipImageProcessor(size={"height": 384, "width": 384})) == 384
    assert _input_size(CLIPImageProcessor(size={"shortest_edge": 224})) == 224
    # Qwen2-VL keeps pixel budgets in `size`: 3136..1003520 pixels means about 1001 px a side
    assert _input_size(Qwen2VLImageProcessor()) == 1001


@pytest.mark.parametrize("family", ["blip", "git", "vit-gpt2", "blip2"])
def test_int8_quantization_swaps_every_linear_layer_and_still_captions(family, tiny_models, photos):
    from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

    captioner = load(str(tiny_models[family]), LoadOptions(quantize="int8"))
    modules = list(captioner.model.modules())
    assert captioner.device.type == "cpu" and captioner.variant == "int8"
    assert not [m for m in modules if type(m) is torch.nn.Linear]
    assert sum(isinstance(m, DynamicInt8Linear) for m in modules) >= 4
    options = GenerationOptions(max_new_tokens=5, min_new_tokens=5)
    captions = [c.text for c in captioner.caption(photos[:3], options)]
    assert all(captions) and captions == [c.text for c in captioner.caption(photos[:3], options)]


def test_int8_vision_features_stay_close_to_float32(blip_dir, photos):
    fp32, int8 = load(str(blip_dir), FP32), load(str(blip_dir), LoadOptions(quantize="int8"))
    pixels = fp32.encode(photos[:2], None)["pixel_values"]
    with torch.inference_mode():
        exact = fp32.model.vision_model(pixel_values=pixels).pooler_output
        quantized = int8.model.vision_model(pixel_values=pixels).pooler_output
    assert not torch.equal(exact, quantized)  # really quantized
    assert torch.nn.functional.cosine_similarity(exact, quantized).min() > 0.98


def test_int8_refuses_what_it_cannot_do(blip_dir):
    with pytest.raises(OptionError, match="--quantize 'int4': use int8"):
        LoadOptions(quantize="int4")
    with pytest.raises(OptionError, match="runs on the CPU"):
        LoadOptions(quantize="int8", device="cuda")
    with pytest.raises(OptionError, match="drop --dtype bfloat16"):
        LoadOptions(quantize="int8", dtype="bfloat16")
    with pytest.raises(OptionError, match="pass one"):
        LoadOptions(quantize="int8", load_in_8bit=True)
    with pytest.raises(OptionError, match="not to objects"):
        load("objects", LoadOptions(quantize="int8"))
    with pytest.raises(OptionError, match="not to openai:gpt-4o"):
        load("openai:gpt-4o", LoadOptions(quantize="int8", api_base="http://127.0.0.1:9/v1"))
