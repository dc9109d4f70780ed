"""`hsat report collect|tables|figures|card|dvc|calibration|replicates|cost`: concatenate tidy CSVs, write Tables 1-6,
draw the figures and the robustness cards, write DVC's compact views, judge a cohort, compare cohort draws, sum the
jobs' benchmarks."""

from __future__ import annotations

import argparse

from hsat.config import load_study_config, resolve_evaluation
from hsat.errors import HSATError
from hsat.io import write_json


def _collect(args: argparse.Namespace) -> int:
    from hsat.report import collect

    collect(args.inputs, args.out)
    return 0


def _tables(args: argparse.Namespace) -> int:
    from hsat.report import read_tidy
    from hsat.report.claims import claims, write_claims
    from hsat.report.resampling import read_examples
    from hsat.report.tables import headline, write_tables

    cfg = load_study_config(args.study)
    whitebox, transfer = read_tidy(args.whitebox), read_tidy(args.transfer)
    n_examples = coverage = None
    if args.manifest:
        from hsat.evaluate.runs import attacked_coverage, attacked_patch_count

        cfg_eval = resolve_evaluation(cfg["evaluation"])
        n_examples = attacked_patch_count(args.manifest, cfg_eval)
        coverage = attacked_coverage(args.manifest, cfg_eval)
    shift = read_tidy(args.shift) if args.shift else None
    write_tables(whitebox, transfer, cfg, args.out_dir, coverage=coverage, shift=shift)
    sanity = read_tidy(args.sanity) if args.sanity else None
    language = read_tidy(args.language) if args.language else None
    examples = read_examples(args.examples) if args.examples else None
    found = (claims(whitebox, transfer, sanity, cfg, language, n_examples=n_examples, examples=examples, shift=shift)
             if args.metrics or args.claims else [])
    if args.claims:
        write_claims(found, args.claims)
    if args.metrics:
        write_json(args.metrics, {**headline(whitebox, cfg, sanity, transfer=transfer), "claims": found})
    return 0


