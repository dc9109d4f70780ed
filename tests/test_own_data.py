"""docs/own_data.md as a test: a folder tree of real RGB tissue patches becomes the study's tables
in the documented commands -- `hsat prepare --folders`, an overlay of at most ten lines, one
`snakemake all` -- and the training curves are there for `dvc plots show`.

The patches are tiles of scikit-image's immunohistochemistry sample (a 512 x 512 RGB section of
real tissue, shipped with the package). A class is a band of rows of the image, so the classes
differ in what tissue they hold; one patient is one row of tiles. The labels mean nothing
clinically; the pixels are real stained tissue in RGB, which the synthetic SRH cohort is not.
"""

from __future__ import annotations

import json
import re
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
from test_workflow import REPO, _env, planned_jobs, snakemake, workdir  # noqa: F401  (workdir: the copied workflow)

TILE = 48
RESULTS = "results/own"
MODELS = ["hidisc", "hsat"]
# docs/own_data.md's overlay with tiny settings (a 2-layer test backbone, 2 steps, few attacks):
# the whole DAG in about a minute on 2 cores. Every key it does not name is the default study's.
OVERLAY = f"""\
results_dir: {RESULTS}
dataset: {{manifest: manifest.csv}}
models: {{hidisc: {{method: {{name: hidisc}}, group: scratch}}, hsat: {{method: {{name: hsat}}, group: scratch}}}}
pretrain:
  augment: {{preset: he}}
  data: {{resize: {{size: 32}}, image_size: 16, patients_per_batch: 4, num_workers: 0}}
  model: {{backbone: test_resnet, head_hidden: [16], embed_dim: 8}}
  train: {{steps: 2, checkpoint_every: 2, log_every: 1}}
  attack: {{steps: 1, warmup_steps: 1}}
evaluation: {{knn: {{k: 5}}, linear: {{epochs: 5}}, whitebox: {{attacks: [pgd, bim], eps: [8], steps: 2, objectives: [feature, knn_soft], classifiers: [knn]}}, transfer: {{steps: 2}}, sanity: {{steps: [1, 2], eps: [8, 64], restarts: 2, models: [hsat]}}}}
"""


