"""`python -m captionkit.train ARCHITECTURE --dataset ... --root ... --output ...`

A command line built from the options dataclasses (a flag per field, its docstring as help), until
`captionkit train` takes them over. `--resume [DIR]` continues a run with its saved options.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import sys
import textwrap
import types
import typing
from dataclasses import MISSING, fields
from pathlib import Path

from captionkit.errors import CaptionkitError
from captionkit.train.options import ARCHITECTURES, TrainOptions


def field_help(cls: type) -> dict[str, str]:
    """Each field's docstring (the string literal under it in the class body)."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body  # type: ignore[attr-defined]
    helps = {}
    for node, after in zip(body, body[1:], strict=False):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            helps[node.target.id] = " ".join(after.value.value.split())
    return helps


def _base_type(hint: object) -> object:
    """`int | None` -> int."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def add_options(parser: argparse.ArgumentParser, cls: type, title: str) -> None:
    """A flag per field of `cls`; only flags given end up in the namespace."""
    group = parser.add_argument_group(title)
    helps, hints = field_help(cls), typing.get_type_hints(cls)
    for f in fields(cls):
        if f.name == "resume":
            continue
        flag = f"--{f.name.replace('_', '-')}"
        kind = _base_type(hints[f.name])
        default = f.default if f.default is not MISSING else None
        text = helps.get(f.name, "") + (f" (default: {default})" if default is not None else "")
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=text)
        else:
            group.add_argument(flag, type=kind, default=argparse.SUPPRESS, metavar=f.name.upper(), help=text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m captionkit.train",
                                     description="Train a captioner that captionkit serves by path.")
    commands = parser.add_subparsers(dest="architecture", required=True)
    for name, cls in ARCHITECTURES.items():
        sub = commands.add_parser(name, help=(cls.__doc__ or "").splitlines()[0],
                                  usage="%(prog)s --dataset ... --root ... --output ... [options]",
                                  description=cls.__doc__)
        add_options(sub, TrainOptions, "training")
        add_options(sub, cls, name)
        sub.add_argument("--resume", nargs="?", const=True, default=argparse.SUPPRESS, metavar="DIR",
                         help="Continue the run in DIR (or --output) from its last checkpoint, with its "
                              "saved options")
    return parser


def options_from(args: argparse.Namespace) -> tuple[TrainOptions, object]:
    from captionkit.train.run import resume_options

    given = {k: v for k, v in vars(args).items() if k not in ("architecture", "resume")}
    model_cls = ARCHITECTURES[args.architecture]
    resume = getattr(args, "resume", None)
    if resume:
        output = Path(resume) if resume is not True else Path(given.get("output", TrainOptions.output))
        given.pop("output", None)
        return resume_options(output, **given)
    train_names = {f.name for f in fields(TrainOptions)}
    return (TrainOptions(**{k: v for k, v in given.items() if k in train_names}),
            model_cls(**{k: v for k, v in given.items() if k not in train_names}))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from captionkit.train.run import train

    try:
        options, model = options_from(args)
        result = train(options, model)
    except CaptionkitError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; continue with --resume", file=sys.stderr)
        return 130
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return 0
    best = result.history[result.best_epoch - 1] if result.best_epoch else {}
    shown = ("BLEU-4", "CIDEr-D", "CLIPScore", "val_loss")
    scores = ", ".join(f"{k} {best[k]:.4g}" for k in shown if k in best)
    print(f"best: {result.best} (epoch {result.best_epoch}: {scores})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
