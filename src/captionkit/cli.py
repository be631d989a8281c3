"""The `captionkit` command: a thin layer over the library."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from captionkit.errors import CaptionkitError, OptionError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Turn images into text: caption folders with any model, resumably.",
)
# No markup unless a line asks for it: paths, names and reasons may hold `[...]` (`a [1].jpg`).
console = Console(stderr=True, markup=False)
out = Console(width=None if sys.stdout.isatty() else 200, markup=False)


def _print_version(asked: bool) -> None:
    if asked:
        from captionkit import __version__

        out.print(f"captionkit {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Turn images into text: caption folders with any model, resumably."""


Inputs = Annotated[
    list[str],
    typer.Argument(help="Image files, folders, globs, list files (one path per line) or - for stdin."),
]
OutputDir = Annotated[
    Path,
    typer.Option(
        "--output-dir", "-o", help="Where captions and the run store go.", rich_help_panel="Outputs"
    ),
]
Formats = Annotated[
    str,
    typer.Option(
        "--format",
        "-f",
        help="Comma-separated: captions.txt, txt (sidecar per image), jsonl, csv, or all.",
        rich_help_panel="Outputs",
    ),
]
CaptionExt = Annotated[
    str, typer.Option(help="Extension of per-image caption files.", rich_help_panel="Outputs")
]
Prefix = Annotated[
    str,
    typer.Option(help="Text before every exported caption, taken as written: a LoRA trigger word "
                 "such as 'ohwx, '.", rich_help_panel="Outputs"),
]
Suffix = Annotated[
    str, typer.Option(help="Text after every exported caption, taken as written.", rich_help_panel="Outputs")
]
ClipModel = Annotated[
    str | None,
    typer.Option(
        help="Score captions with this CLIP-family model: Hub id, folder or open_clip:ARCH/TAG.",
        rich_help_panel="CLIP scoring",
    ),
]
ScoreScale = Annotated[
    str,
    typer.Option(
        help="clipscore (the paper's 2.5 * cos, 0 to 2.5) or cosine100 (100 * cos, 0 to 100).",
        rich_help_panel="CLIP scoring",
    ),
]
Beside = Annotated[
    bool,
    typer.Option(
        "--beside-images",
        help="Write per-image caption files next to the images instead of under --output-dir.",
        rich_help_panel="Outputs",
    ),
]


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


