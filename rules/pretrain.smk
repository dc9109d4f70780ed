# Pretraining, one job per model of the study matrix -> RESULTS/runs/<model>/.
#
# A rerun of this rule starts the run afresh: Snakemake reruns it only when the model's settings,
# the training code or the manifest changed, and a checkpoint of other settings or code must not
# be resumed. (To resume an interrupted long run, run the logged `hsat pretrain` command by hand:
# it resumes from checkpoint.pt; then `snakemake --touch`.)


rule pretrain:
    input:
        manifest=MANIFEST,
    output:
        model=f"{RESULTS}/runs/{{model}}/model.safetensors",
        log_jsonl=f"{RESULTS}/runs/{{model}}/log.jsonl",
    params:
        run_dir=lambda wildcards: run_dir(wildcards.model),
        study=STUDY,
        launcher=pretrain_launcher(),
        settings=run_settings,
        code=CODE_VERSION["pretrain"],
    wildcard_constraints:
        model=MODEL_RE,
    threads: 1
    resources:
        gpu=NPROC,
    log:
        f"{RESULTS}/logs/pretrain/{{model}}.log",
    conda:
        "../envs/hsat.yaml"
    shell:
        "rm -f {params.run_dir}/checkpoint.pt {params.run_dir}/config.yaml;"
        " OMP_NUM_THREADS={threads} {params.launcher} pretrain --study {params.study} --model {wildcards.model}"
        " --manifest {input.manifest} --out {params.run_dir} > {log} 2>&1"
