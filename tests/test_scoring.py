"""CLIPScore against hand-computed formulas and torchmetrics, on tiny random-weight dual encoders."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data
from tiny import CLIP_CONTEXT as CONTEXT
from tiny import clip_tokenizer, clip_tower_sizes

from captionkit.errors import ModelNotFoundError, ModelUnavailableError, OptionError
from captionkit.scoring import (
    PREFIX,
    ClipScorer,
    histogram,
    histogram_text,
    load_scorer,
)

CAPTIONS = ["a man in a white suit", "a cat on a table", "a red cup of coffee",
            "a train next to a building"]
# Each sentence fits the 16-token context with the prefix, two together do not.
LONG = ("a young man is standing in the snow. two small dogs are playing on the grass; "
        "a woman is looking at the sky! an old train near the water.")


@pytest.fixture(scope="module")
def tiny_siglip(tmp_path_factory):
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipProcessor

    tokenizer = clip_tokenizer()
    text, vision = clip_tower_sizes(len(tokenizer))
    torch.manual_seed(0)
    model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
    images = SiglipImageProcessor(size={"height": 32, "width": 32})
    directory = tmp_path_factory.mktemp("tiny-siglip")
    model.save_pretrained(directory)
    SiglipProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def pictures(photos) -> list[Image.Image]:
    """Four of the shared real photos, one per caption in CAPTIONS."""
    return photos[:len(CAPTIONS)]


def _hf_reference(directory):
    from transformers import AutoModel, AutoProcessor

    return AutoModel.from_pretrained(directory).eval(), AutoProcessor.from_pretrained(directory)


def _unit(features) -> torch.Tensor:
    tensor = features if isinstance(features, torch.Tensor) else features.pooler_output
    return torch.nn.functional.normalize(tensor, dim=-1)


def _hand_cosines(directory, pictures, captions, padding="longest") -> torch.Tensor:
    """cos(E_img, E_txt) for every photo x caption, straight from the model, prefix added by hand."""
    model, processor = _hf_reference(directory)
    with torch.no_grad():
        image = _unit(model.get_image_features(**processor(images=pictures, return_tensors="pt")))
        tokens = processor.tokenizer([PREFIX + c for c in captions], padding=padding,
                                     max_length=CONTEXT, return_tensors="pt")
        text = _unit(model.get_text_features(**tokens))
    return image @ text.T


def test_clipscore_is_the_formula_on_the_models_own_features(scorer, tiny_clip, pictures):
    cosines = _hand_cosines(tiny_clip, pictures, CAPTIONS)
    results = scorer.score(pictures, CAPTIONS)
    for i, result in enumerate(results):
        assert result.cosine == pytest.approx(float(cosines[i, i]), abs=1e-5)
        assert result.clip_score == pytest.approx(2.5 * max(float(cosines[i, i]), 0.0), abs=1e-5)
        assert result.ref_clip_score is None
        assert result.chunks == 1


def test_random_weights_give_positive_and_negative_cosines(tiny_clip, pictures):
    # Keeps the parity tests honest: with only negative cosines every score would be a clamped 0.
    cosines = _hand_cosines(tiny_clip, pictures, CAPTIONS)
    assert (cosines > 0.01).sum() >= 4


class _FeaturesAsTensors(torch.nn.Module):
    """torchmetrics 1.9 expects get_*_features to return tensors; transformers 5 returns outputs.

    Only the return type changes: the same model's pooler_output (the projected embedding).
    """

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return self.model.get_image_features(*args, **kwargs).pooler_output

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return self.model.get_text_features(*args, **kwargs).pooler_output


def test_clipscore_matches_torchmetrics(scorer, tiny_clip, pictures):
    """torchmetrics reports max(100 * cos, 0) of exactly the text it is given, so the test hands it
    "A photo depicts " + caption; CLIPScore is then torchmetrics / 40 (2.5 / 100) and cosine100
    is torchmetrics itself. One pair per update: torchmetrics clamps the mean, not each pair."""
    pytest.importorskip("torchmetrics")
    from torchmetrics.multimodal import CLIPScore

    model, processor = _hf_reference(tiny_clip)
    metric = CLIPScore(model_name_or_path=lambda: (_FeaturesAsTensors(model), processor))
    cosine100 = ClipScorer(scorer.encoder, scale="cosine100")
    positive = 0
    for image in pictures:
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)
        for caption in CAPTIONS:
            metric.reset()
            metric.update(pixels, PREFIX + caption)
            reference = float(metric.compute())
            positive += reference > 0
            assert scorer.score([image], [caption])[0].clip_score == pytest.approx(
                reference / 40, abs=1e-5)
            assert cosine100.score([image], [caption])[0].clip_score == pytest.approx(
                reference, abs=1e-3)
    assert positive >= 4


def test_refclipscore_is_the_harmonic_mean_in_the_papers_units(scorer, pictures):
    references = [["a man standing in the snow", "a person in a white suit"],
                  ["a cat sitting on a table"], [], ["a train", "a bus near a building"]]
    results = scorer.score(pictures, CAPTIONS, references)
    image = scorer.embed_images(pictures)
    caption = scorer.embed_texts(CAPTIONS)
    assert results[2].ref_clip_score is None  # no references for that image
    checked = 0
    for i, refs in enumerate(references):
        if not refs:
            continue
        refs_emb = scorer.embed_texts(refs)  # references read with the prefix too
        clip_s = 2.5 * max(float(image[i] @ caption[i]), 0.0)
        best_ref = max(float((refs_emb @ caption[i]).max()), 0.0)
        expected = 2 * clip_s * best_ref / (clip_s + best_ref) if clip_s + best_ref else 0.0
        assert results[i].ref_clip_score == pytest.approx(expected, abs=1e-5)
        checked += expected > 0
    assert checked >= 1
    on_cosine100 = ClipScorer(scorer.encoder, scale="cosine100").score(pictures, CAPTIONS, references)
    for ours, scaled in zip(results, on_cosine100, strict=True):
        assert scaled.clip_score == pytest.approx(40 * ours.clip_score, abs=1e-4)
        if ours.ref_clip_score is not None:
            assert scaled.ref_clip_score == pytest.approx(40 * ours.ref_clip_score, abs=1e-4)


def test_cosine100_is_100_times_the_clamped_cosine(scorer, pictures):
    cosine100 = ClipScorer(scorer.encoder, scale="cosine100")
    for result in cosine100.score(pictures, CAPTIONS):
        assert result.clip_score == pytest.approx(100 * max(result.cosine, 0.0), abs=1e-4)


def test_reranking_embeds_each_image_once(scorer, pictures):
    seen = {"vision": 0, "text": 0}

    def counter(tower):
        def hook(module, args, output):
            seen[tower] += output.last_hidden_state.shape[0]
        return hook

    model = scorer.encoder.model
    handles = [model.vision_model.register_forward_hook(counter("vision")),
               model.text_model.register_forward_hook(counter("text"))]
    try:
        image_emb = scorer.embed_images(pictures)
        ranked = [scorer.rank(row, CAPTIONS) for row in image_emb]
    finally:
        for handle in handles:
            handle.remove()
    assert seen == {"vision": len(pictures), "text": len(pictures) * len(CAPTIONS)}
    for i, scores in enumerate(ranked):
        paired = scorer.score([pictures[i]] * len(CAPTIONS), CAPTIONS)
        assert scores == pytest.approx([r.clip_score for r in paired], abs=1e-6)


def test_long_caption_is_chunked_by_sentence_and_averaged(scorer, tiny_clip, pictures):
    tokens = scorer.encoder.count_tokens(PREFIX + LONG)
    assert tokens > CONTEXT  # the path under test really triggers
    chunks = scorer.chunks(LONG)
    assert len(chunks) > 1
    assert " ".join(chunks).split() == LONG.split()  # nothing dropped, order kept
    assert all(scorer.encoder.count_tokens(PREFIX + c) <= CONTEXT for c in chunks)
    assert all(c.endswith((".", ";", "!")) for c in chunks[:-1])  # cut at sentence ends where possible

    pieces = _hand_embeddings(tiny_clip, [PREFIX + c for c in chunks])
    expected = torch.nn.functional.normalize(pieces.mean(dim=0), dim=0)
    assert torch.allclose(scorer.embed_texts([LONG])[0], expected, atol=1e-5)
    result = scorer.score(pictures[:1], [LONG])[0]
    assert result.chunks == len(chunks)
    image = scorer.embed_images(pictures[:1])[0]
    assert result.cosine == pytest.approx(float(image @ expected), abs=1e-5)


def test_short_caption_is_scored_unchanged(scorer, tiny_clip):
    caption = CAPTIONS[1]
    assert scorer.chunks(caption) == [caption]
    expected = _hand_embeddings(tiny_clip, [PREFIX + caption])[0]
    assert torch.allclose(scorer.embed_texts([caption])[0], expected, atol=1e-6)


def test_overlong_sentence_is_split_at_spaces(scorer):
    sentence = LONG.replace(".", "").replace(";", "").replace("!", "")
    chunks = scorer.chunks(sentence)
    assert len(chunks) > 1
    assert " ".join(chunks).split() == sentence.split()
    assert all(scorer.encoder.count_tokens(PREFIX + c) <= CONTEXT for c in chunks)


def _hand_embeddings(directory, texts) -> torch.Tensor:
    model, processor = _hf_reference(directory)
    with torch.no_grad():
        tokens = processor.tokenizer(texts, padding=True, return_tensors="pt")
        return _unit(model.get_text_features(**tokens))


def test_grayscale_images_are_converted(scorer):
    gray = Image.fromarray(data.camera())
    result = scorer.score([gray], ["a man with a camera"])[0]
    rgb = scorer.score([gray.convert("RGB")], ["a man with a camera"])[0]
    assert result.cosine == pytest.approx(rgb.cosine, abs=1e-6)


def test_bfloat16_weights_score_close_to_float32(tiny_clip, scorer, pictures):
    half = load_scorer(str(tiny_clip), device="cpu", dtype="bfloat16")
    assert half.encoder.model.dtype == torch.bfloat16
    for full, low in zip(scorer.score(pictures, CAPTIONS), half.score(pictures, CAPTIONS),
                         strict=True):
        assert low.cosine == pytest.approx(full.cosine, abs=0.05)


def test_siglip_loads_and_scores(tiny_siglip, pictures):
    from transformers import SiglipModel

    siglip = load_scorer(str(tiny_siglip), device="cpu")
    assert isinstance(siglip.encoder.model, SiglipModel)
    # SigLIP pools the last position, so the hand computation pads to the full context as well.
    cosines = _hand_cosines(tiny_siglip, pictures, CAPTIONS, padding="max_length")
    for i, result in enumerate(siglip.score(pictures, CAPTIONS)):
        assert result.cosine == pytest.approx(float(cosines[i, i]), abs=1e-5)
        assert result.clip_score == pytest.approx(2.5 * max(float(cosines[i, i]), 0.0), abs=1e-5)


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory):
    open_clip = pytest.importorskip("open_clip")
    from safetensors.torch import save_file

    config = {"embed_dim": 16,
              "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8,
                             "head_width": 16},
              "text_cfg": {"context_length": CONTEXT, "vocab_size": 49408, "width": 32,
                           "heads": 2, "layers": 1}}
    torch.manual_seed(0)
    model = open_clip.model.CLIP(**config).eval()
    directory = tmp_path_factory.mktemp("tiny-open-clip")
    (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": config}))
    save_file(model.state_dict(), directory / "open_clip_model.safetensors")
    return directory, model


def test_open_clip_folder_loads_and_scores(tiny_open_clip, pictures):
    import open_clip

    directory, model = tiny_open_clip
    scorer = load_scorer(f"open_clip:{directory}", device="cpu")
    preprocess = open_clip.image_transform(32, is_train=False)
    tokenize = open_clip.tokenizer.SimpleTokenizer(context_length=CONTEXT)
    with torch.no_grad():
        image = _unit(model.encode_image(torch.stack([preprocess(p) for p in pictures])))
        text = _unit(model.encode_text(tokenize([PREFIX + c for c in CAPTIONS])))
    for i, result in enumerate(scorer.score(pictures, CAPTIONS)):
        assert result.cosine == pytest.approx(float(image[i] @ text[i]), abs=1e-5)
        assert result.clip_score == pytest.approx(2.5 * max(result.cosine, 0.0), abs=1e-6)
    assert scorer.score(pictures[:1], [LONG])[0].chunks > 1


def test_overlong_word_is_split_not_truncated(tiny_open_clip):
    # open_clip's byte-level BPE, unlike the word-level test tokenizer, spends many tokens on it.
    scorer = load_scorer(f"open_clip:{tiny_open_clip[0]}", device="cpu")
    text = "see " + "x" * 300 + " here"
    assert scorer.encoder.count_tokens(text) > 3 * CONTEXT
    chunks = scorer.chunks(text)
    assert "".join(chunks).replace(" ", "") == text.replace(" ", "")
    assert all(chunk in text for chunk in chunks)  # halves of the word rejoin without a space
    assert all(scorer.encoder.count_tokens(PREFIX + c) <= CONTEXT for c in chunks)
    assert scorer.score([Image.new("RGB", (40, 40))], [text])[0].chunks == len(chunks)


def test_open_clip_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)
    with pytest.raises(OptionError, match=r"pip install 'captionkit\[clip\]'"):
        load_scorer("open_clip:ViT-B-32/openai", device="cpu")


def test_open_clip_tag_goes_through_the_hub_cache(monkeypatch):
    pytest.importorskip("open_clip")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailableError, match="timm/vit_base_patch32_clip_224.openai"):
        load_scorer("open_clip:ViT-B-32/openai", device="cpu")


def test_open_clip_unknown_tag_lists_known_ones():
    pytest.importorskip("open_clip")
    with pytest.raises(ModelNotFoundError, match="openai"):
        load_scorer("open_clip:ViT-B-32/no-such-tag", device="cpu")


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such model directory"):
        load_scorer(str(tmp_path / "nope"), device="cpu")
    with pytest.raises(ModelNotFoundError, match=str(tmp_path)):
        load_scorer(str(tmp_path), device="cpu")


def test_not_a_dual_encoder_is_a_clear_error(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=32)).save_pretrained(tmp_path)
    with pytest.raises(OptionError, match="bert model, not an image-text dual encoder"):
        load_scorer(str(tmp_path), device="cpu")


def test_a_captioner_checkpoint_is_refused_not_scored_with_a_random_text_tower(blip_dir):
    # AutoModel loads it as BlipModel, a dual encoder class, with its text model left random.
    with pytest.raises(OptionError, match=r"is a blip model, not an image-text dual encoder \(it "
                                          r"was saved as BlipForConditionalGeneration\)"):
        load_scorer(str(blip_dir), device="cpu")


def test_a_checkpoint_missing_weights_is_refused(tiny_clip, tmp_path):
    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny_clip, tmp_path, dirs_exist_ok=True)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["text_projection.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(OptionError, match=r"^\S+: 1 weights of its CLIPModel are not in \S+ \(such "
                                          r"as text_projection.weight\), so its scores would be random"):
        load_scorer(str(tmp_path), device="cpu")


def test_uncached_hub_id_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailableError, match="not in the Hugging Face cache"):
        load_scorer("nobody/no-such-clip", device="cpu")


def test_bad_scale_is_rejected_before_loading():
    with pytest.raises(OptionError, match="--score-scale"):
        load_scorer("nobody/no-such-clip", scale="percent")


def test_histogram_counts_every_score():
    scores = [0.1, 0.2, 0.2, 0.5, 0.9, 1.0]
    rows = histogram(scores, bins=3)
    assert [count for _, _, count in rows] == [3, 1, 2]
    assert rows[0][0] == pytest.approx(0.1) and rows[-1][1] == pytest.approx(1.0)
    assert histogram([0.4, 0.4]) == [(0.4, 0.4, 2)]
    assert histogram([]) == []
    chart = histogram_text(scores, bins=3, threshold=0.4)
    assert chart.splitlines()[-1] == "3 of 6 below 0.4"
    assert "░" in chart and "█" in chart
