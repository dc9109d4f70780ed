# Black-box transfer: craft the adversarial validation set once per surrogate, then score every
# other surrogate's set on each target (evaluation.transfer.models, or every model).


rule transfer_craft:
    input:
        model=f"{RESULTS}/runs/{{surrogate}}/model.safetensors",
        manifest=MANIFEST,
        features=f"{RESULTS}/embeddings/{{surrogate}}/features.safetensors",
    output:
        f"{RESULTS}/adversarial/{{surrogate}}.safetensors",
    params:
        run_dir=lambda wildcards: run_dir(wildcards.surrogate),
        emb_dir=lambda wildcards, input: str(Path(input.features).parent),
        study=STUDY,
        settings=lambda wildcards: eval_settings("transfer"),
        code=CODE_VERSION["transfer"],
    threads: 1
    resources:
        gpu=lambda wildcards: model_gpus(wildcards.surrogate),
    log:
        f"{RESULTS}/logs/transfer/craft_{{surrogate}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/transfer/craft_{{surrogate}}.tsv",
    conda:
        "../envs/hsat.yaml"
    shell:
        "OMP_NUM_THREADS={threads} hsat transfer craft --run {params.run_dir} --manifest {input.manifest}"
        " --embeddings {params.emb_dir} --study {params.study} --out {output} > {log} 2>&1"


rule transfer_evaluate:
    """One job per target: its model is loaded once and scores every other surrogate's stored
    examples (a job's start -- importing torch and friends -- costs more than scoring a set)."""
    input:
        adversarial=lambda wildcards: [f"{RESULTS}/adversarial/{s}.safetensors" for s in transfer_surrogates(wildcards.target)],
        model=f"{RESULTS}/runs/{{target}}/model.safetensors",
        features=f"{RESULTS}/embeddings/{{target}}/features.safetensors",
    output:
        f"{RESULTS}/transfer/{{target}}.csv",
    params:
        surrogates=lambda wildcards: " ".join(transfer_surrogates(wildcards.target)),
        run_dir=lambda wildcards: run_dir(wildcards.target),
        emb_dir=lambda wildcards, input: str(Path(input.features).parent),
        study=STUDY,
        settings=lambda wildcards: eval_settings("transfer"),
        code=CODE_VERSION["transfer"],
    wildcard_constraints:
        target=MODEL_RE,
    threads: 1
    resources:
        gpu=lambda wildcards: model_gpus(wildcards.target),
    log:
        f"{RESULTS}/logs/transfer/{{target}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/transfer/{{target}}.tsv",
    conda:
        "../envs/hsat.yaml"
    shell:
        "OMP_NUM_THREADS={threads} hsat transfer evaluate --adversarial {input.adversarial}"
        " --surrogate {params.surrogates} --target {wildcards.target} --target-run {params.run_dir}"
        " --target-embeddings {params.emb_dir} --study {params.study} --out {output} > {log} 2>&1"
