"""Each speed lever measured against a reference (the first variant listed), interleaved in one process.

Groups (one per invocation, each well under 10 minutes on a 2-core CPU for BLIP-base):
  batch    captionkit's captioner at batch sizes 8, 1, 4, 16, 32 (model only: images pre-decoded);
  dtype    float32, bfloat16 weights, bfloat16 autocast, int8 dynamic quantization;
  compile  torch.compile of the vision encoder: compile time, then steady-state speed;
  threads  torch intra-op threads 1 vs all cores vs one model stream per core (batches of 16 shared
           out to Python threads of one torch thread each; `--images 32` gives each core a batch),
           and decode workers 1/2/4 over the whole pipeline;
  attention captionkit's fused (SDPA) BLIP vision attention against transformers' eager one, and
           whether transformers' own `attn_implementation="sdpa"` and a static KV cache run;
  prompts  per-image prompts (8 distinct, 3 or 4 words): one generate call per prompt against
           captionkit's stacking of equal-length prompts into one call.
Every variant but `threads`'s workers sees the same decoded images; captions are compared with
the reference's, since a lever that changes captions is only acceptable as an opt-in. JPEG draft
decoding is measured by decode.py. `--dtype bfloat16` runs every group but dtype in bf16 (for CPUs
with AMX); `--quick` runs a tiny model on 4 images once (CI).

    python benchmarks/levers.py batch --out benchmarks/results/levers-batch.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import images  # noqa: E402
import models  # noqa: E402
from throughput import GENERATE, QUICK_THUMBNAIL, pinned_generation, weights_dtype  # noqa: E402

from captionkit import sources  # noqa: E402
from captionkit.device import quantize_int8  # noqa: E402
from captionkit.models import load  # noqa: E402
from captionkit.options import LoadOptions  # noqa: E402

GEN = pinned_generation()
BATCH = 16  # captionkit's default on a CPU


def captioner_for(path: Path, dtype: str = "float32"):
    return load(str(path), LoadOptions(device="cpu", dtype=dtype))


def batched(captioner, batch_size: int, context: Callable = torch.inference_mode):
    def run(pictures: list) -> list[str]:
        texts = []
        with context():
            for start in range(0, len(pictures), batch_size):
                texts += [c.text for c in captioner.caption(pictures[start:start + batch_size], GEN)]
        return texts
    return run


def compare(variants: dict[str, Callable], pictures: list, runs: int) -> dict:
    """Median images/s of each variant over `runs` interleaved passes, and caption agreement."""
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    captions: dict[str, list[str]] = {}
    for run in range(runs):
        names = list(variants)
        for name in names[run % len(names):] + names[:run % len(names)]:
            started = time.perf_counter()
            captions[name] = variants[name](pictures)
            seconds[name].append(time.perf_counter() - started)
            print(f"run {run + 1}/{runs} {name:24s} {len(pictures) / seconds[name][-1]:7.3f} images/s",
                  flush=True)
    reference = captions[next(iter(variants))]
    rows = {}
    for name in variants:
        rates = [len(pictures) / s for s in seconds[name]]
        rows[name] = {"images_per_second": common.median(rates), "runs": rates,
                      "same_captions_as_first": sum(a == b for a, b in zip(captions[name], reference,
                                                                           strict=True)) / len(reference)}
    first = rows[next(iter(variants))]["images_per_second"]
    for row in rows.values():
        row["speedup"] = row["images_per_second"] / first
    return rows


def group_batch(path: Path, pictures: list, args) -> dict:
    captioner = captioner_for(path, args.dtype)
    batched(captioner, BATCH)(pictures[:BATCH])
    return compare({f"batch {n}": batched(captioner, n) for n in args.batch_sizes}, pictures, args.runs)


def group_dtype(path: Path, pictures: list, args) -> dict:
    fp32 = captioner_for(path)
    bf16 = captioner_for(path, "bfloat16")
    int8 = copy.deepcopy(fp32)
    started = time.perf_counter()
    quantize_int8(int8.model)  # what --quantize int8 does
    quantize_seconds = time.perf_counter() - started

    @contextlib.contextmanager
    def autocast():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            yield

    variants = {"float32": batched(fp32, BATCH), "bfloat16 weights": batched(bf16, BATCH),
                "bfloat16 autocast": batched(fp32, BATCH, autocast), "int8 dynamic": batched(int8, BATCH)}
    for variant in variants.values():
        variant(pictures[:2])
    rows = compare(variants, pictures, args.runs)
    rows["int8 dynamic"]["quantize_seconds"] = quantize_seconds
    for dtype in (torch.float32, torch.bfloat16):
        rows[f"matmul peak {dtype}"] = {"gflops": common.matmul_peak(dtype, torch.device("cpu"))}
    return rows


def group_compile(path: Path, pictures: list, args) -> dict:
    """Eager against a compiled vision encoder, and what compiling costs, in a fresh inductor cache."""
    with _fresh_inductor_cache():
        return _compile_rows(path, pictures, args)


def _compile_rows(path: Path, pictures: list, args) -> dict:
    eager = captioner_for(path, args.dtype)
    compiled = captioner_for(path, args.dtype)
    compiled.model.vision_model.compile()
    first = pictures[:BATCH]
    batched(eager, BATCH)(first)
    started = time.perf_counter()
    batched(compiled, BATCH)(first)
    first_batch = time.perf_counter() - started
    rows = compare({"eager": batched(eager, BATCH), "compiled vision encoder": batched(compiled, BATCH)},
                   pictures, args.runs)
    gained = 1 / rows["eager"]["images_per_second"] - 1 / rows["compiled vision encoder"]["images_per_second"]
    compile_seconds = first_batch - len(first) / rows["compiled vision encoder"]["images_per_second"]
    rows["compile"] = {"first_batch_seconds": first_batch, "compile_seconds": compile_seconds,
                       "seconds_saved_per_image": gained,
                       "break_even_images": compile_seconds / gained if gained > 0 else None,
                       "weights": weights_dtype(compiled.model)}
    return rows


@contextlib.contextmanager
def _fresh_inductor_cache():
    """An empty inductor cache for the block (unless TORCHINDUCTOR_CACHE_DIR names one): a warm one
    turns the compile being timed into a lookup."""
    if "TORCHINDUCTOR_CACHE_DIR" in os.environ:
        yield
        return
    with tempfile.TemporaryDirectory(prefix="levers-inductor-") as folder:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
        try:
            yield
        finally:
            del os.environ["TORCHINDUCTOR_CACHE_DIR"]


def group_threads(path: Path, pictures: list, args) -> dict:
    from captionkit.pipeline import Pipeline, RunOptions

    captioner = captioner_for(path, args.dtype)
    cores = torch.get_num_threads()

    def threads(count: int):
        def run(pictures: list) -> list[str]:
            torch.set_num_threads(count)
            try:
                return batched(captioner, BATCH)(pictures)
            finally:
                torch.set_num_threads(cores)
        return run

    def streams(pictures: list) -> list[str]:
        """One model shared by `cores` Python threads of one torch thread each, taking turns at
        batches: while one stream's encoder is compute-bound, another's decoder waits on memory."""
        starts = range(0, len(pictures), BATCH)
        texts: dict[int, list[str]] = {}

        def stream(mine: list[int]) -> None:
            torch.set_num_threads(1)
            with torch.inference_mode():
                for start in mine:
                    texts[start] = [c.text for c in captioner.caption(pictures[start:start + BATCH], GEN)]

        with ThreadPoolExecutor(cores) as pool:
            list(pool.map(stream, [list(starts[k::cores]) for k in range(cores)]))
        torch.set_num_threads(cores)
        return [text for start in starts for text in texts[start]]

    batched(captioner, BATCH)(pictures[:BATCH])
    rows = {"torch threads": compare({f"{cores} torch threads": threads(cores), "1 torch thread": threads(1),
                                      f"{cores} streams of 1 thread": streams}, pictures, args.runs)}
    files = [str(p) for p in image_paths(args)]
    out = Path(args.work) / "levers-out"

    def workers(count: int):
        def run(_: list) -> list[str]:
            shutil.rmtree(out, ignore_errors=True)
            Pipeline(captioner, GEN, RunOptions(output_dir=out, workers=count, progress=False)).run(files)
            records = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
            return [r["caption"] for r in sorted(records, key=lambda r: r["path"])]
        return run

    rows["decode workers"] = compare({f"{n} workers": workers(n) for n in (4, 1, 2)}, files, args.runs)
    return rows


def group_attention(path: Path, pictures: list, args) -> dict:
    """captionkit's fused vision attention against transformers' eager one; what else loads."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    fused = captioner_for(path, args.dtype)
    eager = captioner_for(path, args.dtype)
    for layer in eager.model.vision_model.encoder.layers:
        vars(layer.self_attn).pop("forward", None)
    for captioner in (fused, eager):
        batched(captioner, BATCH)(pictures[:BATCH])
    rows = compare({"fused (sdpa) vision attention": batched(fused, BATCH),
                    "eager vision attention": batched(eager, BATCH)}, pictures, args.runs)
    processor = AutoProcessor.from_pretrained(path)
    inputs = processor(images=pictures[:BATCH], return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].to(getattr(torch, args.dtype))
    for name, load_kwargs, generate_kwargs in [
        ("transformers attn_implementation=sdpa", {"attn_implementation": "sdpa"}, {}),
        ("static cache", {}, {"cache_implementation": "static"}),
    ]:
        try:
            model = AutoModelForImageTextToText.from_pretrained(path, dtype=getattr(torch, args.dtype),
                                                                **load_kwargs).eval()
            with torch.inference_mode():
                model.generate(**inputs, **GENERATE, **generate_kwargs)
                started = time.perf_counter()
                model.generate(**inputs, **GENERATE, **generate_kwargs)
            seconds = time.perf_counter() - started
            rows[name] = {"runs": True, "images_per_second": len(pictures[:BATCH]) / seconds}
        except Exception as err:  # noqa: BLE001 - the failure is the finding
            rows[name] = {"runs": False, "error": f"{type(err).__name__}: {err}"[:300]}
        print(name, rows[name], flush=True)
    return rows


