"""The paper's study rehearsed on the CPU (config/opensrh.yaml + config/opensrh_rehearsal.yaml) on
a fake OpenSRH as downloaded (an empty slide, a missing patch, 300 px 2-channel TIFFs): the
overlay changes only data size, steps, patches and batch sizes; every paper model takes a
training step and an attack step at its own resolution; a representative subset of the models
runs the whole DAG under `dvc repro`. The whole DAG of all 22 models would take hours of CPU
(a ResNet-50 at 300 px is ~1.5 s a forward-backward image here), hence the split.

Marked `rehearsal` (deselect with `-m "not rehearsal"`); part of the default suite."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from hsat.config import MODEL_LISTS, deep_merge, read_yaml, resolve_study, run_config_for_model
from hsat.evaluate.mil import MIL_CLASSIFIER
from test_workflow import REPO, copy_workflow, dvc, planned_jobs, snakemake

pytestmark = pytest.mark.rehearsal

PAPER = REPO / "config" / "opensrh.yaml"
OVERLAY = REPO / "config" / "opensrh_rehearsal.yaml"
RESULTS = "results/opensrh_rehearsal"

# The models that run the whole DAG: the paper's baseline and HSAT on ResNet-50 at 300 px (the
# tables' pair, the transfer pair, AutoAttack's and the sanity checks' models) and DINO's ViT-S/16
# at 224 px with 65,536 prototypes and multi-crop (the attention maps).
DAG_MODELS = ("hidisc_resnet50", "hsat_resnet50", "dino_vits16")

# What the rehearsal may change (key paths of the resolved study): the data, steps, patches,
# batch sizes and the device; and the ImageNet initialisation, which needs local weights.
CHANGEABLE = (
    ("results_dir",), ("dataset", "root"),
    ("pretrain", "device"), ("pretrain", "precision"), ("pretrain", "threads"),
    ("pretrain", "data", "patients_per_batch"), ("pretrain", "data", "num_slide_samples"),
    ("pretrain", "data", "num_patch_samples"), ("pretrain", "data", "num_workers"),
    ("pretrain", "attack", "steps"), ("pretrain", "attack", "warmup_steps"), ("pretrain", "augment", "stages"),
    ("pretrain", "optim", "warmup_steps"), ("pretrain", "train"),
    ("evaluation", "batch_size"), ("evaluation", "max_val_patches"), ("evaluation", "linear", "epochs"),
    ("evaluation", "whitebox", "steps"), ("evaluation", "whitebox", "autoattack", "steps"),
    ("evaluation", "transfer", "steps"), ("evaluation", "sanity", "steps"), ("evaluation", "sanity", "eps"),
    ("evaluation", "sanity", "restarts"), ("evaluation", "mil", "epochs"),
    ("evaluation", "attention", "patches_per_class"), ("evaluation", "language", "patches_per_class"),
    ("evaluation", "language", "steps"),
)
MODEL_CHANGEABLE = (("model", "pretrained"), ("method", "dino", "freeze_last_layer_steps"),
                    ("optim", "warmup_steps"), ("train", "steps"),
                    ("method", "hlss", "text_embeddings"))  # a file under results_dir


def rehearsal_config(models: tuple[str, ...] | None = None) -> dict:
    """opensrh.yaml with the overlay merged in as Snakemake merges two --configfile files (key by
    key, `models` included), optionally cut to `models`."""
    cfg = deep_merge(read_yaml(PAPER), read_yaml(OVERLAY))
    if models is not None:
        cfg["models"] = {m: cfg["models"][m] for m in models}
        for path in MODEL_LISTS:  # the paper's lists (transfer, sanity, tables...) keep the models left
            *parents, key = path
            section = cfg
            for part in parents:
                section = section.get(part) or {}
            if isinstance(section.get(key), list):
                section[key] = [m for m in section[key] if m in models]
    return cfg


def write_fake(root: Path):
    """The fake release the overlay's dataset.root names (2 patients per class, 2 slides of one
    300 px patch, one slide empty and one patch missing)."""
    from hsat.data.fake_opensrh import write_fake_opensrh

    return write_fake_opensrh(root, patients_per_class=2, slides=2, patches=1, size=300, empty_slides=1, missing_patches=1)


def _leaves(d, prefix=()):
    out = {}
    for key, value in d.items():
        path = (*prefix, str(key))
        out.update(_leaves(value, path) if isinstance(value, dict) and value else {path: value})
    return out


def _allowed(path: tuple[str, ...], allowed) -> bool:
    return any(path[: len(a)] == a for a in allowed)


def test_rehearsal_keeps_every_value_of_the_paper_but_size_steps_and_patches():
    """Resolved, the rehearsal differs from the paper's study only where CHANGEABLE says, in the
    study and in every model's run config: a value the paper adds later is rehearsed too."""
    base = REPO / "config" / "config.yaml"
    paper, _ = resolve_study(base, [PAPER])
    rehearsal, _ = resolve_study(base, [(rehearsal_config(), "rehearsal")])
    assert list(rehearsal["models"]) == list(paper["models"])
    a, b = _leaves({k: v for k, v in paper.items() if k != "models"}), _leaves({k: v for k, v in rehearsal.items() if k != "models"})
    changed = sorted(p for p in set(a) | set(b) if a.get(p) != b.get(p))
    assert changed and all(_allowed(p, CHANGEABLE) for p in changed), [p for p in changed if not _allowed(p, CHANGEABLE)]
    run_changeable = tuple(c[1:] for c in CHANGEABLE if c[0] == "pretrain") + MODEL_CHANGEABLE
    for name in paper["models"]:
        ra = _leaves(run_config_for_model(paper, name))
        rb = _leaves(run_config_for_model(rehearsal, name))
        diff = [p for p in set(ra) | set(rb) if ra.get(p) != rb.get(p) and not _allowed(p, run_changeable)]
        assert not diff, (name, diff)
        assert rb[("data", "image_size")] == ra[("data", "image_size")]  # 300 px, or 224 px resized


