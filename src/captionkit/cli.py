"""The `captionkit` command: a thin layer over the library.

Options come from the dataclasses in `captionkit.options` through `flags.with_options`; heavy
libraries (torch, transformers, PIL) are imported inside the commands, so `--help` stays quick.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

from captionkit import ui
from captionkit.errors import CaptionkitError, OptionError
from captionkit.flags import Select, changed, declared, with_options
from captionkit.options import (
    INPUTS,
    MODEL,
    OUTPUTS,
    RESUME,
    SEGMENTATION,
    EngineOptions,
    GateOptions,
    GenerationOptions,
    LoadOptions,
    RunOptions,
)
from captionkit.segment.options import SegmenterLoadOptions, SegmentOptions
from captionkit.serve.options import ServeOptions
from captionkit.train.options import (
    BlipOptions,
    ClipCapOptions,
    CnnLstmOptions,
    TrainOptions,
    architecture_of,
)


class _Unlabelled:
    """Help without the `<bool>` and `<list[str]>` labels typer >= 0.29 gives flags and arguments:
    a flag takes no value, and an argument's help says what it takes."""

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)  # type: ignore[misc]
        for param in params:
            if param.param_type_name == "argument":
                param.display_type_rich = lambda ctx: None
            elif getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
        return params


class _Command(_Unlabelled, TyperCommand):
    pass


class _Group(_Unlabelled, TyperGroup):
    pass


app = typer.Typer(
    cls=_Group,
    add_completion=False,
    no_args_is_help=True,
    help="Turn images into text: caption folders with any model, resumably.",
)


