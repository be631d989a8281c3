"""Checkpoints that a kill or a full disk never leaves half-written.

A file is written beside its target and renamed over it. A checkpoint folder is written as
`NAME.tmp`, renamed `NAME.new` once complete, and only then swapped in for `NAME`; `recover` finishes
or discards whatever a kill left behind, so the last complete checkpoint always survives.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from captionkit.errors import OutputError

TRAINER_STATE = "trainer_state.pt"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp makes files only their owner can read; written files get the usual permissions instead.
FILE_MODE = 0o666 & ~_umask()


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write `data` to a temporary file beside `path`, flush it to disk, then rename it over `path`."""
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(temporary, FILE_MODE)
        with os.fdopen(handle, "wb") as file:
            file.write(payload)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise OutputError(f"{path}: cannot write it ({error.strerror or error})") from error


def recover(target: Path) -> None:
    """Finish or undo an interrupted `checkpoint_dir` swap of `target`."""
    target = Path(target)
    temporary, complete, old = (target.with_name(target.name + s) for s in (".tmp", ".new", ".old"))
    if temporary.exists():
        shutil.rmtree(temporary)  # never finished: the previous checkpoint stands
    if complete.exists():
        if target.exists():
            os.replace(target, old) if not old.exists() else shutil.rmtree(target)
        os.replace(complete, target)
    if old.exists():
        shutil.rmtree(old)


@contextlib.contextmanager
def checkpoint_dir(target: Path) -> Iterator[Path]:
    """A folder to write a checkpoint into; it replaces `target` only once the block completes."""
    target = Path(target)
    recover(target)
    temporary = target.with_name(target.name + ".tmp")
    temporary.mkdir(parents=True)
    try:
        yield temporary
        _sync_folder(temporary)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    os.replace(temporary, target.with_name(target.name + ".new"))
    recover(target)


def _sync_folder(folder: Path) -> None:
    """Flush every file of `folder` to disk, so the rename never publishes unwritten data."""
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as file:
                os.fsync(file.fileno())


def rng_state() -> dict:
    """Every random generator a training step draws from."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_trainer_state(folder: Path, state: dict) -> None:
    with open(Path(folder) / TRAINER_STATE, "wb") as file:
        torch.save(state, file)


def load_trainer_state(folder: Path) -> dict:
    path = Path(folder) / TRAINER_STATE
    if not path.is_file():
        raise OutputError(f"{path}: no trainer state, so this run cannot be resumed (is it a training "
                          "output folder? its last/ checkpoint holds the state)")
    # Our own file: optimizer states and RNG tuples need full unpickling.
    return torch.load(path, map_location="cpu", weights_only=False)