@app.command()
def caption(
    inputs: Inputs,
    model: Annotated[
        str,
        typer.Option(
            "--model",
            "-m",
            help="Alias, Hub id, local directory, "
            "openai:MODEL or hf-api:MODEL (remote endpoints), "
            "or auto (blip-large if cached, else objects).",
            rich_help_panel="Model and hardware",
        ),
    ] = "auto",
    output_dir: OutputDir = Path("captionkit-out"),
    recursive: Annotated[bool, typer.Option("--recursive", "-r", rich_help_panel="Inputs")] = False,
    ext: Annotated[
        str | None, typer.Option(help="Only these extensions, e.g. jpg,png.", rich_help_panel="Inputs")
    ] = None,
    formats: Formats = "captions.txt,jsonl",
    caption_extension: CaptionExt = ".txt",
    beside_images: Beside = False,
    prefix: Prefix = "",
    suffix: Suffix = "",
    batch_size: Annotated[
        int | None,
        typer.Option(help="Images per batch (default: auto).", min=1, rich_help_panel="Model and hardware"),
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="Decoding threads.", min=1, rich_help_panel="Inputs")
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option(help="Start over, ignoring earlier results, and replace caption files "
                     "captionkit did not write.", rich_help_panel="Resume and exit code"),
    ] = False,
    retry_failed: Annotated[
        bool, typer.Option(help="Try earlier failures again.", rich_help_panel="Resume and exit code")
    ] = False,
    strict: Annotated[
        bool,
        typer.Option(
            help="Exit 1 if any image failed, unreadable ones included (without it only model failures do).",
            rich_help_panel="Resume and exit code",
        ),
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress bar.", rich_help_panel="Outputs")
    ] = False,
    max_pixels: Annotated[
        int,
        typer.Option(help="Refuse images with more pixels (decompression bombs).", rich_help_panel="Inputs"),
    ] = 100_000_000,
    full_decode: Annotated[
        bool,
        typer.Option(
            help="Decode big JPEGs in full before resizing, exactly as the model's processor would "
            "(slower; by default they are decoded at a reduced scale still >= the model's input).",
            rich_help_panel="Inputs",
        ),
    ] = False,
    device: Annotated[
        str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.", rich_help_panel="Model and hardware")
    ] = "auto",
    dtype: Annotated[
        str, typer.Option(help="auto, float32, bfloat16 or float16.", rich_help_panel="Model and hardware")
    ] = "auto",
    load_in_8bit: Annotated[
        bool, typer.Option(help="8-bit weights (CUDA + bitsandbytes).", rich_help_panel="Model and hardware")
    ] = False,
    load_in_4bit: Annotated[
        bool, typer.Option(help="4-bit weights (CUDA + bitsandbytes).", rich_help_panel="Model and hardware")
    ] = False,
    quantize: Annotated[
        str | None,
        typer.Option(
            help="int8: dynamically quantized linear layers on the CPU, ~1.6x faster; captions may change.",
            rich_help_panel="Model and hardware",
        ),
    ] = None,
    api_base: Annotated[
        str | None,
        typer.Option(
            help="Remote endpoints: server base URL, e.g. http://localhost:8000/v1.",
            rich_help_panel="Remote endpoints",
        ),
    ] = None,
    concurrency: Annotated[
        int,
        typer.Option(help="Remote endpoints: requests in flight.", min=1, rich_help_panel="Remote endpoints"),
    ] = 4,
    timeout: Annotated[
        float,
        typer.Option(
            help="Remote endpoints: seconds per request.", min=0.001, rich_help_panel="Remote endpoints"
        ),
    ] = 60.0,
    max_retries: Annotated[
        int,
        typer.Option(
            help="Remote endpoints: retries on 429, 5xx and timeouts.",
            min=0,
            rich_help_panel="Remote endpoints",
        ),
    ] = 5,
    max_new_tokens: Annotated[int, typer.Option(min=1, rich_help_panel="Generation")] = 30,
    min_new_tokens: Annotated[int | None, typer.Option(min=0, rich_help_panel="Generation")] = None,
    num_beams: Annotated[int, typer.Option(min=1, rich_help_panel="Generation")] = 1,
    repetition_penalty: Annotated[float | None, typer.Option(rich_help_panel="Generation")] = None,
    length_penalty: Annotated[float | None, typer.Option(rich_help_panel="Generation")] = None,
    no_repeat_ngram_size: Annotated[int | None, typer.Option(min=0, rich_help_panel="Generation")] = None,
    do_sample: Annotated[
        bool, typer.Option(help="Sample instead of greedy/beam search.", rich_help_panel="Generation")
    ] = False,
    temperature: Annotated[float | None, typer.Option(rich_help_panel="Generation")] = None,
    top_p: Annotated[float | None, typer.Option(rich_help_panel="Generation")] = None,
    seed: Annotated[int | None, typer.Option(rich_help_panel="Generation")] = None,
    prompt: Annotated[
        str | None,
        typer.Option(
            help="Text the caption starts from or answers (models that take text).",
            rich_help_panel="Generation",
        ),
    ] = None,
    prompt_file: Annotated[
        Path | None,
        typer.Option(
            help="CSV of `image path,prompt` rows (paths "
            "relative to it): each listed image is asked "
            "its own prompt, others --prompt.",
            rich_help_panel="Generation",
        ),
    ] = None,
    detail: Annotated[
        str | None,
        typer.Option(
            help="brief, detailed or more-detailed: the "
            "family's own prompt for that level (Kosmos-2, "
            "Florence-2, InstructBLIP, VLMs).",
            rich_help_panel="Generation",
        ),
    ] = None,
    system: Annotated[
        str | None, typer.Option(help="Chat VLMs: a system message.", rich_help_panel="Generation")
    ] = None,
    language: Annotated[
        str | None,
        typer.Option(
            help="Chat VLMs: ask for captions in this language, e.g. French.", rich_help_panel="Generation"
        ),
    ] = None,
    draw_boxes: Annotated[
        Path | None,
        typer.Option(
            help="Write copies of the images with their grounded phrases' boxes here (Kosmos-2).",
            rich_help_panel="Outputs",
        ),
    ] = None,
    candidates: Annotated[
        int,
        typer.Option(
            help="Generate N captions per image (beams, or samples "
            "with --do-sample) and keep the best CLIPScore.",
            min=1,
            rich_help_panel="Generation",
        ),
    ] = 1,
    clip_model: ClipModel = None,
    min_score: Annotated[
        float | None,
        typer.Option(
            help="Captions scoring below this fail the "
            "quality gate (uses the default CLIP model "
            "without --clip-model).",
            rich_help_panel="CLIP scoring",
        ),
    ] = None,
    score_scale: ScoreScale = "clipscore",
    failed_dir: Annotated[
        Path | None,
        typer.Option(
            help="Copy images that fail the gate here, with their caption file.",
            rich_help_panel="CLIP scoring",
        ),
    ] = None,
    move: Annotated[
        bool,
        typer.Option(
            help="Move failed images into --failed-dir instead of copying them.",
            rich_help_panel="CLIP scoring",
        ),
    ] = False,
    keep_failed: Annotated[
        bool,
        typer.Option(
            help="Keep failed images in captions.txt and the caption files.", rich_help_panel="CLIP scoring"
        ),
    ] = False,
    copy_images: Annotated[
        bool,
        typer.Option(
            help="Copy the captioned (passing) images into --output-dir, a caption file beside each.",
            rich_help_panel="CLIP scoring",
        ),
    ] = False,
) -> None:
    """Caption images into captions.txt / per-image .txt / JSONL / CSV, resuming earlier runs."""
    from captionkit import sources
    from captionkit.exporters import check_output_dir, parse_formats
    from captionkit.gate import GateOptions, load_scorer
    from captionkit.models import choose_auto, load
    from captionkit.options import GenerationOptions, LoadOptions
    from captionkit.pipeline import Pipeline, RunOptions

    generation = GenerationOptions(
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        num_beams=num_beams,
        repetition_penalty=repetition_penalty,
        length_penalty=length_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size,
        do_sample=do_sample,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        prompt=prompt,
        candidates=candidates,
        detail=detail,
        system=system,
        language=language,
    )
    gate_options = GateOptions(
        clip_model=clip_model,
        min_score=min_score,
        score_scale=score_scale,
        failed_dir=failed_dir,
        move=move,
        keep_failed=keep_failed,
        copy_images=copy_images,
    )
    run_options = RunOptions(
        output_dir=output_dir,
        recursive=recursive,
        extensions=tuple(e.strip() for e in ext.split(",")) if ext else None,
        formats=tuple(parse_formats(formats)),
        caption_extension=caption_extension,
        sidecars_beside_images=beside_images,
        batch_size=batch_size,
        workers=workers,
        overwrite=overwrite,
        retry_failed=retry_failed,
        max_pixels=max_pixels or sources.DEFAULT_MAX_PIXELS,
        full_decode=full_decode,
        progress=not quiet,
        gate=gate_options,
        prompt_file=prompt_file,
        draw_boxes=draw_boxes,
        prefix=prefix,
        suffix=suffix,
    )
    check_output_dir(output_dir)  # a file in the way is reported before any model loads
    sources.check_inputs_exist(inputs)  # and so is a mistyped input
    if model == "auto":
        model, reason = choose_auto()
        console.print(f"model: {reason}")
    _quiet_transformers()
    # Loaded first: a missing CLIP model is reported before minutes go into the captioner.
    scorer = load_scorer(gate_options, generation, device)
    captioner = load(
        model,
        LoadOptions(
            device=device,
            dtype=dtype,
            load_in_8bit=load_in_8bit,
            load_in_4bit=load_in_4bit,
            quantize=quantize,
            api_base=api_base,
            concurrency=concurrency,
            timeout=timeout,
            max_retries=max_retries,
        ),
    )
    summary = Pipeline(captioner, generation, run_options, scorer).run(inputs)
    _print_summary(summary)
    if failed_dir is not None:
        console.print(
            f"  {_counted(summary.set_aside, 'image')} below {min_score:g} with their captions "
            f"{'moved' if move else 'copied'} to {failed_dir}"
        )
    if summary.model_failures or (strict and summary.failed):
        raise typer.Exit(1)