def command(name: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a `captionkit NAME` command whose options-class parameters become its flags
    (`flags.with_options`)."""
    return lambda function: app.command(name, cls=_Command)(with_options(function))


def _print_version(asked: bool) -> None:
    if asked:
        from captionkit import __version__

        ui.out.print(f"captionkit {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Turn images into text: caption folders with any model, resumably."""


Inputs = Annotated[list[str], typer.Argument(
    help="Image files, folders, globs, list files (one path per line) or - for stdin.")]
ModelName = Annotated[str, typer.Option(
    "--model", "-m", help="Alias, Hub id, local directory, openai:MODEL or hf-api:MODEL (remote "
    "endpoints), or auto (blip-large if cached, else objects).", rich_help_panel=MODEL, metavar="NAME")]
SegmentWith = Annotated[str | None, typer.Option(
    "--segment", help="Also segment each image with these segmenters (comma-separated, e.g. "
    "maskrcnn-v2; sam masks a grounded caption's phrases).", rich_help_panel=SEGMENTATION,
    metavar="NAMES")]
Segmenter = Annotated[str, typer.Option(
    "--model", "-m", help="The segmenter: yolov5s-seg (offline default), maskrcnn-v2, a Hub id or "
    "a folder; `captionkit models` lists them.", rich_help_panel=MODEL, metavar="NAME")]
Semantic = Annotated[str | None, typer.Option(
    help="Also give every pixel a class with this semantic segmenter, e.g. deeplabv3-resnet50.",
    rich_help_panel=MODEL, metavar="NAME")]
SEGMENT_RUN = Select("output_dir", "recursive", "extensions", "formats", "batch_size", "workers",
                     "full_decode", "overwrite", "retry_failed", "max_pixels", "progress", "overlays",
                     "overlay_alpha",
                     formats={"cli_default": "jsonl,coco,masks", "help": "Comma-separated: jsonl, coco "
                              "(instances.json), masks (label maps), csv."})
Strict = Annotated[bool, typer.Option(
    "--strict", help="Exit 1 if any image failed, unreadable ones included (without it only model "
    "failures do).", rich_help_panel=RESUME)]


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


@command()
def caption(inputs: Inputs, model: ModelName = "auto", strict: Strict = False, segment: SegmentWith = None,
            *, generation: GenerationOptions, load_options: LoadOptions, run: RunOptions,
            segment_options: SegmentOptions, segmenter_load: SegmenterLoadOptions,
            engine: EngineOptions) -> None:
    """Caption images into captions.txt / per-image .txt / JSONL / CSV, resuming earlier runs."""
    from captionkit import ray_engine, sources
    from captionkit.exporters import check_output_dir
    from captionkit.gate import load_scorer
    from captionkit.models import choose_auto
    from captionkit.pipeline import find_inputs

    check_output_dir(run.output_dir)  # a file in the way is reported before any model loads
    if segment is None:
        segmenter_load.check_unused("--segment")
    sources.check_inputs_exist(inputs)  # and so is a mistyped input
    found = find_inputs(inputs, run)  # and a folder with no image in it
    if model == "auto":
        model, reason = choose_auto()
        ui.err.print(f"model: {reason}")
    _quiet_transformers()
    # Loaded first: a missing CLIP model is reported before minutes go into the captioner. Under
    # Ray the driver needs only its name and scale, on its own CPU; each replica loads its own.
    scorer = load_scorer(run.gate, generation, "cpu" if engine.engine == "ray" else load_options.device)
    loader = (_segmenting(segment.split(","), segment_options, segmenter_load)
              if segment is not None else None)
    pipeline, executor = ray_engine.pipeline_for(ray_engine.ModelRecipe(model, load_options, loader),
                                                 generation, run, engine, scorer)
    summary = pipeline.run(inputs, found, executor=executor)
    ui.print_run(summary)
    gate = run.gate
    if gate.failed_dir is not None:
        ui.err.print(f"  {ui.counted(summary.set_aside, 'image')} below {gate.min_score:g} with their "
                     f"captions {'moved' if gate.move else 'copied'} to {gate.failed_dir}")
    if summary.model_failures or (strict and summary.failed):
        raise typer.Exit(1)


@command()
def segment(inputs: Inputs, model: Segmenter = "yolov5s-seg", semantic: Semantic = None,
            strict: Strict = False, *, options: SegmentOptions, segmenter_load: SegmenterLoadOptions,
            load_options: Annotated[LoadOptions, Select("device", "dtype")],
            run: Annotated[RunOptions, SEGMENT_RUN], engine: EngineOptions) -> None:
    """Segment images: instances as COCO instances.json, label maps, overlays; resumably."""
    from captionkit import ray_engine, sources
    from captionkit.exporters import check_output_dir
    from captionkit.pipeline import find_inputs

    check_output_dir(run.output_dir)
    sources.check_inputs_exist(inputs)
    found = find_inputs(inputs, run)
    names = [model, *([semantic] if semantic else [])]
    _quiet_transformers()
    recipe = ray_engine.ModelRecipe("+".join(names), load_options,
                                    _segmenting(names, options, segmenter_load, with_captioner=False))
    pipeline, executor = ray_engine.pipeline_for(recipe, GenerationOptions(), run, engine)
    summary = pipeline.run(inputs, found, executor=executor)
    ui.print_run(summary)
    if summary.model_failures or (strict and summary.failed):
        raise typer.Exit(1)


def _segmenting(names: list[str], options: SegmentOptions, load: SegmenterLoadOptions | None = None,
                with_captioner: bool = True):
    """How the run's model (here or on Ray workers) loads the named segmenters, around the
    captioner or alone."""
    from captionkit.segment.captioner import SegmentingLoader

    return SegmentingLoader(tuple(name.strip() for name in names), options, with_captioner,
                            load or SegmenterLoadOptions())


@command()
def models() -> None:
    """List the known captioners and segmenters: aliases, Hub ids, size, license and memory needs."""
    from captionkit import hub
    from captionkit.models import FAMILIES, MODELS
    from captionkit.segment.registry import DEFAULT, SEGMENTERS

    cached = {spec.alias: "built-in" if spec.source == "built-in" else
              "yes" if hub.cached_snapshot(spec.source) else "no" for spec in MODELS.values()}
    ui.print_models(MODELS.values(), FAMILIES, cached)
    ui.print_segmenters(SEGMENTERS.values(), DEFAULT)


@command("export")
def export_command(
    output_dir: Annotated[Path, typer.Argument(help="A run's folder, holding captionkit.db.")],
    to: Annotated[Path | None, typer.Option(help="Write here instead of the run's folder.", metavar="DIR",
                                            rich_help_panel=OUTPUTS)] = None,
    model: Annotated[str | None, typer.Option(
        help="Export this model's results (default: the latest run's).", metavar="NAME",
        rich_help_panel=INPUTS)] = None,
    keep_failed: Annotated[bool, typer.Option(
        "--keep-failed", help="Keep images that failed the quality gate in captions.txt and the caption "
        "files.", rich_help_panel=OUTPUTS)] = False,
    *,
    run: Annotated[RunOptions, Select(
        "formats", "caption_extension", "sidecars_beside_images", "prefix", "suffix", "overwrite",
        "overlays", "overlay_alpha", formats={"cli_default": "captions.txt"},
        overwrite={"help": "Replace caption files captionkit did not write (by hand, or edited)."})],
) -> None:
    """Rebuild captions.txt, sidecars, JSONL, CSV, COCO, label maps or overlays from a run store."""
    from captionkit.exporters import (
        ExportOptions,
        distinct_names,
        export,
        foreign_sidecars,
        nothing_to_write,
        with_existing_files,
    )
    from captionkit.store import DB_NAME, Store

    db = output_dir / DB_NAME
    if not db.is_file():
        raise CaptionkitError(f"{output_dir}: no {DB_NAME} here; pass the --output-dir of a run")
    store = Store(db)
    try:
        key = store.latest_options_key() if model is None else _latest_key_of(store, model)
        if key is None:
            raise CaptionkitError(f"{db}: the store holds no run yet")
        results = distinct_names(list(store.results(key)))
        options = with_existing_files(
            results, run.formats, ExportOptions(to or output_dir, run.caption_extension,
                                                run.sidecars_beside_images, keep_failed, prefix=run.prefix,
                                                suffix=run.suffix,
                                                label_maps=store.run_options(key).get("label_maps")),
            store, run.overwrite, copies_in=[output_dir, to])
        kept = foreign_sidecars(results, options)
        written = export(results, run.formats, options)
        if run.overlays is not None:
            from captionkit.segment.export import draw_overlays

            written += draw_overlays(results, run.overlays, options.label_maps, run.overlay_alpha)
        done = sum(result.status == "done" for result in results)
        # Recorded so that a later run knows these caption files, prefix and all, as its own.
        model_id = model or (results[0].model_id if results else "")
        run_id = store.start_run(model_id, key, {"export": ",".join(run.formats), "prefix": run.prefix,
                                                 "suffix": run.suffix}, kind="export")
        store.finish_run(run_id, {"exported": done, "files": len(written)})
    finally:
        store.close()
    ui.err.print(f"exported {ui.counted(done, 'caption')} to {ui.counted(len(written), 'file')}")
    ui.print_written(written)
    ui.print_unwritten(nothing_to_write(results, run.formats))
    ui.print_missing(sorted(result.name for result in results if result.path in options.missing))
    ui.print_kept(kept)


def _latest_key_of(store, model: str) -> str:
    """The option set of the latest run of `model` (as given to `caption --model`) in `store`."""
    from captionkit.models.registry import recorded_ids

    key = store.latest_options_key(recorded_ids(model))
    if key is None:
        known = ", ".join(sorted(store.run_models())) or "none"
        raise CaptionkitError(f"{store.path}: no run with model {model!r} (its runs' models: {known})")
    return key


@command()
def score(
    captions: Annotated[Path, typer.Argument(
        exists=True, help="captions.txt, JSONL, CSV, or a folder of caption files.")],
    images: Annotated[Path | None, typer.Option(
        exists=True, file_okay=False, help="Where the images are (default: the captions file's folder), "
        "searched recursively.", rich_help_panel=INPUTS, metavar="DIR")] = None,
    references: Annotated[Path | None, typer.Option(
        exists=True, help="Reference captions in any dataset format, for RefCLIPScore.",
        rich_help_panel=INPUTS, metavar="PATH")] = None,
    output: Annotated[Path, typer.Option(
        "--output", "-o", help="Scores file: .jsonl, or .csv for a table (a folder: FOLDER/scores.jsonl). "
        "A .db of the same name beside it lets a re-run resume.", rich_help_panel=OUTPUTS,
        metavar="PATH")] = Path("scores.jsonl"),
    *,
    gate: Annotated[GateOptions, Select("clip_model", "score_scale", "min_score", min_score={
        "help": "Mark captions below this as not passed."})],
    load_options: Annotated[LoadOptions, Select("device")],
    run: Annotated[RunOptions, Select("progress")],
) -> None:
    """Score existing captions against their images with CLIP, without captioning again."""
    from captionkit.exporters import check_output_dir
    from captionkit.gate import score_existing
    from captionkit.scoring import DEFAULT_MODEL, load_scorer
    from captionkit.store import DB_NAME, Store

    if output.is_dir():
        output = output / "scores.jsonl"
    if output.exists() and output.samefile(captions):
        raise OptionError(f"-o {output} is the captions file being scored: name another output")
    check_output_dir(output.parent)
    _quiet_transformers()
    scorer = load_scorer(gate.clip_model or DEFAULT_MODEL, device=load_options.device,
                         scale=gate.score_scale)
    record = output.with_suffix(".db")
    if record.name == DB_NAME:  # `-o OUT/captionkit.csv` beside a run: its store is the run's, not ours
        record = output.with_suffix(".scores.db")
    store = Store(record)
    try:
        scored = score_existing(captions, scorer, images, references, gate.min_score, store=store,
                                progress=lambda total: ui.progress_bar(total, run.progress, "scoring"))
    finally:
        store.close()
    _report_scores(scored, output, record, gate.min_score)


def _report_scores(scored, output: Path, record: Path, min_score: float | None) -> None:
    """Write `score`'s results to `output` and print what they say."""
    from captionkit.exporters import ExportOptions, write_csv, write_jsonl
    from captionkit.gate import tally

    if scored.reused:
        ui.err.print(f"{ui.counted(scored.reused, 'score')} reused from {record} (scored earlier)")
    ui.print_problems("skipped", scored.problems, style="yellow")
    ui.print_problems("not scored", [f"{r.name}: {r.error}" for r in scored.results if r.status != "done"],
                      f"see {output}")
    writer = write_csv if output.suffix.lower() == ".csv" else write_jsonl
    writer(scored.results, ExportOptions(output.parent), name=output.name)
    scores, passed = tally(scored.results)
    if not scores:
        raise CaptionkitError(f"no image found for any of the {len(scored.results)} captions under "
                              f"{scored.images}: pass --images DIR")
    ui.print_scores(scores, min_score, passed)
    refs = [r.extras["ref_clip_score"] for r in scored.results if "ref_clip_score" in r.extras]
    if refs:
        ui.err.print(f"RefCLIPScore mean {sum(refs) / len(refs):.4f} over {ui.counted(len(refs), 'caption')}")
    ui.err.print(f"wrote {output}")


SCORING, DATASET = "Scoring", "Captioning a dataset (--dataset)"
# `evaluate`'s own options: what it scores, and with --dataset, what it captions first.
Predictions = Annotated[Path | None, typer.Option(
    help="Captions to score: captions.txt, JSONL, CSV, COCO results JSON or sidecars.",
    rich_help_panel=SCORING, metavar="PATH")]
References = Annotated[Path | None, typer.Option(
    help="Reference captions in any dataset format (Flickr, COCO, Karpathy, CSV, ...).",
    rich_help_panel=SCORING, metavar="PATH")]
Split = Annotated[str | None, typer.Option(
    help="test, val, train or all: a Karpathy split, or the --dataset split (default test).",
    rich_help_panel=SCORING, metavar="SPLIT")]
SplitFile = Annotated[Path | None, typer.Option(
    help="Image names to keep, one a line (Flickr_8k.testImages.txt).", rich_help_panel=SCORING,
    metavar="PATH")]
ImagesFolder = Annotated[Path | None, typer.Option(
    help="The images' folder, for thumbnails and --clip-model.", rich_help_panel=SCORING, metavar="DIR")]
Metrics = Annotated[str, typer.Option(
    help="Comma-separated: bleu, meteor, rouge, cider, spice.", rich_help_panel=SCORING, metavar="LIST")]
ClipModel = Annotated[str | None, typer.Option(
    help="Also score the images against their captions with this CLIP-family model.",
    rich_help_panel=SCORING, metavar="MODEL")]
ReportDir = Annotated[Path, typer.Option(
    "--output-dir", "-o", help="Report files; with --dataset, captions and store.", rich_help_panel=SCORING,
    metavar="DIR")]
Dataset = Annotated[str | None, typer.Option(
    help="flickr8k, flickr30k or coco: caption its split with --model, then score it.",
    rich_help_panel=DATASET, metavar="NAME")]
Root = Annotated[Path | None, typer.Option(help="The --dataset folder.", rich_help_panel=DATASET,
                                           metavar="DIR")]
DatasetModel = Annotated[str | None, typer.Option(
    "--model", "-m", help="The captioner: alias, Hub id, local directory, openai:MODEL or hf-api:MODEL.",
    rich_help_panel=DATASET, metavar="NAME")]
Limit = Annotated[int | None, typer.Option(
    help="Caption only the split's first N images.", min=1, rich_help_panel=DATASET, metavar="N")]


Task = Annotated[str, typer.Option(
    help="caption, or segmentation: --predictions instances.json (or a label-map folder) against "
    "--references COCO ground truth (or label maps).", rich_help_panel=SCORING, metavar="TASK")]


def _evaluate_segmentation(predictions: Path | None, references: Path | None, output_dir: Path) -> None:
    """COCO box and mask AP/AR (pycocotools' COCOeval), or mIoU and pixel accuracy of label maps."""
    import json

    from captionkit.exporters import atomic_write, make_output_dir
    from captionkit.segment.metrics import evaluate_instances, evaluate_label_maps

    if predictions is None or references is None:
        raise OptionError("--task segmentation needs --predictions and --references")
    if predictions.is_dir():
        scores = {"semantic": evaluate_label_maps(predictions, references)}
    else:
        scores = evaluate_instances(predictions, references)
    for kind, values in scores.items():
        shown = {k: v for k, v in values.items() if isinstance(v, float)}
        ui.out.print(f"{kind}: " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()))
    make_output_dir(output_dir)
    atomic_write(output_dir / "metrics.json", json.dumps(scores, indent=1))
    ui.err.print(f"wrote {output_dir / 'metrics.json'}")


