"""Feeding the model: files to model-ready tensors, and whole runs with the inputs made each way.

  files     read, decode, resize and normalize, image by image on one core (one Python thread,
            one torch thread), in images/s per core of CPU time:
              today    `sources.decode`, then BLIP's processor on batches (what the model's thread
                       runs when the inputs are made there);
              threads  `sources.decode`, then `FixedSize` per image and the batch stacked (what the
                       decoding threads and the stacking thread run now);
              nvjpeg   with --device cuda: `FixedSize.from_jpeg`, decoded and resized on the GPU.
            Beside them, the JPEG decoders this machine has, each decoding to at least the
            model's side (Pillow's draft as captionkit does, with libjpeg's fastest IDCT, OpenCV's
            reduced decode, simplejpeg when installed; torchvision's full decode): the fastest
            decode alone, over today's whole path, is the most any feeding change gives per core.
            Two sets: 12 MP JPEGs (the throughput harness's) and 0.3-1 MP photos (scikit-image's and
            scikit-learn's photos enlarged, with film grain). The processor's output is the
            reference: the largest difference from it, on the same decoded image and on a full
            decode, is reported.
  pipeline  `captionkit caption` on the throughput harness's images (half 12 MP JPEGs), with:
              today    the inputs made by the processor on the model's thread;
              threads  the inputs made in the decoding threads (the default);
              nvjpeg   JPEGs decoded with nvJPEG (CUDA only);
              graphs   the decoder's steps from a static cache, in CUDA graphs (CUDA; BLIP, BLIP-2);
            joined with + (nvjpeg+graphs). Contenders run interleaved, the order rotating; each
            gets images/s and images per CPU second (all the process's threads: per core), and
            its captions are compared with today's. --no-model skips generate: the feeding rate
            of the real executor. On CUDA the GPU's utilization is sampled during each run.

    python benchmarks/feed.py files --out benchmarks/results/feed-files.json
    python benchmarks/feed.py pipeline --images 16 --out benchmarks/results/feed-blip-base.json
    python benchmarks/feed.py files --quick
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import images  # noqa: E402
import models  # noqa: E402

from captionkit import preprocess, sources  # noqa: E402
from captionkit.pipeline import Pipeline, RunOptions  # noqa: E402

PHOTO_SIZES = ((720, 480), (800, 600), (1024, 768), (1152, 864))
"""0.35 to 1 megapixel: phone pictures as shared, screenshots, scans."""
QUICK_THUMBNAIL = 48
CUDA_ONLY = ("nvjpeg", "graphs")


def photo_folder(folder: Path, count: int) -> list[Path]:
    """`count` 0.3-1 MP JPEGs made from the bundled photos (cropped to each size's shape, enlarged,
    grain added); files already there are reused."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{index:03d}-{images.NAMES[index % len(images.NAMES)]}.jpg" for index in range(count)]
    missing = [path for path in paths if not path.exists()]
    if missing:
        found = dict(images.photos())
        for index, path in enumerate(paths):
            if path in missing:
                source = found[images.NAMES[index % len(images.NAMES)]]
                photo = source if isinstance(source, Image.Image) else Image.open(source).convert("RGB")
                size = PHOTO_SIZES[index % len(PHOTO_SIZES)]
                images.grain(_fitted(photo, size), index).save(path, quality=90)
    return paths


