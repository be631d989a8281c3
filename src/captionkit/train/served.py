"""What every checkpoint `captionkit train` writes shares once loaded as a captioner."""

from __future__ import annotations

from pathlib import Path

from captionkit import hub
from captionkit.device import pick_device
from captionkit.errors import OptionError
from captionkit.models.base import Captioner
from captionkit.options import LoadOptions


class TrainedCaptioner(Captioner):
    """A trained checkpoint folder: float32 weights on the chosen device, keyed by its files."""

    architecture: str = ""
    """How messages name the architecture: CNN-LSTM, ClipCap."""

    def __init__(self, path: Path, model_id: str, options: LoadOptions) -> None:
        if options.quantize or options.load_in_8bit or options.load_in_4bit:
            raise OptionError(f"{model_id}: a {self.architecture} checkpoint runs in float32; drop "
                              "--quantize, --load-in-8bit and --load-in-4bit")
        self.model_id = model_id
        self.fingerprint = hub.fingerprint(Path(path))  # retrained in place: other captions
        self.device = pick_device(options.device)
