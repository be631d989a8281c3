"""Per-image prompts from a CSV file (`--prompt-file`): visual question answering over a folder."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from captionkit.errors import InputError

PROMPT_HEADINGS = frozenset({"prompt", "question", "instruction", "text"})


def read_prompt_file(path: Path) -> dict[str, str]:
    """Prompts by absolute image path from `path,prompt` rows; paths are relative to the CSV."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            rows = list(csv.reader(handle))
    except OSError as err:
        reason = (err.strerror or str(err)).lower()
        raise InputError(f"--prompt-file {path}: cannot read it: {reason}") from None
    except (UnicodeDecodeError, csv.Error) as err:
        raise InputError(f"--prompt-file {path}: cannot read it ({err})") from None
    # a header names its columns: `path,prompt`, `image,question`, `file,instruction`...
    header = bool(rows) and len(rows[0]) == 2 and rows[0][1].strip().lower() in PROMPT_HEADINGS
    prompts: dict[str, str] = {}
    for line, row in enumerate(rows[header:], start=1 + header):
        if not any(cell.strip() for cell in row):
            continue
        problem = (f"{len(row)} columns (quote prompts that contain commas)" if len(row) != 2
                   else "no image path" if not row[0].strip()
                   else "an empty prompt (leave the image out to ask it --prompt)" if not row[1].strip()
                   else None)
        if problem:
            raise InputError(f"--prompt-file {path}, row {line}: expected `image path,prompt`, "
                             f"found {problem}")
        image = Path(row[0].strip()).expanduser()
        prompts[os.path.abspath(path.parent / image)] = row[1].strip()
    if not prompts:
        raise InputError(f"--prompt-file {path}: no `image path,prompt` rows")
    return prompts