def _fitted(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The image's centre cropped to `size`'s aspect ratio, resized to `size`."""
    width, height = image.size
    crop_w, crop_h = min(width, height * size[0] // size[1]), min(height, width * size[1] // size[0])
    left, top = (width - crop_w) // 2, (height - crop_h) // 2
    return image.crop((left, top, left + crop_w, top + crop_h)).resize(size, Image.BICUBIC)


class Ways:
    """The ways from file to batch, sharing one BLIP processor and its `FixedSize`."""

    def __init__(self, side: int, batch: int, device: torch.device) -> None:
        from transformers import BlipImageProcessor

        self.side, self.batch, self.device = side, batch, device
        self.processor = BlipImageProcessor(size={"height": side, "width": side})
        spec = preprocess.FixedSize.of(self.processor)
        if spec is None:
            raise SystemExit("FixedSize does not reproduce this transformers' BLIP processor")
        self.spec = spec

    def names(self) -> list[str]:
        return ["decode", "today", "threads", *(["nvjpeg"] if self.device.type == "cuda" else [])]

    def run(self, name: str, paths: list[Path]) -> list:
        """The batches of model inputs for `paths`, made the way `name` says (decode: the decoded
        images alone, the part today's and the threads' ways share)."""
        if name == "decode":
            return [self.decode(path) for path in paths]
        if name == "today":
            decoded = [self.decode(path) for path in paths]
            return [self.processor(images=part, return_tensors="pt")["pixel_values"]
                    for part in _chunks(decoded, self.batch)]
        if name == "threads":
            rows = [self.spec(self.decode(path)) for path in paths]
            return [preprocess.stacked(part, pin=self.device.type == "cuda")
                    for part in _chunks(rows, self.batch)]
        rows = [self.spec.from_jpeg(sources.read_bytes(path), self.device) for path in paths]
        batches = [preprocess.stacked(part, pin=False) for part in _chunks(rows, self.batch)]
        torch.cuda.synchronize(self.device)
        return batches

    def decode(self, path: Path, full: bool = False) -> Image.Image:
        return sources.decode(sources.read_bytes(path), path.name, None if full else self.side)

    def differences(self, name: str, paths: list[Path]) -> dict:
        """Largest and mean absolute difference of `name`'s inputs from the processor's, on the same
        decoded image (the draft captionkit decodes) and on a full decode (what a plain script does)."""
        made = torch.cat(self.run(name, paths)).cpu()
        same = self.processor(images=[self.decode(p) for p in paths], return_tensors="pt")["pixel_values"]
        full = self.processor(images=[self.decode(p, full=True) for p in paths],
                              return_tensors="pt")["pixel_values"]
        return {"max_abs_vs_processor_same_decode": float((made - same).abs().max()),
                "max_abs_vs_processor_full_decode": float((made - full).abs().max()),
                "mean_abs_vs_processor_full_decode": float((made - full).abs().mean())}


def _chunks(values: list, size: int) -> list[list]:
    return [values[start:start + size] for start in range(0, len(values), size)]


def files(args: argparse.Namespace) -> dict:
    """Per-core rates of each way on each set, interleaved runs, and the differences."""
    torch.set_num_threads(1)  # per core: the torch work runs in this thread alone
    device = torch.device(args.device)
    ways = Ways(args.size, args.batch, device)
    work = Path(args.work)
    sets = {"12mp": images.make_folder(work / "images", 2 * args.images)[::2],
            "photos": photo_folder(work / "feed-photos", args.images)}
    names = ways.names()
    result: dict = {"machine": common.machine(device), "settings": {
        "images_per_set": args.images, "runs": args.runs, "batch": args.batch, "size": args.size,
        "torch_threads": 1, "sets": {name: _describe(paths) for name, paths in sets.items()}}}
    for set_name, paths in sets.items():
        result[set_name] = _timed_ways(ways, names, paths, args.runs)
        result[set_name]["decoders"] = _timed_decoders(paths, args.size, args.runs,
                                                       result[set_name]["today"])
    for set_name in sets:
        for name, row in result[set_name].items():
            if name == "decoders":
                _print_decoders(set_name, row)
            if name in ("decode", "decoders"):
                continue
            after = (f"after the decode {row['preprocess_ms_per_image']:.2f} ms/image "
                     f"({row['preprocessing_vs_today']:.2f}x today)" if "preprocess_ms_per_image" in row
                     else "decoded on the GPU")
            print(f"{set_name:7s} {name:8s} {row['images_per_second_per_core']:7.1f} images/s per core "
                  f"({row['per_core_vs_today']:.2f}x today; wall {row['wall_vs_today']:.2f}x); {after}; "
                  f"max diff {row['max_abs_vs_processor_same_decode']:.4f} vs the processor on the same "
                  f"decode, {row['max_abs_vs_processor_full_decode']:.3f} vs a full decode")
    return result


def _timed_ways(ways: Ways, names: list[str], paths: list[Path], runs: int) -> dict:
    """Each way's median rate per core and on the wall clock, runs interleaved (order rotating);
    what each adds to the shared decode; its differences from the processor."""
    for name in names:  # warm-up: first calls, page cache
        ways.run(name, paths[:2])
    cpu: dict[str, list[float]] = {name: [] for name in names}
    wall: dict[str, list[float]] = {name: [] for name in names}
    for run in range(runs):
        for name in names[run % len(names):] + names[:run % len(names)]:
            started, started_cpu = time.perf_counter(), time.thread_time()
            ways.run(name, paths)
            cpu[name].append(len(paths) / (time.thread_time() - started_cpu))
            wall[name].append(len(paths) / (time.perf_counter() - started))
    rows = {name: {"images_per_second_per_core": common.median(cpu[name]),
                   "images_per_second_wall": common.median(wall[name]), "runs_per_core": cpu[name]}
            for name in names}
    today, decode = rows["today"], rows["decode"]["images_per_second_per_core"]
    for name, row in rows.items():
        row["per_core_vs_today"] = row["images_per_second_per_core"] / today["images_per_second_per_core"]
        row["wall_vs_today"] = row["images_per_second_wall"] / today["images_per_second_wall"]
        if name not in ("decode", "nvjpeg"):  # nvJPEG does not share the CPU decode
            row["preprocess_ms_per_image"] = 1000 / row["images_per_second_per_core"] - 1000 / decode
        if name != "decode":
            row.update(ways.differences(name, paths))
    for row in rows.values():
        if "preprocess_ms_per_image" in row:
            row["preprocessing_vs_today"] = (today["preprocess_ms_per_image"]
                                             / row["preprocess_ms_per_image"])
    return rows


def decoders(side: int) -> dict[str, Callable[[bytes], object]]:
    """JPEG decoders giving at least `side` pixels on the short side, by name."""
    import cv2
    from torchvision.io import decode_jpeg

    found = {"pillow_draft": lambda data: sources.decode(data, "-", side),
             "pillow_draft_fastest_idct": lambda data: _fastest_draft(data, side),
             "opencv_reduced": lambda data: _opencv_reduced(cv2, data, side),
             "torchvision_full": lambda data: decode_jpeg(torch.frombuffer(bytearray(data),
                                                                            dtype=torch.uint8))}
    try:
        import simplejpeg

        found["simplejpeg"] = lambda data: simplejpeg.decode_jpeg(data, min_width=side, min_height=side)
    except ImportError:
        pass
    return found


def _fastest_draft(data: bytes, side: int) -> Image.Image:
    """Pillow's draft with the flag libjpeg reads as fastest IDCT and plain chroma upsampling."""
    image = Image.open(io.BytesIO(data))
    image.draft("RGB", (side, side))
    image.decoderconfig = (image.decoderconfig[0], 1)
    image.load()
    return image


def _opencv_reduced(cv2, data: bytes, side: int):
    """OpenCV's decode at 1/2, 1/4 or 1/8 scale, the largest keeping the short side >= `side`."""
    shrink = min(Image.open(io.BytesIO(data)).size) // side
    scale = max(s for s in (1, 2, 4, 8) if s <= max(1, shrink))
    flags = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
             8: cv2.IMREAD_REDUCED_COLOR_8}
    return cv2.imdecode(np.frombuffer(data, np.uint8), flags[scale])