def tile_tree(root: Path) -> dict[str, int]:
    """Write `root/<class>/<patient>/<slide>/<i>.png` from the immunohistochemistry image and return
    the patches per class: 3 classes of unequal size, 4 + 4 + 1 patients, 1 or 2 slides each."""
    from skimage.data import immunohistochemistry

    image = immunohistochemistry()
    n = image.shape[0] // TILE  # 10 x 10 tiles
    tiles = [[image[r * TILE:(r + 1) * TILE, c * TILE:(c + 1) * TILE] for c in range(n)] for r in range(n)]
    # rows 0-3 | 4-7: four patients each (a row), two slides for even rows, one for odd;
    # rows 8-9: one patient whose two slides are the two rows (train only: no patient left for val).
    layout = {"upper": range(0, 4), "middle": range(4, 8)}
    counts: dict[str, int] = {}
    for label, rows in layout.items():
        for r in rows:
            halves = [(1, range(0, n // 2)), (2, range(n // 2, n))] if r % 2 == 0 else [(1, range(n))]
            for slide, cols in halves:
                _write(root / label / f"p{r}" / f"s{slide}", [tiles[r][c] for c in cols])
        counts[label] = len(rows) * n
    for slide, r in enumerate((8, 9), 1):
        _write(root / "lower" / "p8" / f"s{slide}", tiles[r])
    counts["lower"] = 2 * n
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


@pytest.mark.slow
@pytest.mark.timeout(1000)
def test_folder_tree_to_tables_in_four_commands(workdir):
    counts = tile_tree(workdir / "tree")
    hsat = str(Path(sys.executable).parent / "hsat")

    # hsat prepare --folders: the split by patient, and a warning naming the one-patient class.
    proc = subprocess.run([hsat, "prepare", "--folders", "tree", "--out", "manifest.csv", "--val-fraction", "0.5",
                           "--seed", "0"], cwd=workdir, env=_env(workdir), capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "class 'lower' has 1 patient: it is in train only" in out, out
    manifest = pd.read_csv(workdir / "manifest.csv")
    assert {k: int(v) for k, v in manifest["label"].value_counts().items()} == counts
    assert set(manifest.loc[manifest["label"] == "lower", "split"]) == {"train"}
    assert set(manifest["split"]) == {"train", "val"}

    # The overlay: at most ten lines.
    overlay_path = workdir / "overlay.yaml"
    overlay_path.write_text(OVERLAY, encoding="utf-8")
    assert len(OVERLAY.splitlines()) <= 10

    proc = snakemake("all", "--cores", "2", "--configfile", "overlay.yaml", cwd=workdir, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    res = workdir / RESULTS

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

    # The resolved study: the overlay's values where it names a key, the default study's elsewhere.
    resolved = yaml.safe_load((res / "config.resolved.yaml").read_text())
    default, _ = resolve_study(REPO / "config" / "config.yaml")
    _, named = resolve_study(REPO / "config" / "config.yaml", [yaml.safe_load(OVERLAY)])
    assert resolved["pretrain"]["augment"]["preset"] == "he"
    assert resolved["pretrain"]["data"]["resize"] == {"size": 32}
    assert resolved["dataset"]["manifest"] == "manifest.csv" and list(resolved["models"]) == MODELS
    assert resolved["evaluation"]["whitebox"]["alpha"] == default["evaluation"]["whitebox"]["alpha"] == 2
    assert resolved["pretrain"]["optim"]["weight_decay"] == default["pretrain"]["optim"]["weight_decay"]
    kept = [p for p in leaf_paths(default) if p[:1] != ("models",) and p not in MODEL_LISTS
            and not any(p[:len(n)] == n or n[:len(p)] == p for n in named)]
    assert len(kept) > 50
    differ = [".".join(p) for p in kept if _get(resolved, p) != _get(default, p)]
    assert not differ, f"not named by the overlay, yet not the default study's: {differ}"

    # The training saw the H&E preset and the resize: each run's resolved config says so.
    for model in MODELS:
        run = read_yaml(res / "runs" / model / "config.yaml")
        assert run["augment"]["preset"] == "he" and run["data"]["resize"] == {"size": 32}, model
        assert run["data"]["image_size"] == 16 and run["model"]["backbone"] == "test_resnet", model

    # dvc plots show renders the training curves: dvc.yaml lists ${study.results_dir}/training as a
    # plots folder; params.yaml says which study. The workspace is what is shown, so no git is needed.
    params = workdir / "params.yaml"
    p = yaml.safe_load(params.read_text())
    p["study"].update(configfile="overlay.yaml", results_dir=RESULTS)
    params.write_text(yaml.safe_dump(p))
    dvc = str(Path(sys.executable).parent / "dvc")
    init = subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=workdir, env=_env(workdir),
                          capture_output=True, text=True, timeout=60)
    assert init.returncode == 0, init.stderr
    proc = subprocess.run([dvc, "plots", "show", "--json"], cwd=workdir, env=_env(workdir),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    shown = json.dumps(json.loads(proc.stdout))
    for model in MODELS:
        live = res / "training" / model
        tsvs = sorted(live.rglob("*.tsv"))
        loss = [t for t in tsvs if "loss" in t.relative_to(live).parts]
        assert loss, f"no loss curves in {live}: {tsvs}"
        rows = loss[0].read_text().splitlines()
        assert rows[0].split("\t")[:1] == ["step"] and len(rows) == 1 + 2, rows  # a header and 2 steps
        for tsv in loss:
            assert tsv.relative_to(workdir).as_posix() in shown, f"{tsv} not in dvc plots show"


def test_the_documented_overlay_has_at_most_ten_lines_and_resolves():
    """docs/own_data.md's overlay.yaml: the test's overlay with real-data values, a valid study."""
    body = READER_FILES["overlay.yaml"]
    assert len(body.splitlines()) + 1 <= 10  # with its `# overlay.yaml` line
    cfg, _ = resolve_study(REPO / "config" / "config.yaml", [yaml.safe_load(body)])
    assert cfg["dataset"]["manifest"] and cfg["pretrain"]["augment"]["preset"] == "he"
    assert cfg["pretrain"]["data"]["resize"] and cfg["results_dir"] != "results"
    assert set(cfg["evaluation"]["transfer"]["models"]) == set(cfg["models"])
