# Config validation (once), the study matrix, paths, and the rerun keys of every stage.
#
# Rerun policy: Snakemake reruns a job when its params or code change (rerun-triggers). Each rule's
# params therefore carry (a) only the settings that stage reads -- a model's resolved run config for
# its pretraining, the relevant `evaluation` keys for the sweeps -- and (b) a hash of the library
# modules the stage runs, derived from their imports (hsat.provenance). Changing one model's
# settings reruns that model's chain only; editing src/hsat/train.py reruns every pretraining and
# what depends on it; editing the report code reruns only the report.

import json
import os
import re
import shlex
import sys
from pathlib import Path

import hsat
from hsat.backbones import is_vit
from hsat.cluster import job_gpus, launcher_prefix, pretrain_resources
from hsat.config import resolve_study, run_config_for_model
from hsat.errors import HSATError
from hsat.io import remove_temporaries, write_yaml
from hsat.methods import trains_encoder
from hsat.provenance import code_version
from snakemake_interface_executor_plugins.settings import DeploymentMethod

# Run the verbs of the Python that runs Snakemake (its venv need not be activated). Under
# --sdm conda the shared environment provides them instead.
if DeploymentMethod.CONDA not in workflow.deployment_settings.deployment_method:
    shell.prefix(f"export PATH={shlex.quote(str(Path(sys.executable).parent))}:\"$PATH\"; ")


def config_error(message):
    """Stop with the message alone, exit status 2 (bad input, as every `hsat` verb). Snakemake
    prints an exception raised while the Snakefile is parsed (a WorkflowError included) with a
    traceback into this file; a configuration error is the user's to fix and needs none.
    SystemExit passes Snakemake's handlers."""
    print(f"Error: {message}", file=sys.stderr)
    raise SystemExit(2)


# ---------------------------------------------------------------- config: overlay, validate once, fill defaults
# A --configfile is an overlay on the default study (config/config.yaml): what it names wins,
# `models` replaces the matrix, the evaluation's model lists follow the models kept
# (hsat.config.apply_overlay; `hsat config show --study F` prints the result). Snakemake
# has already merged the --configfile files and --config values into `config`. Validation is
# the JSON schema of hsat.config.schema_path(), with defaults and messages naming the key.
_BASE_CONFIG = os.path.join(workflow.basedir, "config", "config.yaml")
_OVERLAYS = [str(p) for p in workflow.configfiles if os.path.abspath(p) != os.path.abspath(_BASE_CONFIG)]
_CONFIG_SOURCE = " + ".join([os.path.relpath(_BASE_CONFIG)] + _OVERLAYS)
try:
    _study, _ = resolve_study(_BASE_CONFIG, [(dict(config), " + ".join(_OVERLAYS) or "--config")])
    RUN_CONFIGS = {name: run_config_for_model(_study, name) for name in _study["models"]}
except HSATError as exc:
    config_error(exc)
config.clear()
config.update(_study)

RESULTS = os.path.normpath(config["results_dir"])
MODELS = list(config["models"])


def models_re(names):
    """A wildcard constraint matching exactly these model names (none: no name at all)."""
    return "|".join(re.escape(m) for m in sorted(names, key=len, reverse=True)) or "^$"


MODEL_RE = models_re(MODELS)
# Encoders the study does not train (method `pretrained`): rule import_encoder writes their runs
# from the weights file, rule pretrain trains the others.
IMPORTED_MODELS = [m for m in MODELS if not trains_encoder(RUN_CONFIGS[m]["method"])]
TRAINED_RE = models_re([m for m in MODELS if m not in IMPORTED_MODELS])
IMPORTED_RE = models_re(IMPORTED_MODELS)
EVAL = config["evaluation"]
NPROC = int(config["launcher"]["nproc_per_node"])
NODES = int(config["launcher"]["nodes"])

# The study config every verb reads: the validated config with defaults, written at parse time
# only when its content changes. It is not a rule input on purpose -- its time stamp would rerun
# everything; each rule's params carry the part of it that the rule depends on.
STUDY = f"{RESULTS}/config.resolved.yaml"


def _write_resolved(path, cfg):
    path = Path(path)
    text = json.dumps(cfg, sort_keys=True)
    old = None
    if path.is_file():
        import yaml

        try:
            old = json.dumps(yaml.safe_load(path.read_text(encoding="utf-8")), sort_keys=True)
        except Exception:
            old = None
    if old != text:
        write_yaml(path, cfg)


