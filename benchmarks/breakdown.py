"""Where one batch's time goes inside captionkit's model call: processor, encoders, decoder steps.

Times one `captioner.caption` batch (the call the pipeline makes) with forward hooks on the
family's modules, synchronizing the GPU at each boundary so every stage's wall time is its own:

  processor             the model's processor, images to tensors (host);
  encoder MODULE        each encoder module the family runs once per batch (`STAGES`);
  decoder, first call   the first decoding step, with the cross-attention caches it builds;
  decoder, later steps  every later step, one token for the whole batch each;
  rest                  what no hook covers: `generate`'s loop, logits processing, the tokenizer.

On CUDA it also reports how busy the GPU was (the sum of its kernels' time from torch.profiler
over one extra batch, against that batch's wall time): a low share means the host side limits.

    python benchmarks/breakdown.py --model blip-base --out benchmarks/results/breakdown-blip-base-float32.json
    python benchmarks/breakdown.py --quick   # tiny model, CI
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import models  # noqa: E402
from throughput import TOKENS, image_paths, model_path, pinned_generation, resolve  # noqa: E402

STAGES = {
    # model_type: (encoders run once per batch, the decoder run once per generated token)
    "blip": (("vision_model",), "text_decoder"),
    "blip-2": (("vision_model", "qformer"), "language_model"),
    "vision-encoder-decoder": (("encoder",), "decoder"),
    "git": (("git.image_encoder",), "git.encoder"),
}


class StageClock:
    """Wall time per stage, from forward hooks that synchronize the device at both ends."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, list[float]] = {}
        self._started: dict[str, float] = {}

    def watch(self, module: torch.nn.Module, name: str) -> None:
        module.register_forward_pre_hook(lambda *_: self.start(name))
        module.register_forward_hook(lambda *_: self.stop(name))

    def start(self, name: str) -> None:
        common.synchronize(self.device)
        self._started[name] = time.perf_counter()

    def stop(self, name: str) -> None:
        common.synchronize(self.device)
        self.seconds.setdefault(name, []).append(time.perf_counter() - self._started[name])


def submodule(model: torch.nn.Module, dotted: str) -> torch.nn.Module:
    for part in dotted.split("."):
        model = getattr(model, part)
    return model


def measure(captioner, images: list, generation, runs: int, device: torch.device) -> tuple[dict, float]:
    """Median seconds per stage over `runs` batches, after one warm-up batch, and the median
    number of page faults a batch took (memory fresh from the OS, a fault per 4 KiB)."""
    model = captioner.model
    encoders, decoder = STAGES[model.config.model_type]
    clock = StageClock(device)
    for name in encoders:
        clock.watch(submodule(model, name), name)
    clock.watch(submodule(model, decoder), "decoder")
    encode = captioner.encode

    def timed_encode(*args, **kwargs):
        clock.start("processor")
        inputs = encode(*args, **kwargs)
        clock.stop("processor")
        return inputs

    captioner.encode = timed_encode
    per_run, faults = [], []
    for run in range(runs + 1):
        clock.seconds.clear()
        common.synchronize(device)
        faulted = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        started = time.perf_counter()
        captioner.caption(images, generation)
        common.synchronize(device)
        total = time.perf_counter() - started
        steps = clock.seconds["decoder"]
        stages = {"processor": sum(clock.seconds["processor"]),
                  **{f"encoder {name}": sum(clock.seconds[name]) for name in encoders},
                  "decoder, first call": steps[0],
                  f"decoder, later steps (x{len(steps) - 1})": sum(steps[1:])}
        stages["rest"] = total - sum(stages.values())
        stages["total"] = total
        if run:  # the first batch is the warm-up
            per_run.append(stages)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faulted)
    del captioner.encode
    return ({stage: common.median([run[stage] for run in per_run]) for stage in per_run[0]},
            common.median(faults))


def gpu_busy_share(captioner, images: list, generation) -> float:
    """Share of one batch's wall time the GPU spent running kernels."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        torch.cuda.synchronize()
        started = time.perf_counter()
        captioner.caption(images, generation)
        torch.cuda.synchronize()
        wall = time.perf_counter() - started
    kernels = sum(event.device_time_total for event in prof.events()
                  if event.device_type == torch.autograd.DeviceType.CUDA) / 1e6
    return kernels / wall


def print_table(result: dict) -> None:
    settings, stages = result["settings"], result["seconds_per_batch"]
    batch = settings["batch"]
    precision = "int8 linear layers" if settings["quantize"] else settings["dtype"]
    print(f"\n{settings['model']} ({precision}, "
          f"{result['machine'].get('gpu') or result['machine']['cpu']}), batch {batch}, {TOKENS} tokens")
    print(f"{'stage':34s} {'s/batch':>9s} {'ms/image':>9s} {'share':>7s}")
    for stage, seconds in stages.items():
        share = seconds / stages["total"]
        print(f"{stage:34s} {seconds:9.3f} {seconds / batch * 1000:9.1f} {share:7.1%}")
    print(f"page faults per batch (fresh 4 KiB pages): {result['page_faults_per_batch']:.0f}")
    if "gpu_busy_share" in result:
        print("GPU busy (kernel time / wall, one more batch under the profiler): "
              f"{result['gpu_busy_share']:.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="blip-base", choices=sorted(models.FULL))
    parser.add_argument("--batch", type=int, help="images per batch (default: the pipeline's for the device)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--quantize", choices=["int8"])
    parser.add_argument("--work", default=str(common.DEFAULT_WORK))
    parser.add_argument("--quick", action="store_true", help="tiny model, batch 2, 1 run (CI)")
    parser.add_argument("--out")
    args = parser.parse_args()
    import transformers

    from captionkit.device import set_malloc_thresholds
    from captionkit.models import load
    from captionkit.options import LoadOptions
    from captionkit.pipeline import default_batch_size
    from captionkit.sources import load_image

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    set_malloc_thresholds()  # as every pipeline run does
    if args.quick:
        args.batch, args.runs = 2, 1
    device, dtype = resolve(args)
    dtype_name = str(dtype).removeprefix("torch.")
    captioner = load(str(model_path(args)), LoadOptions(device=str(device), dtype=dtype_name,
                                                        quantize=args.quantize))
    args.images = args.batch or default_batch_size(captioner)  # what image_paths makes
    images = [load_image(path, captioner.input_size) for path in image_paths(args)]
    generation = pinned_generation()
    seconds, faults = measure(captioner, images, generation, args.runs, device)
    result = {"machine": common.machine(device),
              "settings": {"model": args.model, "batch": len(images), "tokens": TOKENS,
                           "dtype": dtype_name, "quantize": args.quantize,
                           "runs": args.runs, "quick": args.quick},
              "seconds_per_batch": seconds, "page_faults_per_batch": faults}
    if device.type == "cuda":
        result["gpu_busy_share"] = gpu_busy_share(captioner, images, generation)
    print_table(result)
    common.save(result, args.out)


if __name__ == "__main__":
    main()
