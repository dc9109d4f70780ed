"""`hsat pretrain`: one pretraining run from a run config, or from one model of a study config."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from hsat.errors import HSATError


def _pretrain(args: argparse.Namespace) -> int:
    from hsat.config import (
        deep_merge,
        load_run_config,
        load_study_config,
        parse_overrides,
        run_config_for_model,
        validate,
    )
    from hsat.methods import resolve_method
    from hsat.train import pretrain

    if args.study is not None:
        if args.config is not None:
            raise HSATError("give either --run-config RUN.yaml or --study STUDY.yaml --model NAME, not both")
        if not args.model:
            raise HSATError("--study needs --model NAME (a key of the study's `models`)")
        study = load_study_config(args.study)
        cfg = run_config_for_model(study, args.model, manifest=str(args.manifest) if args.manifest else None)
        if args.overrides:
            cfg = validate(deep_merge(cfg, parse_overrides(args.overrides)), "run", source="overrides")
            cfg["method"] = resolve_method(cfg["method"])
    else:
        if args.model:
            raise HSATError("--model only goes with --study STUDY.yaml")
        overrides = list(args.overrides)
        if args.manifest is not None:
            overrides.append(f"data.manifest={args.manifest}")
        cfg = load_run_config(args.config, overrides)
    from hsat.distributed import cleanup
    from hsat.provenance import code_version

    try:
        out = pretrain(cfg, args.out, on_config_change="restart" if args.restart_if_changed else "error",
                       code_version=code_version(["hsat.cli.train"]), live_dir=args.live_dir)
    finally:
        cleanup()  # leave the torchrun process group cleanly (no-op without torchrun)
    if os.environ.get("RANK", "0") == "0":  # one line per job, not per torchrun rank
        print(f"hsat pretrain: {cfg['method']['name']} ({cfg['model']['backbone']}, "
              f"{cfg['train']['steps']} steps) -> {out}")
    return 0


def add_parsers(subparsers) -> None:
    p = subparsers.add_parser(
        "pretrain",
        help="hierarchical (adversarial) self-supervised pretraining of one encoder",
        description="Pretrain one encoder and write RUN_DIR/{config.yaml, checkpoint.pt, log.jsonl, "
        "model.safetensors}. Either --run-config RUN.yaml (keys of the schema's $defs/run) or --study "
        "STUDY.yaml --model NAME (the study's `pretrain` section merged with that model's overrides). "
        "Running the same command again resumes from RUN_DIR/checkpoint.pt, or returns at once when the "
        "run is finished. Under torchrun (--nproc_per_node N) it trains with DistributedDataParallel; "
        "data.patients_per_batch is then the global batch.",
        epilog="examples: hsat pretrain --run-config run.yaml --out runs/hsat train.steps=20 attack.steps=2\n"
        "          hsat pretrain --study config/config.yaml --model hsat --manifest results/manifest.csv --out runs/hsat",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run-config", "--config", dest="config", type=Path, metavar="RUN.yaml",
                   help="run config YAML (omit to start from the schema defaults; --config: the old name)")
    p.add_argument("--study", type=Path, metavar="STUDY.yaml", help="study config YAML (with --model)")
    p.add_argument("--model", help="model name in the study's `models` matrix")
    p.add_argument("--manifest", type=Path, help="manifest CSV (sets data.manifest)")
    p.add_argument("--out", type=Path, required=True, help="run directory")
    p.add_argument(
        "--restart-if-changed",
        action="store_true",
        help="if RUN_DIR holds a run of other settings or made by other training code, discard it and "
        "start afresh (default: refuse other settings, warn about other code)",
    )
    p.add_argument("--live-dir", type=Path, default=None,
                   help="dvclive folder for the training curves (default: RUN_DIR/dvclive; `dvc plots show` draws them)")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key.path=value",
        help="config overrides, values parsed as YAML (e.g. optim.lr=3e-4 method.max_levels=[patch])",
    )
    p.set_defaults(func=_pretrain)
