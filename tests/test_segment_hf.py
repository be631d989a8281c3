"""transformers segmenters (tiny random-weight Mask2Former, SegFormer and SAM built from configs)
against the same checkpoints run through transformers' own processors and post-processing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captionkit.errors import ModelNotFoundError, OptionError
from captionkit.predictions import Prediction, Region
from captionkit.segment import SegmentOptions, load_segmenter, masks
from captionkit.segment.combine import add_masks

EXAMPLES = Path(__file__).parent.parent / "examples" / "images"
LABELS = {0: "person", 1: "cat", 2: "cup"}


def build_mask2former(folder: Path) -> Path:
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessor,
        SwinConfig,
    )

    torch.manual_seed(0)
    backbone = SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1],
                          num_heads=[1, 1, 2, 2], window_size=4,
                          out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(backbone_config=backbone, num_queries=10, hidden_dim=32,
                               mask_feature_size=32, feature_size=32, encoder_feedforward_dim=64,
                               dim_feedforward=64, encoder_layers=1, decoder_layers=2,
                               num_attention_heads=2, common_stride=4, id2label=LABELS,
                               label2id={v: k for k, v in LABELS.items()}, use_pretrained_backbone=False)
    model = Mask2FormerForUniversalSegmentation(config)
    with torch.no_grad():
        # Random heads give every query a near-uniform mask and often the "no object" class;
        # panoptic post-processing keeps none of those. Distinct masks and real classes:
        model.class_predictor.bias[-1] = -10
        embedder = model.model.transformer_module.decoder.mask_predictor.mask_embedder
        [*_, last] = (m for m in embedder.modules() if isinstance(m, torch.nn.Linear))
        last.weight.mul_(50)
    model.save_pretrained(folder)
    Mask2FormerImageProcessor(size={"shortest_edge": 64, "longest_edge": 128},
                              size_divisor=32).save_pretrained(folder)
    return folder


def build_segformer(folder: Path) -> Path:
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessor

    torch.manual_seed(0)
    config = SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16],
                             num_attention_heads=[1, 1], decoder_hidden_size=16, id2label=LABELS,
                             label2id={v: k for k, v in LABELS.items()})
    SegformerForSemanticSegmentation(config).save_pretrained(folder)
    SegformerImageProcessor(size={"height": 64, "width": 64}).save_pretrained(folder)
    return folder


def build_sam(folder: Path) -> Path:
    from transformers import (
        SamConfig,
        SamImageProcessor,
        SamMaskDecoderConfig,
        SamModel,
        SamProcessor,
        SamPromptEncoderConfig,
        SamVisionConfig,
    )

    torch.manual_seed(0)
    vision = SamVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=64, image_size=128, patch_size=16, output_channels=16,
                             window_size=4, global_attn_indexes=[1], mlp_dim=64, num_pos_feats=8)
    config = SamConfig(vision_config=vision,
                       prompt_encoder_config=SamPromptEncoderConfig(hidden_size=16, image_size=128,
                                                                    patch_size=16, mask_input_channels=4),
                       mask_decoder_config=SamMaskDecoderConfig(hidden_size=16, num_hidden_layers=2,
                                                                num_attention_heads=2, mlp_dim=32,
                                                                iou_head_hidden_dim=16))
    SamModel(config).save_pretrained(folder)
    SamProcessor(SamImageProcessor(size={"longest_edge": 128},
                                   pad_size={"height": 128, "width": 128})).save_pretrained(folder)
    return folder


def build_detr(folder: Path) -> Path:
    from transformers import DetrConfig, DetrForSegmentation, DetrImageProcessor, ResNetConfig

    torch.manual_seed(0)
    backbone = ResNetConfig(embedding_size=8, hidden_sizes=[8, 8, 16, 16], depths=[1, 1, 1, 1],
                            out_features=["stage1", "stage2", "stage3", "stage4"])
    config = DetrConfig(use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False,
                        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=8,
                        decoder_attention_heads=8, encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=8,
                        id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    model = DetrForSegmentation(config)
    with torch.no_grad():  # as for Mask2Former: real classes and decisive masks
        model.detr.class_labels_classifier.bias[-1] = -10
        model.mask_head.output_conv.weight.mul_(50)
    model.save_pretrained(folder)
    DetrImageProcessor(size={"shortest_edge": 64, "longest_edge": 96},
                       format="coco_panoptic").save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("segmenters")
    return {"mask2former": build_mask2former(root / "mask2former-tiny-coco-instance"),
            "segformer": build_segformer(root / "segformer-tiny"),
            "sam": build_sam(root / "sam-tiny"),
            "detr": build_detr(root / "detr-tiny-panoptic")}


@pytest.fixture(scope="session")
def images() -> list[Image.Image]:
    return [Image.open(EXAMPLES / f"{name}.jpg").convert("RGB") for name in ("cat", "coffee")]


def reference(folder: Path, image: Image.Image, auto_class: str):
    """The checkpoint through transformers alone: its processor, its model, its outputs."""
    import transformers

    processor = transformers.AutoProcessor.from_pretrained(folder)
    model = getattr(transformers, auto_class).from_pretrained(folder).eval()
    with torch.no_grad():
        return processor, model(**processor(images=[image], return_tensors="pt"))


def as_regions(result: dict) -> list[tuple]:
    """(label, score, mask) of the processor's segments, best first, empty masks left out."""
    segmentation = result["segmentation"]
    out = []
    for index, segment in enumerate(result["segments_info"]):
        mask = (segmentation[index] if segmentation.dim() == 3 else segmentation == segment["id"]).bool()
        if mask.any():
            out.append((LABELS[segment["label_id"]], segment["score"], mask.numpy()))
    return sorted(out, key=lambda found: -found[1])


