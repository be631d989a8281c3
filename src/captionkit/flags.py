"""Options declared once: a dataclass field carries its help text and its command-line spelling.

An options class declares each field with `flag(default, help, *names, panel=...)`. A command takes
the class as a keyword-only parameter and is wrapped in `with_options`: the class's fields become
the command's flags, and the command receives one built (validated) instance per class.

    @app.command()
    @with_options
    def caption(inputs: Inputs, *, generation: GenerationOptions,
                run: Annotated[RunOptions, Select("batch_size", "progress")]) -> None: ...

Nothing here imports typer until a command is wrapped, so the Python API pays nothing for it.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from types import NoneType, UnionType
from typing import Annotated, Any

PANELS = ("Inputs", "Model and hardware", "Generation", "Outputs", "Quality gate (CLIP)",
          "Remote endpoints", "Resume and exit code", "Segmentation", "Engine")
"""The order of the shared help panels. A command's own panels come before them."""

METAVARS = {bool: "", int: "N", float: "NUM", str: "TEXT", Path: "PATH"}


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()


@dataclass(frozen=True)
class Flag:
    """How one options field reads on a command line."""

    help: str
    names: tuple[str, ...] = ()
    """Its spellings: `-o` adds to `--field-name`; a `--long` name replaces it."""
    panel: str | None = None
    metavar: str | None = None
    """What the value looks like in `--help`; by default from its type (N, NUM, TEXT, PATH)."""
    cli_type: Any = None
    """The value's type on the command line where it differs from the field's."""
    cli_default: Any = UNSET
    """What the command line defaults to where that differs from the field's default."""
    parse: Callable[[Any], Any] | None = None
    """The command-line value (never None) to the field's value: `"jpg,png"` -> `("jpg", "png")`."""
    min: float | None = None
    max: float | None = None


def flag(default: Any, help: str, *names: str, **spelling: Any) -> Any:
    """A dataclass field with a command-line flag; `spelling` takes `Flag`'s other attributes."""
    return field(default=default, metadata={"flag": Flag(help, names, **spelling)})


@dataclass(frozen=True)
class Declared:
    """A flag as one command takes it: `path` leads from the options class to the field."""

    path: tuple[str, ...]
    flag: Flag
    type: Any
    default: Any

    @property
    def name(self) -> str:
        """The command's parameter name: the field's name (fields of nested classes too)."""
        return self.path[-1]

    @property
    def spellings(self) -> tuple[str, ...]:
        names = self.flag.names
        if any(name.startswith("--") for name in names):
            return names
        return ("--" + self.name.replace("_", "-"), *names)

    @property
    def cli_default(self) -> Any:
        return self.default if self.flag.cli_default is UNSET else self.flag.cli_default


@functools.cache
def declared(cls: type) -> tuple[Declared, ...]:
    """The flags of an options class, its nested options classes' included, in field order."""
    found = []
    for item, kind in _fields(cls):
        if "flag" in item.metadata:
            default = item.default if item.default_factory is MISSING else item.default_factory()
            found.append(Declared((item.name,), item.metadata["flag"], kind, default))
        elif is_dataclass(kind):
            found += [replace(inner, path=(item.name, *inner.path)) for inner in declared(kind)]
    return tuple(found)


@functools.cache
def _fields(cls: type) -> tuple[tuple[Field, Any], ...]:
    """Each field of a dataclass with its type, resolved (options modules postpone annotations)."""
    if not is_dataclass(cls):
        return ()
    hints = typing.get_type_hints(cls)
    return tuple((item, hints[item.name]) for item in fields(cls))


class Select:
    """Which flags of an options class a command takes, and how they read there.

    `Select("batch_size", "progress")` takes only those; `exclude=` leaves some out; `panel=` puts
    them all in one help panel; a field name as keyword changes that flag's attributes, e.g.
    `formats={"cli_default": "captions.txt"}`. Fields left out keep their defaults.
    """

    def __init__(self, *only: str, exclude: tuple[str, ...] = (), panel: str | None = None,
                 **changes: Mapping[str, Any]) -> None:
        self.only, self.exclude, self.panel, self.changes = only, exclude, panel, changes

    def flags_of(self, cls: type) -> list[Declared]:
        every = list(declared(cls))
        unknown = {*self.only, *self.exclude, *self.changes} - {item.name for item in every}
        if unknown:
            raise TypeError(f"{cls.__name__} declares no flag {', '.join(sorted(unknown))}")
        chosen = []
        for item in every:
            if (self.only and item.name not in self.only) or item.name in self.exclude:
                continue
            changes = dict(self.changes.get(item.name, {}))
            if self.panel is not None:
                changes.setdefault("panel", self.panel)
            chosen.append(replace(item, flag=replace(item.flag, **changes)) if changes else item)
        return chosen