def _dvc(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from hsat.report import read_tidy
    from hsat.report.dvc import write_dvc_views

    try:
        metrics = json.loads(Path(args.metrics).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise HSATError(f"{args.metrics}: cannot read the study's metrics ({exc})") from exc
    paths = write_dvc_views(read_tidy(args.whitebox), load_study_config(args.study), args.runs_dir, metrics,
                            args.plots_dir, args.summary)
    print("DVC views ->", ", ".join(str(p) for p in paths))
    return 0


def _sanity(args: argparse.Namespace) -> int:
    from hsat.evaluate import sanity_report_run

    df = sanity_report_run(args.inputs, args.whitebox, args.transfer, args.manifest, load_study_config(args.study), args.out)
    failed = int((~df["passed"].astype(bool)).sum()) if not df.empty else 0
    print(f"{len(df)} sanity checks, {failed} failed -> {args.out}")
    return 0


def _attention(args: argparse.Namespace) -> int:
    from hsat.evaluate.attention import read_attention_maps
    from hsat.report.figures import attention_figure, save_figure

    paths = save_figure(attention_figure([read_attention_maps(p) for p in args.maps]), args.out_dir, args.name)
    print("attention maps ->", ", ".join(str(p) for p in paths))
    return 0


def _figures(args: argparse.Namespace) -> int:
    from hsat.report import read_tidy
    from hsat.report.figures import write_figures

    cfg = load_study_config(args.study)
    write_figures(
        read_tidy(args.whitebox),
        read_tidy(args.transfer),
        read_tidy(args.sanity),
        cfg,
        args.runs_dir,
        args.embeddings_dir,
        args.out_dir,
        shift=read_tidy(args.shift) if args.shift else None,
    )
    return 0


def _card(args: argparse.Namespace) -> int:
    from hsat.report import read_tidy
    from hsat.report.card import robustness_card, write_card

    cfg, whitebox = load_study_config(args.study), read_tidy(args.whitebox)
    shift = read_tidy(args.shift) if args.shift else None
    transfer = read_tidy(args.transfer) if args.transfer else None
    cards = [robustness_card(model, cfg, whitebox, shift, transfer) for model in args.model]  # all checked first
    for card in cards:
        paths = write_card(card, args.out_dir)
        print("robustness card ->", ", ".join(str(p) for p in paths))
    return 0


def _language(args: argparse.Namespace) -> int:
    from hsat.report import read_tidy
    from hsat.report.figures import language_similarity, save_figure

    save_figure(language_similarity(read_tidy(args.language)), args.out_dir, "language_similarity")
    return 0


def _replicates(args: argparse.Namespace) -> int:
    from hsat.report.replicates import write_replicates

    draws = {}
    for item in args.draws:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise HSATError(f"hsat report replicates: {item!r} is not NAME=metrics.json")
        if name in draws:
            raise HSATError(f"hsat report replicates: draw {name!r} given twice")
        draws[name] = path
    table = write_replicates(draws, args.out)
    print(f"{len(table)} claims on {len(draws)} draws -> {args.out}; verdicts differ on {int((table['agreement'] == 'differs').sum())}")
    return 0


def _calibration(args: argparse.Namespace) -> int:
    import pandas as pd

    from hsat.io import write_text
    from hsat.report import read_tidy
    from hsat.report.calibration import format_markdown

    frames = [read_tidy(p) for p in args.inputs]
    frames = [f for f in frames if not f.empty]
    if not frames:
        raise HSATError("hsat report calibration: no whitebox rows in " + ", ".join(args.inputs))
    text = format_markdown(pd.concat(frames, ignore_index=True), args.title)
    if args.out:
        write_text(args.out, text)
    print(text)
    return 0


def _cost(args: argparse.Namespace) -> int:
    from hsat.report.cost import cost_tables, job_costs, write_cost

    jobs, dropped = job_costs(args.benchmarks, load_study_config(args.study))
    tables = cost_tables(jobs, args.cores)
    paths = write_cost(jobs, tables, args.out_dir, dropped)
    t = tables["total"].iloc[0]
    print(f"{int(t['jobs'])} jobs, {t['job_seconds']:,.0f} job-seconds, at least {t['wall_lower_bound_min']:.1f} min "
          f"on {args.cores} cores -> {', '.join(str(p) for p in paths)}")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="tables and figures from the tidy result CSVs",
                       description="The study's report from the tidy result CSVs: collect them, then tables, "
                       "figures, claims and the sanity and cost summaries. Nothing is recomputed.")
    verbs = p.add_subparsers(dest="report_verb", metavar="STEP", required=True)

    c = verbs.add_parser("collect", help="concatenate per-model tidy CSVs into one",
                         description="Concatenate per-model tidy CSVs (same columns) into one; empty files are skipped.")
    c.add_argument("--out", required=True, help="output CSV")
    c.add_argument("inputs", nargs="*", help="input CSVs (same columns; empty files are skipped; none -> an empty CSV)")
    c.set_defaults(func=_collect)

    lg = verbs.add_parser("language", help="HLSS's marker-similarity heat maps from results/language.csv",
                          description="Per model, clean and under attack: the mean similarity of each class's validation "
                          "samples to every class's markers (less that marker's mean over the classes), from the "
                          "collected `hsat language` rows.")
    lg.add_argument("--language", required=True, help="results/language.csv (hsat language, collected)")
    lg.add_argument("--out-dir", required=True, help="writes language_similarity.png and .pdf here")
    lg.set_defaults(func=_language)

    a = verbs.add_parser("attention", help="the ViT models' attention maps, clean and under attack, from stored maps",
                         description="Draw the stored maps of `hsat attention --out`: per model and condition (clean, "
                         "under attack) the validation patches, then one row per head with its map over the patch.")
    a.add_argument("--maps", nargs="*", default=[], help="files of `hsat attention --out` (one per model)")
    a.add_argument("--out-dir", required=True, help="writes NAME.png and .pdf here")
    a.add_argument("--name", default="attention", help="the figure's file name, without extension (default: attention)")
    a.set_defaults(func=_attention)

    t = verbs.add_parser("tables", help="Tables 1-5 as CSV, Markdown and LaTeX",
                         description="Tables 1-5 (white-box robustness, transfer, hierarchy level, L_max, every "
                         "method per classifier) as CSV, Markdown and LaTeX (booktabs), and optionally the "
                         "headline claims as JSON and Markdown.")
    t.add_argument("--study", "--config", dest="study", required=True, help="study config (YAML; --config: the old name)")
    t.add_argument("--whitebox", required=True, help="results/whitebox.csv")
    t.add_argument("--transfer", required=True, help="results/transfer.csv")
    t.add_argument("--out-dir", required=True, help="folder for table1..table5")
    t.add_argument("--metrics", default=None, help="also write the headline claims as JSON here (e.g. results/metrics.json)")
    t.add_argument("--sanity", default=None, help="results/sanity.csv: counts failed checks in --metrics and --claims")
    t.add_argument("--language", default=None, help="results/language.csv (HLSS models): the marker-similarity claims")
    t.add_argument("--shift", default=None, help="results/shift.csv (hsat shift, collected): Table 6 and the natural-shift "
                                                  "carry-over claims (without it Table 6 is a note)")
    t.add_argument("--manifest", default=None,
                   help="the study's manifest: the claims' sampling term counts the validation patches the attacks ran on "
                        "(without it: evaluation.max_val_patches), and the white-box tables' captions say how many "
                        "validation slides and patients those patches come from")
    t.add_argument("--examples", nargs="*", default=None, metavar="CSV",
                   help="results/examples/*.csv (hsat evaluate --examples): the white-box claims resample patients "
                        "(a hierarchical bootstrap) instead of counting the patches as independent")
    t.add_argument(
        "--claims", default=None,
        help="also write each claim with its numbers, seeds, spread, interval, p-value and verdict as Markdown here "
             "(e.g. results/claims.md)",
    )
    t.set_defaults(func=_tables)

    d = verbs.add_parser("dvc", help="compact plot data (dvc plots show) and headline numbers (dvc metrics show)",
                         description="Reshape the study's results for DVC's viewers, recomputing nothing: worst-case "
                         "accuracy against eps per level and method, each model's training loss, and one compact "
                         "row of headline numbers (HSAT and the baseline, clean and worst case; claim verdicts).")
    d.add_argument("--study", required=True, help="study config (YAML)")
    d.add_argument("--whitebox", required=True, help="results/whitebox.csv")
    d.add_argument("--metrics", required=True, help="results/metrics.json (hsat report tables): its claims and sanity counts")
    d.add_argument("--runs-dir", required=True, help="folder of run directories (log.jsonl)")
    d.add_argument("--plots-dir", required=True, help="writes robust_accuracy.csv and training_loss.csv here")
    d.add_argument("--summary", required=True, help="the headline numbers as JSON (e.g. results/summary.json)")
    d.set_defaults(func=_dvc)

    s = verbs.add_parser("sanity", help="every model's sanity checks plus the study-level ones (attack above clean, white-box vs transfer)",
                         description="Collect the per-model checks of `hsat sanity` and add those that need the whole "
                         "study: no attack above clean accuracy, white-box at most transfer.")
    s.add_argument("--study", "--config", dest="study", required=True, help="study config (YAML; --config: the old name)")
    s.add_argument("--whitebox", required=True, help="results/whitebox.csv")
    s.add_argument("--transfer", required=True, help="results/transfer.csv")
    s.add_argument("--manifest", required=True, help="the study's manifest (how many validation patches were attacked)")
    s.add_argument("--out", required=True, help="results/sanity.csv")
    s.add_argument("inputs", nargs="*", help="per-model sanity CSVs of `hsat sanity`")
    s.set_defaults(func=_sanity)

    cal = verbs.add_parser(
        "calibration", help="the embedded cohort's calibration targets (HiDisc and the supervised references) judged from whitebox CSVs",
        description="Judge the embedded cohort's calibration targets (docs/synthetic_cohort.md) from whitebox CSVs: "
        "mean and spread over seeds, and a verdict per target.",
    )
    cal.add_argument("--out", default=None, help="also write the Markdown here")
    cal.add_argument("--title", default="Calibration", help="heading of the Markdown")
    cal.add_argument("inputs", nargs="+", help="whitebox CSVs (per model or collected)")
    cal.set_defaults(func=_calibration)

    rep = verbs.add_parser(
        "replicates", help="the claims' verdicts on independent draws of the cohort, side by side",
        description="Read the metrics.json of each draw of the study (config/replicates.yaml runs another draw) and "
        "write one table: per claim, each draw's verdict and difference, and whether the verdicts agree.",
    )
    rep.add_argument("--out", required=True, help="Markdown to write (e.g. results/replicates.md)")
    rep.add_argument("draws", nargs="+", metavar="NAME=METRICS",
                     help="e.g. draw0=results/metrics.json draw1=results/replicate1/metrics.json")
    rep.set_defaults(func=_replicates)

    co = verbs.add_parser("cost", help="where the study's time went: its jobs' Snakemake benchmarks by rule and by method",
                          description="Sum the study's Snakemake benchmark files by rule and by method, with a lower "
                          "bound of the wall time on --cores cores: cost.csv and cost.md.")
    co.add_argument("--study", "--config", dest="study", required=True,
                    help="the study config the jobs ran (results/config.resolved.yaml); other models' benchmarks are left out")
    co.add_argument("--benchmarks", default="results/benchmarks", help="the workflow's benchmark folder (default: results/benchmarks)")
    co.add_argument("--cores", type=int, default=2, help="cores for the wall-time lower bound (default: 2)")
    co.add_argument("--out-dir", required=True, help="writes cost.csv and cost.md here")
    co.set_defaults(func=_cost)

    f = verbs.add_parser("figures", help="figures (PNG and PDF)",
                         description="The report's figures as PNG and PDF: robust accuracy against eps, the transfer "
                         "heat map, training curves, a t-SNE map of the embeddings, the attack-steps sanity plot.")
    f.add_argument("--study", "--config", dest="study", required=True, help="study config (YAML; --config: the old name)")
    f.add_argument("--whitebox", required=True)
    f.add_argument("--transfer", required=True)
    f.add_argument("--sanity", required=True)
    f.add_argument("--runs-dir", required=True, help="folder of run directories (log.jsonl)")
    f.add_argument("--embeddings-dir", required=True, help="folder of embedding directories")
    f.add_argument("--out-dir", required=True)
    f.add_argument("--shift", default=None, help="results/shift.csv: the natural-shift figure (without it: a note)")
    f.set_defaults(func=_figures)

    cd = verbs.add_parser("card", help="each encoder's robustness card: JSON and a one-page figure",
                          description="One model's robustness card from the collected results, recomputing nothing: "
                          "per level, clean accuracy, the L-inf worst case at 4/255 and 8/255, the transfer drop "
                          "(when transfer.csv has the model as a target) and natural-shift accuracy per family "
                          "(docs/shift.md). Writes MODEL.json, MODEL.png and MODEL.pdf per model.")
    cd.add_argument("--study", required=True, help="study config (YAML): the model's method, group, backbone, seed")
    cd.add_argument("--model", required=True, nargs="+", help="the models (keys of the study's models): one card each, "
                    "in one process (the plotting libraries are imported once)")
    cd.add_argument("--whitebox", required=True, help="results/whitebox.csv")
    cd.add_argument("--shift", default=None, help="results/shift.csv")
    cd.add_argument("--transfer", default=None, help="results/transfer.csv")
    cd.add_argument("--out-dir", required=True, help="writes MODEL.json, .png and .pdf here (e.g. results/cards)")
    cd.set_defaults(func=_card)
