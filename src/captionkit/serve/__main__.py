"""`python -m captionkit.serve ...` is `captionkit serve ...`."""

from __future__ import annotations

import sys

from captionkit.cli import main

if __name__ == "__main__":
    sys.argv = [sys.argv[0], "serve", *sys.argv[1:]]
    main()
