# Pretraining, one job per model of the study matrix -> RESULTS/runs/<model>/.
#
# An interrupted job resumes: Snakemake reruns it (its model.safetensors is missing) and
# `hsat pretrain` continues from runs/<model>/checkpoint.pt. A job rerun because the model's
# settings changed starts afresh (--restart-if-changed), and so does one rerun because the
# training code changed (the code version stamped in the run directory differs), so a checkpoint
# of other settings or code is never resumed. log.jsonl is not a declared output, so Snakemake
# does not delete it before a resumed job; it lives beside the weights.


rule pretrain:
    input:
        manifest=MANIFEST,
    output:
        model=f"{RESULTS}/runs/{{model}}/model.safetensors",
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
        "mkdir -p {params.run_dir};"
        " if [ \"$(cat {params.run_dir}/code.version 2>/dev/null)\" != {params.code} ]; then"
        " rm -f {params.run_dir}/checkpoint.pt {params.run_dir}/config.yaml {params.run_dir}/log.jsonl;"
        " echo {params.code} > {params.run_dir}/code.version; fi;"
        " OMP_NUM_THREADS={threads} {params.launcher} pretrain --study {params.study} --model {wildcards.model}"
        " --manifest {input.manifest} --out {params.run_dir} --restart-if-changed > {log} 2>&1"
