"""Images/s of three ways to caption a folder, on the same images and model, in one process.

Contenders:
  naive       what the BLIP-2 folder scripts do: per file `Image.open().convert("RGB")`, the processor,
              `model.generate`, one image at a time;
  pipeline-N  transformers' `pipeline("image-text-to-text")` with `batch_size=N` over the same files
              (transformers 5 removed `image-to-text`; an empty text prompt makes it caption);
  captionkit  the `captionkit caption` path: sources, decode threads, batches, run store, exporters;
  captionkit-VARIANT  the same with an opt-in mode (`--variants int8,full-decode,batch-64`):
              `--quantize int8`, `--full-decode` (every JPEG pixel decoded, as the naive loop
              does), `--batch-size N` (batch-N) or `--workers N` (workers-N).

Every contender generates exactly 20 tokens per image (min_new_tokens = max_new_tokens = 20), runs
once to warm up, then `--runs` times interleaved (the order rotates) so load from other processes
hits all of them alike. Peak RSS comes from one fresh subprocess per contender. All contenders
run in `--dtype`, except that `--naive-dtype float32` keeps the naive loop in float32 (a plain
script's dtype) against captionkit's bf16 on a CPU with AMX.

    python benchmarks/throughput.py --model blip-base --out benchmarks/results/blip-base.json
    python benchmarks/throughput.py --quick --out /tmp/quick.json   # tiny model, < 1 minute
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import images  # noqa: E402
import models  # noqa: E402

TOKENS = 20
QUICK_THUMBNAIL = 48
GENERATE = {"max_new_tokens": TOKENS, "min_new_tokens": TOKENS, "do_sample": False, "num_beams": 1}
VARIANTS = ("", "int8", "full-decode")
SIZED_VARIANTS = ("batch", "workers")


def pinned_generation():
    """captionkit's generation options for exactly TOKENS tokens, as GENERATE pins the others."""
    from captionkit.options import GenerationOptions

    return GenerationOptions(max_new_tokens=TOKENS, min_new_tokens=TOKENS)


class Naive:
    """One image at a time, full decode, the model's own processor: the scripts people start from."""

    name = "naive"

    def __init__(self, path: Path, device: torch.device, dtype: torch.dtype) -> None:
        from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

        self.device, self.dtype = device, dtype
        self.model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).to(device).eval()
        if self.model.config.model_type == "vision-encoder-decoder":
            self.processor = AutoImageProcessor.from_pretrained(path)
            self.tokenizer = AutoTokenizer.from_pretrained(path)
        else:
            self.processor = AutoProcessor.from_pretrained(path)
            self.tokenizer = self.processor.tokenizer

    def __call__(self, paths: list[Path]) -> list[str]:
        captions = []
        for path in paths:
            image = Image.open(path).convert("RGB")
            inputs = self.processor(images=image, return_tensors="pt")
            inputs = {key: value.to(self.device, self.dtype) if value.is_floating_point()
                      else value.to(self.device) for key, value in inputs.items()}
            with torch.inference_mode():
                output = self.model.generate(**inputs, **GENERATE)
            if "input_ids" in inputs and not self.model.config.is_encoder_decoder:
                output = output[:, inputs["input_ids"].shape[1]:]
            captions.append(self.tokenizer.decode(output[0], skip_special_tokens=True).strip())
        return captions


class HFPipeline:
    """transformers' own batched inference loop."""

    def __init__(self, path: Path, device: torch.device, dtype: torch.dtype, batch_size: int) -> None:
        from transformers import pipeline

        self.name = f"pipeline-{batch_size}"
        self.batch_size = batch_size
        self.pipe = pipeline("image-text-to-text", model=str(path), device=device, dtype=dtype)
        self.model = self.pipe.model
        if self.pipe.tokenizer.pad_token is None:  # what its error message tells users to do
            self.pipe.tokenizer.pad_token = self.pipe.tokenizer.eos_token

    def __call__(self, paths: list[Path]) -> list[str]:
        # A generator, not a list: the pipeline takes a list of dicts for one chat conversation.
        inputs = ({"images": str(path), "text": ""} for path in paths)
        # GIT's generate rejects the token_type_ids its tokenizer returns for the empty prompt
        outputs = self.pipe(inputs, batch_size=self.batch_size, generate_kwargs=GENERATE,
                            return_full_text=False, processor_kwargs={"return_token_type_ids": False})
        return [output[0]["generated_text"].strip() for output in outputs]