def _latest_key_of(store, model: str) -> str:
    """The option set of the latest run of `model` (as given to `caption --model`) in `store`."""
    from captionkit.models.registry import recorded_ids

    key = store.latest_options_key(recorded_ids(model))
    if key is None:
        known = ", ".join(sorted(store.run_models())) or "none"
        raise CaptionkitError(f"{store.path}: no run with model {model!r} (its runs' models: {known})")
    return key


def _counted(count: int, noun: str) -> str:
    """'1 caption', '2 captions'."""
    return f"{count} {noun}{'s' * (count != 1)}"


def _print_missing(missing: list[str]) -> None:
    if missing:
        console.print(f"  left out {_counted(len(missing), 'image')} captioned earlier and no longer on "
                      f"disk, such as {missing[0]}", highlight=False)


def _print_kept(kept: list[Path]) -> None:
    from captionkit.sources import printable

    if kept:
        console.print(f"  kept {_counted(len(kept), 'caption file')} captionkit did not write, such as "
                      f"{printable(kept[0])} (--overwrite replaces them)", highlight=False)


def _print_summary(summary) -> None:
    from captionkit.sources import printable

    failed = len(summary.failed)
    parts = [f"[bold]{summary.done}[/] captioned", f"{summary.skipped} already done", f"{failed} failed"]
    if summary.duplicates:
        parts.append(f"{summary.duplicates} identical to another file")
    if summary.failed_earlier:
        parts.append(f"{summary.failed_earlier} failed earlier (--retry-failed to retry)")
    console.print(
        ", ".join(parts) + f" in {summary.seconds:.1f}s "
        f"({summary.images_per_second:.2f} images/s) with {escape(summary.model_id)}", markup=True
    )
    for name, reason in summary.failed[:20]:
        console.print(f"  [red]failed[/] {escape(f'{name}: {reason}')}", markup=True, highlight=False)
    if failed > 20:
        console.print(f"  ... and {failed - 20} more (see captions.jsonl)")
    _print_missing(summary.missing)
    _print_kept(summary.kept)
    if summary.unmatched_prompts:
        console.print(f"  {_counted(len(summary.unmatched_prompts), '--prompt-file row')} named no input "
                      f"image, such as {summary.unmatched_prompts[0]}", highlight=False)
    for path in summary.outputs[:5]:
        console.print(f"  wrote {printable(path)}")
    if len(summary.outputs) > 5:
        console.print(f"  ... and {len(summary.outputs) - 5} more files")
    if getattr(summary, "scores", None):
        _print_scores(summary.scores, summary.min_score, summary.passed)