onstart:
    # Before any job: the temporary files that killed jobs' atomic writes left beside the outputs
    # this run writes are removed, so a resumed study leaves no debris. Only those outputs: this
    # run has locked them, so no other Snakemake is writing them.
    for _out in workflow.persistence.all_outputfiles():
        for _tmp in remove_temporaries(_out):
            print(f"removed {_tmp} (left by an interrupted job)", file=sys.stderr)
    # Jobs read this file (--study); written when a run starts, never by a dry run, so checking
    # another config with -n cannot change it under a running study.
    _write_resolved(STUDY, config)


# ---------------------------------------------------------------- dataset
def _dataset_source():
    """('manifest', CSV) | ('root', DIR) | ('synth', DIR): where the study's patches come from."""
    ds = config["dataset"]
    if ds["manifest"]:
        if not Path(ds["manifest"]).is_file():
            config_error(f"dataset.manifest: file not found: {ds['manifest']} (edit the study config)")
        return "manifest", ds["manifest"]
    if ds["root"]:
        root = Path(ds["root"])
        for key in ("meta_json", "split_json"):
            if not (root / "meta" / ds[key]).is_file():
                config_error(
                    f"dataset.root: {root} does not hold meta/{ds[key]} (dataset.{key}). Point dataset.root of "
                    f"{_CONFIG_SOURCE} at your OpenSRH download, or set dataset.manifest to a manifest CSV."
                )
        return "root", str(root)
    return "synth", f"{RESULTS}/dataset"


DATASET_KIND, DATASET_PATH = _dataset_source()


# Settings that do not fit your own manifest stop the dry run, naming the key and what to set,
# instead of a training job after it (hsat.data.manifest.run_data_errors).
if DATASET_KIND == "manifest":
    from hsat.data.manifest import study_data_errors

    try:
        _data_errors = study_data_errors(config)
    except HSATError as exc:
        config_error(exc)
    if _data_errors:
        config_error(f"{_CONFIG_SOURCE} does not fit the data:\n  " + "\n  ".join(_data_errors))


SYNTH = config["dataset"]["synth"]
try:
    from hsat.data.synthetic import synth_params

    synth_params(SYNTH["params"], source=f"{_CONFIG_SOURCE}: dataset.synth.params")
except HSATError as exc:
    config_error(exc)
MANIFEST = f"{RESULTS}/manifest.csv"
PREPARE_REPORT = f"{RESULTS}/prepare_report.csv"


def opensrh_options():
    """`hsat prepare` options of a user's OpenSRH root (the meta file names, what is skipped); one
    string, so the rule's params rerun the manifest when they change. The synthetic cohort has
    the default names and nothing to skip."""
    if DATASET_KIND != "root":
        return ""
    ds = config["dataset"]
    return (f"--meta-json {shlex.quote(ds['meta_json'])} --split-json {shlex.quote(ds['split_json'])}"
            f" --max-missing-fraction {ds['max_missing_fraction']}" + (" --strict" if ds["strict"] else ""))


# ---------------------------------------------------------------- rerun keys
def canonical(obj):
    """Compact, key-sorted JSON: a stable, readable params value (see `snakemake --list-changes params`)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


# The library code each stage runs: its entry modules and everything they import (derived by
# hsat.provenance from the import statements, never listed by hand), plus the config schema.
_ENTRY_MODULES = {
    "synth": ["hsat.cli.data"],
    "prepare": ["hsat.cli.data"],
    "pretrain": ["hsat.cli.train"],
    "text": ["hsat.cli.data"],
    "evaluate": ["hsat.cli.evaluate"],
    "transfer": ["hsat.cli.evaluate"],
    "report": ["hsat.cli.report"],
    "sanity_report": ["hsat.cli.report"],
}


CODE_VERSION = {stage: code_version(entries) for stage, entries in _ENTRY_MODULES.items()}


def run_settings(wildcards):
    """The resolved run config of one model: changing it reruns that model's chain only."""
    return canonical(RUN_CONFIGS[wildcards.model])


