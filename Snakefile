# The HSAT study as one workflow: dataset -> manifest -> pretrain (per model) -> embeddings ->
# white-box sweep + sanity checks -> transfer matrix -> tables, figures, metrics.
#
#   snakemake all --cores 2                                  # the default study (config/config.yaml)
#   snakemake all --cores 2 --configfile config/tiny.yaml    # the tiny study the tests run
#   snakemake all --cores 8 --resources gpu=1 --configfile config/opensrh.yaml
#   snakemake paper_figures --cores 2                        # or model_<name>, or any output file
#
# The target comes first: --configfile, --resources, --config and --sdm take several values and
# would read a target after them as one of theirs.
#
# See docs/workflow.md. Rules are thin: each calls one `hsat` verb.

from snakemake.utils import min_version

min_version("9.0")

# The default study. A --configfile is an overlay on it, applied in rules/common.smk (Snakemake
# alone would merge `models` too, and a tiny study would inherit the default study's matrix).
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


include: "rules/common.smk"
include: "rules/dataset.smk"
include: "rules/pretrain.smk"
include: "rules/evaluate.smk"
include: "rules/transfer.smk"
include: "rules/shift.smk"  # before the report: its tables, figures and cards read SHIFT_MODELS
include: "rules/report.smk"


rule all:
    input:
        report_outputs(),
        SHIFT_OUTPUTS,
        expand(f"{RESULTS}/runs/{{model}}/model.safetensors", model=MODELS),
        intermediate_outputs(),  # so that a deleted per-model file is rebuilt, with what depends on it
    default_target: True
    localrule: True


rule paper_figures:
    input:
        report_outputs(),
    localrule: True


rule pretrain_all:
    """DVC stage `pretrain`: the dataset, the manifest and every checkpoint."""
    input:
        expand(f"{RESULTS}/runs/{{model}}/model.safetensors", model=MODELS),
    localrule: True


rule evaluate_all:
    """DVC stage `evaluate`: embeddings, white-box sweeps, sanity checks, the transfer matrix, MIL,
    attention maps and HLSS's marker similarities."""
    input:
        sweep_outputs(),
        SHIFT_OUTPUTS,
    localrule: True


# Per-model targets: `snakemake model_<name>` trains and evaluates one model of the matrix.
for _model in MODELS:

    rule:
        name:
            f"model_{_model}"
        input:
            model_outputs(_model),
        localrule: True
