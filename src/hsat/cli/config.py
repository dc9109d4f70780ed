"""`hsat config show`: the study a set of overlays resolves to, with what each overlay set marked."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from hsat.errors import HSATError


def _show(args: argparse.Namespace) -> int:
    from hsat.config import find_default_study, resolve_study, show_study
    from hsat.data.manifest import study_data_errors

    base = args.base if args.base is not None else find_default_study()
    cfg, named = resolve_study(base, args.study, args.set)
    shown = os.path.relpath(base) if Path(base).resolve().is_relative_to(Path.cwd().resolve()) else base
    print(f"# {shown}" + "".join(f" + {p}" for p in args.study) + "  (# overlay: set by an overlay or --set)")
    print(show_study(cfg, named), end="")
    errors = study_data_errors(cfg)  # what `snakemake -n` would stop on
    if errors:
        raise HSATError("the study does not fit its data:\n  " + "\n  ".join(errors))
    return 0


def add_parsers(subparsers) -> None:
    p = subparsers.add_parser("config", help="inspect study configs (overlays on the default study)",
                              description="Inspect study configs: `hsat config show` prints what a set of overlays "
                              "makes of the default study.")
    verbs = p.add_subparsers(dest="config_verb", metavar="ACTION", required=True)
    s = verbs.add_parser(
        "show",
        help="print the resolved study: the default study changed by each --study overlay",
        description="What `snakemake all --configfile F` runs: the default study (--base) with each "
        "overlay applied in turn (named values win; `models` replaces the matrix; the evaluation's "
        "model lists follow the models kept), validated with the schema's defaults filled in. With "
        "dataset.manifest set, the settings are checked against it as the workflow checks them.",
    )
    s.add_argument("--base", type=Path, default=None,
                   help="the default study (default: config/config.yaml of the workflow folder you are in or "
                   "above, else of the checkout hsat is installed from)")
    s.add_argument("--study", "--configfile", dest="study", nargs="+", action="extend", default=[], type=Path,
                   metavar="STUDY.yaml", help="study configs, each an overlay, applied in order (--configfile: the "
                   "same, as snakemake names it)")
    s.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="key.path=value overrides applied last")
    s.set_defaults(func=_show)