def eval_settings(stage, wildcards=None):
    """The `evaluation` keys a stage reads (and the model's table group, which goes into the CSV)."""
    extras = {"mil", "attention", "language", "shift"}  # their own stages: changing them reruns nothing else
    drop = {
        "embed": {"whitebox", "transfer", "sanity"} | extras,
        "evaluate": {"transfer", "sanity"} | extras,
        "sanity": {"transfer"} | extras,
        "transfer": {"sanity"} | extras,
        "mil": {"transfer", "sanity"} | extras - {"mil"},  # the bag attacks use whitebox eps, steps, alpha
        "evaluate+mil": {"transfer", "sanity"} | extras - {"mil"},
        "attention": {"whitebox", "transfer", "sanity"} | extras - {"attention"},
        "language": {"whitebox", "transfer", "sanity"} | extras - {"language"},
        "shift": {"transfer"} | extras - {"shift"},  # whitebox.classifiers and sanity.z too
    }[stage]
    model = wildcards.model if wildcards is not None and "model" in wildcards.keys() else None
    out = _model_lists({k: v for k, v in EVAL.items() if k not in drop}, model)
    if stage in ("evaluate", "evaluate+mil"):  # the sweep runs the sanity check's restarts
        out["sanity"] = {k: EVAL["sanity"][k] for k in ("enabled", "restarts")}
    if model is not None:
        out["group"] = config["models"][model].get("group")
    return canonical(out)


def _model_lists(settings, model):
    """Each model list in `settings` as what it means for `model`: whether the model is on it (an
    empty list names every model), or nothing when no model is known (the job's input files name
    the models). Adding a model to a list reruns that model's jobs, not every job."""
    out = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            out[key] = _model_lists(value, model)
        elif key != "models":
            out[key] = value
        elif model is not None:
            out["listed"] = not value or model in value
    return out


# ---------------------------------------------------------------- the study matrix and its files
def _subset(names):
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        config_error(f"{_CONFIG_SOURCE}: evaluation lists unknown model(s) {unknown}; models are {MODELS}")
    return list(names) or list(MODELS)


SANITY_MODELS = _subset(EVAL["sanity"]["models"]) if EVAL["sanity"]["enabled"] else []
TRANSFER_MODELS = _subset(EVAL["transfer"]["models"]) if EVAL["transfer"]["enabled"] else []
_subset(EVAL["whitebox"]["autoattack"]["models"])  # names checked; empty = every model
MIL_MODELS = _subset(EVAL["mil"]["models"]) if EVAL["mil"]["enabled"] else []
MIL_ATTACK = bool(MIL_MODELS) and EVAL["mil"]["attack"]
# A factory's backbone name is only a label: its module need not have timm's attention blocks.
VIT_MODELS = [m for m in MODELS if is_vit(RUN_CONFIGS[m]["model"]["backbone"]) and not RUN_CONFIGS[m]["model"].get("factory")]
_ATTENTION = _subset(EVAL["attention"]["models"]) if EVAL["attention"]["models"] else VIT_MODELS
if set(_ATTENTION) - set(VIT_MODELS):
    config_error(f"{_CONFIG_SOURCE}: evaluation.attention.models lists model(s) without a ViT backbone: "
                 f"{sorted(set(_ATTENTION) - set(VIT_MODELS))}")
ATTENTION_MODELS = _ATTENTION if EVAL["attention"]["enabled"] else []
HLSS_MODELS = [m for m in MODELS if RUN_CONFIGS[m]["method"].get("hlss")]
LANGUAGE_MODELS = ([m for m in _subset(EVAL["language"]["models"]) if m in HLSS_MODELS]
                   if EVAL["language"]["enabled"] else [])
if set(EVAL["language"]["models"]) - set(HLSS_MODELS):
    config_error(f"{_CONFIG_SOURCE}: evaluation.language.models lists model(s) without an HLSS head: "
                 f"{sorted(set(EVAL['language']['models']) - set(HLSS_MODELS))}")
TRANSFER_PAIRS = [(s, t) for s in TRANSFER_MODELS for t in TRANSFER_MODELS if s != t]
TRANSFER_TARGETS = [t for t in TRANSFER_MODELS if len(TRANSFER_MODELS) > 1]


