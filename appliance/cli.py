"""The ``edgecc`` command line."""

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Run the ``edgecc`` command line and return its exit status."""
    parser = argparse.ArgumentParser(prog="edgecc", description="edgecc hybrid contact center")
    parser.add_subparsers(dest="command", required=True)
    parser.parse_args(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