@pytest.mark.parametrize("task, options", [("instance", SegmentOptions(threshold=0.0)),
                                           ("panoptic", SegmentOptions(threshold=0.0, mask_threshold=0.2))])
def test_mask2former_equals_its_processors_post_processing(checkpoints, images, task, options):
    segmenter = load_segmenter(str(checkpoints["mask2former"]), device="cpu", task=task)
    assert segmenter.kind == "instance" and segmenter.classes == list(LABELS.values())
    found = segmenter.segment(images, options)
    for image, prediction in zip(images, found, strict=True):
        processor, outputs = reference(checkpoints["mask2former"], image,
                                       "AutoModelForUniversalSegmentation")
        kwargs = {"threshold": 0.0, "mask_threshold": options.mask_threshold,
                  "target_sizes": [image.size[::-1]]}
        if task == "instance":
            kwargs["return_binary_maps"] = True
        result = getattr(processor, f"post_process_{task}_segmentation")(outputs, **kwargs)[0]
        expected = as_regions(result)
        assert expected, "the tiny model should find something"
        assert [(r.label, r.score) for r in prediction.regions] == [(e[0], e[1]) for e in expected]
        for r, (_, _, mask) in zip(prediction.regions, expected, strict=True):
            assert np.array_equal(masks.decode(r.mask), mask)
            assert r.box == masks.box(r.mask)


def test_detr_panoptic_equals_its_post_processing(checkpoints, images):
    segmenter = load_segmenter(str(checkpoints["detr"]), device="cpu")
    assert segmenter.task == "panoptic" and segmenter.kind == "instance"
    options = SegmentOptions(threshold=0.0, mask_threshold=0.2)
    prediction = segmenter.segment(images[0], options)
    processor, outputs = reference(checkpoints["detr"], images[0], "DetrForSegmentation")
    result = processor.post_process_panoptic_segmentation(outputs, threshold=0.0, mask_threshold=0.2,
                                                          target_sizes=[images[0].size[::-1]])[0]
    expected = as_regions(result)
    assert expected and [(r.label, r.score) for r in prediction.regions] == [e[:2] for e in expected]
    for r, (_, _, mask) in zip(prediction.regions, expected, strict=True):
        assert np.array_equal(masks.decode(r.mask), mask)


def test_the_task_is_read_from_the_checkpoint_name(checkpoints):
    assert load_segmenter(str(checkpoints["mask2former"]), device="cpu").task == "instance"
    semantic = load_segmenter(str(checkpoints["mask2former"]), device="cpu", task="semantic")
    assert semantic.kind == "semantic"
    with pytest.raises(OptionError, match="--task"):
        load_segmenter(str(checkpoints["mask2former"]), task="everything")