# Rule evaluate chains embed, the sweep and (when it covers every model) MIL in one process per
# model: the verbs stay separate, but the 5-7 s of imports are paid once per model.
EMBED_OUT = {
    "features": f"{RESULTS}/embeddings/{{model}}/features.safetensors",
    "index": f"{RESULTS}/embeddings/{{model}}/index.csv",
    "probe": f"{RESULTS}/embeddings/{{model}}/probe.safetensors",
    "meta": f"{RESULTS}/embeddings/{{model}}/meta.json",
}
MIL_OUT = {
    "mil_csv": f"{RESULTS}/mil/{{model}}.csv",
    "mil_head": f"{RESULTS}/mil/{{model}}.safetensors",
    **({"mil_whitebox": f"{RESULTS}/whitebox_abmil/{{model}}.csv"} if MIL_ATTACK else {}),
}
MIL_IN_EVALUATE = bool(MIL_MODELS) and set(MIL_MODELS) == set(MODELS)


def mil_command(wildcards, output, emb_dir, run, manifest):
    """The `hsat mil` arguments of one model (its outputs named as in the rule)."""
    attack = f" --run {run} --manifest {manifest} --whitebox {output.mil_whitebox}" if MIL_ATTACK else ""
    return (f"mil --embeddings {emb_dir} --study {STUDY} --model {wildcards.model}"
            f" --out {output.mil_csv} --head {output.mil_head}{attack}")

def transfer_surrogates(target):
    """The surrogates whose stored examples a target scores: every other transfer model."""
    return [s for s in TRANSFER_MODELS if s != target]


# ---------------------------------------------------------------- HLSS's attribute embeddings
# One cached file per (descriptions, encoder), named by both (hsat.config.text_embeddings_file);
# rule text_embeddings writes it, HLSS pretraining reads it.
TEXT_SOURCES = {}
for _name, _run in RUN_CONFIGS.items():
    _hlss = _run["method"].get("hlss")
    if _hlss:
        TEXT_SOURCES.setdefault(_hlss["text_embeddings"], (_hlss["descriptions"], _hlss["encoder"]))


def pretrain_inputs(wildcards):
    """The manifest; for an HLSS model its attribute embeddings; for a model initialised from a
    local weights file (model.pretrained_path), that file, so replacing it retrains the model;
    for a model fine-tuned from another (init_from), that model's weights, so it runs after it
    and retrains when they change."""
    out = {"manifest": MANIFEST}
    cfg = RUN_CONFIGS[wildcards.model]
    hlss = cfg["method"].get("hlss")
    if hlss:
        out["text"] = hlss["text_embeddings"]
    if cfg["model"].get("pretrained_path"):
        out["weights"] = cfg["model"]["pretrained_path"]
    if cfg["init_from"]:
        out["init"] = f"{run_dir(cfg['init_from']['model'])}/model.safetensors"
    return out


def import_inputs(wildcards):
    """The local weights file of an imported encoder, when it has one (a factory may build it
    alone): replacing the file rewrites the run and reruns its evaluation."""
    path = RUN_CONFIGS[wildcards.model]["model"].get("pretrained_path")
    return {"weights": path} if path else {}


def run_dir(model):
    return f"{RESULTS}/runs/{model}"


def sweep_outputs():
    out = [f"{RESULTS}/whitebox/{m}.csv" for m in MODELS]
    out += [f"{RESULTS}/sanity/{m}.csv" for m in SANITY_MODELS]
    out += [f"{RESULTS}/transfer/{t}.csv" for t in TRANSFER_TARGETS]
    out += [f"{RESULTS}/mil/{m}.csv" for m in MIL_MODELS]
    out += [f"{RESULTS}/language/{m}.csv" for m in LANGUAGE_MODELS]
    out += [f"{RESULTS}/attention/{m}.safetensors" for m in ATTENTION_MODELS]
    return out


def intermediate_outputs():
    """Every file the report is built from, model by model. `all` names them all: Snakemake does
    not look behind an output that exists, so a deleted per-model file that no target names
    stays deleted while the tables built from it look up to date."""
    out = [MANIFEST] + sweep_outputs()
    out += [path.format(model=m) for m in MODELS for path in EMBED_OUT.values()]
    out += [f"{RESULTS}/mil/{m}.safetensors" for m in MIL_MODELS]
    out += [f"{RESULTS}/whitebox_abmil/{m}.csv" for m in MIL_MODELS] if MIL_ATTACK else []
    out += [f"{RESULTS}/adversarial/{s}.safetensors" for s in TRANSFER_MODELS] if TRANSFER_TARGETS else []
    out += [f"{RESULTS}/attention/{m}.safetensors" for m in ATTENTION_MODELS]
    out += sorted(TEXT_SOURCES)
    return out


