"""`python -m captionkit.serve --model NAME [...]`: a plain entry point whose flags are
ServeOptions' fields (plus --device and --dtype), until the CLI's `captionkit serve` has them."""

from __future__ import annotations

import argparse
import sys
import types
import typing
from dataclasses import MISSING, fields

from captionkit.errors import CaptionkitError
from captionkit.options import LoadOptions
from captionkit.serve.options import ServeOptions


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m captionkit.serve",
                                     description="Serve a captioning model over HTTP.")
    hints = typing.get_type_hints(ServeOptions)
    for field in fields(ServeOptions):
        hint = hints[field.name]
        flag = "--" + field.name.replace("_", "-")
        args = typing.get_args(hint) if isinstance(hint, types.UnionType) else ()
        base = next((a for a in args if a is not type(None)), hint)
        if base is bool:
            parser.add_argument(flag, action="store_true")
        elif typing.get_origin(base) is tuple:
            parser.add_argument(flag, action="append", metavar="VALUE")
        else:
            default = None if field.default is MISSING else field.default
            parser.add_argument(flag, type=base, default=default, metavar=base.__name__.upper())
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    return parser


def main(argv: list[str] | None = None) -> int:
    from captionkit.serve.app import run

    args = vars(parser().parse_args(argv))
    load = LoadOptions(device=args.pop("device"), dtype=args.pop("dtype"))
    values = {name: tuple(value) if isinstance(value, list) else value
              for name, value in args.items() if value is not None}
    try:
        run(ServeOptions(**values), load)
    except CaptionkitError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
