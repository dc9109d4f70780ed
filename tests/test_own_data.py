"""docs/own_data.md as a test: a folder tree of real RGB tissue patches becomes the study's tables
in the documented commands -- `hsat prepare --folders`, the overlay exactly as the page prints it
(only the training steps lowered), one `snakemake all` -- and the training curves are there for
`dvc plots show`. Two cohorts, both with 5 training patients (fewer than the default batch of 8):
three classes of unequal size, one with a single patient, and a two-class task.

The patches are tiles of scikit-image's immunohistochemistry sample (a 512 x 512 RGB section of
real tissue, shipped with the package). A class is a band of rows of the image, so the classes
differ in what tissue they hold; one patient is one row of tiles. The labels mean nothing
clinically; the pixels are real stained tissue in RGB, which the synthetic SRH cohort is not.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from hsat.config import MODEL_LISTS, leaf_paths, read_yaml, resolve_study
from test_documented_commands import READER_FILES
from test_latex_tables import compile_latex, latex_missing, latex_problems
from test_workflow import REPO, _env, planned_jobs, snakemake, workdir  # noqa: F401  (workdir: the copied workflow)

TILE = 48
STEPS = 2  # the one value the test changes: training steps (the overlay leaves the default's 300)
TRAIN_PATIENTS = 5
# Which image rows are a class's patients, and which columns their tiles: a patient of an even row
# has two slides (two halves of its tiles), of an odd row one. "lower" is one patient whose two
# slides are two rows (train only: no patient left for val).
COHORTS = {
    "three_classes": {"classes": {"upper": range(0, 4), "middle": range(4, 8)}, "columns": range(0, 4),
                      "single": ("lower", (8, 9))},
    "two_classes": {"classes": {"tumour": range(0, 5), "normal": range(5, 9)}, "columns": range(4, 8), "single": None},
}


def tile_tree(root: Path, cohort: str) -> dict[str, int]:
    """Write `root/<class>/<patient>/<slide>/<i>.png` from the immunohistochemistry image and return
    the patches per class."""
    from skimage.data import immunohistochemistry

    spec = COHORTS[cohort]
    image = immunohistochemistry()
    tiles = [[image[r * TILE:(r + 1) * TILE, c * TILE:(c + 1) * TILE] for c in spec["columns"]]
             for r in range(image.shape[0] // TILE)]
    n = len(spec["columns"])
    counts: dict[str, int] = {}
    for label, rows in spec["classes"].items():
        for r in rows:
            halves = [(1, range(0, n // 2)), (2, range(n // 2, n))] if r % 2 == 0 else [(1, range(n))]
            for slide, cols in halves:
                _write(root / label / f"p{r}" / f"s{slide}", [tiles[r][c] for c in cols])
        counts[label] = len(rows) * n
    if spec["single"]:
        label, rows = spec["single"]
        for slide, r in enumerate(rows, 1):
            _write(root / label / f"p{rows[0]}" / f"s{slide}", tiles[r])
        counts[label] = len(rows) * n
    return counts


def _write(folder: Path, patches: list[np.ndarray]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, patch in enumerate(patches):
        Image.fromarray(np.ascontiguousarray(patch)).save(folder / f"{i}.png")


def report_files() -> list[str]:
    """The tables and figures of the report, as rules/common.smk names them (TABLES, FIGURES)."""
    text = (REPO / "rules" / "common.smk").read_text(encoding="utf-8")
    tables, figures = (eval(re.search(rf"^{var} = (.+)$", text, re.M).group(1), {})  # list expressions of literals
                       for var in ("TABLES", "FIGURES"))
    return [f"tables/{t}" for t in tables] + [f"figures/{f}.{ext}" for f in figures for ext in ("png", "pdf")]


def _get(d, path):
    for key in path:
        d = d[key]
    return d


def documented_overlay() -> dict:
    """docs/own_data.md's overlay.yaml, as the reader copies it."""
    return yaml.safe_load(READER_FILES["overlay.yaml"])