@command("evaluate")
def evaluate_command(
    predictions: Predictions = None, references: References = None, split: Split = None,
    split_file: SplitFile = None, images: ImagesFolder = None,
    metrics: Metrics = "bleu,meteor,rouge,cider,spice", clip_model: ClipModel = None,
    output_dir: ReportDir = Path("captionkit-eval"), dataset: Dataset = None, root: Root = None,
    model: DatasetModel = None, limit: Limit = None, task: Task = "caption", *,
    generation: GenerationOptions, load_options: LoadOptions,
    run: Annotated[RunOptions, Select("batch_size", "progress")],
) -> None:
    """Score captions against references; with --dataset, caption the split first (resumably)."""
    from captionkit.evaluate import check_inputs, evaluate_dataset, evaluate_files, parse_metrics
    from captionkit.report import print_summary

    if task == "segmentation":
        return _evaluate_segmentation(predictions, references, output_dir)

    check_inputs(predictions=predictions, references=references, dataset=dataset, root=root, model=model,
                 split_file=split_file, images=images, limit=limit, clip_model=clip_model)
    if dataset is None:
        _refuse_captioning_flags(generation, load_options, run)
    chosen = parse_metrics(metrics)
    scorer = None
    if dataset is not None or clip_model is not None:
        _quiet_transformers()
    if clip_model is not None:
        from captionkit.scoring import load_scorer

        scorer = load_scorer(clip_model, device=load_options.device)
    if dataset is not None:
        evaluation = evaluate_dataset(
            dataset, root, model, output_dir, split=split or "test", limit=limit, generation=generation,
            load_options=load_options, batch_size=run.batch_size, progress=run.progress, metrics=chosen,
            clip_scorer=scorer)
        ui.print_run(evaluation.run)
    else:
        evaluation = evaluate_files(predictions, references, output_dir, split=split, split_file=split_file,
                                    images=images, metrics=chosen, clip_scorer=scorer,
                                    progress=run.progress)
    print_summary(evaluation.result, ui.out, notes=ui.err)
    for path in evaluation.files.values():
        ui.err.print(f"wrote {path}", soft_wrap=True)


