# Pretraining, one job per model of the study matrix -> RESULTS/runs/<model>/, training curves
# (dvclive) -> RESULTS/training/<model>/ (the folder dvc.yaml's plots name). A model of method
# `pretrained` is not trained: rule import_encoder writes its run from its weights.
#
# An interrupted job resumes: Snakemake reruns it (its model.safetensors is missing) and
# `hsat pretrain` continues from runs/<model>/checkpoint.pt. A job rerun because the model's
# settings or the training code changed starts afresh (--restart-if-changed: `hsat pretrain`
# compares both with what the run directory holds), so a checkpoint of other settings or code is
# never resumed. log.jsonl and the curves are not declared outputs, so Snakemake does not delete
# them before a resumed job.


rule text_embeddings:
    """HLSS's attribute embeddings: the descriptions through the frozen text encoder, once."""
    input:
        descriptions=lambda wildcards: TEXT_SOURCES[f"{RESULTS}/text/{wildcards.name}.safetensors"][0],
        manifest=MANIFEST,
    output:
        f"{RESULTS}/text/{{name}}.safetensors",
    params:
        encoder=lambda wildcards: shlex.quote(TEXT_SOURCES[f"{RESULTS}/text/{wildcards.name}.safetensors"][1]),
        code=CODE_VERSION["text"],
    wildcard_constraints:
        name="|".join(re.escape(Path(p).stem) for p in TEXT_SOURCES) or "^$",
    threads: 1
    log:
        f"{RESULTS}/logs/text/{{name}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/text/{{name}}.tsv",
    conda:
        "../envs/hsat.yaml"
    shell:
        "OMP_NUM_THREADS={threads} hsat text-embed --descriptions {input.descriptions:q} --encoder {params.encoder:q}"
        " --manifest {input.manifest} --out {output} > {log} 2>&1"


rule pretrain:
    input:
        unpack(pretrain_inputs),
    output:
        model=f"{RESULTS}/runs/{{model}}/model.safetensors",
    params:
        run_dir=lambda wildcards: run_dir(wildcards.model),
        live_dir=lambda wildcards: f"{RESULTS}/training/{wildcards.model}",
        study=STUDY,
        launcher=pretrain_launcher,
        settings=run_settings,
        code=CODE_VERSION["pretrain"],
    wildcard_constraints:
        model=TRAINED_RE,
    threads: 1
    resources:
        # One node (torchrun --standalone: every process on the node that holds the GPUs), or with
        # launcher.nodes > 1 one task per node, each with nproc_per_node GPUs under device cuda.
        gpu=pretrain_resource("gpu"),
        nodes=pretrain_resource("nodes"),
        tasks=pretrain_resource("tasks"),
        mpi=pretrain_resource("mpi"),  # the SLURM executor: the job's command starts its tasks (srun)
        slurm_extra=pretrain_resource("slurm_extra"),
    log:
        f"{RESULTS}/logs/pretrain/{{model}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/pretrain/{{model}}.tsv",
    conda:
        "../envs/hsat.yaml"
    shell:
        "OMP_NUM_THREADS={threads} {params.launcher} pretrain --study {params.study} --model {wildcards.model}"
        " --manifest {input.manifest} --out {params.run_dir} --live-dir {params.live_dir} --restart-if-changed"
        " > {log} 2>&1"


rule import_encoder:
    """An encoder the study does not train (method `pretrained`): its weights file (or the user's
    model.factory) read and written as a finished run, no training step (hsat.encoders)."""
    input:
        unpack(import_inputs),
    output:
        model=f"{RESULTS}/runs/{{model}}/model.safetensors",
    params:
        run_dir=lambda wildcards: run_dir(wildcards.model),
        study=STUDY,
        settings=run_settings,
        code=CODE_VERSION["pretrain"],
    wildcard_constraints:
        model=IMPORTED_RE,
    threads: 1
    log:
        f"{RESULTS}/logs/import_encoder/{{model}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/import_encoder/{{model}}.tsv",
    conda:
        "../envs/hsat.yaml"
    shell:
        "OMP_NUM_THREADS={threads} hsat pretrain --study {params.study} --model {wildcards.model}"
        " --out {params.run_dir} > {log} 2>&1"