def test_rehearsal_of_every_model_plans(tmp_path):
    """Both files as --configfile: the whole matrix (22 models) plans, every stage of it."""
    workdir = copy_workflow(tmp_path / "wf")
    write_fake(workdir / read_yaml(OVERLAY)["dataset"]["root"])
    proc = snakemake("-n", "all", "--configfile", "config/opensrh.yaml", "config/opensrh_rehearsal.yaml", cwd=workdir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = planned_jobs(proc)
    n = len(read_yaml(PAPER)["models"])
    assert jobs["pretrain"] == n and jobs["evaluate"] == n and jobs["transfer_craft"] == 4 and jobs["attention"] == 2
    assert jobs["language"] == 3 and jobs["sanity"] == 2 and jobs["tables"] == 1


@pytest.fixture(scope="module")
def fake_manifest(tmp_path_factory) -> Path:
    from hsat.data.manifest import write_manifest
    from hsat.data.opensrh import build_manifest

    root = tmp_path_factory.mktemp("rehearsal_data") / "opensrh"
    write_fake(root)
    out = root.parent / "manifest.csv"
    write_manifest(build_manifest(root), out)
    return out


def _distinct_models() -> list[str]:
    """The paper's models minus those whose rehearsed run config repeats another's (the ImageNet
    ones, initialised at random here) and minus the DAG's models (rehearsed end to end)."""
    study, _ = resolve_study(REPO / "config" / "config.yaml", [(rehearsal_config(), "rehearsal")])
    seen, out = set(), []
    for name in study["models"]:
        key = json.dumps(run_config_for_model(study, name), sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            if name not in DAG_MODELS:
                out.append(name)
    return out


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("name", _distinct_models())
def test_every_paper_model_takes_a_training_and_an_attack_step(name, fake_manifest, tmp_path):
    """One training step of the model's method at its own resolution, then a PGD step on the
    feature objective through the trained encoder at the evaluation's preprocessing: the shapes,
    heads and settings of the paper path, and a finite loss and gradient."""
    from hsat import attacks
    from hsat.evaluate.runs import datasets, eval_image_size
    from hsat.models import load_trained_model
    from hsat.text import load_text_embeddings  # noqa: F401  (HLSS: the packaged encoder, offline)
    from hsat.train import pretrain

    study, _ = resolve_study(REPO / "config" / "config.yaml", [(rehearsal_config(), "rehearsal")])
    cfg = run_config_for_model(study, name, manifest=str(fake_manifest))
    cfg["train"]["steps"] = 1
    hlss = cfg["method"].get("hlss")
    if hlss:
        hlss["descriptions"] = str(REPO / hlss["descriptions"])
        hlss["text_embeddings"] = None  # computed into the run directory
    run = pretrain(cfg, tmp_path / name)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert log and all(torch.isfinite(torch.tensor(r["loss_total"])) for r in log)
    saved = read_yaml(run / "config.yaml")
    assert saved["data"]["image_size"] == cfg["data"]["image_size"] and saved["model"]["backbone"] == cfg["model"]["backbone"]

    model = load_trained_model(run)
    (val,), _ = datasets(fake_manifest, eval_image_size(study, run), ["val"], run)
    x = torch.stack([val[i]["image"] for i in range(2)])
    assert x.shape[-1] == cfg["data"]["image_size"]
    with torch.no_grad():
        clean = model.encode(x)
    objective = lambda adv: 1 - torch.nn.functional.cosine_similarity(model.encode(adv), clean).sum()  # noqa: E731
    adv = attacks.pgd(x, objective, eps=8 / 255, alpha=2 / 255, steps=1)
    assert adv.shape == x.shape and (adv - x).abs().max() <= 8 / 255 + 1e-6 and not torch.equal(adv, x)


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.timeout(3600)  # a hang guard above dvc()'s own 3000 s
def test_rehearsal_whole_dag_under_dvc_repro(tmp_path):
    """DAG_MODELS through every stage under `dvc repro` from the fake download: the data stage
    skips the empty slide and the missing patch, every model trains at its paper resolution, and
    the sweep (AutoAttack's standard version included), sanity checks, transfer, MIL with its
    bag attack, attention maps, tables and figures are written."""
    workdir = copy_workflow(tmp_path / "wf")
    fake = write_fake(workdir / read_yaml(OVERLAY)["dataset"]["root"])
    (workdir / "config" / "rehearsal_dag.yaml").write_text(yaml.safe_dump(rehearsal_config(DAG_MODELS)))
    params = workdir / "params.yaml"
    p = yaml.safe_load(params.read_text())
    p["study"].update(configfile="config/rehearsal_dag.yaml", results_dir=RESULTS, cores=2)
    params.write_text(yaml.safe_dump(p))
    assert dvc(workdir, "init", "--no-scm", "-q").returncode == 0
    shutil.copytree(REPO / ".dvc" / "plots", workdir / ".dvc" / "plots")  # the plot templates dvc.yaml names
    proc = dvc(workdir, "repro")
    res = workdir / RESULTS
    logs = "".join(f"\n== {f}\n{f.read_text()[-2500:]}" for f in sorted((res / "logs").rglob("*.log"))
                   if "Error" in f.read_text() or "Traceback" in f.read_text()) if (res / "logs").is_dir() else ""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + logs

    assert len(pd.read_csv(res / "manifest.csv")) == fake.usable_patches
    report = pd.read_csv(res / "prepare_report.csv")
    assert (report["status"] == "skipped: none listed").sum() == 1 and report["missing"].sum() == 1
    for model in DAG_MODELS:
        cfg = read_yaml(res / "runs" / model / "config.yaml")
        assert cfg["data"]["image_size"] == (224 if model.startswith("dino") else 300)
    assert read_yaml(res / "runs" / "dino_vits16" / "config.yaml")["method"]["dino"]["out_dim"] == 65536
    wb = pd.read_csv(res / "whitebox.csv")
    assert set(wb["model"]) == set(DAG_MODELS)
    assert {"pgd", "autoattack", "worst_case"} <= set(wb["attack"])
    assert set(wb.loc[wb["attack"] == "autoattack", "model"]) == {"hidisc_resnet50", "hsat_resnet50"}
    assert (wb["classifier"] == MIL_CLASSIFIER).any()
    assert set(pd.read_csv(res / "transfer.csv")["surrogate"]) == {"hidisc_resnet50", "hsat_resnet50"}
    assert (res / "attention" / "dino_vits16.safetensors").is_file()
    for name in ("table1.md", "table2.md", "table3.md", "table4.md", "table5.md"):
        assert (res / "tables" / name).stat().st_size > 0
    assert "Wilson" in (res / "tables" / "table1.md").read_text()
