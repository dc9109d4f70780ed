"""`hsat bench`: time the HSAT step against its floor and a naive loop; write a JSON report."""

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
    p.set_defaults(func=_bench)
