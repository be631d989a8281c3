"""`python -m captionkit.train ARCHITECTURE ...`: the `captionkit train` commands, for launchers
that start a module (`accelerate launch -m captionkit.train`, `torchrun -m captionkit.train`)."""

from __future__ import annotations

from captionkit.cli import main, train_app

if __name__ == "__main__":
    main(train_app)