def _refuse_captioning_flags(generation: GenerationOptions, load_options: LoadOptions,
                             run: RunOptions) -> None:
    """Generation and model flags do nothing without --dataset: say so rather than ignore them."""
    stray = changed(generation) + [name for name in changed(load_options) if name != "--device"]
    stray += ["--batch-size"] * (run.batch_size is not None)
    if stray:
        raise OptionError(f"{' and '.join(stray)} only apply with --dataset (captions are read from "
                          "--predictions here)")


train_app = typer.Typer(
    cls=_Group, add_completion=False, no_args_is_help=True,
    help="Train a captioner (cnn-lstm, clipcap, blip) on a dataset: resumable, with curves.")
app.add_typer(train_app, name="train")


def train_command(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a `captionkit train NAME` command (also `python -m captionkit.train NAME`), its
    options-class parameters as its flags."""
    return lambda function: train_app.command(name, cls=_Command)(with_options(function))


@train_command("cnn-lstm")
def train_cnn_lstm(context: typer.Context, *, options: TrainOptions, architecture: CnnLstmOptions) -> None:
    """Show, Attend and Tell: an attention LSTM over a CNN's feature map, trained from scratch."""
    _train(context, options, architecture)


@train_command("clipcap")
def train_clipcap(context: typer.Context, *, options: TrainOptions, architecture: ClipCapOptions) -> None:
    """ClipCap: a frozen image embedding mapped to the prefix of a causal language model."""
    _train(context, options, architecture)


@train_command("blip")
def train_blip(context: typer.Context, *, options: TrainOptions, architecture: BlipOptions) -> None:
    """Fine-tune BLIP after LAVIS's COCO caption recipe, or BLIP-2 with LoRA adapters."""
    _train(context, options, architecture)


def _train(context: typer.Context, options: TrainOptions, architecture: object) -> None:
    """Train; with --resume DIR, the run in DIR goes on with its saved options, changed only by
    the flags given."""
    from captionkit.train.run import resume_options, saved_options, train

    if options.resume:
        saved = saved_options(options.output)[1]
        if type(saved) is not type(architecture):
            raise OptionError(f"--resume: the run in {options.output} trains {architecture_of(saved)}, "
                              f"not {architecture_of(architecture)}")
        # By the source's name: typer >= 0.29 has its own copy of click's ParameterSource.
        given = [name for name in context.params if name not in ("resume", "output")
                 and getattr(context.get_parameter_source(name), "name", None) == "COMMANDLINE"]
        train_fields = {item.name for item in declared(TrainOptions)}
        options, architecture = resume_options(options.output, **{
            name: getattr(options if name in train_fields else architecture, name) for name in given})
    try:
        result = train(options, architecture)
    except (Interrupted, KeyboardInterrupt) as interrupt:
        ui.err.print("interrupted; continue with --resume")
        raise typer.Exit(getattr(interrupt, "exit_code", 130)) from None
    from accelerate import PartialState

    if PartialState().is_main_process:  # every process of `accelerate launch` gets here
        best = result.history[result.best_epoch - 1] if result.best_epoch else {}
        shown = ("BLEU-4", "CIDEr-D", "CLIPScore", "val_loss")
        scores = ", ".join(f"{name} {best[name]:.4g}" for name in shown if name in best)
        ui.out.print(f"best: {result.best} (epoch {result.best_epoch}: {scores})", soft_wrap=True,
                     highlight=False)


@command()
def serve(*, options: ServeOptions, generation: Annotated[GenerationOptions, Select(
              "max_new_tokens", "num_beams", "prompt", "detail", panel="Request defaults")],
          load_options: Annotated[LoadOptions, Select("device", "dtype", "quantize", "load_in_8bit",
                                                      "load_in_4bit")],
          segment_options: Annotated[SegmentOptions, Select("threshold", "mask_threshold",
                                                            "max_instances", "classes")],
          segmenter_load: SegmenterLoadOptions) -> None:
    """Serve a model over HTTP: a web page, and native, OpenAI- and HF-compatible APIs."""
    from captionkit.serve.app import run

    if options.segment_model is None:
        segmenter_load.check_unused("--segment")
    _quiet_transformers()
    run(options, load_options, generation, segment_options, segmenter_load)


INTERRUPTED = "interrupted: finished batches are saved; run the same command to resume"


class Interrupted(BaseException):
    """Ctrl-C or SIGTERM (a scheduler's time limit, `docker stop`). Not a KeyboardInterrupt, which
    typer >= 0.29 turns into a silent exit code; a BaseException, so no `except Exception` stops it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.exit_code = 128 + signum


def _interrupt(signum: int, frame: object) -> None:
    raise Interrupted(signum)


def main(command: typer.Typer = app) -> None:
    """Console-script entry point (of `command`, `captionkit` by default): user errors become one
    line and exit code 2."""
    # First thing: the commands import torch and load models, and Ctrl-C then must say "interrupted".
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) is not signal.SIG_IGN:  # `nohup` and `&` ignore SIGINT: keep that
            signal.signal(signum, _interrupt)
    try:
        code = command(standalone_mode=False)
    except CaptionkitError as err:
        # Escaped and soft-wrapped: a path like `a [1].jpg` is not markup, and one line stays one line.
        ui.err.print(f"[red]error:[/] {escape(str(err))}", markup=True, highlight=False, soft_wrap=True)
        sys.exit(2)
    except typer.Exit as exit_:
        sys.exit(exit_.exit_code)
    except typer.Abort:
        ui.err.print("aborted")
        sys.exit(130)
    except Interrupted as interrupt:
        ui.err.print(INTERRUPTED)
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
