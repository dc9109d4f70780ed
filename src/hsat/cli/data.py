"""`hsat synth` and `hsat prepare`: the embedded cohort and the manifest every later stage reads."""

from __future__ import annotations

import argparse
from pathlib import Path


def _synth(args: argparse.Namespace) -> int:
    from hsat.data.synthetic import synthesize_cohort

    out = synthesize_cohort(
        args.out,
        patients=args.patients,
        slides=args.slides,
        patches=args.patches,
        size=args.size,
        seed=args.seed,
        val_fraction=args.val_fraction,
    )
    n = args.patients * args.slides * args.patches
    print(f"hsat synth: {args.patients} patients x {args.slides} slides x {args.patches} patches ({n} patches of {args.size} px) -> {out}")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from hsat.data.manifest import prepare_manifest, summary

    df = prepare_manifest(args.out, root=args.root, manifest=args.manifest, check=args.check_images)
    print(f"hsat prepare: {summary(df)} -> {args.out}")
    return 0


def add_parsers(subparsers) -> None:
    p = subparsers.add_parser(
        "synth",
        help="write the embedded SRH-like cohort (OpenSRH layout)",
        description="Write a synthetic SRH-like cohort in the OpenSRH layout (meta/*.json + 2-channel "
        "uint16 TIFF patches). Deterministic for a seed; see docs/synthetic_cohort.md.",
    )
    p.add_argument("--out", type=Path, required=True, help="cohort folder (must be empty, absent, or an earlier synthetic cohort)")
    p.add_argument("--patients", type=int, default=42, help="patients, spread over the 7 classes (>= 7)")
    p.add_argument("--slides", type=int, default=2, help="slides per patient")
    p.add_argument("--patches", type=int, default=24, help="patches per slide")
    p.add_argument("--size", type=int, default=32, help="patch side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.33, help="fraction of each class's patients held out for val")
    p.set_defaults(func=_synth)

    p = subparsers.add_parser(
        "prepare",
        help="build or validate the manifest (patient, slide, path, label, split)",
        description="Walk an OpenSRH root (--root) or validate a user manifest (--manifest; rows may point "
        "to SRH TIFFs or RGB PNG/JPEG/TIFF) and write a normalised manifest with paths relative to its folder. "
        "Nothing is written if any check fails.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--root", type=Path, help="dataset root holding meta/opensrh.json and meta/train_val_split.json")
    src.add_argument("--manifest", type=Path, help="a manifest CSV to validate and normalise")
    p.add_argument("--out", type=Path, required=True, help="manifest CSV to write")
    p.add_argument(
        "--check-images",
        action="store_true",
        help="read every image once (catches corrupt/truncated files and wrong dtype or shape; slower)",
    )
    p.set_defaults(func=_prepare)
