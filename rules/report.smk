# Tidy CSVs of the whole study -> Tables 1-4, headline metrics, figures (and the --report HTML).


rule collect:
    """One tidy CSV of the study from the per-model ones. The manifest is an input too: with no
    per-model files (one transfer model), the job would otherwise run at once, before -- and even
    when -- the stages before it fail."""
    input:
        parts=lambda wildcards: {
            "whitebox": [f"{RESULTS}/whitebox/{m}.csv" for m in MODELS]
            + ([f"{RESULTS}/whitebox_abmil/{m}.csv" for m in MIL_MODELS] if MIL_ATTACK else []),
            "transfer": [f"{RESULTS}/transfer/{t}.csv" for t in TRANSFER_TARGETS],
            "mil": [f"{RESULTS}/mil/{m}.csv" for m in MIL_MODELS],
            "language": [f"{RESULTS}/language/{m}.csv" for m in LANGUAGE_MODELS],
        }[wildcards.kind],
        manifest=MANIFEST,
    output:
        f"{RESULTS}/{{kind}}.csv",
    wildcard_constraints:
        kind="whitebox|transfer|mil|language",
    params:
        code=CODE_VERSION["report"],
    log:
        f"{RESULTS}/logs/report/collect_{{kind}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/report/collect_{{kind}}.tsv",
    conda:
        "../envs/hsat.yaml"
    shell:
        "hsat report collect --out {output} {input.parts} > {log} 2>&1"


rule sanity_report:
    """Every model's sanity checks plus those that need the whole study (attack above clean for
    every model, white-box vs transfer for every transfer cell)."""
    input:
        per_model=[f"{RESULTS}/sanity/{m}.csv" for m in SANITY_MODELS],
        whitebox=f"{RESULTS}/whitebox.csv",
        transfer=f"{RESULTS}/transfer.csv",
        manifest=MANIFEST,
    output:
        f"{RESULTS}/sanity.csv",
    params:
        study=STUDY,
        settings=lambda wildcards: eval_settings("sanity"),
        code=CODE_VERSION["sanity_report"],
    log:
        f"{RESULTS}/logs/report/sanity.log",
    benchmark:
        f"{RESULTS}/benchmarks/report/sanity.tsv",
    conda:
        "../envs/hsat.yaml"
    shell:
        "hsat report sanity --study {params.study} --whitebox {input.whitebox} --transfer {input.transfer}"
        " --manifest {input.manifest} --out {output} {input.per_model} > {log} 2>&1"


rule tables:
    input:
        whitebox=f"{RESULTS}/whitebox.csv",
        transfer=f"{RESULTS}/transfer.csv",
        sanity=f"{RESULTS}/sanity.csv",
        language=[f"{RESULTS}/language.csv"] if LANGUAGE_MODELS else [],
        examples=[f"{RESULTS}/examples/{m}.csv" for m in MODELS],
        shift=[f"{RESULTS}/shift.csv"] if SHIFT_MODELS else [],
        manifest=MANIFEST,
    output:
        tables=[
            report(f"{RESULTS}/tables/{t}", caption="../workflow/report/tables.rst", category="Tables")
            if t.endswith(".csv")
            else f"{RESULTS}/tables/{t}"
            for t in TABLES + SHIFT_TABLES
        ],
        metrics=f"{RESULTS}/metrics.json",
        claims=f"{RESULTS}/claims.md",
    params:
        out_dir=lambda wildcards, output: str(Path(output.tables[0]).parent),
        language=lambda wildcards, input: f" --language {input.language[0]}" if input.language else "",
        shift=lambda wildcards, input: f" --shift {input.shift[0]}" if input.shift else "",
        study=STUDY,
        settings=report_settings,
        code=CODE_VERSION["report"],
    log:
        f"{RESULTS}/logs/report/tables.log",
    benchmark:
        f"{RESULTS}/benchmarks/report/tables.tsv",
    conda:
        "../envs/hsat.yaml"
    shell:
        "hsat report tables --study {params.study} --whitebox {input.whitebox} --transfer {input.transfer}"
        " --sanity {input.sanity} --out-dir {params.out_dir} --metrics {output.metrics}"
        " --claims {output.claims} --manifest {input.manifest}{params.language}{params.shift} --examples {input.examples}"
        " > {log} 2>&1"


rule figures:
    input:
        whitebox=f"{RESULTS}/whitebox.csv",
        transfer=f"{RESULTS}/transfer.csv",
        sanity=f"{RESULTS}/sanity.csv",
        runs=expand(f"{RESULTS}/runs/{{model}}/model.safetensors", model=MODELS),  # log.jsonl beside each
        features=expand(f"{RESULTS}/embeddings/{{model}}/features.safetensors", model=MODELS),
        shift=[f"{RESULTS}/shift.csv"] if SHIFT_MODELS else [],
    output:
        [
            report(f"{RESULTS}/figures/{name}.png", caption=f"../workflow/report/{name}.rst", category="Figures")
            for name in FIGURES
        ],
        expand(f"{RESULTS}/figures/{{name}}.pdf", name=FIGURES),
    params:
        out_dir=lambda wildcards, output: str(Path(output[0]).parent),
        runs_dir=lambda wildcards, input: str(Path(input.runs[0]).parent.parent),
        emb_dir=lambda wildcards, input: str(Path(input.features[0]).parent.parent),
        shift=lambda wildcards, input: f" --shift {input.shift[0]}" if input.shift else "",
        study=STUDY,
        settings=report_settings,
        code=CODE_VERSION["report"],
    threads: 1
    log:
        f"{RESULTS}/logs/report/figures.log",
    benchmark:
        f"{RESULTS}/benchmarks/report/figures.tsv",
    conda:
        "../envs/hsat.yaml"
    shell:
        "OMP_NUM_THREADS={threads} hsat report figures --study {params.study} --whitebox {input.whitebox}"
        " --transfer {input.transfer} --sanity {input.sanity} --runs-dir {params.runs_dir}"
        " --embeddings-dir {params.emb_dir} --out-dir {params.out_dir}{params.shift} > {log} 2>&1"