def model_outputs(model):
    out = [f"{run_dir(model)}/model.safetensors", f"{RESULTS}/whitebox/{model}.csv"]
    if model in SANITY_MODELS:
        out.append(f"{RESULTS}/sanity/{model}.csv")
    return out


FIGURES = ["robust_accuracy", "transfer_heatmap", "training_curves", "embedding_map", "attack_steps", "natural_shift"]
TABLES = [f"table{i}.{ext}" for i in range(1, 6) for ext in ("csv", "md", "tex")] + ["table1_full.csv", "table2_summary.csv"]


def report_outputs():
    return (
        [f"{RESULTS}/{name}.csv" for name in ("whitebox", "transfer", "sanity")]
        + [f"{RESULTS}/tables/{t}" for t in TABLES + SHIFT_TABLES]
        + [f"{RESULTS}/metrics.json", f"{RESULTS}/claims.md"]
        + [f"{RESULTS}/plots/{name}.csv" for name in ("robust_accuracy", "training_loss")] + [f"{RESULTS}/summary.json"]
        + [f"{RESULTS}/figures/{f}.{ext}" for f in FIGURES for ext in ("png", "pdf")]
        + ([f"{RESULTS}/mil.csv"] if MIL_MODELS else [])
        + ([f"{RESULTS}/language.csv"] + [f"{RESULTS}/figures/language_similarity.{e}" for e in ("png", "pdf")]
           if LANGUAGE_MODELS else [])
        + ([f"{RESULTS}/figures/attention.{ext}" for ext in ("png", "pdf")] if ATTENTION_MODELS else [])
        + [f"{RESULTS}/cards/{m}.{ext}" for m in CARD_MODELS for ext in ("json", "png", "pdf")]
    )


def model_gpus(model, per_job=1):
    """GPUs a job of `model` asks for (resource `gpu`: `--gpus` under the SLURM executor, a cap
    under `--resources gpu=N` locally): `per_job` when the model runs on CUDA, else none."""
    return job_gpus(RUN_CONFIGS[model]["device"], per_job)


def pretrain_launcher(wildcards):
    """`hsat`, torchrun with one process per GPU when launcher.nproc_per_node > 1, or `hsat launch`
    (srun and one torchrun per node) when launcher.nodes > 1. On CUDA a one-node torchrun first
    takes that many GPUs of its own (`python -m hsat.gpus`, docs/workflow.md "GPUs"); a
    single-process `hsat` claims its GPU itself, and across nodes SLURM's allocation decides."""
    prefix = launcher_prefix(NPROC, NODES)
    gpus = model_gpus(wildcards.model, NPROC) if NPROC > 1 and NODES == 1 else 0
    return f"python -m hsat.gpus {gpus} {prefix}" if gpus else prefix


def pretrain_resource(name):
    """One resource of a pretraining job (hsat.cluster.pretrain_resources): GPUs on one node, or
    nodes, one task per node and GPUs per node for SLURM when launcher.nodes > 1; None: unset."""
    return lambda wildcards: pretrain_resources(RUN_CONFIGS[wildcards.model]["device"], NPROC, NODES)[name]


def report_settings(wildcards):
    """Everything the report reads of the study config (all but the launcher), each evaluation
    model list as the models it stands for (an empty list names every model), so that naming the
    same models again reruns nothing."""
    settings = json.loads(json.dumps({k: v for k, v in config.items() if k != "launcher"}))
    ev = settings["evaluation"]
    for section, models in (("transfer", TRANSFER_MODELS), ("sanity", SANITY_MODELS), ("mil", MIL_MODELS),
                            ("attention", ATTENTION_MODELS), ("language", LANGUAGE_MODELS)):
        ev[section]["models"] = list(models)  # in order: the report draws them in it
    ev["whitebox"]["autoattack"]["models"] = _subset(EVAL["whitebox"]["autoattack"]["models"])
    return canonical(settings)
