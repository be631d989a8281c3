"""`captionkit score` with its images loaded, and CLIP's inputs made, in threads ("threads")
against one thread loading them and the processor on the scoring thread ("today"), same captions.

The scorer is CLIP ViT-B/32 as transformers' `CLIPConfig` defaults build it (224 px, patch 32),
with random weights at their trained scale and a word-level tokenizer. The images are the
throughput harness's (half 12 MP JPEGs), scored whole as `captionkit score` scores them, against
one caption each. Runs alternate, the order rotating; scores must be identical.

    python benchmarks/score.py --images 48 --runs 3 --out benchmarks/results/score-clip-b32.json
    python benchmarks/score.py --quick --out /tmp/score-quick.json   # the tiny CLIP, seconds
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import images  # noqa: E402
import models  # noqa: E402
from throughput import QUICK_THUMBNAIL  # noqa: E402

from captionkit import gate  # noqa: E402
from captionkit.scoring import load_scorer  # noqa: E402

CONTENDERS = ("today", "threads")
CAPTION = "a photo of a cup of coffee on a table"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--runs", type=int, default=3, help="runs of each contender, alternating")
    parser.add_argument("--work", default=str(common.DEFAULT_WORK), help="models and images are kept here")
    parser.add_argument("--quick", action="store_true", help="4 images, 1 run, the tiny CLIP (CI)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    if args.quick:
        args.images, args.runs = 4, 1
    return args


def build_clip(directory: Path, quick: bool) -> Path:
    """CLIP ViT-B/32 with random weights (the tiny test CLIP with `quick`), saved once."""
    sys.path.insert(0, str(models.TESTS))
    import tiny

    if quick:
        return tiny.build_clip(directory)
    if (directory / "config.json").exists():
        return directory
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = tiny.clip_tokenizer()
    torch.manual_seed(0)
    text = {"vocab_size": len(tokenizer), "max_position_embeddings": 77,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}
    config = CLIPConfig(text_config=text)
    directory.mkdir(parents=True, exist_ok=True)
    CLIPModel(config).save_pretrained(directory)
    CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tokenizer).save_pretrained(directory)
    return directory


@contextmanager
def one_loading_thread(scorer):
    """Today's loading: one image after another, the processor left to the scoring thread."""
    with ThreadPoolExecutor(1) as pool:
        yield pool


def timed_run(contender: str, captions: Path, folder: Path, scorer) -> tuple[float, float, dict]:
    """(wall seconds, CPU seconds of every thread, scores by image) of one `score_existing`."""
    threads, spec = gate._loading_threads, scorer.encoder.preprocess
    if contender == "today":
        gate._loading_threads, scorer.encoder.preprocess = one_loading_thread, None
    try:
        cpu = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        results = gate.score_existing(captions, scorer, folder).results
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        gate._loading_threads, scorer.encoder.preprocess = threads, spec
    busy = (after.ru_utime - cpu.ru_utime) + (after.ru_stime - cpu.ru_stime)
    return wall, busy, {result.name: result.extras.get("clip_score") for result in results}


def main() -> None:
    args = parse_args()
    work = Path(args.work)
    size = "tiny" if args.quick else "full"
    scorer = load_scorer(str(build_clip(work / "models" / f"clip-b32-{size}", args.quick)), device="cpu")
    paths = (images.make_folder(work / "images-quick", args.images, thumbnail=QUICK_THUMBNAIL)
             if args.quick else images.make_folder(work / "images", args.images))
    captions = work / f"score-captions-{args.images}-{size}.txt"
    captions.write_text("".join(f"{path.name}: {CAPTION}\n" for path in paths))
    gate.score_existing(captions, scorer, paths[0].parent)  # warm-up: weights paged in, threads made
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in CONTENDERS}
    scores: dict[str, dict] = {}
    for index in range(args.runs):
        order = CONTENDERS if index % 2 == 0 else CONTENDERS[::-1]
        for name in order:
            wall, busy, scores[name] = timed_run(name, captions, paths[0].parent, scorer)
            runs[name].append((wall, busy))
            print(f"run {index + 1}/{args.runs} {name:8} {len(paths) / wall:7.2f} images/s", flush=True)
    result = {"machine": common.machine(torch.device("cpu")),
              "settings": {"images": len(paths), "runs": args.runs, "size": size,
                           "batch_size": scorer.batch_size},
              "contenders": {name: _row(len(paths), runs[name], runs["today"]) for name in CONTENDERS},
              "identical_scores": scores["threads"] == scores["today"]}
    for name, row in result["contenders"].items():
        print(f"{name:8} {row['images_per_second']:7.2f} images/s ({row['vs_today']:.2f}x today; "
              f"{row['per_cpu_second_vs_today']:.2f}x per CPU second)")
    print(f"scores identical: {result['identical_scores']}")
    common.save(result, args.out)


def _row(count: int, runs: list[tuple[float, float]], today: list[tuple[float, float]]) -> dict:
    """A contender's median rates, and its ratios to today's."""
    rate = count / common.median([wall for wall, _ in runs])
    per_cpu = count / common.median([busy for _, busy in runs])
    return {"images_per_second": rate, "images_per_cpu_second": per_cpu,
            "runs": [count / wall for wall, _ in runs],
            "vs_today": rate / (count / common.median([wall for wall, _ in today])),
            "per_cpu_second_vs_today": per_cpu / (count / common.median([busy for _, busy in today]))}


if __name__ == "__main__":
    main()
