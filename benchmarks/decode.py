"""A 12-megapixel JPEG to a 384 px model input: full decode + resize against captionkit's decoder.

Four ways, interleaved in one process (the order rotates each run), median ms per image:
  full decode               `Image.open(path).convert("RGB")`, every pixel decoded;
  captionkit decode         `sources.decode(data, name, 384)`: draft (DCT-scaled) decoding;
  full -> model input       full decode, then the BLIP image processor (resize to 384x384,
                            rescale, normalize): what the naive script and transformers' pipeline do;
  captionkit -> model input captionkit's decoder, then the same processor: what captionkit does.
It also reports how far captionkit's model input is from the full path's (mean and max absolute
difference of the normalized pixel values).

    python benchmarks/decode.py --out benchmarks/results/decode.json
    python benchmarks/decode.py --quick
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import images  # noqa: E402

from captionkit import sources  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=384, help="the model's input side")
    parser.add_argument("--images", type=int, default=12, help="12 MP JPEGs to decode")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--work", default=str(common.DEFAULT_WORK))
    parser.add_argument("--quick", action="store_true", help="2 images, 1 run (CI)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    if args.quick:
        args.images, args.runs = 2, 1

    import torch
    from transformers import BlipImageProcessor

    processor = BlipImageProcessor(size={"height": args.size, "width": args.size})
    paths = images.make_folder(Path(args.work) / "images", 2 * args.images)[::2]
    files = [(path.name, path.read_bytes()) for path in paths]

    def full(name: str, data: bytes) -> Image.Image:
        return Image.open(io.BytesIO(data)).convert("RGB")

    def captionkit(name: str, data: bytes) -> Image.Image:
        return sources.decode(data, name, args.size)

    def model_input(decode):
        return lambda name, data: processor(images=decode(name, data), return_tensors="pt").pixel_values

    ways = {"full decode": full, "captionkit decode": captionkit,
            "full -> model input": model_input(full), "captionkit -> model input": model_input(captionkit)}
    for way in ways.values():
        way(*files[0])
    times: dict[str, list[float]] = {name: [] for name in ways}
    for run in range(args.runs):
        names = list(ways)
        for name in names[run % len(names):] + names[:run % len(names)]:
            started = time.perf_counter()
            for file in files:
                ways[name](*file)
            times[name].append((time.perf_counter() - started) / len(files) * 1000)
    ms = {name: common.median(values) for name, values in times.items()}
    differences = [(ways["captionkit -> model input"](*file) - ways["full -> model input"](*file)).abs()
                   for file in files]
    result = {
        "machine": common.machine(torch.device("cpu")),
        "settings": {"images": len(files), "runs": args.runs, "size": args.size,
                     "source": f"{images.BIG_SIZE[0]}x{images.BIG_SIZE[1]} JPEG, quality 90",
                     "captionkit_decoded_size": list(captionkit(*files[0]).size)},
        "ms_per_image": ms,
        "decode_speedup": ms["full decode"] / ms["captionkit decode"],
        "model_input_speedup": ms["full -> model input"] / ms["captionkit -> model input"],
        "model_input_mean_abs_difference": float(sum(d.mean() for d in differences) / len(differences)),
        "model_input_max_abs_difference": float(max(d.max() for d in differences)),
    }
    for name, value in ms.items():
        print(f"{name:28s} {value:8.1f} ms/image")
    print(f"decoding {result['decode_speedup']:.1f}x faster; to the model input "
          f"{result['model_input_speedup']:.1f}x faster; model input differs by "
          f"{result['model_input_mean_abs_difference']:.4f} on average "
          f"(max {result['model_input_max_abs_difference']:.3f}, normalized units)")
    common.save(result, args.out)


if __name__ == "__main__":
    main()
