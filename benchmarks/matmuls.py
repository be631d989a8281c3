"""How fast can float32 go on this CPU? BLIP-base's matrix products under every exact kernel torch has.

For the products BLIP-base makes (its vision encoder's, one image of 577 tokens at a time; its text
decoder's at a step of batch 16), this times each float32 kernel torch offers on a CPU: `F.linear`
(MKL's sgemm, what captionkit runs), MKL with the weight prepacked, and oneDNN. Encoder products
are compute-bound, so they are set against the square-GEMM peak; decoder steps read weights that
no cache holds, so they are set against a plain memory read. Every kernel runs in each round
(interleaved, so load from other processes hits all alike) and the best round counts.

It then turns the vision encoder's FLOPs into the least time one image can take in float32 at the
fastest kernel measured, and compares it with what a `--target`-times-naive speed allows per image
for everything (decoding, encoder, 20 decoder steps), given the naive loop's measured images/s.

    python benchmarks/matmuls.py --naive 0.51 --out benchmarks/results/matmuls.json
    python benchmarks/matmuls.py --quick --out /tmp/matmuls.json   # small shapes, seconds (CI)
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

TOKENS, WIDTH, MLP, LAYERS, PATCH, VOCAB = 577, 768, 3072, 12, 16, 30524
"""BLIP-base: ViT-B/16 at 384 px (24 x 24 patches + CLS) and a BERT-base text decoder."""
DECODER_BATCH = 16  # captionkit's CPU batch
UNCACHED_BYTES = 96 << 20
"""Decoder weights are cycled through copies adding up to this, so that no cache holds them."""


def shapes(scale: int = 1) -> tuple[dict, dict]:
    """(rows, inner, outputs) of the linear layers of one encoder layer (one image) and of one
    decoder step (one batch); `scale` divides the sizes (--quick)."""
    tokens, width, mlp, vocab = TOKENS // scale, WIDTH // scale, MLP // scale, VOCAB // scale
    encoder = {"qkv": (tokens, width, 3 * width), "projection": (tokens, width, width),
               "mlp up": (tokens, width, mlp), "mlp down": (tokens, mlp, width)}
    decoder = {"attention": (DECODER_BATCH, width, width), "mlp up": (DECODER_BATCH, width, mlp),
               "mlp down": (DECODER_BATCH, mlp, width), "lm head": (DECODER_BATCH, width, vocab)}
    return encoder, decoder


def encoder_flops(layers: int = LAYERS, scale: int = 1) -> int:
    """One image through the vision encoder: the patch embedding, then in every layer the linear
    layers and attention's scores and weighted sum (4 x tokens^2 x width)."""
    encoder, _ = shapes(scale)
    tokens, width = encoder["qkv"][:2]
    embedding = 2 * (tokens - 1) * 3 * PATCH ** 2 * width
    return embedding + layers * (sum(2 * r * k * n for r, k, n in encoder.values())
                                 + 4 * tokens ** 2 * width)


def kernels(weight: torch.Tensor, bias: torch.Tensor, rows: int) -> dict[str, Callable | str]:
    """Each exact float32 CPU kernel for `x @ weight.T + bias`, or why it cannot run here."""
    found: dict[str, Callable | str] = {"F.linear (MKL sgemm)": lambda x: F.linear(x, weight, bias)}
    try:
        packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, rows)
        found["MKL, weight prepacked"] = lambda x: torch.ops.mkl._mkl_linear(x, packed, weight, bias, rows)
    except (AttributeError, RuntimeError) as error:
        found["MKL, weight prepacked"] = f"unavailable: {str(error).splitlines()[0]}"
    try:
        linear_pointwise = torch.ops.mkldnn._linear_pointwise
        linear_pointwise(torch.zeros(rows, weight.shape[1]), weight, bias, "none", [], "")
        found["oneDNN"] = lambda x: linear_pointwise(x, weight, bias, "none", [], "")
    except (AttributeError, RuntimeError) as error:
        found["oneDNN"] = f"unavailable: {str(error).splitlines()[0]}"
    return found


def best_seconds(run: Callable[[], object], repeats: int) -> float:
    run()
    started = time.perf_counter()
    for _ in range(repeats):
        run()
    return (time.perf_counter() - started) / repeats


