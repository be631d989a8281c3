"""torchvision segmenters against torchvision itself: random-weight models saved where the torch
hub cache keeps the real weights, loaded through `load_segmenter` as users load them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

from captionkit.errors import ModelUnavailableError, OptionError
from captionkit.exporters import ExportOptions
from captionkit.options import GenerationOptions
from captionkit.segment import SegmentOptions, export, labelmaps, load_segmenter, masks
from captionkit.segment import torchvision_models as tvm
from captionkit.segment.captioner import SegmentingCaptioner
from captionkit.store import Result

EXAMPLES = Path(__file__).parent.parent / "examples" / "images"
SIDE = 160  # input size: small, so the full-size architectures run fast


def seeded(builder: str, **kwargs) -> dict:
    """A random-weight model's state dict, the same in every session."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(builder, weights=None, weights_backbone=None, **kwargs)
    return model.state_dict()


@pytest.fixture(scope="session")
def hub_dir(tmp_path_factory):
    """A torch hub cache holding random weights under the real weights' file names."""
    previous = torch.hub.get_dir()
    folder = tmp_path_factory.mktemp("torch-hub")
    torch.hub.set_dir(str(folder))
    v1 = seeded("maskrcnn_resnet50_fpn", num_classes=91)
    # trained Mask R-CNN v1 freezes its batch norms, which keep no batch count
    v1 = {k: v for k, v in v1.items() if not k.endswith("num_batches_tracked")}
    files = {"maskrcnn_resnet50_fpn": v1,
             "lraspp_mobilenet_v3_large": seeded("lraspp_mobilenet_v3_large", num_classes=21),
             "deeplabv3_mobilenet_v3_large": seeded("deeplabv3_mobilenet_v3_large", num_classes=21,
                                                    aux_loss=True)}
    for builder, state in files.items():
        path = tvm.weights_file(torchvision.models.get_model_weights(builder).DEFAULT)
        path.parent.mkdir(parents=True, exist_ok=True)
        # the Mask R-CNN file in torch's pre-zip format, as torchvision's 2019 weights are
        torch.save(state, path, _use_new_zipfile_serialization=builder != "maskrcnn_resnet50_fpn")
    yield folder
    torch.hub.set_dir(previous)


@pytest.fixture(scope="session")
def images() -> list[Image.Image]:
    """Two photos of one size (a batch) and one of another."""
    cat = Image.open(EXAMPLES / "cat.jpg").convert("RGB").resize((192, 128))
    astronaut = Image.open(EXAMPLES / "astronaut.jpg").convert("RGB").resize((192, 128))
    coffee = Image.open(EXAMPLES / "coffee.jpg").convert("RGB").resize((150, 100))
    return [cat, astronaut, coffee]


def reference_instances(builder: str, batches: list[list[Image.Image]], threshold: float,
                        count: int) -> list[dict]:
    """torchvision's own Mask R-CNN forward and post-processing, a call per batch."""
    weights = torchvision.models.get_model_weights(builder).DEFAULT
    model = torchvision.models.get_model(builder, weights=weights, min_size=SIDE,
                                         max_size=round(SIDE * 1333 / 800), box_score_thresh=threshold,
                                         box_detections_per_img=count).eval()
    transform = weights.transforms()
    with torch.no_grad():
        return [output for batch in batches for output in model([transform(i) for i in batch])]


@pytest.mark.parametrize("name", ["maskrcnn", pytest.param("maskrcnn-v2", marks=pytest.mark.slow)])
def test_mask_rcnn_equals_torchvision(hub_dir, images, name):
    if name == "maskrcnn-v2":
        state = seeded("maskrcnn_resnet50_fpn_v2", num_classes=91)
        torch.save(state, tvm.weights_file(torchvision.models.get_model_weights(
            "maskrcnn_resnet50_fpn_v2").DEFAULT))
    builder = {"maskrcnn": "maskrcnn_resnet50_fpn", "maskrcnn-v2": "maskrcnn_resnet50_fpn_v2"}[name]
    segmenter = load_segmenter(name, device="cpu", input_size=SIDE)
    assert segmenter.kind == "instance" and segmenter.classes[1] == "person"
    options = SegmentOptions(threshold=0.3, max_instances=8)
    found = segmenter.segment(images, options)
    expected = reference_instances(builder, [images[:2], images[2:]], 0.3, 8)  # same sizes batched
    categories = torchvision.models.get_model_weights(builder).DEFAULT.meta["categories"]
    assert sum(len(p.regions) for p in found) > 3  # random weights still find things
    for image, prediction, output in zip(images, found, expected, strict=True):
        regions = prediction.regions
        assert [r.box for r in regions] == output["boxes"].tolist()
        assert [r.score for r in regions] == output["scores"].tolist()
        assert [r.label for r in regions] == [categories[i] for i in output["labels"]]
        for r, soft in zip(regions, output["masks"][:, 0], strict=True):
            assert r.mask["size"] == [image.height, image.width]
            assert np.array_equal(masks.decode(r.mask), (soft > 0.5).numpy())


def test_masks_of_an_image_decoded_smaller_are_upsampled_soft(hub_dir, images):
    """Given the file's size, torchvision's soft masks are upsampled before thresholding and the
    boxes scaled: what the pipeline gets for a drafted JPEG."""
    segmenter = load_segmenter("maskrcnn", device="cpu", input_size=SIDE)
    small = images[0]
    size = (small.width * 2, small.height * 2)
    options = SegmentOptions(threshold=0.3, max_instances=4)
    regions = segmenter.segment(small, options, sizes=size).regions
    [output] = reference_instances("maskrcnn_resnet50_fpn", [[small]], 0.3, 4)
    assert np.array([r.box for r in regions]) == pytest.approx((output["boxes"] * 2).numpy())
    upsampled = F.interpolate(output["masks"], size=size[::-1], mode="bilinear", align_corners=False)
    assert regions and all(r.mask["size"] == [size[1], size[0]] for r in regions)
    for r, soft in zip(regions, upsampled[:, 0], strict=True):
        assert np.array_equal(masks.decode(r.mask), (soft > 0.5).numpy())