def group_prompts(path: Path, pictures: list, args) -> dict:
    """Per-image prompts (as from --prompt-file): one generate call per distinct prompt, against
    captionkit's stacking of equal-length prompts into one call."""
    captioner = captioner_for(path, args.dtype)
    vocabulary = models.words(200)[100:]
    # 8 distinct prompts of 3 or 4 words, each image asked one of them, as a question file would
    distinct = [" ".join(vocabulary[i * 4:i * 4 + 3 + i % 2]) for i in range(8)]
    prompts = [distinct[i % len(distinct)] for i in range(len(pictures))]

    def per_prompt(batch: list, asked: list) -> list[str]:
        texts: list[str] = [""] * len(batch)
        for prompt in dict.fromkeys(asked):
            indices = [i for i, p in enumerate(asked) if p == prompt]
            found = captioner.caption([batch[i] for i in indices], GEN, [prompt] * len(indices))
            for index, caption in zip(indices, found, strict=True):
                texts[index] = caption.text
        return texts

    def stacked(batch: list, asked: list) -> list[str]:
        return [c.text for c in captioner.caption(batch, GEN, asked)]

    def over_batches(run_batch: Callable) -> Callable:
        def run(pictures: list) -> list[str]:
            texts = []
            with torch.inference_mode():
                for start in range(0, len(pictures), BATCH):
                    texts += run_batch(pictures[start:start + BATCH], prompts[start:start + BATCH])
            return texts
        return run

    over_batches(stacked)(pictures[:BATCH])
    return compare({"one generate call per prompt": over_batches(per_prompt),
                    "equal-length prompts stacked": over_batches(stacked)}, pictures, args.runs)


