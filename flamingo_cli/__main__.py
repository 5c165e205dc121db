"""``python -m flamingo_cli`` and the ``flamingo`` console script."""

import sys


def main() -> None:
    from flamingo_cli.cli import main as run

    sys.exit(run())


if __name__ == "__main__":
    main()