def measure(shapes: dict[str, tuple[int, int, int]], rounds: int, uncached_bytes: int = 0) -> dict:
    """Best GFLOP/s (and GB/s of weights) of each kernel on each shape over interleaved rounds."""
    results: dict[str, dict] = {}
    setups = {}
    for name, (rows, inner, outputs) in shapes.items():
        copies = max(1, math.ceil(uncached_bytes / (inner * outputs * 4)))
        weights = [torch.randn(outputs, inner) * 0.02 for _ in range(copies)]
        bias = torch.randn(outputs) * 0.02
        x = torch.randn(rows, inner)
        per_copy = [kernels(w, bias, rows) for w in weights]
        setups[name] = (x, per_copy, 2 * rows * inner * outputs, inner * outputs * 4)
        results[name] = {"shape": [rows, inner, outputs], "kernels": {}}
    for _ in range(rounds):
        for name, (x, per_copy, flops, weight_bytes) in setups.items():
            for kernel, run in per_copy[0].items():
                row = results[name]["kernels"].setdefault(kernel, {})
                if isinstance(run, str):
                    row["error"] = run
                    continue
                runs = [copy[kernel] for copy in per_copy]
                seconds = best_seconds(lambda runs=runs, x=x: [r(x) for r in runs], repeats=3) / len(runs)
                if seconds < row.get("seconds", math.inf):
                    row.update(seconds=seconds, gflops=flops / seconds / 1e9,
                               weight_gbytes_per_second=weight_bytes / seconds / 1e9)
    return results


def read_speed(megabytes: int, rounds: int) -> float:
    """GB/s of summing a float32 array far bigger than the caches: what a memory-bound step can reach."""
    data = torch.ones(megabytes << 18)
    seconds = min(best_seconds(data.sum, repeats=3) for _ in range(rounds))
    return data.numel() * 4 / seconds / 1e9


def fastest(result: dict, key: str) -> dict[str, float]:
    """Each shape's best figure over the kernels that ran."""
    return {name: max(k[key] for k in row["kernels"].values() if key in k) for name, row in result.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--naive", type=float, default=None,
                        help="the naive loop's images/s on this machine (throughput.py's naive row)")
    parser.add_argument("--target", type=float, default=6.0, help="the speed-up over naive to test (issue 3)")
    parser.add_argument("--quick", action="store_true", help="shapes 1/8 the size, one round (CI)")
    parser.add_argument("--out")
    args = parser.parse_args()
    rounds = 1 if args.quick else args.rounds
    scale = 8 if args.quick else 1
    encoder_shapes, decoder_shapes = shapes(scale)
    flops = encoder_flops(scale=scale)
    cpu = torch.device("cpu")
    with torch.inference_mode():
        encoder = measure(encoder_shapes, rounds)
        steps = measure(decoder_shapes, rounds, UNCACHED_BYTES // (64 if args.quick else 1))
    # Each ceiling is the best of several tries too, so that a busy moment lowers none of them.
    peak = max(common.matmul_peak(torch.float32, cpu, seconds=0.1 if args.quick else 0.5)
               for _ in range(rounds))
    read = read_speed(16 if args.quick else 256, rounds)
    # What the encoder's linear layers take at the fastest kernel measured for each shape.
    linear_seconds = sum(LAYERS * 2 * r * k * n / (gflops * 1e9) for (r, k, n), gflops in
                         zip(encoder_shapes.values(), fastest(encoder, "gflops").values(), strict=True))
    bound = {"encoder_gflop_per_image": flops / 1e9, "float32_matmul_peak_gflops": peak,
             "encoder_linear_seconds_at_fastest_kernels": linear_seconds,
             "encoder_seconds_at_peak": flops / (peak * 1e9)}
    if args.naive:
        bound.update(naive_images_per_second=args.naive, target=args.target,
                     seconds_per_image_at_target=1 / (args.target * args.naive))
    result = {"machine": common.machine(cpu), "quick": args.quick, "rounds": rounds,
              "encoder_one_image": encoder, "decoder_step_batch_16": steps,
              "plain_read_gbytes_per_second": read, "float32_bound": bound}
    print(f"float32 matmul peak (square {common.GEMM_SIZE}): {peak:.0f} GFLOP/s; plain read {read:.1f} GB/s")
    for title, table, key, unit, against in (
            ("encoder", encoder, "gflops", "GFLOP/s", peak),
            ("decoder step", steps, "weight_gbytes_per_second", "GB/s", read)):
        for name, row in table.items():
            cells = [f"{kernel} {k[key]:.1f}" if key in k else f"{kernel}: n/a"
                     for kernel, k in row["kernels"].items()]
            best = max((k[key] for k in row["kernels"].values() if key in k), default=0.0)
            print(f"{title:12s} {name:10s} {unit:7s} {' | '.join(cells)}  (best {best / against:.0%})")
    print(f"encoder: {flops / 1e9:.1f} GFLOP per image; its linear layers alone take "
          f"{linear_seconds * 1000:.0f} ms at the fastest kernels, {flops / peak / 1e6:.0f} ms at the peak")
    if args.naive:
        print(f"{args.target:g}x naive ({args.naive} images/s) allows "
              f"{bound['seconds_per_image_at_target'] * 1000:.0f} ms per image for everything")
    common.save(result, args.out)


if __name__ == "__main__":
    main()
