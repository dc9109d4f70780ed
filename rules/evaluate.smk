# Per model: clean embeddings + linear probe (once), the white-box sweep, MIL, the attack sanity checks.


rule evaluate:
    """One job per model: its clean embeddings + linear probe, the white-box sweep and (when every
    model has it) slide-level MIL, chained in one process (`hsat embed ... --then evaluate ...`)."""
    input:
        model=f"{RESULTS}/runs/{{model}}/model.safetensors",
        manifest=MANIFEST,
    output:
        whitebox=f"{RESULTS}/whitebox/{{model}}.csv",
        examples=f"{RESULTS}/examples/{{model}}.csv",
        **EMBED_OUT,
        **(MIL_OUT if MIL_IN_EVALUATE else {}),
    params:
        run_dir=lambda wildcards: run_dir(wildcards.model),
        emb_dir=lambda wildcards, output: str(Path(output.features).parent),
        study=STUDY,
        settings=lambda wildcards: eval_settings("evaluate+mil" if MIL_IN_EVALUATE else "evaluate", wildcards),
        code=CODE_VERSION["evaluate"],
        mil=lambda wildcards, input, output: (
            f" --then {mil_command(wildcards, output, str(Path(output.features).parent), run_dir(wildcards.model), input.manifest)}"
            if MIL_IN_EVALUATE else ""
        ),
    threads: 1
    resources:
        gpu=lambda wildcards: model_gpus(wildcards.model),
    log:
        f"{RESULTS}/logs/evaluate/{{model}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate/{{model}}.tsv",
    conda:
        "../envs/hsat.yaml"
    shell:
        "OMP_NUM_THREADS={threads} hsat embed --run {params.run_dir} --manifest {input.manifest}"
        " --study {params.study} --out {params.emb_dir}"
        " --then evaluate --run {params.run_dir} --manifest {input.manifest}"
        " --embeddings {params.emb_dir} --study {params.study} --model {wildcards.model} --out {output.whitebox}"
        " --examples {output.examples}{params.mil} > {log} 2>&1"


rule sanity:
    input:
        model=f"{RESULTS}/runs/{{model}}/model.safetensors",
        manifest=MANIFEST,
        features=f"{RESULTS}/embeddings/{{model}}/features.safetensors",
    output:
        f"{RESULTS}/sanity/{{model}}.csv",
    params:
        run_dir=lambda wildcards: run_dir(wildcards.model),
        emb_dir=lambda wildcards, input: str(Path(input.features).parent),
        study=STUDY,
        settings=lambda wildcards: eval_settings("sanity", wildcards),
        code=CODE_VERSION["evaluate"],
    threads: 1
    resources:
        gpu=lambda wildcards: model_gpus(wildcards.model),
    log:
        f"{RESULTS}/logs/sanity/{{model}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/sanity/{{model}}.tsv",
    conda:
        "../envs/hsat.yaml"
    shell:
        "OMP_NUM_THREADS={threads} hsat sanity --run {params.run_dir} --manifest {input.manifest}"
        " --embeddings {params.emb_dir} --study {params.study} --model {wildcards.model} --out {output}"
        " > {log} 2>&1"


if not MIL_IN_EVALUATE:

    rule mil:
        """Slide-level gated attention MIL on the model's frozen clean features (evaluation.mil) for a
        subset of the models; with evaluation.mil.attack, every validation slide attacked end to end."""
        input:
            features=f"{RESULTS}/embeddings/{{model}}/features.safetensors",
            model=f"{RESULTS}/runs/{{model}}/model.safetensors",
            manifest=MANIFEST,
        output:
            **MIL_OUT,
        params:
            settings=lambda wildcards: eval_settings("mil", wildcards),
            code=CODE_VERSION["evaluate"],
            command=lambda wildcards, input, output: mil_command(
                wildcards, output, str(Path(input.features).parent), run_dir(wildcards.model), input.manifest),
        threads: 1
        resources:
            gpu=lambda wildcards: model_gpus(wildcards.model) if MIL_ATTACK else 0,
        log:
            f"{RESULTS}/logs/mil/{{model}}.log",
        benchmark:
            f"{RESULTS}/benchmarks/mil/{{model}}.tsv",
        conda:
            "../envs/hsat.yaml"
        shell:
            "OMP_NUM_THREADS={threads} hsat {params.command} > {log} 2>&1"


rule attention:
    """A ViT model's last-block attention maps on validation patches, clean and under attack
    (evaluation.attention), stored for the figure rule."""
    input:
        model=f"{RESULTS}/runs/{{model}}/model.safetensors",
        manifest=MANIFEST,
    output:
        f"{RESULTS}/attention/{{model}}.safetensors",
    params:
        run_dir=lambda wildcards: run_dir(wildcards.model),
        study=STUDY,
        per_class=EVAL["attention"]["patches_per_class"],
        settings=lambda wildcards: eval_settings("attention", wildcards),
        code=CODE_VERSION["evaluate"],
    threads: 1
    resources:
        gpu=lambda wildcards: model_gpus(wildcards.model),
    log:
        f"{RESULTS}/logs/attention/{{model}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/attention/{{model}}.tsv",
    conda:
        "../envs/hsat.yaml"
    shell:
        "OMP_NUM_THREADS={threads} hsat attention --run {params.run_dir} --manifest {input.manifest}"
        " --study {params.study} --model {wildcards.model} --out {output}"
        " --patches-per-class {params.per_class} > {log} 2>&1"


rule language:
    """An HLSS model's similarities to each class's markers, clean and under attack (evaluation.language)."""
    input:
        model=f"{RESULTS}/runs/{{model}}/model.safetensors",
        manifest=MANIFEST,
    output:
        f"{RESULTS}/language/{{model}}.csv",
    params:
        run_dir=lambda wildcards: run_dir(wildcards.model),
        study=STUDY,
        settings=lambda wildcards: eval_settings("language", wildcards),
        code=CODE_VERSION["evaluate"],
    threads: 1
    resources:
        gpu=lambda wildcards: model_gpus(wildcards.model),
    log:
        f"{RESULTS}/logs/language/{{model}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/language/{{model}}.tsv",
    conda:
        "../envs/hsat.yaml"
    shell:
        "OMP_NUM_THREADS={threads} hsat language --run {params.run_dir} --manifest {input.manifest}"
        " --study {params.study} --model {wildcards.model} --out {output} > {log} 2>&1"