def test_mask2former_semantic_equals_its_post_processing(checkpoints, images):
    segmenter = load_segmenter(str(checkpoints["mask2former"]), device="cpu", task="semantic")
    prediction = segmenter.segment(images[0])
    processor, outputs = reference(checkpoints["mask2former"], images[0],
                                   "AutoModelForUniversalSegmentation")
    expected = processor.post_process_semantic_segmentation(outputs, target_sizes=[images[0].size[::-1]])[0]
    rebuilt = masks.label_map(prediction.regions, images[0].size, segmenter.classes)
    assert np.array_equal(rebuilt, expected.numpy())


def test_segformer_equals_its_post_processing(checkpoints, images):
    segmenter = load_segmenter(str(checkpoints["segformer"]), device="cpu")
    assert segmenter.kind == "semantic" and segmenter.label_map_classes == ["person", "cat", "cup"]
    found = segmenter.segment(images)
    for image, prediction in zip(images, found, strict=True):
        processor, outputs = reference(checkpoints["segformer"], image,
                                       "AutoModelForSemanticSegmentation")
        expected = processor.post_process_semantic_segmentation(outputs, target_sizes=[image.size[::-1]])[0]
        assert len(prediction.regions) >= 2
        assert np.array_equal(masks.label_map(prediction.regions, image.size, segmenter.classes),
                              expected.numpy())


def sam_reference(folder: Path, image: Image.Image, boxes: list[list[float]]) -> np.ndarray:
    from transformers import SamModel, SamProcessor

    processor = SamProcessor.from_pretrained(folder)
    model = SamModel.from_pretrained(folder).eval()
    inputs = processor(images=[image], input_boxes=[boxes], return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs, multimask_output=False)
    return processor.post_process_masks(outputs.pred_masks, inputs["original_sizes"],
                                        inputs["reshaped_input_sizes"])[0][:, 0].numpy()


