"""`hsat bench`: time the HSAT step against its floor and a naive loop; write a JSON report.
`hsat plan`: a study's GPU-hours per stage, from its sizes and such measured (or default) throughputs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _bench(args: argparse.Namespace) -> int:
    from hsat.bench import format_table, run_benchmark
    from hsat.io import write_json

    report = run_benchmark(
        args.config,
        args.overrides,
        extra=args.extra,
        repeats=args.repeats,
        warmup=args.warmup,
        threads=args.threads or None,
        data_steps=args.data_steps,
        data_workers=args.data_workers,
        eval_patches=args.eval_patches,
        progress=lambda msg: print(f"hsat bench: {msg}", file=sys.stderr, flush=True),
    )
    write_json(args.json, report)
    print(format_table(report))
    print(f"hsat bench: report -> {args.json}")
    return 0


def add_parsers(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="benchmark one HSAT step against its floor and a naive attack loop",
        description="Time, in one run on one model and one batch: one HSAT step (the function pretrain "
        "runs), its floor (k input-gradient passes + one training pass, each timed alone), a naive loop "
        "that back-propagates into the parameters at every attack step; the fraction of a pretrain-like "
        "loop spent waiting for the DataLoader on the embedded cohort; white-box sweep throughput; peak "
        "memory. Prints a table and writes JSON. Ratios, not seconds, are the point: they compare "
        "implementations on whatever machine runs them. About 1-2 minutes on 2 CPU cores with defaults.",
        epilog="examples: hsat bench --json results/bench.json\n"
        "          hsat bench --json b.json --config run.yaml --extra resnet18@64 attack.steps=10\n"
        "          hsat bench --json b.json device=cuda precision=bf16 channels_last=true compile=true",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--json", type=Path, required=True, metavar="OUT.json", help="where to write the report")
    p.add_argument("--config", type=Path, help="run config YAML, or a study config (its first adversarial "
                   "model); omit for the schema defaults (resnet10t, 32 px, 8x2x2x2 views, PGD-5)")
    p.add_argument("--extra", action="append", default=[], metavar="BACKBONE@PX",
                   help="also benchmark this backbone and/or resolution (repeatable), e.g. resnet18@64 or @64")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds; medians are reported (default 7)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up rounds (default 2)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads, fixed for the run (default 1: stable on a shared machine; "
                   "0 leaves torch's choice, as a run config with threads: null does)")
    p.add_argument("--data-steps", type=int, default=6, help="timed steps of the data-wait loop (default 6)")
    p.add_argument("--data-workers", type=int, action="append", metavar="N",
                   help="DataLoader workers for the data-wait loop (repeatable; default the config's "
                   "data.num_workers, plus 1 when that is 0); the first gives data_wait_fraction")
    p.add_argument("--eval-patches", type=int, default=128, help="validation patches attacked (default 128)")
    p.add_argument("overrides", nargs="*", metavar="key.path=value",
                   help="run-config overrides, values parsed as YAML (e.g. attack.steps=10 device=cuda)")
    p.set_defaults(func=_bench, gpus=1)  # timings on a GPU another job shares would be wrong
    add_plan_parser(subparsers)


def _plan(args: argparse.Namespace) -> int:
    import json

    from hsat.config import find_default_study, resolve_study
    from hsat.errors import HSATError
    from hsat.io import write_csv
    from hsat.plan import DEFAULT_THROUGHPUT, format_plan, patch_counts, plan_study, throughputs_from_bench

    study, _ = resolve_study(args.base if args.base is not None else find_default_study(), args.study, args.set)
    if args.patches:
        patches, counted = {"train": args.patches[0], "val": args.patches[1]}, "given"
    else:
        patches, counted = patch_counts(study, args.manifest)
    throughputs, source = None, "hsat.plan.DEFAULT_THROUGHPUT (one H100, rough)"
    if args.bench:
        try:
            report = json.loads(args.bench.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise HSATError(f"--bench {args.bench}: cannot read a JSON report ({exc})") from None
        measured = throughputs_from_bench(report)
        throughputs = {**DEFAULT_THROUGHPUT, **measured}
        source = f"{args.bench} for {', '.join(sorted(measured))}, the defaults for the rest"
    plan = plan_study(study, patches, throughputs)
    print(format_plan(plan, source, patches, counted, study["evaluation"]["max_val_patches"]))
    if args.csv:
        write_csv(args.csv, plan)
    return 0


def add_plan_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "plan",
        help="GPU-hours per stage of a study, from its sizes and a throughput, before it runs",
        description="Estimate a study's GPU-hours per stage (pretrain, embed, whitebox, autoattack, sanity, "
        "transfer, mil) and in all: image passes counted from the config (steps, batch, views, attack steps, "
        "attack configurations, models, patches) over throughputs per backbone -- rough defaults for one H100, "
        "or measured ones from `hsat bench --json` on your GPU (--bench). +-50 %; data loading and the small "
        "stages are left out.",
        epilog="examples: hsat plan --configfile config/opensrh.yaml\n"
        "          hsat bench --json b.json --config config/opensrh.yaml device=cuda && "
        "hsat plan --configfile config/opensrh.yaml --bench b.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--study", "--configfile", dest="study", nargs="+", action="extend", default=[], type=Path,
                   metavar="STUDY.yaml", help="study configs, each an overlay on the default study, applied in order "
                   "(--configfile: the same, as snakemake names it)")
    p.add_argument("--base", type=Path, default=None, help="the default study (default: the workflow's config/config.yaml)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="key.path=value overrides applied last")
    p.add_argument("--bench", type=Path, metavar="B.json", help="throughputs measured by `hsat bench --json` (per backbone)")
    p.add_argument("--manifest", metavar="CSV", help="count the patches of this manifest (default: the study's "
                   "dataset.manifest, else OpenSRH's sizes under dataset.root, else the embedded cohort's)")
    p.add_argument("--patches", type=int, nargs=2, metavar=("TRAIN", "VAL"), help="patches per split, given")
    p.add_argument("--csv", type=Path, metavar="OUT.csv", help="also write one row per stage and model")
    p.set_defaults(func=_plan)
