"""`hsat synth`, `hsat prepare` and `hsat text-embed`: the embedded cohort, the manifest every
later stage reads, and HLSS's attribute embeddings."""

from __future__ import annotations

import argparse
from pathlib import Path

from hsat.errors import HSATError


def _synth(args: argparse.Namespace) -> int:
    import yaml

    from hsat.data.synthetic import synth_params, synthesize_cohort

    overrides = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise HSATError(f"--set {item!r}: expected key=value (a SynthParams field)")
        try:
            overrides[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise HSATError(f"--set {item!r}: the value is not YAML ({exc})") from exc
    out = synthesize_cohort(
        params=synth_params(overrides, source="--set"),
        out=args.out,
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
    from hsat.data.manifest import VAL_FRACTION, format_split_report, prepare_manifest, report_path, summary

    if args.folders is None and (args.val_fraction is not None or args.seed is not None):
        raise HSATError(
            "--val-fraction and --seed apply to --folders only (--root takes its split from "
            "meta/train_val_split.json, --manifest from its split column)"
        )
    given = {"meta_json": args.meta_json, "split_json": args.split_json,
             "max_missing_fraction": args.max_missing_fraction, "strict": args.strict or None}
    opensrh = {k: v for k, v in given.items() if v is not None}
    if opensrh and args.root is None:
        raise HSATError(f"--{next(iter(opensrh)).replace('_', '-')} applies to --root only (an OpenSRH dataset root)")
    df = prepare_manifest(
        args.out,
        root=args.root,
        manifest=args.manifest,
        folders=args.folders,
        check=args.check_images,
        val_fraction=VAL_FRACTION if args.val_fraction is None else args.val_fraction,
        seed=0 if args.seed is None else args.seed,
        opensrh=opensrh,
        report=args.report,
        record=args.record,
    )
    report = args.report or report_path(args.out)
    print(f"hsat prepare: {summary(df)} -> {args.out} (per-slide report: {report})")
    print(format_split_report(df))
    return 0


def _text_embed(args: argparse.Namespace) -> int:
    from hsat.text import compute_text_embeddings, read_descriptions, write_text_embeddings

    classes = None
    if args.manifest is not None:
        from hsat.data.manifest import class_names, read_manifest

        classes = class_names(read_manifest(args.manifest, check_files=False))
    emb = compute_text_embeddings(read_descriptions(args.descriptions, classes), args.encoder)
    write_text_embeddings(args.out, emb)
    sizes = ", ".join(f"{lvl} {n}" for lvl, n in emb.sizes.items())
    print(f"hsat text-embed: {sizes} attributes, {emb.markers.shape[0]} markers, dimension {emb.dim} -> {args.out}")
    return 0


def _synth_defaults() -> dict:
    """The embedded cohort of the default study (`dataset.synth` of the schema): one source of defaults."""
    from hsat.config import validate

    return validate({}, "synth")


def add_parsers(subparsers) -> None:
    p = subparsers.add_parser(
        "synth",
        help="write the embedded SRH-like cohort (OpenSRH layout)",
        description="Write a synthetic SRH-like cohort in the OpenSRH layout (meta/*.json + 2-channel "
        "uint16 TIFF patches). Deterministic for a seed; see docs/synthetic_cohort.md.",
    )
    p.add_argument("--out", type=Path, required=True, help="cohort folder (must be empty, absent, or an earlier synthetic cohort)")
    d = _synth_defaults()
    p.add_argument("--patients", type=int, default=d["patients"], help="patients, spread over the 7 classes (>= 7)")
    p.add_argument("--slides", type=int, default=d["slides"], help="slides per patient")
    p.add_argument("--patches", type=int, default=d["patches"], help="patches per slide")
    p.add_argument("--size", type=int, default=d["size"], help="patch side in pixels")
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--val-fraction", type=float, default=d["val_fraction"], help="fraction of each class's patients held out for val")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a generation parameter (hsat.data.synthetic.SynthParams field; value as YAML), repeatable")
    p.set_defaults(func=_synth)

    p = subparsers.add_parser(
        "text-embed",
        help="embed HLSS's attribute descriptions with a frozen, local text encoder",
        description="Embed every sentence of an attribute-descriptions file (config/attributes/srh.yaml) "
        "with a local text encoder (never downloaded) and write the per-attribute and per-marker "
        "embeddings (renormalised means of their sentences') as safetensors, which HLSS training reads.",
    )
    p.add_argument("--descriptions", type=Path, required=True, help="attribute descriptions (YAML)")
    p.add_argument("--encoder", default="all-MiniLM-L6-v2",
                   help="a packaged text encoder name or a local model directory (default all-MiniLM-L6-v2)")
    p.add_argument("--manifest", type=Path, help="check that every class of this manifest is described")
    p.add_argument("--out", type=Path, required=True, help="output .safetensors file")
    p.set_defaults(func=_text_embed)

    p = subparsers.add_parser(
        "prepare",
        help="build or validate the manifest (patient, slide, path, label, split)",
        description="Walk an OpenSRH root (--root) or a folder tree (--folders), or validate a user manifest "
        "(--manifest; rows may point to SRH TIFFs or RGB PNG/JPEG/TIFF), and write a normalised manifest with "
        "paths relative to its folder. Every image is read once (in parallel) so corrupt or truncated files "
        "fail here, not in training. Prints the patients and patches of each class per split and warns about "
        "classes missing from train or val. Nothing is written if any check fails.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--root", type=Path, help="dataset root holding meta/opensrh.json and meta/train_val_split.json")
    src.add_argument("--manifest", type=Path, help="a manifest CSV to validate and normalise")
    src.add_argument(
        "--folders",
        type=Path,
        metavar="ROOT",
        help="a folder tree ROOT/<class>/<patient>/<slide>/<image> or ROOT/<class>/<patient>/<image> (one slide "
        "per patient); images end in .png .jpg .jpeg .tif .tiff (any case); hidden files are skipped, other "
        "non-image files are skipped with a warning. Slide ids become <patient>-<slide>; patient folder names "
        "must be unique across classes. The split is by patient, stratified by class (--val-fraction, --seed)",
    )
    p.add_argument("--out", type=Path, required=True, help="manifest CSV to write")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=None,
        help="--folders only: fraction of each class's patients held out for val (default 0.33); a class with "
        ">= 2 patients gets at least one val patient and keeps at least one in train, a class with one patient "
        "stays in train (its validation accuracy cannot be measured)",
    )
    p.add_argument("--seed", type=int, default=None, help="--folders only: seed of the patient split (default 0)")
    p.add_argument("--meta-json", default=None, metavar="NAME",
                   help="--root only: the metadata file in ROOT/meta/ (default opensrh.json; e.g. a pruned copy)")
    p.add_argument("--split-json", default=None, metavar="NAME",
                   help="--root only: the split file in ROOT/meta/ (default train_val_split.json)")
    p.add_argument("--max-missing-fraction", type=float, default=None, metavar="F",
                   help="--root only: slides without patches of their class and patches listed but missing on disk "
                   "are skipped with a warning (counted per slide in the report); more than this fraction of the "
                   "listed patches missing is an error (default 0.05)")
    p.add_argument("--strict", action="store_true",
                   help="--root only: any slide without patches, patient without slides or missing patch is an error")
    p.add_argument("--report", type=Path, default=None,
                   help="the per-slide report CSV (patches listed, missing, used; default prepare_report.csv beside --out)")
    p.add_argument("--record", type=Path, default=None, metavar="DIR",
                   help="also write DIR/source.json: the source's path and the sha256 of its meta files or manifest "
                   "(the workflow's dataset folder when the data is not the synthesised cohort)")
    check = p.add_mutually_exclusive_group()
    check.add_argument(
        "--check-images",
        dest="check_images",
        action="store_true",
        default=True,
        help="read every image once (the default; catches corrupt/truncated files and wrong dtype or shape)",
    )
    check.add_argument(
        "--no-check-images",
        dest="check_images",
        action="store_false",
        help="only check that the image files exist (fast; a corrupt image then fails in training)",
    )
    p.set_defaults(func=_prepare)