rule cards:
    """Every model's robustness card (docs/shift.md): clean, L-inf worst case at 4 and 8/255, transfer
    drop and natural-shift accuracy per level, as JSON and a one-page figure, from the collected
    CSVs; one job, so the plotting libraries are imported once."""
    input:
        whitebox=f"{RESULTS}/whitebox.csv",
        transfer=f"{RESULTS}/transfer.csv",
        shift=f"{RESULTS}/shift.csv",
    output:
        json=[f"{RESULTS}/cards/{m}.json" for m in CARD_MODELS],
        png=[report(f"{RESULTS}/cards/{m}.png", caption="../workflow/report/card.rst", category="Robustness cards")
             for m in CARD_MODELS],
        pdf=[f"{RESULTS}/cards/{m}.pdf" for m in CARD_MODELS],
    params:
        out_dir=lambda wildcards, output: str(Path(output.json[0]).parent),
        models=" ".join(CARD_MODELS),
        study=STUDY,
        settings=report_settings,
        code=CODE_VERSION["report"],
    log:
        f"{RESULTS}/logs/report/cards.log",
    benchmark:
        f"{RESULTS}/benchmarks/report/cards.tsv",
    conda:
        "../envs/hsat.yaml"
    shell:
        "hsat report card --study {params.study} --model {params.models} --whitebox {input.whitebox}"
        " --transfer {input.transfer} --shift {input.shift} --out-dir {params.out_dir} > {log} 2>&1"


rule language_figure:
    """HLSS's interpretability heat maps, from the stored similarities (results/language.csv)."""
    input:
        f"{RESULTS}/language.csv",
    output:
        png=report(f"{RESULTS}/figures/language_similarity.png", caption="../workflow/report/language_similarity.rst",
                   category="Figures"),
        pdf=f"{RESULTS}/figures/language_similarity.pdf",
    params:
        out_dir=lambda wildcards, output: str(Path(output.png).parent),
        code=CODE_VERSION["report"],
    log:
        f"{RESULTS}/logs/report/language_figure.log",
    conda:
        "../envs/hsat.yaml"
    shell:
        "hsat report language --language {input} --out-dir {params.out_dir} > {log} 2>&1"


rule attention_figure:
    """The ViT models' attention maps, clean and under attack, from the stored maps."""
    input:
        [f"{RESULTS}/attention/{m}.safetensors" for m in ATTENTION_MODELS],
    output:
        png=report(f"{RESULTS}/figures/attention.png", caption="../workflow/report/attention.rst", category="Figures"),
        pdf=f"{RESULTS}/figures/attention.pdf",
    params:
        out_dir=lambda wildcards, output: str(Path(output.png).parent),
        code=CODE_VERSION["report"],
    log:
        f"{RESULTS}/logs/report/attention_figure.log",
    benchmark:
        f"{RESULTS}/benchmarks/report/attention_figure.tsv",
    conda:
        "../envs/hsat.yaml"
    shell:
        "hsat report attention --maps {input} --out-dir {params.out_dir} > {log} 2>&1"


rule dvc_views:
    """Small views for DVC (dvc.yaml's plots and metrics): robust accuracy and training loss as
    flat plot data, and the headline numbers, from the collected results and the run logs."""
    input:
        whitebox=f"{RESULTS}/whitebox.csv",
        metrics=f"{RESULTS}/metrics.json",
        runs=expand(f"{RESULTS}/runs/{{model}}/model.safetensors", model=MODELS),  # log.jsonl beside each
    output:
        robust=f"{RESULTS}/plots/robust_accuracy.csv",
        training=f"{RESULTS}/plots/training_loss.csv",
        summary=f"{RESULTS}/summary.json",
    params:
        runs_dir=lambda wildcards, input: str(Path(input.runs[0]).parent.parent),
        plots_dir=lambda wildcards, output: str(Path(output.robust).parent),
        study=STUDY,
        settings=report_settings,
        code=CODE_VERSION["report"],
    log:
        f"{RESULTS}/logs/report/dvc_views.log",
    benchmark:
        f"{RESULTS}/benchmarks/report/dvc_views.tsv",
    conda:
        "../envs/hsat.yaml"
    shell:
        "hsat report dvc --study {params.study} --whitebox {input.whitebox} --metrics {input.metrics}"
        " --runs-dir {params.runs_dir} --plots-dir {params.plots_dir} --summary {output.summary} > {log} 2>&1"