def test_sam_masks_each_prompt_box_and_keeps_its_span(checkpoints, images):
    sam = load_segmenter(str(checkpoints["sam"]), device="cpu")
    assert sam.kind == "promptable" and sam.input_size == 128
    cat = [Region([40.0, 10.0, 400.0, 290.0], "a cat", 0.8, span=(0, 5), kind="phrase"),
           Region([0.0, 0.0, 120.0, 90.0], "a blanket", None, span=(13, 22), kind="phrase")]
    coffee = [Region([170.0, 20.0, 420.0, 270.0], "cup", 0.78)]
    found = sam.segment(images, prompts=[cat, coffee])
    for image, prompts, prediction in zip(images, [cat, coffee], found, strict=True):
        expected = sam_reference(checkpoints["sam"], image, [r.box for r in prompts])
        assert [(r.box, r.label, r.score, r.span, r.kind) for r in prediction.regions] == \
            [(r.box, r.label, r.score, r.span, r.kind) for r in prompts]
        for r, mask in zip(prediction.regions, expected, strict=True):
            assert r.mask["size"] == [image.height, image.width]
            ours = masks.decode(r.mask)
            assert ours.any() and (ours == mask).mean() > 0.999  # batched embeddings: float noise
    alone = sam.segment(images[1], prompts=[coffee])
    assert np.array_equal(masks.decode(alone.regions[0].mask),
                          sam_reference(checkpoints["sam"], images[1], [coffee[0].box])[0])
    assert sam.segment(images, prompts=[[], []]) == [Prediction(), Prediction()]
    # the file was twice the size: prompts are read, and masks made, at the file's size
    half = images[1].resize((images[1].width // 2, images[1].height // 2))
    bigger = sam.segment(half, prompts=[coffee], sizes=images[1].size).regions[0]
    assert bigger.mask["size"] == [images[1].height, images[1].width] and bigger.box == coffee[0].box
    with pytest.raises(OptionError, match="masks the boxes it is given"):
        sam.segment(images[0])


def test_a_grounded_caption_gets_a_mask_per_phrase(checkpoints, images):
    sam = load_segmenter(str(checkpoints["sam"]), device="cpu")
    caption = Prediction("a cat on a blanket", {"candidates": []}, [
        Region([40.0, 10.0, 400.0, 290.0], "a cat", None, span=(0, 5), kind="phrase"),
        Region([0.0, 100.0, 451.0, 300.0], "a blanket", None, span=(9, 18), kind="phrase")])
    [combined] = add_masks([caption], images[:1], sam)
    assert combined.text == caption.text and combined.extras == caption.extras
    assert [(r.label, r.span, r.kind) for r in combined.regions] == [
        ("a cat", (0, 5), "phrase"), ("a blanket", (9, 18), "phrase")]
    assert all(r.mask is not None for r in combined.regions)


def test_an_instance_segmenter_adds_its_regions_after_the_captions(checkpoints, images):
    segmenter = load_segmenter(str(checkpoints["mask2former"]), device="cpu")
    caption = Prediction("a cat", regions=[Region([1.0, 2.0, 3.0, 4.0], "a cat", kind="phrase")])
    [combined] = add_masks([caption], images[:1], segmenter, SegmentOptions(threshold=0.0))
    assert combined.text == "a cat" and combined.regions[0] == caption.regions[0]
    assert len(combined.regions) > 1 and all(r.kind == "instance" for r in combined.regions[1:])


def test_checkpoints_that_are_not_segmenters_say_so(tmp_path):
    (tmp_path / "blip").mkdir()
    (tmp_path / "blip" / "config.json").write_text(json.dumps({"model_type": "blip"}))
    with pytest.raises(ModelNotFoundError, match="model type 'blip' is not a segmentation model"):
        load_segmenter(str(tmp_path / "blip"))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_segmenter(str(tmp_path / "nothing"))


def test_kosmos2_with_sam_through_the_cli_masks_each_grounded_phrase(checkpoints, images, tmp_path,
                                                                    monkeypatch):
    """`caption --model kosmos-2 --segment sam`: the caption's phrase gets SAM's mask, with its span."""
    import tiny
    from transformers import AutoTokenizer, Kosmos2ForConditionalGeneration
    from typer.testing import CliRunner

    from captionkit.cli import app

    kosmos = tiny.build_kosmos2(tmp_path / "kosmos2")
    tokenizer = AutoTokenizer.from_pretrained(kosmos)
    # A random model seldom writes grounding tokens: bias its own greedy steps to ground "a cat"
    # to the whole image (patches 0 and 1023), then stop.
    chain = tokenizer.convert_tokens_to_ids(["▁of", "<phrase>", "▁a", "▁cat", "</phrase>", "<object>",
                                             "<patch_index_0000>", "<patch_index_1023>", "</object>"])
    bias = {pair: 1e4 for pair in zip(chain, [*chain[1:], tokenizer.eos_token_id], strict=True)}
    generate = Kosmos2ForConditionalGeneration.generate
    monkeypatch.setattr(Kosmos2ForConditionalGeneration, "generate",
                        lambda self, **kwargs: generate(self, **kwargs, sequence_bias=bias))
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "cat.jpg").write_bytes((EXAMPLES / "cat.jpg").read_bytes())
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [
        "caption", str(photos), "--model", str(kosmos), "--segment", str(checkpoints["sam"]),
        "-o", str(out), "-f", "jsonl", "--full-decode", "--max-new-tokens", "12", "--device", "cpu",
        "--dtype", "float32", "-q"])
    assert result.exit_code == 0, result.output
    row = json.loads((out / "captions.jsonl").read_text())
    [region] = row["regions"]
    start, end = region["span"]
    assert (row["caption"][start:end], region["label"], region["kind"]) == ("a cat", "a cat", "phrase")
    width, height = images[0].size
    # Kosmos-2 reads patch indices as the centres of a 32 x 32 grid's cells
    assert region["box"] == pytest.approx([width / 64, height / 64, width * 63 / 64, height * 63 / 64],
                                          abs=0.5)
    expected = sam_reference(checkpoints["sam"], images[0], [region["box"]])[0]
    assert region["mask"]["size"] == [height, width]
    ours = masks.decode(region["mask"])
    assert ours.any() and (ours == expected).mean() > 0.999  # the stored box is rounded to 0.01 px