GROUPS = {"batch": group_batch, "dtype": group_dtype, "compile": group_compile,
          "threads": group_threads, "attention": group_attention, "prompts": group_prompts}


def image_paths(args) -> list[Path]:
    if args.quick:
        return images.make_folder(Path(args.work) / "images-quick", args.images, thumbnail=QUICK_THUMBNAIL)
    return images.make_folder(Path(args.work) / "images", args.images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("group", choices=sorted(GROUPS))
    parser.add_argument("--model", default="blip-base", choices=sorted(models.FULL))
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch-sizes", type=lambda s: [int(n) for n in s.split(",")],
                        default=[8, 1, 4, 16, 32], help="for the batch group; the first is the reference")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="the captioners' dtype in every group but dtype, which compares dtypes")
    parser.add_argument("--work", default=str(common.DEFAULT_WORK))
    parser.add_argument("--quick", action="store_true", help="tiny model, 4 images, 1 run (CI)")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.quick:
        args.images, args.runs = 4, 1
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    size = "tiny" if args.quick else "full"
    path = models.build(args.model, Path(args.work) / "models" / f"{args.model}-{size}", quick=args.quick)
    captioner = captioner_for(path)
    pictures = [sources.load_image(p, captioner.input_size) for p in image_paths(args)]
    del captioner
    result = {"machine": common.machine(torch.device("cpu")), "group": args.group, "model": args.model,
              "dtype": args.dtype, "size": size, "images": len(pictures), "runs": args.runs,
              "generate": GENERATE,
              "results": GROUPS[args.group](path, pictures, args)}
    result["machine"]["load_average_after"] = os.getloadavg()
    print(json.dumps(result["results"], indent=1))
    common.save(result, args.out)


if __name__ == "__main__":
    main()
