"""Robustness evaluation, one module per idea:

- `classifiers`: kNN, its differentiable soft copy (the adaptive attack's target), the kNN's
  decisions with the soft copy's gradient (AutoAttack's target), linear probe;
- `embeddings`: clean features once per model (`hsat embed`) and their files;
- `metrics`: slide/patient aggregation, Acc/MCA/top-k/mAP, the slide-stratified attack subset;
- `sweep`: the white-box attack grid and the sweep that crafts each batch once;
- `worst_case`: the per-example worst case over every attack and objective;
- `examples`: each attacked patch's correctness (clean, PGD, worst case), for the claims' patient bootstrap;
- `sanity`: the attack sanity checks, one small function each;
- `shift`: natural shifts (stain, blur, JPEG, intensity, noise, an adversarial stain) and their sweep;
- `language`: HLSS's similarities to each class's markers, clean and under attack;
- `runs`: the entry points of the CLI.

Everything a user or another module needs is importable from `hsat.evaluate`.
"""

from hsat.evaluate.classifiers import CLASSIFIERS, KNNVote, LinearProbe, SoftKNN, classify, fit_linear_probe, knn_predict, load_probe
from hsat.evaluate.examples import EXAMPLE_COLUMNS, example_rows
from hsat.evaluate.embeddings import Embeddings, dataset_groups, dataset_labels, embed, index_frame, load_embeddings, loader, write_embeddings
from hsat.evaluate.metrics import (
    LEVELS_EVAL,
    aggregate,
    binomial_se,
    classification_metrics,
    level_metrics,
    patch_accuracy,
    slide_stratified_subset,
    stratified_subset,
    subset_coverage,
)
from hsat.evaluate.runs import (
    attacked_coverage,
    attention_run,
    attacked_patch_count,
    attacked_positions,
    datasets,
    default_device,
    embed_run,
    eval_image_size,
    language_run,
    load_for_eval,
    mil_run,
    model_info,
    sanity_report_run,
    sanity_run,
    shift_run,
    whitebox_run,
)
from hsat.evaluate.sanity import SANITY_COLUMNS, sanity_checks, study_checks
from hsat.evaluate.shift import (
    ADVERSARIAL_STAIN,
    DEFAULT_FAMILIES,
    SHIFT_COLUMNS,
    SHIFTS,
    adversarial_stain,
    apply_shift,
    hed_to_rgb,
    rgb_to_hed,
    shift_checks,
    shift_sweep,
)
from hsat.evaluate.sweep import (
    AUTOATTACK_OBJECTIVE,
    LABEL_FREE_OBJECTIVES,
    OBJECTIVES,
    WHITEBOX_COLUMNS,
    AttackResults,
    AttackSpec,
    ProbeClassifier,
    attack_name,
    attack_subset,
    craft_batch,
    eval_frozen,
    knn_attack_specs,
    make_objective,
    restart_specs,
    run_attacks,
    sweep_alpha,
    whitebox_specs,
    whitebox_sweep,
)
from hsat.evaluate.worst_case import WORST_CASE, worst_case_correct, worst_case_rows

__all__ = [
    "ADVERSARIAL_STAIN", "DEFAULT_FAMILIES", "SHIFTS", "SHIFT_COLUMNS", "adversarial_stain", "apply_shift", "hed_to_rgb",
    "rgb_to_hed", "shift_checks", "shift_run", "shift_sweep",
    "AUTOATTACK_OBJECTIVE", "AttackResults", "AttackSpec", "CLASSIFIERS", "Embeddings", "KNNVote", "LABEL_FREE_OBJECTIVES",
    "LEVELS_EVAL", "LinearProbe", "OBJECTIVES", "ProbeClassifier", "SANITY_COLUMNS", "SoftKNN", "WHITEBOX_COLUMNS",
    "WORST_CASE", "aggregate", "attack_name", "attack_subset", "attention_run", "attacked_coverage", "attacked_patch_count", "attacked_positions",
    "binomial_se", "classification_metrics", "classify", "craft_batch", "dataset_groups", "dataset_labels", "datasets",
    "default_device", "embed", "embed_run", "eval_frozen", "eval_image_size", "fit_linear_probe", "index_frame", "knn_attack_specs",
    "knn_predict", "level_metrics", "load_embeddings", "load_for_eval", "load_probe", "loader", "make_objective",
    "mil_run", "model_info", "patch_accuracy", "restart_specs", "run_attacks", "sanity_checks", "sanity_report_run", "sanity_run",
    "slide_stratified_subset", "stratified_subset", "study_checks", "subset_coverage", "sweep_alpha", "whitebox_run", "whitebox_specs", "whitebox_sweep", "worst_case_correct",
    "worst_case_rows",
    "EXAMPLE_COLUMNS", "example_rows",
]
