"""`hsat <verb>`: thin command-line shells over the library.

Each verb group lives in its own module here and registers its sub-parsers through
`add_parsers(subparsers)`; a handler parses arguments, calls one library function, and returns
an exit code. Bad input raises HSATError, printed as one clear message with exit status 2; a write
the operating system refuses (disk full, read-only, no permission) is one line naming the file and
the cause, exit status 74 (`hsat.io.WRITE_ERROR`), with nothing half-written left behind.

`hsat VERB ARGS --then VERB ARGS ...` runs several verbs in one process, in order, stopping at the
first that fails: the workflow chains a model's stages this way so that the imports (5-7 s of
torch, torchvision, timm and scikit-learn) are paid once per model, not once per stage.

A verb that runs a model on the GPU declares `gpus` (set_defaults): before any verb runs, the
process claims that many GPUs of its own (`hsat.gpus`), so that jobs running side by side on a
multi-GPU machine never share one; on a machine without GPUs nothing happens.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from hsat import __version__
from hsat.errors import HSATError
from hsat.gpus import claim_for_process
from hsat.io import WRITE_ERROR, describe_os_error

# Verb groups, in the order `hsat --help` lists them. A missing module is skipped so that a
# partial installation still offers the verbs it has.
GROUPS = ("config", "data", "train", "launch", "evaluate", "report", "bench", "export")


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


def gpus_needed(args: argparse.Namespace) -> int:
    """GPUs a parsed verb uses: its `gpus` default, a number or a function of its arguments."""
    n = getattr(args, "gpus", 0)
    return int(n(args) if callable(n) else n)


THEN = "--then"


def split_chain(argv: list[str]) -> list[list[str]]:
    """`a --x 1 --then b --y 2` -> [[a, --x, 1], [b, --y, 2]]; an empty stage is an error."""
    stages: list[list[str]] = [[]]
    for token in argv:
        if token == THEN:
            stages.append([])
        else:
            stages[-1].append(token)
    if len(stages) > 1 and not all(stages):
        raise SystemExit(f"hsat: error: {THEN} needs a verb on both sides: hsat VERB ... {THEN} VERB ...")
    return stages


def main(argv: list[str] | None = None) -> int:
    stages = split_chain(sys.argv[1:] if argv is None else list(argv))
    parser = build_parser()
    parsed = [parser.parse_args(stage) for stage in stages]  # every stage's arguments checked before any runs
    logging.basicConfig(
        level=logging.DEBUG if any(a.verbose for a in parsed) else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        claim_for_process(max(gpus_needed(args) for args in parsed))
    except HSATError as exc:
        print(f"hsat {parsed[0].verb}: error: {exc}", file=sys.stderr)
        return 2
    for args in parsed:
        code = run_verb(args)
        if code:
            return code
    return 0


def _say(message: str) -> None:
    """Print to stderr, which may be a log file on the disk that just filled: the exit status
    still tells, so a message that cannot be stored is dropped rather than raised."""
    try:
        print(message, file=sys.stderr, flush=True)
    except OSError:
        pass


def run_verb(args: argparse.Namespace) -> int:
    try:
        return int(args.func(args) or 0)
    except HSATError as exc:
        print(f"hsat {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # One line, not a traceback: a full disk is the user's to fix (--verbose adds the traceback).
        logging.getLogger("hsat").debug("traceback", exc_info=True)
        _say(f"hsat {args.verb}: error: {describe_os_error(exc)}")
        return WRITE_ERROR
    except KeyboardInterrupt:
        print(f"hsat {args.verb}: interrupted", file=sys.stderr)
        return 130
