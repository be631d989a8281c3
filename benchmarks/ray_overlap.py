"""What a Ray replica gains by decoding its next batch while the model predicts one.

A GPU predicts while the host's model thread waits for it, so the host's cores are free to decode
the next batch meanwhile; a replica that takes one batch at a time leaves them idle while the GPU
works, and the GPU idle while they decode. Without a GPU here, a fixed time per image stands in
for it: a small BLIP at 384 px (the real decoding, drafting and `FixedSize` inputs, captions from
its real weights) predicts, then the model's thread sleeps out the rest of the batch's time.

First one run with no stand-in time measures the host's feeding rate: images per second of the
steady part of the run (after its first batch), less the small model's own time. The stand-in
then runs at `--accelerator-share` of that rate (1.0: the two are equal, where overlapping can at
best double the rate). Then runs alternate between one batch per replica at a time
(`CALLS_PER_REPLICA = 1`, as before) and captionkit's default, on the harness's images (half 12 MP
JPEGs), one replica holding every CPU. Captions must match.

    python benchmarks/ray_overlap.py --images 192 --runs 2 --out benchmarks/results/ray-overlap.json
    python benchmarks/ray_overlap.py --quick --out /tmp/ray-overlap.json   # about a minute
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import common  # noqa: E402
import images  # noqa: E402
import tiny  # noqa: E402
from ray_overhead import caption_run, captions, steady_rate  # noqa: E402

from captionkit.models.base import CaptionerWrapper  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--runs", type=int, default=2, help="runs of each contender, alternating")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--accelerator-share", type=float, default=1.0,
                        help="the stand-in's rate over the host's own rate")
    parser.add_argument("--cpus", type=int, default=None, help="CPUs for Ray and its one replica")
    parser.add_argument("--quick", action="store_true", help="32 images, one run each")
    parser.add_argument("--work", default=str(common.DEFAULT_WORK))
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.quick:
        args.images, args.runs, args.batch_size = 32, 1, 8
    return args


class Accelerator(CaptionerWrapper):
    """The real model, held to `seconds_per_image` per batch image as if it ran on a GPU: the
    model's thread sleeps out the rest, as it waits for a GPU, with its CPU free meanwhile."""

    def __init__(self, inner, seconds_per_image: float) -> None:
        super().__init__(inner)
        self.seconds_per_image = seconds_per_image

    def caption(self, images, options, prompts=None):
        started = time.perf_counter()
        predictions = self.inner.caption(images, options, prompts)
        time.sleep(max(0.0, self.seconds_per_image * len(images) - (time.perf_counter() - started)))
        return predictions


def accelerator_loader(seconds_per_image: float, name: str, options) -> Accelerator:
    from captionkit.models import load

    return Accelerator(load(name, options), seconds_per_image)


def ray_run(model_dir: Path, inputs: list[str], out: Path, engine, batch_size: int,
            seconds_per_image: float, calls: int) -> tuple[float, float | None, str]:
    """One `--engine ray` run with `calls` batches per replica at once: seconds, steady images/s
    and captions."""
    from captionkit import ray_engine
    from captionkit.options import GenerationOptions, LoadOptions
    from captionkit.pipeline import RunOptions

    ray_engine.CALLS_PER_REPLICA = calls  # read on the driver, when the actor pool is made
    shutil.rmtree(out, ignore_errors=True)
    recipe = ray_engine.ModelRecipe(str(model_dir), LoadOptions(device="cpu", dtype="float32"),
                                    loader=functools.partial(accelerator_loader, seconds_per_image))
    generation = GenerationOptions(max_new_tokens=3, min_new_tokens=3)
    pipeline, executor = ray_engine.pipeline_for(
        recipe, generation, RunOptions(output_dir=out, progress=False, batch_size=batch_size), engine)
    seconds, summary = caption_run(pipeline, inputs, executor)
    assert summary["done"] == len(inputs) and not summary["failed"], summary
    return seconds, steady_rate(out), captions(out)


def feeding_rate(folder: Path) -> float:
    """Images/s of a run's batches after its first, with the model's recorded time taken out: what
    the host's decoding and input making alone would sustain."""
    import sqlite3

    with sqlite3.connect(folder / "captionkit.db") as db:
        batches = db.execute("SELECT updated, COUNT(*), SUM(seconds) FROM results GROUP BY updated "
                             "ORDER BY updated").fetchall()
    assert len(batches) > 2, "the host's rate needs three batches or more"
    later = batches[1:]
    span = later[-1][0] - batches[0][0] - sum(model for _, _, model in later)
    return sum(count for _, count, _ in later) / span


def main() -> None:
    args = parse_args()
    import ray
    import torch

    from captionkit import ray_engine
    from captionkit.device import usable_cpus

    work = Path(args.work)
    model_dir = work / "models" / "blip-tiny-384"
    if not (model_dir / "config.json").is_file():
        tiny.build_blip(model_dir, image_size=384, patch_size=32)
    folder = work / "images"
    images.make_folder(folder, args.images)
    inputs = [str(p) for p in sorted(folder.iterdir())[: args.images]]
    cpus = args.cpus or usable_cpus()
    engine = ray_engine.EngineOptions(engine="ray", local_cpus=cpus, ray_workers=1, cpus_per_worker=cpus)
    ray_engine.connect(engine)
    out = work / "ray-overlap"
    run = functools.partial(ray_run, model_dir, inputs, engine=engine, batch_size=args.batch_size)
    contenders = {"one batch at a time": 1, "decode while predicting": ray_engine.CALLS_PER_REPLICA}

    _, _, reference = run(out / "host", seconds_per_image=0.0, calls=1)
    host_rate = feeding_rate(out / "host")
    accelerator_rate = host_rate * args.accelerator_share
    timings: dict[str, list[float]] = {name: [] for name in contenders}
    steady: dict[str, list[float]] = {name: [] for name in contenders}
    identical = True
    for index in range(args.runs):
        order = list(contenders) if index % 2 == 0 else list(contenders)[::-1]
        for name in order:
            seconds, rate, text = run(out / name.replace(" ", "-"), seconds_per_image=1 / accelerator_rate,
                                      calls=contenders[name])
            timings[name].append(round(seconds, 2))
            steady[name].append(round(rate, 3))
            identical &= text == reference
            print(f"{name}: {seconds:.1f} s, steady {rate:.2f} images/s", flush=True)
    ray.shutdown()

    one, both = list(contenders)
    result = {
        "machine": common.machine(torch.device("cpu")),
        "settings": {**{k: v for k, v in vars(args).items() if k not in ("out", "work")},
                     "ray": ray.__version__, "ray_cpus": cpus, "load_average_after": os.getloadavg()},
        "host_images_per_second": round(host_rate, 3),
        "accelerator_images_per_second": round(accelerator_rate, 3),
        "ideal": {one: round(1 / (1 / host_rate + 1 / accelerator_rate), 3),
                  both: round(min(host_rate, accelerator_rate), 3)},
        "seconds": timings,
        "steady_images_per_second": steady,
        "steady_speedup": round(statistics.median(steady[both]) / statistics.median(steady[one]), 3),
        "run_speedup": round(statistics.median(timings[one]) / statistics.median(timings[both]), 3),
        "captions_identical": identical,
    }
    common.save(result, args.out)
    print(json.dumps({k: result[k] for k in ("host_images_per_second", "ideal", "steady_images_per_second",
                                                "steady_speedup", "run_speedup", "captions_identical")},
                     indent=2))


if __name__ == "__main__":
    main()
