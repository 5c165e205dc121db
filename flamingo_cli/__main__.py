"""``python -m flamingo_cli`` and the ``flamingo`` console script."""

import sys


def main() -> None:
    from flamingo_cli.cli import main as run
    from flamingo_cli.quiet import DecoderChatter

    # C decoders' notes on odd MP3 frames go to the flamingo.decoder logger, never raw on the terminal.
    with DecoderChatter():
        status = run()
    sys.exit(status)


if __name__ == "__main__":
    main()