def test_builder_names_and_aliases_load_the_same_model(hub_dir):
    segmenter = load_segmenter("maskrcnn_resnet50_fpn", device="cpu", input_size=SIDE)
    assert segmenter.model_id == "maskrcnn" and segmenter.input_size == SIDE


@pytest.mark.parametrize("name, builder", [("lraspp-mobilenet", "lraspp_mobilenet_v3_large"),
                                           ("deeplabv3-mobilenet", "deeplabv3_mobilenet_v3_large")])
def test_semantic_models_equal_torchvision(hub_dir, images, name, builder):
    segmenter = load_segmenter(name, device="cpu", input_size=SIDE)
    assert segmenter.kind == "semantic" and len(segmenter.classes) == 21
    found = segmenter.segment(images)
    weights = torchvision.models.get_model_weights(builder).DEFAULT
    reference = torchvision.models.get_model(builder, weights=weights).eval()
    transform = weights.transforms(resize_size=SIDE)
    classes = weights.meta["categories"]
    for image, prediction in zip(images, found, strict=True):
        with torch.no_grad():
            logits = reference(transform(image)[None])["out"]
        expected = F.interpolate(logits, size=(image.height, image.width), mode="bilinear",
                                 align_corners=False).argmax(1)[0].numpy()
        rebuilt = masks.label_map(prediction.regions, image.size, classes)
        assert np.array_equal(rebuilt, expected)
        assert all(r.kind == "semantic" and r.score is None for r in prediction.regions)
    assert {r.label for p in found for r in p.regions} - {"__background__"}


def test_classes_filter_keeps_only_those_classes(hub_dir, images):
    segmenter = load_segmenter("lraspp-mobilenet", device="cpu", input_size=SIDE)
    every = segmenter.segment(images[0])
    kept = every.regions[0].label
    assert [r.label for r in segmenter.segment(images[0], SegmentOptions(classes=(kept,))).regions] == [kept]
    with pytest.raises(OptionError, match="--classes plane: lraspp-mobilenet has no such class"):
        segmenter.segment(images[0], SegmentOptions(classes=("plane",)))


def test_label_maps_hold_each_segmenters_own_class_ids(hub_dir, images, tmp_path):
    instance = load_segmenter("maskrcnn", device="cpu", input_size=SIDE)
    semantic = load_segmenter("lraspp-mobilenet", device="cpu", input_size=SIDE)
    both = SegmentingCaptioner([instance, semantic], SegmentOptions(threshold=0.0))
    voc = torchvision.models.get_model_weights("lraspp_mobilenet_v3_large").DEFAULT.meta["categories"]
    assert both.label_maps == {"instance": ["background", *instance.output_classes], "semantic": voc}
    assert len(both.label_maps["instance"]) == 81 and "N/A" not in both.label_maps["instance"]
    image = tmp_path / "cat.png"
    images[0].save(image)
    [prediction] = both.caption([images[0]], GenerationOptions())
    result = Result(path=image, name=image.name, status="done", regions=prediction.regions)
    export.write_masks([result], ExportOptions(tmp_path / "out", label_maps=both.label_maps))
    alone = semantic.segment(images[0]).regions
    stored = labelmaps.read(tmp_path / "out" / "masks" / "semantic" / "cat.png")
    assert np.array_equal(stored, masks.label_map(alone, images[0].size, voc))  # VOC's own ids
    assert (tmp_path / "out" / "masks" / "instance" / "classes.json").is_file()


@pytest.fixture
def empty_hub(tmp_path, hub_dir):
    torch.hub.set_dir(str(tmp_path))
    yield tmp_path
    torch.hub.set_dir(str(hub_dir))


def test_uncached_unreachable_weights_say_where_to_put_the_file(empty_hub, monkeypatch):
    def unreachable(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(tvm.socket, "create_connection", unreachable)
    expected = empty_hub / "checkpoints" / "maskrcnn_resnet50_fpn_v2_coco-73cbd019.pth"
    with pytest.raises(ModelUnavailableError) as caught:
        load_segmenter("maskrcnn-v2", device="cpu")
    message = str(caught.value)
    assert "\n" not in message and "download.pytorch.org cannot be reached" in message
    assert "put maskrcnn_resnet50_fpn_v2_coco-73cbd019.pth" in message and str(expected) in message


class Payload:
    """Anything but tensors: unpickling it would run code."""


@pytest.mark.parametrize("content", ["garbage", "code"])
def test_a_cached_file_that_is_not_plain_tensors_is_refused(empty_hub, content):
    weights = torchvision.models.get_model_weights("lraspp_mobilenet_v3_large").DEFAULT
    path = tvm.weights_file(weights)
    path.parent.mkdir(parents=True)
    if content == "garbage":
        path.write_bytes(b"\x00not a checkpoint" * 10)
    else:
        torch.save({"model": Payload()}, path)
    with pytest.raises(ModelUnavailableError, match=f"{path.name} is not a usable weights file .*"
                                                     "delete it and download"):
        load_segmenter("lraspp-mobilenet", device="cpu")