def _print_scores(scores: list[float], min_score: float | None, passed: int) -> None:
    from captionkit.scoring import histogram_text

    console.print(f"CLIPScore of {_counted(len(scores), 'caption')} (mean {sum(scores) / len(scores):.4f}):")
    console.print(histogram_text(scores, threshold=min_score), highlight=False, markup=False)
    if min_score is not None:
        console.print(f"{passed} of {len(scores)} passed (>= {min_score:g})")


@app.command()
def models() -> None:
    """List the known models: aliases, Hub ids, size, license and memory needs."""
    from captionkit import hub
    from captionkit.models import FAMILIES, MODELS

    table = Table("alias", "source", "family", "params", "license", "memory", "cached")
    for spec in MODELS.values():
        cached = (
            "built-in" if spec.source == "built-in" else ("yes" if hub.cached_snapshot(spec.source) else "no")
        )
        table.add_row(spec.alias, spec.source, spec.family, spec.params, spec.license, spec.memory, cached)
    out.print(table)
    families = Table("family (read from config.json)", "aliases")
    for family in FAMILIES:
        families.add_row(family, ", ".join(s.alias for s in MODELS.values() if s.family == family))
    out.print(families)
    out.print(
        "Any Hub id or local directory of these families works too: --model ORG/NAME "
        "or --model ./checkpoint; any other image-text-to-text checkpoint runs as a chat VLM"
    )
    out.print(
        "Remote endpoints: --model openai:MODEL --api-base URL (OpenAI-compatible servers) "
        "or --model hf-api:ORG/NAME (Hugging Face Inference API)"
    )


