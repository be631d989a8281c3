"""Errors a user can cause. The CLI prints their message on one line and exits non-zero."""

from __future__ import annotations


class CaptionkitError(Exception):
    """Base class: the message says what went wrong and what to do about it."""


class InputError(CaptionkitError):
    """An input path, list file or glob that cannot be used at all."""


class ImageError(CaptionkitError):
    """One image could not be read or decoded; the run records it and goes on."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class OutputError(CaptionkitError):
    """An output file or the run store that cannot be written (disk full, read-only, not a database)."""


class OptionError(CaptionkitError):
    """An option, or a combination of options, that cannot work."""


class ModelNotFoundError(CaptionkitError):
    """A model name that is neither an alias, a local directory, nor a reachable Hub id."""


class ModelUnavailableError(CaptionkitError):
    """A known model whose weights are neither cached nor downloadable right now."""
