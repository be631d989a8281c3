"""Which threads made a model's inputs, and whether the model's side found them."""

from __future__ import annotations

import threading
from types import ModuleType


def record(monkeypatch, owner: object, module: ModuleType) -> tuple[set[str], list[bool]]:
    """Wrap `owner.preprocess` to note the name of each thread it runs in (without its number),
    and `module.gathered` to note whether each batch found its rows. Returns both records."""
    spec, real_gathered = owner.preprocess, module.gathered
    made_in: set[str] = set()
    found: list[bool] = []

    def recording(image):
        made_in.add(threading.current_thread().name.rsplit("_", 1)[0])
        return spec(image)

    def gathered(images, made_by):
        rows = real_gathered(images, made_by)
        found.append(rows is not None)
        return rows

    monkeypatch.setattr(module, "gathered", gathered)
    monkeypatch.setattr(owner, "preprocess", recording)
    return made_in, found
