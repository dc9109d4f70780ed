# Per model: clean embeddings + linear probe (once), the white-box sweep, the attack sanity checks.


rule embed:
    input:
        model=f"{RESULTS}/runs/{{model}}/model.safetensors",
        manifest=MANIFEST,
    output:
        features=f"{RESULTS}/embeddings/{{model}}/features.safetensors",
        index=f"{RESULTS}/embeddings/{{model}}/index.csv",
        probe=f"{RESULTS}/embeddings/{{model}}/probe.safetensors",
        meta=f"{RESULTS}/embeddings/{{model}}/meta.json",
    params:
        run_dir=lambda wildcards: run_dir(wildcards.model),
        emb_dir=lambda wildcards, output: str(Path(output.features).parent),
        study=STUDY,
        settings=lambda wildcards: eval_settings("embed"),
        code=CODE_VERSION["evaluate"],
    threads: 1
    resources:
        gpu=1,
    log:
        f"{RESULTS}/logs/embed/{{model}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/embed/{{model}}.tsv",
    conda:
        "../envs/hsat.yaml"
    shell:
        "OMP_NUM_THREADS={threads} hsat embed --run {params.run_dir} --manifest {input.manifest}"
        " --study {params.study} --out {params.emb_dir} > {log} 2>&1"


rule evaluate:
    input:
        model=f"{RESULTS}/runs/{{model}}/model.safetensors",
        manifest=MANIFEST,
        features=f"{RESULTS}/embeddings/{{model}}/features.safetensors",
    output:
        f"{RESULTS}/whitebox/{{model}}.csv",
    params:
        run_dir=lambda wildcards: run_dir(wildcards.model),
        emb_dir=lambda wildcards, input: str(Path(input.features).parent),
        study=STUDY,
        settings=lambda wildcards: eval_settings("evaluate", wildcards),
        code=CODE_VERSION["evaluate"],
    threads: 1
    resources:
        gpu=1,
    log:
        f"{RESULTS}/logs/evaluate/{{model}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate/{{model}}.tsv",
    conda:
        "../envs/hsat.yaml"
    shell:
        "OMP_NUM_THREADS={threads} hsat evaluate --run {params.run_dir} --manifest {input.manifest}"
        " --embeddings {params.emb_dir} --study {params.study} --model {wildcards.model} --out {output}"
        " > {log} 2>&1"


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
        gpu=1,
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


rule mil:
    """Slide-level gated attention MIL on the model's frozen clean features (evaluation.mil); with
    evaluation.mil.attack, every validation slide attacked end to end through backbone and head."""
    input:
        features=f"{RESULTS}/embeddings/{{model}}/features.safetensors",
        **({"model": f"{RESULTS}/runs/{{model}}/model.safetensors", "manifest": MANIFEST} if MIL_ATTACK else {}),
    output:
        csv=f"{RESULTS}/mil/{{model}}.csv",
        head=f"{RESULTS}/mil/{{model}}.safetensors",
        **({"whitebox": f"{RESULTS}/whitebox_abmil/{{model}}.csv"} if MIL_ATTACK else {}),
    params:
        emb_dir=lambda wildcards, input: str(Path(input.features).parent),
        study=STUDY,
        settings=lambda wildcards: eval_settings("mil", wildcards),
        code=CODE_VERSION["evaluate"],
        attack=lambda wildcards, input, output: (
            f" --run {run_dir(wildcards.model)} --manifest {input.manifest} --whitebox {output.whitebox}"
            if MIL_ATTACK else ""
        ),
    threads: 1
    resources:
        gpu=1 if MIL_ATTACK else 0,
    log:
        f"{RESULTS}/logs/mil/{{model}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/mil/{{model}}.tsv",
    conda:
        "../envs/hsat.yaml"
    shell:
        "OMP_NUM_THREADS={threads} hsat mil --embeddings {params.emb_dir} --study {params.study}"
        " --model {wildcards.model} --out {output.csv} --head {output.head}{params.attack} > {log} 2>&1"


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
        gpu=1,
    log:
        f"{RESULTS}/logs/language/{{model}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/language/{{model}}.tsv",
    conda:
        "../envs/hsat.yaml"
    shell:
        "OMP_NUM_THREADS={threads} hsat language --run {params.run_dir} --manifest {input.manifest}"
        " --study {params.study} --model {wildcards.model} --out {output} > {log} 2>&1"