@app.command("export")
def export_command(
    output_dir: Annotated[Path, typer.Argument(help="A folder holding captionkit.db.")],
    formats: Formats = "captions.txt",
    to: Annotated[Path | None, typer.Option(help="Write here instead of OUTPUT_DIR.")] = None,
    caption_extension: CaptionExt = ".txt",
    beside_images: Beside = False,
    prefix: Prefix = "",
    suffix: Suffix = "",
    model: Annotated[
        str | None, typer.Option(help="Export this model's results (default: the latest run's).")
    ] = None,
    keep_failed: Annotated[
        bool,
        typer.Option(help="Keep images that failed the quality gate in captions.txt and the caption files."),
    ] = False,
    overwrite: Annotated[
        bool, typer.Option(help="Replace caption files captionkit did not write (by hand, or edited).")
    ] = False,
) -> None:
    """Rebuild captions.txt, sidecars, JSONL or CSV from a run store."""
    from captionkit.exporters import (
        ExportOptions,
        distinct_names,
        export,
        foreign_sidecars,
        parse_formats,
        with_existing_files,
    )
    from captionkit.store import DB_NAME, Store

    db = output_dir / DB_NAME
    if not db.is_file():
        raise CaptionkitError(f"{output_dir}: no {DB_NAME} here; pass the --output-dir of a run")
    store = Store(db)
    try:
        key = store.latest_options_key()
        if model is not None:
            key = _latest_key_of(store, model)
        if key is None:
            raise CaptionkitError(f"{db}: the store holds no run yet")
        results = distinct_names(list(store.results(key)))
        chosen = parse_formats(formats)
        options = with_existing_files(
            results, chosen, ExportOptions(to or output_dir, caption_extension, beside_images, keep_failed,
                                           prefix=prefix, suffix=suffix),
            store, overwrite, copies_in=[output_dir, to])
        kept = foreign_sidecars(results, options)
        written = export(results, chosen, options)
        done = sum(result.status == "done" for result in results)
        # Recorded so that a later run knows these caption files, prefix and all, as its own.
        model_id = model or (results[0].model_id if results else "")
        run_id = store.start_run(model_id, key, {"export": formats, "prefix": prefix, "suffix": suffix},
                                 kind="export")
        store.finish_run(run_id, {"exported": done, "files": len(written)})
    finally:
        store.close()
    console.print(f"exported {_counted(done, 'caption')} to {_counted(len(written), 'file')}")
    _print_missing(sorted(result.name for result in results if result.path in options.missing))
    _print_kept(kept)


