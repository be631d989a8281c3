"""Per-image prompts from a CSV file (`--prompt-file`): visual question answering over a folder."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from captionkit.errors import InputError

HEADER = ("path", "prompt")


def read_prompt_file(path: Path) -> dict[str, str]:
    """Prompts by absolute image path from `path,prompt` rows; paths are relative to the CSV."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise InputError(f"--prompt-file {path}: cannot read it ({err})") from None
    header = bool(rows) and tuple(cell.strip().lower() for cell in rows[0]) == HEADER
    prompts: dict[str, str] = {}
    for line, row in enumerate(rows[header:], start=1 + header):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise InputError(f"--prompt-file {path}, row {line}: expected `image path,prompt` "
                             "(quote prompts that contain commas)")
        image = Path(row[0].strip()).expanduser()
        prompts[os.path.abspath(path.parent / image)] = row[1].strip()
    if not prompts:
        raise InputError(f"--prompt-file {path}: no `image path,prompt` rows")
    return prompts