def _timed_decoders(paths: list[Path], side: int, runs: int, today: dict) -> dict:
    """Each decoder's median images/s per core on `paths` (runs interleaved, one OpenCV thread),
    and the fastest one's rate over today's whole path."""
    import cv2

    cv2.setNumThreads(1)
    data = [path.read_bytes() for path in paths]
    ways = decoders(side)
    rates: dict[str, list[float]] = {name: [] for name in ways}
    for run in range(runs + 1):  # the first run warms up
        for name, decode in ways.items():
            started = time.thread_time()
            for one in data:
                decode(one)
            if run:
                rates[name].append(len(data) / (time.thread_time() - started))
    rows: dict = {name: common.median(values) for name, values in rates.items()}
    fastest = max(rows, key=rows.get)
    rows["fastest"] = fastest
    rows["fastest_decode_alone_vs_today"] = rows[fastest] / today["images_per_second_per_core"]
    return rows


def _print_decoders(set_name: str, rows: dict) -> None:
    rates = ", ".join(f"{name} {rate:.1f}" for name, rate in rows.items() if isinstance(rate, float)
                      and name != "fastest_decode_alone_vs_today")
    print(f"{set_name:7s} decoders (images/s per core): {rates}; the fastest alone is "
          f"{rows['fastest_decode_alone_vs_today']:.2f}x today's whole path")


def _describe(paths: list[Path]) -> dict:
    sizes = [Image.open(path).size for path in paths]
    megapixels = [w * h / 1e6 for w, h in sizes]
    return {"count": len(paths), "megapixels_min": min(megapixels), "megapixels_max": max(megapixels),
            "mean_file_kb": sum(p.stat().st_size for p in paths) / len(paths) / 1024}


