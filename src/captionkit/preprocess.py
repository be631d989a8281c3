"""Model-ready pixels made in the decoding threads instead of the model's.

A captioner whose image processor only resizes to a fixed size (or its shorter side to a length,
then crops the centre), rescales and normalizes (BLIP, BLIP-2, GIT, ViT-GPT2, Florence-2,
Kosmos-2) declares a `FixedSize` as its `preprocess`, and so does a gate scorer with such a
processor (CLIP). The executor then runs them in each decoding thread, stacks a batch's rows (into
pinned memory for a CUDA model) while the batch before it is predicted, and hands them over on the
images themselves (`attach`), so the predictor still takes decoded images and any engine that
does not attach pixels gets the processor's path.
"""

from __future__ import annotations

import contextlib
import io
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from captionkit import sources

PIXELS = "captionkit.pixels"
"""`Image.info` key of a decoded image whose model inputs were made in a decoding thread."""
PROBE_SIZES = ((97, 61), (389, 517))
"""Probe images (width, height) that `FixedSize.of` compares with the processor: one enlarged and
wide, one shrunk and tall, so a mismatch in either direction of the resize, or in which side is
the shorter, shows."""

_PINNING = threading.Lock()
_STREAMS = threading.local()


@dataclass(frozen=True)
class FixedSize:
    """A fixed-size image processor's resize (and centre crop), rescale and normalize, with the
    processor's own torchvision operations in its order, so the pixels are bit-identical to the
    processor's."""

    height: int
    width: int
    """The model input's size."""
    interpolation: str
    """torchvision's InterpolationMode value: "bilinear" or "bicubic"."""
    mean: tuple[float, ...]
    """Per channel, in the 0-255 units of the uint8 image (the processor folds the rescale in)."""
    std: tuple[float, ...]
    shortest_edge: int | None = None
    """When set, the resize takes the shorter side to this length, keeping the aspect ratio, and
    the centre height x width is cropped from it (GIT's and CLIP's processors); None: the resize
    goes straight to height x width."""
    _constants: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, image_processor) -> FixedSize | None:
        """The processor's steps when they are only these and `FixedSize` reproduces its output
        exactly on the probe images; None for any other processor (it keeps its own path)."""
        try:
            from torchvision.transforms.v2 import functional  # noqa: F401
        except ImportError:
            return None
        spec = cls._declared(image_processor)
        if spec is None or not all(spec._matches(image_processor, _probe(size, seed))
                                   for seed, size in enumerate(PROBE_SIZES)):
            return None
        return spec

    @classmethod
    def _declared(cls, processor) -> FixedSize | None:
        """What the processor's settings ask for, when they ask for nothing else."""
        steps = [getattr(processor, name, False) for name in ("do_resize", "do_rescale", "do_normalize")]
        interpolation = _interpolation(getattr(processor, "resample", None))
        shape = _output_shape(processor)
        if not (all(steps) and interpolation and shape) or getattr(processor, "do_pad", False):
            return None
        # the processor's own fold of the rescale into mean and std, in float32
        scale = 1.0 / processor.rescale_factor
        mean = torch.tensor(_per_channel(processor.image_mean)) * scale
        std = torch.tensor(_per_channel(processor.image_std)) * scale
        return cls(*shape[:2], interpolation, tuple(mean.tolist()), tuple(std.tolist()), shape[2])

    def _matches(self, processor, probe: Image.Image) -> bool:
        expected = processor(images=[probe], return_tensors="pt")["pixel_values"]
        return isinstance(expected, torch.Tensor) and torch.equal(self(probe), expected[0])

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """3 x height x width float32 model input of an RGB image, made on the CPU."""
        from torchvision.transforms.v2 import functional

        if image.mode != "RGB":
            raise ValueError(f"FixedSize takes RGB images, not {image.mode}")
        # pil_to_tensor gives C x H x W strided over H x W x C memory: the uint8 resize reads that
        # layout directly, where the processor's contiguous copy first costs a conversion back
        return self.resized(functional.pil_to_tensor(image))

    def resized(self, pixels: torch.Tensor) -> torch.Tensor:
        """The model input of a uint8 C x H x W image on any device."""
        from torchvision.transforms.v2 import InterpolationMode, functional

        interpolation = InterpolationMode(self.interpolation)
        if self.shortest_edge is None:
            resized = functional.resize(pixels, [self.height, self.width], interpolation=interpolation,
                                        antialias=True)
        else:
            size = shorter_side_to(*pixels.shape[-2:], self.shortest_edge)
            resized = centre(functional.resize(pixels, list(size), interpolation=interpolation,
                                               antialias=True), self.height, self.width)
        floats = resized.to(torch.float32, memory_format=torch.contiguous_format)
        mean, std = self._on(floats.device)
        return functional.normalize(floats, mean, std, inplace=True)

    def from_jpeg(self, data: bytes, device: torch.device) -> torch.Tensor:
        """The model input of a JPEG file decoded on a CUDA device (nvJPEG); raises RuntimeError for a
        file nvJPEG cannot decode. Not the CPU's pixels: libjpeg and nvJPEG round differently."""
        from torchvision.io import ImageReadMode, decode_jpeg

        encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        with finished_on_own_stream(device):
            return self.resized(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device))

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std as tensors on `device`, made once per device."""
        if device not in self._constants:
            made = (torch.tensor(self.mean, device=device), torch.tensor(self.std, device=device))
            if device.type == "cuda":  # complete before another thread can find them
                torch.cuda.current_stream(device).synchronize()
            self._constants[device] = made
        return self._constants[device]


def shorter_side_to(height: int, width: int, edge: int) -> tuple[int, int]:
    """(height, width) with the shorter side at `edge` and the longer one scaled and truncated, as
    transformers' processors (and torchvision) compute it."""
    if width <= height:
        return int(edge * height / width), edge
    return edge, int(edge * width / height)