class Captionkit:
    """`captionkit caption FILES -o OUT` with the model already loaded (as for every contender)."""

    def __init__(self, path: Path, device: torch.device, dtype: torch.dtype, work: Path,
                 variant: str = "") -> None:
        from captionkit.models import load
        from captionkit.options import LoadOptions

        modes = variant.split("+")  # "batch-32+workers-8": both at once
        sized = dict(filter(None, map(_sized, modes)))
        unknown = [mode for mode in modes if mode not in VARIANTS and not _sized(mode)]
        if unknown:
            raise SystemExit(f"unknown captionkit variant {unknown[0]!r}: use "
                             f"{', '.join(VARIANTS[1:])}, batch-N or workers-N, joined by +")
        quantize = "int8" if "int8" in modes else None
        # int8 runs on the CPU from float32 weights, whatever device and dtype the others use
        load_options = (LoadOptions(device="cpu", quantize=quantize) if quantize
                        else LoadOptions(device=str(device), dtype=str(dtype).split(".")[1]))
        self.captioner = load(str(path), load_options)
        self.model = self.captioner.model
        self.generation = pinned_generation()
        self.full_decode = "full-decode" in modes
        self.batch_size, self.workers = sized.get("batch"), sized.get("workers")
        self.out = work / "captionkit-out"

    def __call__(self, paths: list[Path]) -> list[str]:
        from captionkit.pipeline import Pipeline, RunOptions

        shutil.rmtree(self.out, ignore_errors=True)
        options = RunOptions(output_dir=self.out, progress=False, full_decode=self.full_decode,
                             batch_size=self.batch_size, workers=self.workers)
        summary = Pipeline(self.captioner, self.generation, options).run([str(p) for p in paths])
        if summary.failed:
            raise RuntimeError(f"captionkit failed on {summary.failed}")
        records = [json.loads(line) for line in (self.out / "captions.jsonl").read_text().splitlines()]
        by_path = {record["path"]: record["caption"] for record in records}
        return [by_path[str(path.resolve())] for path in paths]


def _sized(mode: str) -> tuple[str, int] | None:
    """("batch", 64) for "batch-64"; None for any other mode."""
    kind, _, number = mode.partition("-")
    return (kind, int(number)) if kind in SIZED_VARIANTS and number.isdigit() else None


def make_contender(name: str, path: Path, device: torch.device, dtype: torch.dtype, work: Path,
                   naive_dtype: torch.dtype | None = None):
    if name == "naive":
        return Naive(path, device, naive_dtype or dtype)
    if name.startswith("captionkit"):
        return Captionkit(path, device, dtype, work, name.removeprefix("captionkit").removeprefix("-"))
    return HFPipeline(path, device, dtype, int(name.split("-")[1]))


def timed(contender, paths: list[Path], device: torch.device) -> tuple[float, list[str]]:
    common.synchronize(device)
    started = time.perf_counter()
    captions = contender(paths)
    common.synchronize(device)
    return time.perf_counter() - started, captions