class Utilization:
    """The GPU's utilization (percent, NVML), sampled every 50 ms in a thread while in use."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.samples = device, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self.samples.append(torch.cuda.utilization(self.device))
            except Exception:  # noqa: BLE001 - no NVML (pynvml) here: no figure rather than no run
                return

    def __enter__(self) -> Utilization:
        if self.device.type == "cuda":
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


class Contender:
    """`captionkit caption` on a loaded captioner, with the inputs made one way."""

    def __init__(self, name: str, captioner, work: Path, batch_size: int | None) -> None:
        modes = set(name.split("+"))
        unknown = modes - {"today", "threads", *CUDA_ONLY}
        if unknown:
            raise SystemExit(f"unknown contender {name!r}: join today, threads, nvjpeg, graphs with +")
        self.name, self.captioner, self.out = name, captioner, work / f"out-{name}"
        self.modes, self.batch_size = modes, batch_size
        self.spec = captioner.preprocess

    def __call__(self, paths: list[Path]) -> list[str]:
        captioner = self.captioner
        captioner.preprocess = None if "today" in self.modes else self.spec
        captioner.captured_steps = False
        if "graphs" in self.modes and not captioner.capture_steps():
            raise SystemExit(f"{self.name}: no static-cache steps for {captioner.model_id} on "
                             f"{captioner.device}")
        shutil.rmtree(self.out, ignore_errors=True)
        options = RunOptions(output_dir=self.out, progress=False, batch_size=self.batch_size,
                             gpu_jpeg="nvjpeg" in self.modes)
        summary = Pipeline(captioner, _pinned_generation(), options).run([str(p) for p in paths])
        if summary.failed:
            raise RuntimeError(f"{self.name} failed on {summary.failed}")
        records = [json.loads(line) for line in (self.out / "captions.jsonl").read_text().splitlines()]
        by_path = {record["path"]: record["caption"] for record in records}
        return [by_path[str(path.resolve())] for path in paths]


def _pinned_generation():
    from throughput import pinned_generation

    return pinned_generation()


def _skip_the_model(captioner) -> None:
    """Have `generate` return at once: encode still runs, so what is timed is the feeding."""
    captioner._generate = lambda inputs, options: [["-"]] * len(inputs["pixel_values"])


def pipeline(args: argparse.Namespace) -> dict:
    """Each contender's images/s through the whole pipeline, interleaved runs, captions compared."""
    from captionkit.device import pick_device, pick_dtype
    from captionkit.models import load
    from captionkit.options import LoadOptions

    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    names = args.contenders or ["today", "threads", *(["nvjpeg"] if device.type == "cuda" else [])]
    if device.type != "cuda" and any(mode in CUDA_ONLY for name in names for mode in name.split("+")):
        raise SystemExit(f"{', '.join(CUDA_ONLY)} need --device cuda")
    size = "tiny" if args.quick else "full"
    path = models.build(args.model, Path(args.work) / "models" / f"{args.model}-{size}", quick=args.quick)
    paths = (images.make_folder(Path(args.work) / "images-quick", args.images, thumbnail=QUICK_THUMBNAIL)
             if args.quick else images.make_folder(Path(args.work) / "images", args.images))
    captioner = load(str(path), LoadOptions(device=str(device), dtype=str(dtype).split(".")[1]))
    if captioner.preprocess is None:
        raise SystemExit(f"{args.model}: its processor keeps its own path, nothing to compare")
    if args.no_model:
        _skip_the_model(captioner)
    work = Path(args.work) / "feed-pipeline"
    contenders = {name: Contender(name, captioner, work, args.batch_size) for name in names}
    result: dict = {"machine": common.machine(device), "settings": {
        "model": args.model, "size": size, "dtype": str(dtype).split(".")[1], "images": len(paths),
        "runs": args.runs, "batch_size": args.batch_size, "no_model": args.no_model}}
    seconds, cpu, captions, busy = ({name: [] for name in names} for _ in range(4))
    for name in names:
        contenders[name](paths[:args.warmup])  # first batches: compilation, CUDA graphs, page cache
    for run in range(args.runs):
        for name in names[run % len(names):] + names[:run % len(names)]:
            with Utilization(device) as utilization:
                took, took_cpu, texts = _timed(contenders[name], paths, device)
            seconds[name].append(took)
            cpu[name].append(took_cpu)
            captions[name].append(texts)
            busy[name].append(utilization.mean())
            print(f"run {run + 1}/{args.runs} {name:14s} {len(paths) / took:8.2f} images/s", flush=True)
    result["contenders"] = _rows(names, paths, seconds, cpu, captions, busy)
    if args.compare_to:
        _agreement(result["contenders"], captions, paths, Path(args.compare_to))
    result["captions"] = {"files": [p.name for p in paths], **{n: captions[n][0] for n in names}}
    for name, row in result["contenders"].items():
        gpu = f", GPU busy {row['gpu_utilization']:.0f}%" if row["gpu_utilization"] is not None else ""
        print(f"{name:14s} {row['images_per_second']:8.2f} images/s, {row['vs_today']:.2f}x today "
              f"({row['per_cpu_second_vs_today']:.2f}x per CPU second), captions identical to "
              f"today's: {row['identical_to_today']:.0%}{gpu}")
    return result