@pytest.mark.slow
@pytest.mark.timeout(2400)
@pytest.mark.parametrize("cohort", list(COHORTS))
def test_folder_tree_to_tables_with_the_documented_overlay(workdir, cohort):
    counts = tile_tree(workdir / "tree", cohort)
    hsat = str(Path(sys.executable).parent / "hsat")

    # hsat prepare --folders: the split by patient (a one-patient class stays in train, with a warning).
    proc = subprocess.run([hsat, "prepare", "--folders", "tree", "--out", "data/manifest.csv", "--val-fraction", "0.5",
                           "--seed", "0"], cwd=workdir, env=_env(workdir), capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    manifest = pd.read_csv(workdir / "data" / "manifest.csv")
    assert {k: int(v) for k, v in manifest["label"].value_counts().items()} == counts
    assert manifest.query("split == 'train'")["patient"].nunique() == TRAIN_PATIENTS
    assert set(manifest["split"]) == {"train", "val"}
    if COHORTS[cohort]["single"]:
        label = COHORTS[cohort]["single"][0]
        assert f"class '{label}' has 1 patient: it is in train only" in out, out
        assert set(manifest.loc[manifest["label"] == label, "split"]) == {"train"}

    # The overlay as the page prints it, with fewer training steps (a key it does not name).
    overlay = documented_overlay()
    assert "train" not in overlay["pretrain"]
    overlay["pretrain"]["train"] = {"steps": STEPS}
    (workdir / "overlay.yaml").write_text(yaml.safe_dump(overlay, sort_keys=False), encoding="utf-8")
    res = workdir / overlay["results_dir"]
    assert overlay["dataset"]["manifest"] == "data/manifest.csv"

    # What will run, checked against the data before anything runs (the page's step 3).
    proc = subprocess.run([hsat, "config", "show", "--study", "overlay.yaml"], cwd=workdir, env=_env(workdir),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and "preset: he  # overlay" in proc.stdout, proc.stdout[-2000:] + proc.stderr

    proc = snakemake("all", "--cores", "2", "--configfile", "overlay.yaml", cwd=workdir, timeout=2000)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    # Every table and figure of the report, and nothing left to do.
    missing = [f for f in report_files() if not (res / f).is_file() or (res / f).stat().st_size == 0]
    assert len(report_files()) >= 20 and not missing, missing
    for name in ("whitebox.csv", "transfer.csv", "sanity.csv", "metrics.json"):
        assert (res / name).stat().st_size > 0, name
    proc = snakemake("-n", "all", "--configfile", "overlay.yaml", cwd=workdir)
    assert proc.returncode == 0 and planned_jobs(proc) == {}, proc.stdout[-3000:]
    assert "groups" in json.loads((res / "metrics.json").read_text())
    table1 = (res / "tables" / "table1.md").read_text()
    assert "HiDisc" in table1 and "HSAT" in table1
    whitebox = pd.read_csv(res / "whitebox.csv")
    assert set(whitebox["model"]) == set(overlay["models"])
    assert (whitebox["attack"] == "autoattack").any()  # on the default study's attacks, at this class count

    # The tables compile (structurally always; with pdfLaTeX where it is installed).
    tex = sorted((res / "tables").glob("*.tex"))
    for path in tex:
        assert latex_problems(path.read_text(encoding="utf-8")) == [], path.name
    if latex_missing() is None:
        (workdir / "latex").mkdir()
        proc = compile_latex(tex, workdir / "latex")
        assert proc.returncode == 0, [line for line in proc.stdout.splitlines() if line.startswith("!")]

    # The resolved study: the overlay's values where it names a key, the default study's elsewhere.
    resolved = yaml.safe_load((res / "config.resolved.yaml").read_text())
    default, _ = resolve_study(REPO / "config" / "config.yaml")
    _, named = resolve_study(REPO / "config" / "config.yaml", [overlay])
    assert resolved["pretrain"]["augment"]["preset"] == "he" and resolved["pretrain"]["train"]["steps"] == STEPS
    assert resolved["dataset"]["manifest"] == "data/manifest.csv" and list(resolved["models"]) == list(overlay["models"])
    assert resolved["pretrain"]["data"]["patients_per_batch"] == default["pretrain"]["data"]["patients_per_batch"] == 8
    kept = [p for p in leaf_paths(default) if p[:1] != ("models",) and p not in MODEL_LISTS
            and not any(p[:len(n)] == n or n[:len(p)] == p for n in named)]
    assert len(kept) > 50
    differ = [".".join(p) for p in kept if _get(resolved, p) != _get(default, p)]
    assert not differ, f"not named by the overlay, yet not the default study's: {differ}"

    # Each run's config.yaml says what trained: the H&E preset, the resize, and a batch of every
    # training patient (the default 8 fitted to the 5 there are).
    for model in overlay["models"]:
        run = read_yaml(res / "runs" / model / "config.yaml")
        assert run["augment"]["preset"] == "he" and run["data"]["resize"] == overlay["pretrain"]["data"]["resize"], model
        assert run["data"]["image_size"] == overlay["pretrain"]["data"]["image_size"], model
        assert run["model"]["backbone"] == default["pretrain"]["model"]["backbone"], model
        assert run["data"]["patients_per_batch"] == TRAIN_PATIENTS and run["train"]["steps"] == STEPS, model

    # dvc plots show draws every model's training loss from the study's plot data (params.yaml says
    # which study; dvc.yaml names the templates in .dvc/plots). The workspace is what is shown, so no git is needed.
    params = workdir / "params.yaml"
    p = yaml.safe_load(params.read_text())
    p["study"].update(configfile="overlay.yaml", results_dir=overlay["results_dir"])
    params.write_text(yaml.safe_dump(p))
    dvc = str(Path(sys.executable).parent / "dvc")
    init = subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=workdir, env=_env(workdir),
                          capture_output=True, text=True, timeout=900)
    assert init.returncode == 0, init.stderr
    shutil.copytree(REPO / ".dvc" / "plots", workdir / ".dvc" / "plots")
    proc = subprocess.run([dvc, "plots", "show", "--json"], cwd=workdir, env=_env(workdir),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (plot,) = json.loads(proc.stdout)["data"]["training_loss"]
    rows = plot["content"]["data"]["values"]
    assert {r["model"] for r in rows} == set(overlay["models"]), rows[:3]
    for model in overlay["models"]:
        steps = [int(float(r["step"])) for r in rows if r["model"] == model]
        assert max(steps) == STEPS, (model, steps)


def test_the_documented_overlay_has_at_most_ten_lines_and_resolves():
    """docs/own_data.md's overlay.yaml: the test's overlay with real-data values, a valid study."""
    body = READER_FILES["overlay.yaml"]
    assert len(body.splitlines()) + 1 <= 10  # with its `# overlay.yaml` line
    cfg, _ = resolve_study(REPO / "config" / "config.yaml", [yaml.safe_load(body)])
    assert cfg["dataset"]["manifest"] and cfg["pretrain"]["augment"]["preset"] == "he"
    assert cfg["pretrain"]["data"]["resize"] and cfg["results_dir"] != "results"
    assert set(cfg["evaluation"]["transfer"]["models"]) == set(cfg["models"])