def memory_child(args: argparse.Namespace) -> None:
    """Runs in a fresh process: load one contender, caption every image once, print memory."""
    device, dtype = resolve(args)
    paths = image_paths(args)
    contender = make_contender(args.memory_child, model_path(args), device, dtype, Path(args.child_work),
                               baseline_dtype(args, device))
    after_load = common.rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    contender(paths)
    report = {"after_load_mb": after_load, "peak_rss_mb": common.peak_rss_mb()}
    if device.type == "cuda":
        report["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    print(json.dumps(report))


def measure_memory(names: list[str]) -> dict[str, dict]:
    """Peak memory of each contender, each in a fresh process, one after another (side by side,
    big models could push each other into swap and shrink the resident peaks)."""
    reports = {}
    with tempfile.TemporaryDirectory() as work:
        for name in names:
            child = subprocess.run(
                [sys.executable, __file__, *sys.argv[1:], "--memory-child", name, "--child-work",
                 str(Path(work) / name)], capture_output=True, text=True, check=False)
            if child.returncode != 0:
                raise RuntimeError(f"memory run of {name} failed:\n{child.stderr[-3000:]}")
            reports[name] = json.loads(child.stdout.strip().splitlines()[-1])
    return reports


def resolve(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    from captionkit.device import pick_device, pick_dtype

    device = pick_device(args.device)
    return device, pick_dtype(args.dtype, device)


def baseline_dtype(args: argparse.Namespace, device: torch.device) -> torch.dtype | None:
    """The naive loop's own dtype when `--naive-dtype` sets one (a plain script runs float32)."""
    from captionkit.device import pick_dtype

    return pick_dtype(args.naive_dtype, device) if args.naive_dtype else None


def model_path(args: argparse.Namespace) -> Path:
    size = "tiny" if args.quick else "full"
    return models.build(args.model, Path(args.work) / "models" / f"{args.model}-{size}", quick=args.quick)


def image_paths(args: argparse.Namespace) -> list[Path]:
    if args.quick:
        return images.make_folder(Path(args.work) / "images-quick", args.images, thumbnail=QUICK_THUMBNAIL)
    return images.make_folder(Path(args.work) / "images", args.images)


def flops_per_image(contender: Naive, path: Path) -> int:
    """Matmul FLOPs of one 20-token caption at batch 1, counted on the naive contender's model."""
    inputs = contender.processor(images=Image.open(path).convert("RGB"), return_tensors="pt")
    inputs = {key: value.to(contender.device, contender.dtype) if value.is_floating_point()
              else value.to(contender.device) for key, value in inputs.items()}
    contender.model.requires_grad_(False)  # the counter's module hooks trip over BLIP-2's parameters
    return common.count_flops(lambda: contender.model.generate(**inputs, **GENERATE))


def main() -> None:
    args = parse_args()
    if args.memory_child:
        memory_child(args)
        return
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    device, dtype = resolve(args)
    baseline = baseline_dtype(args, device)
    path = model_path(args)
    paths = image_paths(args)
    names = ["naive", *(f"pipeline-{n}" for n in args.pipeline_batch_sizes), "captionkit",
             *(f"captionkit-{variant}" for variant in args.variants)]
    work = Path(args.work)
    peak = common.matmul_peak(dtype, device)
    result: dict = {"machine": common.machine(device), "settings": {
        "model": args.model, "architecture_of": models.FULL[args.model],
        "size": "tiny" if args.quick else "full", "images": len(paths), "runs": args.runs,
        "dtype": str(dtype).split(".")[1], "naive_dtype": str(baseline or dtype).split(".")[1],
        "generate": GENERATE, "quick": args.quick}}
    contenders, result["unavailable"] = {}, {}
    for name in names:
        try:
            contenders[name] = make_contender(name, path, device, dtype, work, baseline)
        except (TypeError, ValueError) as err:  # transformers has no pipeline for some families
            if not name.startswith("pipeline-"):
                raise
            result["unavailable"][name] = f"{type(err).__name__}: {err}"[:300]
            print(f"{name} unavailable: {result['unavailable'][name]}", flush=True)
    names = list(contenders)
    naive = contenders["naive"]
    result["model"] = {"parameters": sum(p.numel() for p in naive.model.parameters()),
                       "flops_per_image": flops_per_image(naive, paths[0]),
                       "flops_method": "torch.utils.flop_counter over one 20-token generate at batch 1"}
    result["settings"]["captionkit_batch_size"] = _captionkit_batch_size(contenders["captionkit"])

    weights = {name: weights_dtype(contender.model) for name, contender in contenders.items()}
    warmup = paths[:args.warmup]
    for contender in contenders.values():
        contender(warmup)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    captions: dict[str, list[list[str]]] = {name: [] for name in names}
    for run in range(args.runs):
        order = names[run % len(names):] + names[:run % len(names)]
        for name in order:
            took, texts = timed(contenders[name], paths, device)
            seconds[name].append(took)
            captions[name].append(texts)
            print(f"run {run + 1}/{args.runs} {name:20s} {len(paths) / took:7.3f} images/s", flush=True)
    del contenders, naive

    reference = captions["naive"][0]
    rows = {}
    for name in names:
        rates = [len(paths) / s for s in seconds[name]]
        same = sum(a == b for a, b in zip(captions[name][0], reference, strict=True))
        rows[name] = {"images_per_second": common.median(rates), "runs": rates,
                      "identical_to_naive": same / len(reference),
                      "stable_across_runs": all(c == captions[name][0] for c in captions[name]),
                      "weights": weights[name]}
    memory = {} if args.no_memory else measure_memory(names)
    for name in names:
        rows[name]["ratio_to_naive"] = rows[name]["images_per_second"] / rows["naive"]["images_per_second"]
        rows[name].update(memory.get(name, {}))
    best = max((n for n in names if n.startswith("pipeline-")), key=lambda n: rows[n]["images_per_second"],
               default=None)
    result["contenders"] = rows
    if args.compare_to:
        compare_captions(rows, captions, [p.name for p in paths], Path(args.compare_to))
    peak = max(peak, common.matmul_peak(dtype, device))
    result["summary"] = summarize(rows, best, result["model"]["flops_per_image"], peak)
    result["captions"] = {"files": [p.name for p in paths], **{n: captions[n][0] for n in names}}
    result["machine"]["load_average_after"] = os.getloadavg()
    print_table(result)
    common.save(result, args.out)


def weights_dtype(model: torch.nn.Module) -> str:
    """The dtype the model's floating-point weights were loaded in (what actually ran)."""
    return str(next(p.dtype for p in model.parameters() if p.is_floating_point())).split(".")[1]


def _captionkit_batch_size(contender: Captionkit) -> int:
    from captionkit.pipeline import default_batch_size

    return default_batch_size(contender.captioner)


def compare_captions(rows: dict, captions: dict, files: list[str], other: Path) -> None:
    """Each contender's agreement with another result's naive captions (say, float32's)."""
    earlier = json.loads(other.read_text())
    reference = dict(zip(earlier["captions"]["files"], earlier["captions"]["naive"], strict=True))
    naive_in = earlier["settings"].get("naive_dtype", earlier["settings"]["dtype"])
    shared = [index for index, name in enumerate(files) if name in reference]
    for name, row in rows.items():
        same = sum(captions[name][0][i] == reference[files[i]] for i in shared)
        row[f"identical_to_{naive_in}_naive"] = same / max(1, len(shared))


def summarize(rows: dict, best_pipeline: str | None, flops: int, peak: float) -> dict:
    """Headline ratios, and how close captionkit gets to what the machine's matmul peak allows."""
    captionkit = rows["captionkit"]["images_per_second"]
    summary = {"captionkit_vs_naive": rows["captionkit"]["ratio_to_naive"],
               "matmul_peak_gflops": peak, "limit_images_per_second": peak * 1e9 / flops,
               "captionkit_fraction_of_peak": captionkit * flops / (peak * 1e9)}
    if best_pipeline:
        summary["best_pipeline"] = best_pipeline
        summary["captionkit_vs_best_pipeline"] = captionkit / rows[best_pipeline]["images_per_second"]
    for name in (n for n in rows if n.startswith("captionkit-")):
        summary[f"{name}_vs_naive"] = rows[name]["ratio_to_naive"]
        if best_pipeline:
            summary[f"{name}_vs_best_pipeline"] = (rows[name]["images_per_second"]
                                                   / rows[best_pipeline]["images_per_second"])
    if "peak_rss_mb" in rows["captionkit"]:
        summary["captionkit_rss_vs_naive"] = rows["captionkit"]["peak_rss_mb"] / rows["naive"]["peak_rss_mb"]
    return summary


def print_table(result: dict) -> None:
    settings, summary, rows = result["settings"], result["summary"], result["contenders"]
    naive_in = settings.get("naive_dtype", settings["dtype"])
    dtypes = settings["dtype"] + (f" (naive in {naive_in})" if naive_in != settings["dtype"] else "")
    print(f"\n{settings['model']} ({settings['size']}), {settings['images']} images, {dtypes}, "
          f"{TOKENS} tokens, median of {settings['runs']} runs on {result['machine']['device']}")
    # columns only some runs have: GPU memory, agreement with another dtype's naive captions
    extra = sorted({key for row in rows.values() for key in row if key == "peak_gpu_mb"
                    or key.startswith("identical_to_") and key != "identical_to_naive"})
    headers = ["peak GPU MB" if key == "peak_gpu_mb"
               else "same as " + key.removeprefix("identical_to_").replace("_", " ") for key in extra]
    print(f"{'contender':20s} {'images/s':>9s} {'x naive':>8s} {'peak RSS MB':>12s} {'same as naive':>14s}"
          + "".join(f" {header:>22s}" for header in headers))
    for name, row in rows.items():
        rss = f"{row['peak_rss_mb']:.0f}" if "peak_rss_mb" in row else "-"
        cells = ["-" if key not in row else f"{row[key]:.0f}" if key == "peak_gpu_mb" else f"{row[key]:.0%}"
                 for key in extra]
        print(f"{name:20s} {row['images_per_second']:9.3f} {row['ratio_to_naive']:8.2f} {rss:>12s} "
              f"{row['identical_to_naive']:14.0%}" + "".join(f" {cell:>22s}" for cell in cells))
    for name, reason in result["unavailable"].items():
        print(f"{name:20s} unavailable: {reason}")
    print(f"FLOPs/image {result['model']['flops_per_image'] / 1e9:.1f} G; matmul peak "
          f"{summary['matmul_peak_gflops']:.0f} GFLOP/s -> limit {summary['limit_images_per_second']:.3f} "
          f"images/s; captionkit at {summary['captionkit_fraction_of_peak']:.0%} of it")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="blip-base", choices=sorted(models.FULL))
    parser.add_argument("--images", type=int, default=24, help="alternately 12 MP JPEGs and photos")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=8, help="images in the untimed first pass")
    parser.add_argument("--pipeline-batch-sizes", type=lambda s: [int(n) for n in s.split(",")],
                        default=[8], help="comma-separated; each is a contender")
    parser.add_argument("--variants", type=lambda s: [v for v in s.split(",") if v], default=[],
                        help="comma-separated opt-in captionkit modes, each a contender: "
                             "int8 (--quantize int8), full-decode (--full-decode), "
                             "batch-N (--batch-size N), workers-N (--workers N); "
                             "join modes with + (batch-32+workers-8)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--naive-dtype", help="run the naive loop in this dtype instead (float32: what a "
                        "plain script does, against captionkit's --dtype auto on a bf16 CPU)")
    parser.add_argument("--work", default=str(common.DEFAULT_WORK), help="models and images are kept here")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-RSS subprocesses")
    parser.add_argument("--compare-to", help="a float32 result JSON: also report agreement with its "
                        "naive captions (for bfloat16/float16 runs)")
    parser.add_argument("--quick", action="store_true", help="tiny model, 3 images, 1 run (CI)")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--child-work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.images, args.runs, args.warmup = 3, 1, 1
    return args


if __name__ == "__main__":
    main()
