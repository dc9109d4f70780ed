# The dataset: the embedded synthetic cohort (dataset.root and dataset.manifest null), a user's
# OpenSRH root, or a ready manifest -> RESULTS/manifest.csv (paths relative to its folder).


# Only the embedded cohort is synthesised: otherwise the dataset folder is prepare's record.
if DATASET_KIND == "synth":

    rule synth:
        output:
            directory(f"{RESULTS}/dataset"),
        params:
            # Scalars, not the dict: a dict param's key order would count as a change.
            patients=SYNTH["patients"],
            slides=SYNTH["slides"],
            patches=SYNTH["patches"],
            size=SYNTH["size"],
            seed=SYNTH["seed"],
            val_fraction=SYNTH["val_fraction"],
            # Generation knobs (SynthParams overrides) as one sorted string: a stable rerun key.
            sets=" ".join(shlex.quote(f"--set={k}={json.dumps(v)}") for k, v in sorted(SYNTH["params"].items())),
            code=CODE_VERSION["synth"],
        log:
            f"{RESULTS}/logs/synth.log",
        benchmark:
            f"{RESULTS}/benchmarks/synth.tsv",
        conda:
            "../envs/hsat.yaml"
        shell:
            "hsat synth --out {output} --patients {params.patients} --slides {params.slides}"
            " --patches {params.patches} --size {params.size} --seed {params.seed}"
            " --val-fraction {params.val_fraction} {params.sets} > {log} 2>&1"


if DATASET_KIND == "manifest":

    # A user's manifest or OpenSRH root: the dataset folder records the source (source.json: its
    # path and the sha256 of its manifest or meta files), so DVC's `dataset` output exists for
    # every source.
    rule prepare:
        input:
            DATASET_PATH,
        output:
            manifest=MANIFEST,
            report=PREPARE_REPORT,
            record=directory(f"{RESULTS}/dataset"),
        params:
            code=CODE_VERSION["prepare"],
        log:
            f"{RESULTS}/logs/prepare.log",
        benchmark:
            f"{RESULTS}/benchmarks/prepare.tsv",
        conda:
            "../envs/hsat.yaml"
        shell:
            "hsat prepare --manifest {input:q} --out {output.manifest} --report {output.report}"
            " --record {output.record} > {log} 2>&1"

else:

    rule prepare:
        input:
            root=DATASET_PATH,
            # A user's OpenSRH root: the folder's own time stamp does not change when its metadata
            # does, so the files the reader walks are inputs (the synthetic cohort is one output).
            meta=[str(Path(DATASET_PATH) / "meta" / config["dataset"][k]) for k in ("meta_json", "split_json")]
            if DATASET_KIND == "root"
            else [],
        output:
            manifest=MANIFEST,
            report=PREPARE_REPORT,
            # the synthetic cohort is rule synth's output; a user's root gets its record here
            record=[directory(f"{RESULTS}/dataset")] if DATASET_KIND == "root" else [],
        params:
            options=opensrh_options(),
            record=f"--record {RESULTS}/dataset" if DATASET_KIND == "root" else "",
            code=CODE_VERSION["prepare"],
        log:
            f"{RESULTS}/logs/prepare.log",
        benchmark:
            f"{RESULTS}/benchmarks/prepare.tsv",
        conda:
            "../envs/hsat.yaml"
        shell:
            "hsat prepare --root {input.root:q} --out {output.manifest} --report {output.report}"
            " {params.options} {params.record} > {log} 2>&1"