@app.command()
def score(
    captions: Annotated[
        Path, typer.Argument(exists=True, help="captions.txt, JSONL, CSV, or a folder of caption files.")
    ],
    images: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            file_okay=False,
            help="Where the images are (default: the captions file's folder), searched recursively.",
        ),
    ] = None,
    references: Annotated[
        Path | None,
        typer.Option(exists=True, help="Reference captions in any dataset format, for RefCLIPScore."),
    ] = None,
    clip_model: ClipModel = None,
    score_scale: ScoreScale = "clipscore",
    min_score: Annotated[float | None, typer.Option(help="Mark captions below this as not passed.")] = None,
    output: Annotated[
        Path,
        typer.Option("--output", "-o", help="Scores file: .jsonl, or .csv for a table (a folder: "
                     "FOLDER/scores.jsonl). A .db of the same name beside it lets a re-run resume."),
    ] = Path("scores.jsonl"),
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Score existing captions against their images with CLIP, without captioning again."""
    from captionkit.exporters import ExportOptions, check_output_dir, write_csv, write_jsonl
    from captionkit.gate import score_existing, tally
    from captionkit.scoring import DEFAULT_MODEL, load_scorer
    from captionkit.store import DB_NAME, Store
    from captionkit.ui import progress_bar

    if output.is_dir():
        output = output / "scores.jsonl"
    if output.exists() and output.samefile(captions):
        raise OptionError(f"-o {output} is the captions file being scored: name another output")
    check_output_dir(output.parent)
    _quiet_transformers()
    scorer = load_scorer(clip_model or DEFAULT_MODEL, device=device, scale=score_scale)
    record = output.with_suffix(".db")
    if record.name == DB_NAME:  # `-o OUT/captionkit.csv` beside a run: its store is the run's, not ours
        record = output.with_suffix(".scores.db")
    store = Store(record)
    try:
        scored = score_existing(captions, scorer, images, references, min_score, store=store,
                                progress=lambda total: progress_bar(total, not quiet, "scoring"))
    finally:
        store.close()
    if scored.reused:
        console.print(f"{_counted(scored.reused, 'score')} reused from {record} (scored earlier)")
    for problem in scored.problems[:20]:
        console.print(f"  [yellow]skipped[/] {escape(problem)}", markup=True, highlight=False)
    unscored = [r for r in scored.results if r.status != "done"]
    for result in unscored[:20]:
        console.print(f"  [red]not scored[/] {escape(f'{result.name}: {result.error}')}", markup=True,
                      highlight=False)
    if len(unscored) > 20:
        console.print(f"  ... and {len(unscored) - 20} more (see {output})")
    writer = write_csv if output.suffix.lower() == ".csv" else write_jsonl
    writer(scored.results, ExportOptions(output.parent), name=output.name)
    scores, passed = tally(scored.results)
    if not scores:
        raise CaptionkitError(
            f"no image found for any of the {len(scored.results)} captions under "
            f"{scored.images}: pass --images DIR"
        )
    _print_scores(scores, min_score, passed)
    refs = [r.extras["ref_clip_score"] for r in scored.results if "ref_clip_score" in r.extras]
    if refs:
        console.print(f"RefCLIPScore mean {sum(refs) / len(refs):.4f} over {_counted(len(refs), 'caption')}")
    console.print(f"wrote {output}")


@app.command("evaluate")
def evaluate_command(
    predictions: Annotated[
        Path | None,
        typer.Option(help="Captions to score: captions.txt, JSONL, CSV, COCO results JSON or sidecars."),
    ] = None,
    references: Annotated[
        Path | None,
        typer.Option(help="Reference captions in any dataset format (Flickr, COCO, Karpathy, CSV, ...)."),
    ] = None,
    split: Annotated[
        str | None,
        typer.Option(
            help="test, val, train or all: a Karpathy split, or the --dataset split (default test)."
        ),
    ] = None,
    split_file: Annotated[
        Path | None, typer.Option(help="Image names to keep, one a line (Flickr_8k.testImages.txt).")
    ] = None,
    images: Annotated[
        Path | None, typer.Option(help="The images' folder, for thumbnails and --clip-model.")
    ] = None,
    dataset: Annotated[
        str | None,
        typer.Option(help="flickr8k, flickr30k or coco: caption its split with --model, then score it."),
    ] = None,
    root: Annotated[Path | None, typer.Option(help="The --dataset folder.")] = None,
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="Captioner for --dataset: alias, Hub id or local directory."),
    ] = None,
    metrics: Annotated[
        str, typer.Option(help="Comma-separated: bleu, meteor, rouge, cider, spice.")
    ] = "bleu,meteor,rouge,cider,spice",
    clip_model: ClipModel = None,
    output_dir: Annotated[
        Path, typer.Option("--output-dir", "-o", help="Report files; with --dataset, captions and store.")
    ] = Path("captionkit-eval"),
    limit: Annotated[int | None, typer.Option(help="Caption only the split's first N images.", min=1)] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per batch (default: auto).", min=1)] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")] = "auto",
    quantize: Annotated[str | None, typer.Option(help="int8: quantized linear layers on the CPU.")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 30,
    num_beams: Annotated[int, typer.Option(min=1)] = 1,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Score captions against references; with --dataset, caption the split first (resumably)."""
    from captionkit.evaluate import check_inputs, evaluate_dataset, evaluate_files, parse_metrics
    from captionkit.options import GenerationOptions, LoadOptions
    from captionkit.report import print_summary

    check_inputs(
        predictions=predictions,
        references=references,
        dataset=dataset,
        root=root,
        model=model,
        split_file=split_file,
        images=images,
        limit=limit,
        clip_model=clip_model,
    )
    chosen = parse_metrics(metrics)
    generation = GenerationOptions(max_new_tokens=max_new_tokens, num_beams=num_beams)
    load_options = LoadOptions(device=device, dtype=dtype, quantize=quantize)
    scorer = None
    if dataset is not None or clip_model is not None:
        _quiet_transformers()
    if clip_model is not None:
        from captionkit.scoring import load_scorer

        scorer = load_scorer(clip_model, device=device)
    if dataset is not None:
        evaluation = evaluate_dataset(
            dataset,
            root,
            model,
            output_dir,
            split=split or "test",
            limit=limit,
            generation=generation,
            load_options=load_options,
            batch_size=batch_size,
            progress=not quiet,
            metrics=chosen,
            clip_scorer=scorer,
        )
        _print_summary(evaluation.run)
    else:
        evaluation = evaluate_files(
            predictions,
            references,
            output_dir,
            split=split,
            split_file=split_file,
            images=images,
            metrics=chosen,
            clip_scorer=scorer,
            progress=not quiet,
        )
    print_summary(evaluation.result, out, notes=console)
    for path in evaluation.files.values():
        console.print(f"wrote {path}", soft_wrap=True)


