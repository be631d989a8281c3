"""`python -m captionkit` and the `captionkit` command.

The command line's own modules take a fraction of a second to import; a Ctrl-C in that time ends
with one line, as one later does, instead of an import traceback.
"""

import sys


def main() -> None:
    try:
        from captionkit.cli import main as run
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        raise SystemExit(130) from None
    run()


if __name__ == "__main__":
    main()
