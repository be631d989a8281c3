"""`python -m captionkit`."""

from captionkit.cli import main

main()
