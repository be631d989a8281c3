"""What `--engine ray` costs against `--engine local` on one machine, same images, same model.

Both engines caption the same folder into fresh output folders with the model's float32 weights
and exactly 20 tokens per image (min_new_tokens = max_new_tokens). The local engine's model is
loaded afresh before each of its runs, as each `captionkit caption` command loads it, and before
its clock starts; for Ray, Ray's start and `describe` (the worker-side load the driver
plans with) come before the clock too, and are reported apart: the clock covers what a run does,
which for Ray includes starting its actors and loading the model in each. Runs alternate (local,
ray, ray, local, ...) so that load from other processes hits both alike. Captions must match.

    python benchmarks/ray_overhead.py --images 240 --out benchmarks/results/ray-overhead.json
    python benchmarks/ray_overhead.py --quick --out /tmp/ray-quick.json   # tiny model, about a minute
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import images  # noqa: E402
import models  # noqa: E402
from throughput import QUICK_THUMBNAIL, pinned_generation  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="blip-base", help="a benchmarks/models.py architecture")
    parser.add_argument("--images", type=int, default=240)
    parser.add_argument("--runs", type=int, default=1, help="runs of each engine, alternating")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--cpus", type=int, default=None,
                        help="CPUs for the Ray started here, all given to one replica (default: usable)")
    parser.add_argument("--workers", type=int, default=1, help="Ray replicas")
    parser.add_argument("--gpus-per-worker", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="tiny model, thumbnails")
    parser.add_argument("--work", default=str(common.DEFAULT_WORK))
    parser.add_argument("--out", required=True)
    return parser.parse_args()


def caption_run(pipeline, inputs: list[str], executor=None) -> tuple[float, dict]:
    """Seconds of one `Pipeline.run` and its summary."""
    started = time.perf_counter()
    summary = pipeline.run(inputs, executor=executor)
    return time.perf_counter() - started, summary.as_dict()


def captions(folder: Path) -> str:
    return (folder / "captions.txt").read_text()


def steady_rate(folder: Path) -> float | None:
    """Images/s between the first and the last batch the store recorded: the run without its
    start (for Ray, its replicas' start and model load); None for a run of one batch."""
    import sqlite3

    with sqlite3.connect(folder / "captionkit.db") as db:
        batches = db.execute("SELECT updated, COUNT(*) FROM results GROUP BY updated "
                             "ORDER BY updated").fetchall()
    if len(batches) < 2:
        return None
    images = sum(count for _, count in batches[1:])
    return images / (batches[-1][0] - batches[0][0])


def first_batch_seconds(folder: Path) -> float:
    """Seconds from the run's start to its first recorded batch: for Ray, its replicas' start and
    model load, then that batch; for both, the first batch of a freshly loaded model."""
    import sqlite3

    with sqlite3.connect(folder / "captionkit.db") as db:
        [(started, first)] = db.execute("SELECT (SELECT MIN(started) FROM runs), MIN(updated) "
                                        "FROM results").fetchall()
    return first - started


def steady_ratio(steady: dict[str, list[float | None]]) -> float | None:
    """The local engine's median steady rate over Ray's; None when a run had one batch only."""
    if any(rate is None for rates in steady.values() for rate in rates):
        return None
    return round(statistics.median(steady["local"]) / statistics.median(steady["ray"]), 3)


def main() -> None:
    args = parse_args()
    import ray
    import torch

    from captionkit import ray_engine
    from captionkit.device import usable_cpus
    from captionkit.models import load
    from captionkit.options import LoadOptions
    from captionkit.pipeline import Pipeline, RunOptions

    work = Path(args.work)
    path = models.build(args.model, work / "models" / f"{args.model}-{'tiny' if args.quick else 'full'}",
                        quick=args.quick)
    folder = work / ("images-quick" if args.quick else "images")
    images.make_folder(folder, args.images, thumbnail=QUICK_THUMBNAIL if args.quick else None)
    inputs = [str(p) for p in sorted(folder.iterdir())[: args.images]]
    load_options = LoadOptions(device=args.device, dtype=args.dtype)
    generation = pinned_generation()
    cpus = args.cpus or usable_cpus()

    started = time.perf_counter()
    engine = ray_engine.EngineOptions(engine="ray", local_cpus=cpus, ray_workers=args.workers,
                                      cpus_per_worker=cpus / args.workers,
                                      gpus_per_worker=args.gpus_per_worker)
    ray_engine.connect(engine)
    ray_start = time.perf_counter() - started
    recipe = ray_engine.ModelRecipe(str(path), load_options)
    started = time.perf_counter()
    remote = ray_engine.describe(recipe, engine)
    describe = time.perf_counter() - started

    out = work / "ray-overhead"
    timings: dict[str, list[float]] = {"local": [], "ray": []}
    steady: dict[str, list[float | None]] = {"local": [], "ray": []}
    first_batch: dict[str, list[float]] = {"local": [], "ray": []}
    local_loads: list[float] = []
    texts: dict[str, str] = {}
    order = ["local", "ray"]
    for run in range(args.runs):
        for name in order if run % 2 == 0 else order[::-1]:
            shutil.rmtree(out / name, ignore_errors=True)
            options = RunOptions(output_dir=out / name, progress=False, batch_size=args.batch_size)
            model = remote
            if name == "local":  # loaded cold, as by a command of its own
                started = time.perf_counter()
                model = load(str(path), load_options)
                local_loads.append(time.perf_counter() - started)
            pipeline = Pipeline(model, generation, options)
            executor = ray_engine.executor_for(pipeline, engine, recipe) if name == "ray" else None
            seconds, summary = caption_run(pipeline, inputs, executor)
            assert summary["done"] == len(inputs) and not summary["failed"], summary
            timings[name].append(seconds)
            steady[name].append(steady_rate(out / name))
            first_batch[name].append(round(first_batch_seconds(out / name), 2))
            del model, pipeline, executor
            texts[name] = captions(out / name)
            print(f"{name}: {seconds:.1f} s, {len(inputs) / seconds:.2f} images/s", flush=True)
    ray.shutdown()

    local, remote_seconds = statistics.median(timings["local"]), statistics.median(timings["ray"])
    result = {
        "machine": common.machine(torch.device(args.device)),
        "settings": {**{k: v for k, v in vars(args).items() if k not in ("out", "work")},
                     "ray": ray.__version__, "ray_cpus": cpus, "tokens": generation.max_new_tokens,
                     "load_average_after": os.getloadavg()},
        "setup_seconds": {"local_model_load": [round(s, 2) for s in local_loads],
                          "ray_start": round(ray_start, 2), "ray_describe": round(describe, 2)},
        "seconds": {name: [round(s, 2) for s in values] for name, values in timings.items()},
        "images_per_second": {"local": round(len(inputs) / local, 3),
                              "ray": round(len(inputs) / remote_seconds, 3)},
        "ray_over_local": round(remote_seconds / local, 3),
        "steady_images_per_second": {name: [None if r is None else round(r, 3) for r in rates]
                                     for name, rates in steady.items()},
        "steady_ray_over_local": steady_ratio(steady),
        "first_batch_seconds": first_batch,
        "captions_identical": texts["local"] == texts["ray"],
    }
    common.save(result, args.out)
    print(json.dumps({k: result[k] for k in ("setup_seconds", "seconds", "ray_over_local",
                                                "steady_ray_over_local", "first_batch_seconds",
                                                "captions_identical")}, indent=2))


if __name__ == "__main__":
    main()
