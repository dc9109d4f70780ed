"""`hsat config show`: the study a set of overlays resolves to, with what each overlay set marked."""

from __future__ import annotations

import argparse
from pathlib import Path

from hsat.errors import HSATError

DEFAULT_BASE = Path("config") / "config.yaml"


def _show(args: argparse.Namespace) -> int:
    from hsat.config import resolve_study, show_study
    from hsat.data.manifest import study_data_errors

    cfg, named = resolve_study(args.base, args.configfile, args.set)
    print(f"# {args.base}" + "".join(f" + {p}" for p in args.configfile) + "  (# overlay: set by an overlay or --set)")
    print(show_study(cfg, named), end="")
    errors = study_data_errors(cfg)  # what `snakemake -n` would stop on
    if errors:
        raise HSATError("the study does not fit its data:\n  " + "\n  ".join(errors))
    return 0


def add_parsers(subparsers) -> None:
    p = subparsers.add_parser("config", help="inspect study configs (overlays on the default study)")
    verbs = p.add_subparsers(dest="config_verb", metavar="ACTION", required=True)
    s = verbs.add_parser(
        "show",
        help="print the resolved study: the default study changed by each --configfile",
        description="What `snakemake all --configfile F` runs: the default study (--base) with each "
        "overlay applied in turn (named values win; `models` replaces the matrix; the evaluation's "
        "model lists follow the models kept), validated with the schema's defaults filled in.",
    )
    s.add_argument("--base", type=Path, default=DEFAULT_BASE, help=f"the default study (default: {DEFAULT_BASE})")
    s.add_argument("--configfile", nargs="*", default=[], type=Path, metavar="OVERLAY.yaml", help="overlays, applied in order")
    s.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="key.path=value overrides applied last")
    s.set_defaults(func=_show)
