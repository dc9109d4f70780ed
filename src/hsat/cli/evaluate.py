"""`hsat embed`, `hsat evaluate`, `hsat sanity`, `hsat shift`, `hsat transfer craft|evaluate`: robustness evaluation.

Each handler loads the study config, calls one library function (hsat.evaluate / hsat.transfer)
and returns 0. The device is CUDA when available, else CPU.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def _study(args: argparse.Namespace) -> dict:
    from hsat.config import load_study_config

    return load_study_config(args.study)


def _embed(args: argparse.Namespace) -> int:
    from hsat.evaluate import embed_run

    out = embed_run(args.run, args.manifest, _study(args), args.out)
    log.info("embeddings written to %s", out)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from hsat.evaluate import whitebox_run

    df = whitebox_run(args.run, args.manifest, args.embeddings, _study(args), args.model, args.out,
                      examples_out=args.examples)
    log.info("%d white-box rows written to %s", len(df), args.out)
    return 0


def _sanity(args: argparse.Namespace) -> int:
    from hsat.evaluate import sanity_run

    df = sanity_run(args.run, args.manifest, args.embeddings, _study(args), args.model, args.out)
    failed = df[~df["passed"].astype(bool)]
    for r in failed.itertuples():
        log.warning("sanity check FAILED for %s: %s %s=%s acc=%.2f (%s)", r.model, r.check, r.param, r.value, r.acc, r.criterion)
    log.info("%d sanity rows (%d failed) written to %s", len(df), len(failed), args.out)
    return 0


def _shift(args: argparse.Namespace) -> int:
    from hsat.evaluate import shift_run

    df = shift_run(args.run, args.manifest, args.embeddings, _study(args), args.model, args.out, sanity_out=args.sanity)
    log.info("%d natural-shift rows written to %s", len(df), args.out)
    return 0


def _craft(args: argparse.Namespace) -> int:
    from hsat.transfer import craft_run

    out = craft_run(args.run, args.manifest, args.embeddings, _study(args), args.out)
    log.info("adversarial validation set written to %s", out)
    return 0


def _transfer_evaluate(args: argparse.Namespace) -> int:
    from hsat.transfer import transfer_run

    df = transfer_run(args.adversarial, args.surrogate, args.target, args.target_run, args.target_embeddings,
                      _study(args), args.out)
    log.info("%d transfer rows written to %s", len(df), args.out)
    return 0


def _attention(args: argparse.Namespace) -> int:
    from hsat.evaluate import attention_run

    paths = attention_run(args.run, args.manifest, _study(args), args.out_dir, args.patches_per_class, out=args.out,
                          model_name=args.model)
    log.info("attention maps written to %s", ", ".join(str(p) for p in paths))
    if args.out_dir is None:
        return 0
    # --out-dir also draws them: the report's verb, run as `--then report attention` would run it.
    from hsat.cli import build_parser, run_verb

    return run_verb(build_parser().parse_args(["report", "attention", "--maps", *map(str, paths), "--out-dir", args.out_dir,
                                               "--name", f"attention_{Path(args.run).name}"]))


def _language(args: argparse.Namespace) -> int:
    from hsat.evaluate import language_run
    from hsat.evaluate.language import language_summary

    df = language_run(args.run, args.manifest, _study(args), args.model, args.out)
    for r in language_summary(df).itertuples():
        log.info("%s %s: zero-shot marker MCA %.1f, own-marker margin %.3f", args.model, r.condition, r.zero_shot_mca,
                 r.own_margin)
    return 0


def _mil(args: argparse.Namespace) -> int:
    from hsat.evaluate import mil_run

    df = mil_run(args.embeddings, _study(args), args.model, args.out, run_dir=args.run, manifest=args.manifest,
                 whitebox_out=args.whitebox, head_out=args.head)
    r = df.iloc[0]
    log.info("%s: slide-level MIL acc %.1f, MCA %.1f, AUC %.1f on %d slides -> %s", args.model, r.acc, r.mca, r.auc,
             r.n_slides, args.out)
    return 0


def _common(p: argparse.ArgumentParser, embeddings: bool = True, model: bool = True) -> None:
    p.add_argument("--run", required=True, metavar="RUN_DIR", help="run directory of `hsat pretrain` (config.yaml, model.safetensors)")
    p.add_argument("--manifest", required=True, metavar="CSV", help="manifest of the study (its val split is attacked)")
    if embeddings:
        p.add_argument("--embeddings", required=True, metavar="EMB_DIR", help="folder written by `hsat embed` for this run")
    p.add_argument("--study", "--config", dest="study", required=True, metavar="STUDY.yaml",
                   help="study config; its `evaluation` section sets the attacks (--config: the old name)")
    if model:
        p.add_argument("--model", required=True, metavar="NAME", help="model name in the study's `models` (method, group, seed columns)")


def add_parsers(subparsers) -> None:
    p = subparsers.add_parser(
        "embed", help="clean backbone features of every patch and the linear probe (once per model)",
        description="Embed every train and validation patch of the manifest with the run's frozen backbone and fit "
        "the linear probe on the train features (evaluation.linear): EMB_DIR/{features,probe}.safetensors, index.csv "
        "and meta.json, which `hsat evaluate`, `sanity`, `mil` and `transfer` read instead of embedding again. "
        "The files record the weights' sha256: embeddings of other weights are refused later.")
    _common(p, embeddings=False, model=False)
    p.add_argument("--out", required=True, metavar="EMB_DIR")
    p.set_defaults(func=_embed, gpus=1)

    p = subparsers.add_parser("evaluate", help="white-box sweep (PGD/BIM/MI-FGSM[/AutoAttack]) -> tidy CSV",
                              description="Attacks are crafted once per (attack, eps, objective) and scored by every classifier.")
    _common(p)
    p.add_argument("--out", required=True, metavar="CSV")
    p.add_argument("--examples", default=None, metavar="CSV",
                   help="also write each attacked patch's correctness (clean, PGD, worst case; patient and slide): "
                        "what the claims' patient-level bootstrap resamples")
    p.set_defaults(func=_evaluate, gpus=1)

    p = subparsers.add_parser(
        "sanity", help="attack sanity checks (Carlini et al. 2019) -> CSV; failures are flagged, not fatal",
        description="Check that the attacks work on this model (evaluation.sanity): accuracy must not rise with "
        "steps or eps, twice the steps and more restarts must not find much more, a large eps must reach chance "
        "(the majority class's share), noise must hurt less than PGD. One row per check with `passed` and its "
        "`criterion`; a failed check puts the attack in doubt, not the model.")
    _common(p)
    p.add_argument("--out", required=True, metavar="CSV")
    p.set_defaults(func=_sanity, gpus=1)

    p = subparsers.add_parser("shift", help="natural shifts (stain, blur, JPEG, intensity, noise, adversarial stain) -> tidy CSV",
                              description="Each family at severities 0-5 (evaluation.shift) on the attacked subset, scored by every "
                                          "classifier at patch, slide and patient level, plus the per-example worst case.")
    _common(p)
    p.add_argument("--out", required=True, metavar="CSV")
    p.add_argument("--sanity", metavar="CSV", help="also its checks: severity 0 equals clean, accuracy falls with severity")
    p.set_defaults(func=_shift, gpus=1)

    p = subparsers.add_parser(
        "attention", help="a ViT run's last-block class-token attention, per head, on validation patches (figure)",
        description="The class token's attention in the last block of a ViT run, per head, on the first "
        "--patches-per-class validation patches of each class, clean and under a PGD attack on the features "
        "(evaluation.attention.eps): where the model looks, and whether the attack moves it.")
    _common(p, embeddings=False, model=False)
    p.add_argument("--out", metavar="MAPS.safetensors", help="the maps, clean and under attack, for `hsat report attention`")
    p.add_argument("--out-dir", metavar="DIR", help="writes the maps here (unless --out) and draws them, as `hsat report attention` does: attention_<run>.png and .pdf")
    p.add_argument("--model", metavar="NAME", help="the model's name in the study (default: the run folder's)")
    p.add_argument("--patches-per-class", type=int, default=1, metavar="N")
    p.set_defaults(func=_attention, gpus=1)

    p = subparsers.add_parser(
        "language", help="an HLSS run's similarity to each class's markers, clean and under attack -> CSV",
        description="For an HLSS or robust-HLSS run: each validation sample's cosine similarity to every class's "
        "markers (method.hlss.descriptions), clean and under a PGD attack on the marker-based zero-shot "
        "classifier (evaluation.language); rows per sample, marker and condition.")
    _common(p, embeddings=False)
    p.add_argument("--out", required=True, metavar="CSV")
    p.set_defaults(func=_language, gpus=1)

    p = subparsers.add_parser(
        "mil", help="slide-level gated attention MIL on a model's frozen clean features -> CSV",
        description="Train a gated-attention MIL head (one bag per slide, evaluation.mil) on the frozen clean "
        "features of `hsat embed` and score the validation slides and patients. With --run, --manifest and "
        "--whitebox it also attacks every validation slide end to end (all its patches within eps, through the "
        "backbone and the MIL head) and writes whitebox rows of the classifier abmil.")
    p.add_argument("--embeddings", required=True, metavar="EMB_DIR", help="folder written by `hsat embed`")
    p.add_argument("--study", "--config", dest="study", required=True, metavar="STUDY.yaml")
    p.add_argument("--model", required=True, metavar="NAME")
    p.add_argument("--out", required=True, metavar="CSV")
    p.add_argument("--run", metavar="RUN_DIR", help="with --manifest and --whitebox: attack every validation slide end to end")
    p.add_argument("--manifest", metavar="CSV")
    p.add_argument("--whitebox", metavar="CSV", help="whitebox.csv rows of the ABMIL classifier, clean and under attack")
    p.add_argument("--head", metavar="FILE.safetensors", help="keep the trained MIL head")
    p.set_defaults(func=_mil, gpus=lambda args: 1 if args.run else 0)  # the GPU attacks slides only

    p = subparsers.add_parser(
        "transfer", help="black-box transfer: craft once per surrogate, evaluate on each target",
        description="Transfer attacks (evaluation.transfer): `craft` stores a surrogate's adversarial validation "
        "set once; `evaluate` scores the sets of several surrogates on one target.")
    sub = p.add_subparsers(dest="transfer_verb", metavar="ACTION", required=True)
    c = sub.add_parser("craft", help="craft the surrogate's adversarial validation set (float32 safetensors)",
                       description="Attack the surrogate run's validation subset (evaluation.transfer: attack, eps, "
                       "steps, objective) and store the adversarial images for any number of targets.")
    _common(c, model=False)
    c.add_argument("--out", required=True, metavar="FILE.safetensors")
    c.set_defaults(func=_craft, gpus=1)
    e = sub.add_parser("evaluate", help="score stored adversarial sets on a target model (loaded once)",
                       description="Score the stored sets of `hsat transfer craft` on a target: accuracy and MCA, "
                       "and their drops from the target's clean figures, per surrogate and level.")
    e.add_argument("--adversarial", required=True, nargs="+", metavar="FILE.safetensors",
                   help="stored sets of `hsat transfer craft` (several: one per surrogate)")
    e.add_argument("--surrogate", required=True, nargs="+", metavar="NAME", help="their surrogates' names, in the same order")
    e.add_argument("--target", required=True, metavar="NAME")
    e.add_argument("--target-run", required=True, metavar="RUN_DIR")
    e.add_argument("--target-embeddings", required=True, metavar="EMB_DIR")
    e.add_argument("--study", "--config", dest="study", required=True, metavar="STUDY.yaml")
    e.add_argument("--out", required=True, metavar="CSV")
    e.set_defaults(func=_transfer_evaluate, gpus=1)