INTERRUPTED = "interrupted: finished batches are saved; run the same command to resume"


class Interrupted(BaseException):
    """Ctrl-C or SIGTERM (a scheduler's time limit, `docker stop`). Not a KeyboardInterrupt, which
    typer >= 0.29 turns into a silent exit code; a BaseException, so no `except Exception` stops it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.exit_code = 128 + signum


def _interrupt(signum: int, frame: object) -> None:
    raise Interrupted(signum)


def main() -> None:
    """Console-script entry point: user errors become one line and exit code 2."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) is not signal.SIG_IGN:  # `nohup` and `&` ignore SIGINT: keep that
            signal.signal(signum, _interrupt)
    try:
        code = app(standalone_mode=False)
    except CaptionkitError as err:
        # Escaped and soft-wrapped: a path like `a [1].jpg` is not markup, and one line stays one line.
        console.print(f"[red]error:[/] {escape(str(err))}", markup=True, highlight=False, soft_wrap=True)
        sys.exit(2)
    except typer.Exit as exit_:
        sys.exit(exit_.exit_code)
    except typer.Abort:
        console.print("aborted")
        sys.exit(130)
    except Interrupted as interrupt:
        console.print(INTERRUPTED)
        _exit_now(interrupt.exit_code)
    except Exception as err:
        if not (isinstance(err, _usage_errors()) and hasattr(err, "show")):
            raise
        err.show()  # the usage line and what was wrong with the command line
        sys.exit(err.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


def _exit_now(code: int) -> None:
    """Exit without waiting for worker threads still blocked in a request or a decode (Python joins
    them at exit: a Ctrl-C during a slow endpoint's 60 s timeout would hang for up to that long)."""
    if any(thread.is_alive() and not thread.daemon for thread in threading.enumerate()
           if thread is not threading.main_thread()):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _usage_errors() -> tuple[type[Exception], ...]:
    """What a bad command line raises: typer >= 0.29 raises its own copy of click's exceptions."""
    kinds: list[type[Exception]] = [typer.TyperException] if hasattr(typer, "TyperException") else []
    try:
        import click
    except ImportError:  # typer >= 0.29 no longer needs click itself
        return tuple(kinds)
    return (*kinds, click.ClickException)
