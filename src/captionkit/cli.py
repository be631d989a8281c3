"""The `captionkit` command: a thin layer over the library."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from captionkit.errors import CaptionkitError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Turn images into text: caption folders with any model, resumably.")
console = Console(stderr=True)
out = Console(width=None if sys.stdout.isatty() else 200)

Inputs = Annotated[list[str], typer.Argument(help="Image files, folders, globs, list files "
                                                  "(one path per line) or - for stdin.")]
OutputDir = Annotated[Path, typer.Option("--output-dir", "-o",
                                         help="Where captions and the run store go.")]
Formats = Annotated[str, typer.Option("--format", "-f", help="Comma-separated: captions.txt, "
                                      "txt (sidecar per image), jsonl, csv, or all.")]
CaptionExt = Annotated[str, typer.Option(help="Extension of per-image caption files.")]
Beside = Annotated[bool, typer.Option("--beside-images", help="Write per-image caption files "
                                      "next to the images instead of under --output-dir.")]


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


@app.command()
def caption(
    inputs: Inputs,
    model: Annotated[str, typer.Option("--model", "-m", help="Alias, Hub id, local directory, "
                                       "or auto (blip-large if cached, else objects).")] = "auto",
    output_dir: OutputDir = Path("captionkit-out"),
    recursive: Annotated[bool, typer.Option("--recursive", "-r")] = False,
    ext: Annotated[str | None, typer.Option(help="Only these extensions, e.g. jpg,png.")] = None,
    formats: Formats = "captions.txt,jsonl",
    caption_extension: CaptionExt = ".txt",
    beside_images: Beside = False,
    batch_size: Annotated[int | None, typer.Option(help="Images per batch (default: auto).",
                                                   min=1)] = None,
    workers: Annotated[int | None, typer.Option(help="Decoding threads.", min=1)] = None,
    overwrite: Annotated[bool, typer.Option(help="Start over, ignoring earlier results.")] = False,
    retry_failed: Annotated[bool, typer.Option(help="Try earlier failures again.")] = False,
    strict: Annotated[bool, typer.Option(help="Exit 1 if any image failed, unreadable ones included "
                                         "(without it only model failures do).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    max_pixels: Annotated[int, typer.Option(help="Refuse images with more pixels "
                                            "(decompression bombs).")] = 100_000_000,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")] = "auto",
    load_in_8bit: Annotated[bool, typer.Option(help="8-bit weights (CUDA + bitsandbytes).")] = False,
    load_in_4bit: Annotated[bool, typer.Option(help="4-bit weights (CUDA + bitsandbytes).")] = False,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 30,
    min_new_tokens: Annotated[int | None, typer.Option(min=0)] = None,
    num_beams: Annotated[int, typer.Option(min=1)] = 1,
    repetition_penalty: Annotated[float | None, typer.Option()] = None,
    length_penalty: Annotated[float | None, typer.Option()] = None,
    no_repeat_ngram_size: Annotated[int | None, typer.Option(min=0)] = None,
    do_sample: Annotated[bool, typer.Option(help="Sample instead of greedy/beam search.")] = False,
    temperature: Annotated[float | None, typer.Option()] = None,
    top_p: Annotated[float | None, typer.Option()] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    prompt: Annotated[str | None, typer.Option(help="Text the caption starts from or answers "
                                                    "(models that take text).")] = None,
) -> None:
    """Caption images into captions.txt / per-image .txt / JSONL / CSV, resuming earlier runs."""
    from captionkit import sources
    from captionkit.exporters import parse_formats
    from captionkit.models import choose_auto, load
    from captionkit.options import GenerationOptions, LoadOptions
    from captionkit.pipeline import Pipeline, RunOptions

    generation = GenerationOptions(
        max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, num_beams=num_beams,
        repetition_penalty=repetition_penalty, length_penalty=length_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size, do_sample=do_sample, temperature=temperature,
        top_p=top_p, seed=seed, prompt=prompt)
    run_options = RunOptions(
        output_dir=output_dir, recursive=recursive,
        extensions=tuple(e.strip() for e in ext.split(",")) if ext else None,
        formats=tuple(parse_formats(formats)), caption_extension=caption_extension,
        sidecars_beside_images=beside_images, batch_size=batch_size, workers=workers,
        overwrite=overwrite, retry_failed=retry_failed,
        max_pixels=max_pixels or sources.DEFAULT_MAX_PIXELS, progress=not quiet)
    if model == "auto":
        model, reason = choose_auto()
        console.print(f"model: {reason}")
    _quiet_transformers()
    captioner = load(model, LoadOptions(device=device, dtype=dtype, load_in_8bit=load_in_8bit,
                                        load_in_4bit=load_in_4bit))
    summary = Pipeline(captioner, generation, run_options).run(inputs)
    _print_summary(summary)
    if summary.model_failures or (strict and summary.failed):
        raise typer.Exit(1)


def _print_summary(summary) -> None:
    failed = len(summary.failed)
    parts = [f"[bold]{summary.done}[/] captioned", f"{summary.skipped} already done",
             f"{failed} failed"]
    if summary.duplicates:
        parts.append(f"{summary.duplicates} identical to another file")
    if summary.failed_earlier:
        parts.append(f"{summary.failed_earlier} failed earlier (--retry-failed to retry)")
    console.print(", ".join(parts) + f" in {summary.seconds:.1f}s "
                  f"({summary.images_per_second:.2f} images/s) with {summary.model_id}")
    for name, reason in summary.failed[:20]:
        console.print(f"  [red]failed[/] {name}: {reason}", markup=True, highlight=False)
    if failed > 20:
        console.print(f"  ... and {failed - 20} more (see captions.jsonl)")
    for path in summary.outputs[:5]:
        console.print(f"  wrote {path}")
    if len(summary.outputs) > 5:
        console.print(f"  ... and {len(summary.outputs) - 5} more files")


@app.command()
def models() -> None:
    """List the known models: aliases, Hub ids, size, license and memory needs."""
    from captionkit import hub
    from captionkit.models import MODELS

    table = Table("alias", "source", "family", "params", "license", "memory", "cached")
    for spec in MODELS.values():
        cached = "built-in" if spec.source == "built-in" else (
            "yes" if hub.cached_snapshot(spec.source) else "no")
        table.add_row(spec.alias, spec.source, spec.family, spec.params, spec.license,
                      spec.memory, cached)
    out.print(table)
    out.print("Any Hub id or local directory of these families works too: --model ORG/NAME "
              "or --model ./checkpoint")


@app.command("export")
def export_command(
    output_dir: Annotated[Path, typer.Argument(help="A folder holding captionkit.db.")],
    formats: Formats = "captions.txt",
    to: Annotated[Path | None, typer.Option(help="Write here instead of OUTPUT_DIR.")] = None,
    caption_extension: CaptionExt = ".txt",
    beside_images: Beside = False,
    model: Annotated[str | None, typer.Option(help="Export this model's results (default: the "
                                              "latest run's).")] = None,
) -> None:
    """Rebuild captions.txt, sidecars, JSONL or CSV from a run store."""
    from captionkit.exporters import ExportOptions, export, parse_formats
    from captionkit.store import DB_NAME, Store

    db = output_dir / DB_NAME
    if not db.is_file():
        raise CaptionkitError(f"{output_dir}: no {DB_NAME} here; pass the --output-dir of a run")
    store = Store(db)
    try:
        key = store.latest_options_key()
        if model is not None:
            keys = [row[0] for row in store.db.execute(
                "SELECT options_key FROM runs WHERE model_id = ? ORDER BY id DESC", (model,))]
            if not keys:
                raise CaptionkitError(f"{db}: no run with model {model!r}")
            key = keys[0]
        if key is None:
            raise CaptionkitError(f"{db}: the store holds no run yet")
        results = list(store.results(key))
    finally:
        store.close()
    written = export(results, parse_formats(formats),
                     ExportOptions(to or output_dir, caption_extension, beside_images))
    console.print(f"exported {sum(r.status == 'done' for r in results)} captions to "
                  f"{len(written)} file(s)")


def main() -> None:
    """Console-script entry point: user errors become one line and exit code 2."""
    try:
        code = app(standalone_mode=False)
    except CaptionkitError as err:
        console.print(f"[red]error:[/] {err}", highlight=False)
        sys.exit(2)
    except typer.Exit as exit_:
        sys.exit(exit_.exit_code)
    except typer.Abort:
        console.print("aborted")
        sys.exit(130)
    except KeyboardInterrupt:
        console.print("interrupted: finished batches are saved; run the same command to resume")
        sys.exit(130)
    except Exception as err:
        import click

        if isinstance(err, click.ClickException):
            err.show()
            sys.exit(err.exit_code)
        raise
    sys.exit(code if isinstance(code, int) else 0)