def build(cls: type, flags: list[Declared], values: Mapping[str, Any]) -> Any:
    """An instance of `cls` from command-line `values` (by parameter name); other fields default."""
    return _build(cls, (), flags, values)


def _build(cls: type, prefix: tuple[str, ...], flags: list[Declared], values: Mapping[str, Any]) -> Any:
    kwargs: dict[str, Any] = {}
    for item in flags:
        if item.path[:-1] == prefix:
            value = values[item.name]
            parse = item.flag.parse
            kwargs[item.name] = parse(value) if parse is not None and value is not None else value
    for inner, kind in _fields(cls):
        path = (*prefix, inner.name)
        if is_dataclass(kind) and any(item.path[:len(path)] == path for item in flags):
            kwargs[inner.name] = _build(kind, path, flags, values)
    return cls(**kwargs)


def changed(options: Any) -> list[str]:
    """The flags (`--num-beams`) whose fields in `options` differ from their defaults."""
    return [item.spellings[0] for item in declared(type(options))
            if _get(options, item.path) != item.default]


def _get(options: Any, path: tuple[str, ...]) -> Any:
    for name in path:
        options = getattr(options, name)
    return options


def with_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """A typer command from `command`: each parameter annotated with an options class (optionally
    `Annotated[cls, Select(...)]`) becomes that class's flags, and receives the built instance."""
    hints = typing.get_type_hints(command, include_extras=True)
    own: list[inspect.Parameter] = []
    groups: dict[str, tuple[type, list[Declared]]] = {}
    for parameter in inspect.signature(command).parameters.values():
        hint = hints.get(parameter.name, parameter.annotation)
        cls, select = _options_class(hint)
        if cls is None:
            own.append(parameter.replace(annotation=hint, kind=inspect.Parameter.KEYWORD_ONLY))
        else:
            groups[parameter.name] = (cls, select.flags_of(cls))
    taken = [_parameter(item) for _, items in groups.values() for item in items]
    names = [parameter.name for parameter in (*own, *taken)]
    clashes = sorted({name for name in names if names.count(name) > 1})
    if clashes:
        raise TypeError(f"{command.__name__}: more than one parameter named {', '.join(clashes)}")

    def run(**values: Any) -> Any:
        for name, (cls, items) in groups.items():
            values[name] = build(cls, items, {item.name: values.pop(item.name) for item in items})
        return command(**values)

    run.__signature__ = inspect.Signature(_in_panel_order([*own, *taken]))  # type: ignore[attr-defined]
    run.__annotations__ = {}
    for attribute in ("__name__", "__qualname__", "__doc__", "__module__"):
        setattr(run, attribute, getattr(command, attribute))
    return run


def _options_class(hint: Any) -> tuple[type | None, Select]:
    """(options class, selection) when `hint` names an options class; (None, ...) otherwise."""
    select = Select()
    if typing.get_origin(hint) is Annotated:
        hint, *extras = typing.get_args(hint)
        selects = [extra for extra in extras if isinstance(extra, Select)]
        if not selects:
            return None, select
        select = selects[0]
    declares = isinstance(hint, type) and is_dataclass(hint) and bool(declared(hint))
    return (hint if declares else None), select


def _parameter(item: Declared) -> inspect.Parameter:
    import typer

    flag = item.flag
    kind = flag.cli_type if flag.cli_type is not None else item.type
    metavar = flag.metavar if flag.metavar is not None else METAVARS.get(_bare(kind), "VALUE")
    option = typer.Option(*item.spellings, help=flag.help, rich_help_panel=flag.panel, metavar=metavar,
                          min=flag.min, max=flag.max)
    default = ... if item.cli_default is MISSING else item.cli_default
    return inspect.Parameter(item.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[kind, option])


def _bare(kind: Any) -> Any:
    """`int` for `int | None`."""
    if isinstance(kind, UnionType) or typing.get_origin(kind) is typing.Union:
        rest = [arg for arg in typing.get_args(kind) if arg is not NoneType]
        return rest[0] if len(rest) == 1 else kind
    return kind


def _in_panel_order(parameters: list[inspect.Parameter]) -> list[inspect.Parameter]:
    """Typer shows panels in the order their first parameter comes: a command's own panels first,
    then the shared ones in `PANELS` order."""

    def rank(parameter: inspect.Parameter) -> int:
        infos = typing.get_args(parameter.annotation)[1:]
        panel = next((getattr(info, "rich_help_panel", None) for info in infos), None)
        return PANELS.index(panel) if panel in PANELS else -1

    return sorted(parameters, key=rank)