def centre(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The centre height x width of a C x H x W image at least that big, offsets truncated as
    transformers' processors do (torchvision's own centre crop rounds them)."""
    top = int((pixels.shape[-2] - height) / 2.0)
    left = int((pixels.shape[-1] - width) / 2.0)
    return pixels[..., top:top + height, left:left + width]


def _output_shape(processor) -> tuple[int, int, int | None] | None:
    """(height, width, shortest edge or None) of the processor's fixed output; None when its size
    depends on the image: a shorter side without a crop, or a crop needing padding."""
    size = _sides(getattr(processor, "size", None))
    cropped = getattr(processor, "do_center_crop", False)
    crop = _sides(getattr(processor, "crop_size", None)) if cropped else {}
    to_crop = (crop.get("height"), crop.get("width"))
    if size["longest_edge"]:
        return None
    if size["shortest_edge"] and not size["height"]:
        edge = int(size["shortest_edge"])
        if all(to_crop) and max(to_crop) <= edge:
            return int(to_crop[0]), int(to_crop[1]), edge
        return None
    fixed = (size["height"], size["width"])
    if all(fixed) and (not cropped or to_crop == fixed):  # a crop to the resized size keeps it all
        return int(fixed[0]), int(fixed[1]), None
    return None


def _sides(size) -> dict:
    """A processor's size or crop size (a dict, or transformers' SizeDict) as a plain dict."""
    get = size.get if isinstance(size, dict) else lambda key: getattr(size, key, None)
    return {key: get(key) for key in ("height", "width", "shortest_edge", "longest_edge")}


def _interpolation(resample) -> str | None:
    """"bilinear" or "bicubic" for PIL's resampling numbers (or torchvision's modes); None for others."""
    value = getattr(resample, "value", resample)
    named = {2: "bilinear", 3: "bicubic"}.get(value, value) if isinstance(value, int) else value
    return named if named in ("bilinear", "bicubic") else None


def _per_channel(values) -> list[float]:
    return [float(v) for v in values] if isinstance(values, list | tuple) else [float(values)] * 3


def _probe(size: tuple[int, int], seed: int) -> Image.Image:
    """A deterministic RGB image with gradients and noise: every resize weight shows in it."""
    width, height = size
    rng = np.random.default_rng(seed)
    ramp = np.add.outer(np.arange(height) * 255 // height, np.arange(width) * 255 // width) // 2
    noise = rng.integers(0, 64, (height, width, 3))
    return Image.fromarray(((ramp[..., None] + noise) % 256).astype(np.uint8), "RGB")


@contextlib.contextmanager
def finished_on_own_stream(device: torch.device) -> Iterator[None]:
    """Run the block's CUDA work on a stream of this thread's own, and wait for it to finish.

    The model's thread then reads the results on its stream with no event to wait for, and the
    decoding threads never launch onto the default stream, whose implicit synchronization would
    break a CUDA graph the model's thread is capturing.
    """
    if device.type != "cuda":
        yield
        return
    streams = _STREAMS.__dict__.setdefault("by_device", {})
    if device not in streams:
        streams[device] = torch.cuda.Stream(device)
    with torch.cuda.stream(streams[device]):
        yield
    streams[device].synchronize()


def one_torch_thread() -> None:
    """Run the calling thread's torch operations on one intra-op thread (a pool's initializer).

    Under OpenMP the count is per thread, and a thread that calls torch at the default count starts
    a team of its own: one per decoding thread, all spinning beside the model's. But
    `torch.set_num_threads` also records the count that threads take on their first parallel
    operation, so a short-lived thread sets that record back for the model's thread and later ones.
    """
    with _PINNING:
        shared = torch.get_num_threads()  # settles this thread's count, so the record no longer applies
        torch.set_num_threads(1)
        restore = threading.Thread(target=torch.set_num_threads, args=(shared,))
        restore.start()
        restore.join()


@dataclass(frozen=True, eq=False)
class _Attached:
    """A row of a stacked batch, made for one image object."""

    batch: torch.Tensor
    index: int
    image: weakref.ref


def stacked(rows: list[torch.Tensor], pin: bool) -> torch.Tensor:
    """One batch tensor of same-shaped rows: on the GPU when any row is there (nvJPEG's), else in
    page-locked memory when `pin`, so the copy to the GPU can run without blocking the host."""
    on_gpu = next((row.device for row in rows if row.is_cuda), None)
    if on_gpu is not None:
        with finished_on_own_stream(on_gpu):
            return torch.stack([row.to(on_gpu) for row in rows])
    out = torch.empty((len(rows), *rows[0].shape), dtype=rows[0].dtype, pin_memory=pin)
    return torch.stack(rows, out=out)


def inputs_of(image: Image.Image, makers: Sequence[Callable]) -> dict[Callable, torch.Tensor]:
    """Each maker's input for `image`, by maker; one that fails is left out, and the processor's own
    path then meets the problem in the batch, which isolates an image that breaks the model."""
    made = {}
    for maker in makers:
        with contextlib.suppress(Exception):
            made[maker] = maker(image)
    return made


def attach_inputs(image: Image.Image, makers: Sequence[Callable]) -> None:
    """Make each maker's input for `image` and hand it over with it, a batch of one row each."""
    for maker, row in inputs_of(image, makers).items():
        attach(image, maker, row[None], 0)


def attach(image: Image.Image, made_by: object, batch: torch.Tensor, index: int) -> None:
    """Hand row `index` of `batch` over with `image`, as made by the preprocessing `made_by`; an
    image carries one row per preprocessing (the captioner's, the gate scorer's)."""
    rows = image.info.get(PIXELS)
    earlier = rows if isinstance(rows, dict) else {}
    # a new dict: images derived from this one share its info's values, not its rows
    image.info[PIXELS] = {**earlier, made_by: _Attached(batch, index, weakref.ref(image))}


def gathered(images: list[Image.Image], made_by: object) -> torch.Tensor | None:
    """The batch's model inputs when every image carries a row `made_by` made for that very image
    (Pillow copies `info` into images derived from it, such as crops: those do not count); else
    None. Consecutive rows of one stacked batch are returned as a view, without copying."""
    rows: list[_Attached] = []
    for image in images:
        attached = image.info.get(PIXELS)
        row = attached.get(made_by) if isinstance(attached, dict) else None
        if not isinstance(row, _Attached) or row.image() is not image:
            return None
        rows.append(row)
    first = rows[0]
    if all(row.batch is first.batch and row.index == first.index + offset
           for offset, row in enumerate(rows)):
        return first.batch[first.index:first.index + len(rows)]
    return torch.stack([row.batch[row.index] for row in rows])


def jpeg_header(data: bytes, max_pixels: int) -> Image.Image | None:
    """The file opened but not decoded, when nvJPEG can give the pixels `sources.decode` would
    orient and convert the same way: an upright RGB or grayscale JPEG within `max_pixels`.
    None sends the file to the CPU path. The image decodes itself if its pixels are ever read."""
    try:
        image = Image.open(io.BytesIO(data), formats=["JPEG", "MPO"])
        upright = image.getexif().get(0x0112, 1) == 1
    except Exception:  # noqa: BLE001 - anything odd about the file: the CPU path says what
        return None
    width, height = image.size
    if image.mode not in ("RGB", "L") or not upright or width * height > max_pixels:
        return None
    image.info[sources.FULL_SIZE] = image.size
    return image
