"""`hsat <verb>`: thin command-line shells over the library.

Each verb group lives in its own module here and registers its sub-parsers through
`add_parsers(subparsers)`; a handler parses arguments, calls one library function, and returns
an exit code. Bad input raises HSATError, printed as one clear message with exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from hsat import __version__
from hsat.errors import HSATError

# Verb groups, in the order `hsat --help` lists them. A missing module is skipped so that a
# partial installation still offers the verbs it has.
GROUPS = ("config", "data", "train", "evaluate", "report", "bench", "export")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hsat",
        description="Hierarchical self-supervised adversarial training (HSAT) for histopathology.",
    )
    parser.add_argument("--version", action="version", version=f"hsat {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for group in GROUPS:
        try:
            module = importlib.import_module(f"hsat.cli.{group}")
        except ModuleNotFoundError as exc:
            if exc.name == f"hsat.cli.{group}":
                continue
            raise
        module.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args) or 0)
    except HSATError as exc:
        print(f"hsat {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hsat {args.verb}: interrupted", file=sys.stderr)
        return 130