def _timed(contender: Contender, paths: list[Path], device: torch.device) -> tuple[float, float, list[str]]:
    """Wall seconds, CPU seconds of every thread of the process, and the captions."""
    common.synchronize(device)
    started, started_cpu = time.perf_counter(), time.process_time()
    texts = contender(paths)
    common.synchronize(device)
    return time.perf_counter() - started, time.process_time() - started_cpu, texts


def _rows(names: list[str], paths: list[Path], seconds: dict, cpu: dict, captions: dict,
          busy: dict) -> dict:
    reference = captions["today"][0] if "today" in captions else captions[names[0]][0]
    rows = {}
    for name in names:
        rates = [len(paths) / s for s in seconds[name]]
        samples = [b for b in busy[name] if b is not None]
        rows[name] = {"images_per_second": common.median(rates), "runs": rates,
                      "images_per_cpu_second": common.median([len(paths) / s for s in cpu[name]]),
                      "identical_to_today": sum(a == b for a, b in zip(captions[name][0], reference,
                                                                       strict=True)) / len(reference),
                      "stable_across_runs": all(c == captions[name][0] for c in captions[name]),
                      "gpu_utilization": sum(samples) / len(samples) if samples else None}
    base = rows["today"] if "today" in rows else rows[names[0]]
    for row in rows.values():
        row["vs_today"] = row["images_per_second"] / base["images_per_second"]
        row["per_cpu_second_vs_today"] = row["images_per_cpu_second"] / base["images_per_cpu_second"]
    return rows


def _agreement(rows: dict, captions: dict, paths: list[Path], other: Path) -> None:
    """Each contender's share of another result's naive captions (throughput.py's, say float32's)."""
    earlier = json.loads(other.read_text())
    reference = dict(zip(earlier["captions"]["files"], earlier["captions"]["naive"], strict=True))
    dtype = earlier["settings"].get("naive_dtype", earlier["settings"]["dtype"])
    shared = [index for index, path in enumerate(paths) if path.name in reference]
    for name, row in rows.items():
        same = sum(captions[name][0][i] == reference[paths[i].name] for i in shared)
        row[f"identical_to_{dtype}_naive"] = same / max(1, len(shared))
        row["compared_images"] = len(shared)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["files", "pipeline"])
    parser.add_argument("--images", type=int, help="files: per set (12); pipeline: in all (16)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="files: cpu or cuda; pipeline: auto, cpu, cuda")
    parser.add_argument("--work", default=str(common.DEFAULT_WORK), help="models and images are kept here")
    parser.add_argument("--quick", action="store_true", help="2 images, 1 run, tiny model (CI)")
    parser.add_argument("--out", help="write the results as JSON here")
    files_only = parser.add_argument_group("files")
    files_only.add_argument("--size", type=int, default=384, help="the model's input side")
    files_only.add_argument("--batch", type=int, default=16, help="images per processor call / stack")
    runs = parser.add_argument_group("pipeline")
    runs.add_argument("--model", default="blip-base", choices=sorted(models.FULL))
    runs.add_argument("--dtype", default="auto")
    runs.add_argument("--batch-size", type=int, help="captionkit's --batch-size (default: its own)")
    runs.add_argument("--contenders", type=lambda s: [c for c in s.split(",") if c],
                      help="comma-separated: today, threads, nvjpeg, graphs, joined by + "
                           "(default: today,threads, and nvjpeg on CUDA)")
    runs.add_argument("--warmup", type=int, default=8, help="images in each contender's untimed pass")
    runs.add_argument("--no-model", action="store_true", help="skip generate: time the feeding alone")
    runs.add_argument("--compare-to", help="a throughput.py result JSON: also report agreement with "
                                           "its naive captions (for bf16 runs against float32's)")
    args = parser.parse_args()
    if args.images is None:
        args.images = 12 if args.part == "files" else 16
    if args.quick:
        args.images, args.runs, args.warmup = 2 if args.part == "files" else 3, 1, 1
    return args


def main() -> None:
    args = parse_args()
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    result = files(args) if args.part == "files" else pipeline(args)
    result["machine"]["load_average_after"] = os.getloadavg()
    common.save(result, args.out)


if __name__ == "__main__":
    main()
