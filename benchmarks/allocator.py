"""Where a batch's memory comes from: captionkit's allocator settings against the ones it replaced.

Each setting runs `captionkit caption`'s pipeline (BLIP-base, 20 tokens, batch 16) over the same
images in a fresh process, because glibc's thresholds only steer allocations made after they are
set; images/s is the median of the runs after a warm-up, peak RSS the process's VmHWM, and page
faults are counted per image.

  captionkit        the defaults: vision encoder one image at a time, blocks under 16 MiB recycled;
  batched-1mib      the previous release: vision encoder on the whole batch, every freed block of
                    1 MiB or more returned to the OS;
  one-at-a-time-1mib  one image at a time, but blocks of 1 MiB or more still returned;
  batched-glibc     vision encoder on the whole batch, glibc's own (self-raising) thresholds;
  kept-32mib        blocks under 32 MiB recycled (a batch of 16's cross-attention caches are
                    27 MiB each) and up to 1 GiB of free heap top kept, so the caches are reused.

    python benchmarks/allocator.py --out benchmarks/results/allocator.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from throughput import TOKENS, image_paths, model_path, pinned_generation  # noqa: E402

SETTINGS = ("captionkit", "batched-1mib", "one-at-a-time-1mib", "batched-glibc", "kept-32mib")


def child(setting: str, model: Path, pictures: list[Path], runs: int, work: Path) -> dict:
    """One setting, measured in this (fresh) process."""
    import captionkit.pipeline
    from captionkit.device import M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
    from captionkit.models import load
    from captionkit.options import LoadOptions
    from captionkit.pipeline import Pipeline, RunOptions

    captioner = load(str(model), LoadOptions(device="cpu", dtype="float32"))
    if setting.startswith("batched"):
        del captioner.model.vision_model.forward  # back to the class's batch-at-once forward
    if setting.endswith("1mib"):
        captionkit.pipeline.set_malloc_thresholds = lambda: bool(
            ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 1 << 20))
    if setting == "batched-glibc":
        captionkit.pipeline.set_malloc_thresholds = lambda: False
    if setting == "kept-32mib":
        libc = ctypes.CDLL("libc.so.6")
        captionkit.pipeline.set_malloc_thresholds = lambda: bool(
            libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
    generation = pinned_generation()
    rates, faults = [], []
    for run in range(runs + 1):
        out = work / f"run-{run}"
        shutil.rmtree(out, ignore_errors=True)
        pipeline = Pipeline(captioner, generation, RunOptions(output_dir=out, progress=False))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        started = time.perf_counter()
        pipeline.run([str(p) for p in pictures])
        if run:  # the first run is the warm-up
            rates.append(len(pictures) / (time.perf_counter() - started))
            faults.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / len(pictures))
    captions = (work / f"run-{runs}" / "captions.txt").read_text()
    return {"images_per_second": common.median(rates), "runs": rates,
            "page_faults_per_image": common.median(faults), "peak_rss_mb": common.peak_rss_mb(),
            "captions": captions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--settings", type=lambda s: s.split(","), default=list(SETTINGS))
    parser.add_argument("--work", default=str(common.DEFAULT_WORK))
    parser.add_argument("--quick", action="store_true", help="tiny model, 3 images, 1 run (CI)")
    parser.add_argument("--out")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.set_defaults(model="blip-base")  # what throughput's model_path/image_paths read
    args = parser.parse_args()
    if args.quick:
        args.images, args.runs = 3, 1
    model, pictures, runs = model_path(args), image_paths(args), args.runs
    if args.child:
        with tempfile.TemporaryDirectory() as work:
            print(json.dumps(child(args.child, model, pictures, runs, Path(work))))
        return
    rows = {}
    for setting in args.settings:
        done = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", setting],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"{setting} failed:\n{done.stderr[-3000:]}")
        rows[setting] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{setting:20s} {rows[setting]['images_per_second']:6.3f} images/s  "
              f"{rows[setting]['page_faults_per_image']:9.0f} faults/image  "
              f"peak RSS {rows[setting]['peak_rss_mb']:6.0f} MB", flush=True)
    first = rows[args.settings[0]]
    reference_captions = first["captions"]
    for row in rows.values():
        row["speedup"] = row["images_per_second"] / first["images_per_second"]
        row["same_captions_as_first"] = row.pop("captions") == reference_captions
    result = {"machine": common.machine(__import__("torch").device("cpu")), "images": len(pictures),
              "tokens": TOKENS, "results": rows}
    common.save(result, args.out)


if __name__ == "__main__":
    main()
