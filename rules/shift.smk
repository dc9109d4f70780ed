# Natural-shift robustness (evaluation.shift; off unless enabled): per model, every shift family
# of the image kind at severities 0-5 and the adversarial stain, on the attacked subset, with its
# checks; collected into shift.csv and shift_sanity.csv. docs/shift.md.

SHIFT_MODELS = _subset(EVAL["shift"]["models"]) if EVAL["shift"]["enabled"] else []


# The study's shift files (rule all, evaluate_all), when evaluation.shift.enabled.
SHIFT_OUTPUTS = [f"{RESULTS}/shift.csv", f"{RESULTS}/shift_sanity.csv"] if SHIFT_MODELS else []
# Table 6 (rule tables) and a robustness card per model of the sweep (rule cards; report_outputs).
SHIFT_TABLES = [f"table6.{ext}" for ext in ("csv", "md", "tex")] if SHIFT_MODELS else []
CARD_MODELS = SHIFT_MODELS


rule shift:
    """One job per model: the natural-shift sweep of its frozen encoder and linear probe."""
    input:
        model=f"{RESULTS}/runs/{{model}}/model.safetensors",
        manifest=MANIFEST,
        features=f"{RESULTS}/embeddings/{{model}}/features.safetensors",
    output:
        csv=f"{RESULTS}/shift/{{model}}.csv",
        sanity=f"{RESULTS}/shift_sanity/{{model}}.csv",
    params:
        run_dir=lambda wildcards: run_dir(wildcards.model),
        emb_dir=lambda wildcards, input: str(Path(input.features).parent),
        study=STUDY,
        settings=lambda wildcards: eval_settings("shift", wildcards),
        code=CODE_VERSION["evaluate"],
    threads: 1
    resources:
        gpu=lambda wildcards: model_gpus(wildcards.model),
    log:
        f"{RESULTS}/logs/shift/{{model}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/shift/{{model}}.tsv",
    conda:
        "../envs/hsat.yaml"
    shell:
        "OMP_NUM_THREADS={threads} hsat shift --run {params.run_dir} --manifest {input.manifest}"
        " --embeddings {params.emb_dir} --study {params.study} --model {wildcards.model}"
        " --out {output.csv} --sanity {output.sanity} > {log} 2>&1"


rule collect_shift:
    input:
        lambda wildcards: [f"{RESULTS}/{wildcards.kind}/{m}.csv" for m in SHIFT_MODELS],
    output:
        f"{RESULTS}/{{kind}}.csv",
    wildcard_constraints:
        kind="shift|shift_sanity",
    params:
        code=CODE_VERSION["report"],
    log:
        f"{RESULTS}/logs/report/collect_{{kind}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/report/collect_{{kind}}.tsv",
    conda:
        "../envs/hsat.yaml"
    shell:
        "hsat report collect --out {output} {input} > {log} 2>&1"
