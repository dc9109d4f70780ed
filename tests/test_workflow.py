"""The workflow through its command line: dry runs build the DAG, the linter is clean, and the
tiny study runs end to end under `dvc repro`, after which nothing is left to do and changing one
model's settings reruns only that model's chain; in another folder it gives the same bytes, and
killed mid-run it resumes with the documented commands to the same bytes."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOW_FILES = ["Snakefile", "rules", "workflow", "config", "envs", "dvc.yaml", "params.yaml", ".dvcignore"]
# A Python traceback, or the short one Snakemake prints for an error raised in a Snakefile.
TRACEBACK = re.compile(r'Traceback|^\s*File ".*", line \d+', re.M)


def _env(cwd: Path = REPO) -> dict:
    """The venv's tools first; in a copied workflow, its own snapshot of src/hsat (so edits made to
    the checkout while the test runs do not count as code changes)."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["OMP_NUM_THREADS"] = "1"
    if cwd != REPO:
        env["PYTHONPATH"] = str(cwd / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def snakemake(*args: str, cwd: Path = REPO, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "snakemake", *args],
        cwd=cwd, env=_env(cwd), capture_output=True, text=True, timeout=timeout,
    )


def planned_jobs(proc: subprocess.CompletedProcess) -> dict[str, int]:
    """Job counts of a dry run's "Job stats" table (empty when there is nothing to do)."""
    out = proc.stdout + proc.stderr
    if "Job stats" not in out:
        return {}
    table = out.split("Job stats:", 1)[1]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", table, re.M) if m.group(1) != "total"}


def copy_workflow(dest: Path, extra: tuple[str, ...] = ()) -> Path:
    """A copy of the workflow (not the results) in `dest`, with results_dir pointing inside it;
    `extra`: more of the repository's files or folders to copy (e.g. "profiles")."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in (*WORKFLOW_FILES, *extra):
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name)
        elif src.exists():
            shutil.copy2(src, dest / name)
    shutil.copytree(REPO / "src" / "hsat", dest / "src" / "hsat", ignore=shutil.ignore_patterns("__pycache__"))
    return dest


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A copy of the workflow (not the results) with results_dir pointing inside it."""
    return copy_workflow(tmp_path)


def dvc_repro_tiny(workdir: Path) -> subprocess.CompletedProcess:
    """`dvc init` and `dvc repro` of the tiny study (params.yaml pointed at it) in a workflow copy."""
    params = workdir / "params.yaml"
    p = yaml.safe_load(params.read_text())
    p["study"].update(configfile="config/tiny.yaml", results_dir="results/tiny", cores=2)
    params.write_text(yaml.safe_dump(p))
    assert dvc(workdir, "init", "--no-scm", "-q").returncode == 0
    shutil.copytree(REPO / ".dvc" / "plots", workdir / ".dvc" / "plots")  # the plot templates dvc.yaml names
    return dvc(workdir, "repro")


def dvc(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=workdir, env=_env(workdir),
                          capture_output=True, text=True, timeout=3000)  # a hang guard: generous for a loaded machine


def study_files(results: Path) -> dict[str, str]:
    """sha256 of every file a study wrote, by path under its results folder, but its logs and
    benchmarks (times and machine-dependent messages live there, by design)."""
    return {p.relative_to(results).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(results.rglob("*"))
            if p.is_file() and p.relative_to(results).parts[0] not in ("logs", "benchmarks")}


def differing(a: dict[str, str], b: dict[str, str]) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


@dataclass(frozen=True)
class TinyStudy:
    workdir: Path
    proc: subprocess.CompletedProcess
    files: dict[str, str]  # study_files right after `dvc repro`: later edits by a test do not count
    lock: str


@pytest.fixture(scope="module")
def tiny_dvc(tmp_path_factory) -> TinyStudy:
    """The tiny study run once under `dvc repro`, shared by the tests that need a finished study."""
    workdir = copy_workflow(tmp_path_factory.mktemp("tiny_dvc"))
    proc = dvc_repro_tiny(workdir)
    results = workdir / "results" / "tiny"
    files = study_files(results) if results.is_dir() else {}
    lock = (workdir / "dvc.lock").read_text() if (workdir / "dvc.lock").is_file() else ""
    return TinyStudy(workdir, proc, files, lock)


@pytest.mark.parametrize("configfile", ["config/config.yaml", "config/tiny.yaml"])
def test_dry_run_builds_the_dag(workdir, configfile):
    proc = snakemake("-n", "all", "--configfile", configfile, cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = planned_jobs(proc)
    models = yaml.safe_load((workdir / configfile).read_text())["models"]
    imported = [m for m, c in models.items() if c["method"]["name"] == "pretrained"]  # read, not trained
    assert jobs["pretrain"] == len(models) - len(imported) and jobs.get("import_encoder", 0) == len(imported)
    assert jobs["evaluate"] == len(models)
    assert jobs["tables"] == 1 and jobs["figures"] == 1
    # One job per model embeds, sweeps and (when MIL covers every model, as by default) fits and
    # attacks the MIL head, chaining the verbs in one process; a MIL subset keeps its own rule.
    assert "embed" not in jobs
    shown = snakemake("-n", "-p", "all", "--configfile", configfile, cwd=workdir).stdout
    chained = [line for line in shown.splitlines() if "hsat embed " in line]
    assert len(chained) == len(models) and all(" --then evaluate " in line for line in chained)
    mil_all = not (yaml.safe_load((workdir / configfile).read_text()).get("evaluation", {}).get("mil", {}).get("models"))
    assert all((" --then mil " in line) == mil_all for line in chained)
    assert ("mil" in jobs) == (not mil_all)
    # Attention maps default to every ViT model; a config may name a subset of them.
    vits = [m for m, c in models.items() if "vit" in str((c.get("model") or {}).get("backbone", "")).split("_")]
    listed = yaml.safe_load((workdir / configfile).read_text()).get("evaluation", {}).get("attention", {}).get("models")
    assert vits and set(listed or vits) <= set(vits) and jobs.get("attention") == len(listed or vits)


def test_default_config_without_configfile(workdir):
    proc = snakemake("-n", "paper_figures", cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # a dry run writes nothing that a running study's jobs read
    assert not (workdir / "results" / "config.resolved.yaml").exists()
    assert planned_jobs(proc)["pretrain"] == len(yaml.safe_load((workdir / "config/config.yaml").read_text())["models"])


def test_lint_is_clean():
    proc = snakemake("--lint", "--configfile", "config/tiny.yaml")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Lints for" not in proc.stdout + proc.stderr


def test_invalid_config_and_missing_opensrh_root_fail_readably(workdir):
    """A configuration error stops the workflow with its message alone: the key, no traceback."""
    models = {"m": {"method": {"name": "hsat"}}}
    cases = {  # file: (config, what the message must name)
        "bad_value.yaml": ({"models": models, "evaluation": {"whitebox": {"eps": "eight"}}},
                           ["evaluation.whitebox.eps"]),
        "unknown_key.yaml": ({"models": models, "evaluation": {"whitebox": {"epsilon": [8]}}},
                             ["evaluation.whitebox", "'epsilon'"]),
    }
    for name, (cfg, says) in cases.items():
        (workdir / name).write_text(yaml.safe_dump(cfg))
        proc = snakemake("-n", "all", "--configfile", name, cwd=workdir)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 2 and all(s in out for s in says) and name in out, out
        assert not TRACEBACK.search(out), out
    proc = snakemake("-n", "all", "--configfile", "config/opensrh.yaml", cwd=workdir)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "dataset.root" in out and "meta/opensrh.json" in out, out
    assert not TRACEBACK.search(out), out


def test_settings_that_do_not_fit_the_manifest_stop_the_dry_run(workdir, tiny_manifest):
    """What cannot work on your own data stops `snakemake -n`, naming the key and a value to set,
    instead of a pretraining job after a dry run that passed."""
    n_train = pd.read_csv(tiny_manifest).query("split == 'train'")["patient"].nunique()
    nproc = next(n for n in range(2, n_train) if n_train % n)
    cfg = {"dataset": {"manifest": str(tiny_manifest)}, "launcher": {"nproc_per_node": nproc},
           "models": {"h": {"method": {"name": "hidisc"}}}}
    (workdir / "mine.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake("-n", "all", "--configfile", "mine.yaml", cwd=workdir)
    out = proc.stdout + proc.stderr
    fit = n_train - n_train % nproc
    assert proc.returncode == 2 and f"launcher.nproc_per_node={nproc}" in out, out
    assert f"set pretrain.data.patients_per_batch: {fit}" in out and "(models: h)" in out, out
    assert not TRACEBACK.search(out), out
    cfg["pretrain"] = {"data": {"patients_per_batch": fit}}  # as the message says: planned
    (workdir / "mine.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake("-n", "all", "--configfile", "mine.yaml", cwd=workdir)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_tiny_study_under_dvc_then_nothing_to_do_then_one_model_reruns(tiny_dvc):
    workdir = tiny_dvc.workdir
    run = lambda *a: dvc(workdir, *a)  # noqa: E731
    proc = tiny_dvc.proc
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    res = workdir / "results" / "tiny"
    for i in range(1, 6):
        for ext in ("csv", "md", "tex"):
            assert (res / "tables" / f"table{i}.{ext}").stat().st_size > 0
    for name in ("robust_accuracy", "transfer_heatmap", "training_curves", "embedding_map", "attack_steps", "attention"):
        assert (res / "figures" / f"{name}.png").is_file() and (res / "figures" / f"{name}.pdf").is_file()
    t1 = (res / "tables" / "table1.csv").read_text()
    assert "HiDisc" in t1 and "HSAT" in t1
    assert "groups" in (res / "metrics.json").read_text()
    wb = pd.read_csv(res / "whitebox.csv")
    assert {"dino", "robust_dino"} <= set(wb["model"]) and set(wb.loc[wb["classifier"] == "abmil", "model"]) == {"hsat", "dino"}
    assert "vit_vs_cnn_baseline" in (res / "claims.md").read_text()

    # The run's own benchmarks account for every job, each model's pretraining and evaluation among them.
    from hsat.config import load_study_config
    from hsat.report.cost import cost_tables, job_costs

    resolved = load_study_config(res / "config.resolved.yaml")
    jobs, dropped = job_costs(res / "benchmarks", resolved)
    assert dropped == 0 and len(jobs) == len(list((res / "benchmarks").rglob("*.tsv")))
    for rules in (("pretrain", "import_encoder"), ("evaluate",)):
        assert set(jobs.loc[jobs["rule"].isin(rules), "model"]) == set(resolved["models"])
    assert cost_tables(jobs)["total"].iloc[0]["job_seconds"] == pytest.approx(jobs["seconds"].sum())

    status = run("status")
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout
    check_dvc_views(run, workdir, res)

    # A second Snakemake run has nothing to do.
    proc = snakemake("-n", "all", "--configfile", "config/tiny.yaml", cwd=workdir)
    assert proc.returncode == 0 and planned_jobs(proc) == {}, proc.stdout[-3000:]

    # Changing one model's settings reruns that model's chain (and the report), nothing else.
    cfg = yaml.safe_load((workdir / "config/tiny.yaml").read_text())
    cfg["models"]["hsat_patch"]["optim"] = {"lr": 0.002}
    (workdir / "config/tiny2.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake("-n", "all", "--configfile", "config/tiny2.yaml", cwd=workdir)
    jobs = planned_jobs(proc)
    assert jobs.get("pretrain") == 1 and jobs.get("evaluate") == 1 and "embed" not in jobs, proc.stdout[-3000:]
    assert "synth" not in jobs and "prepare" not in jobs
    assert "hsat_patch" in proc.stdout and "wildcards: model=hidisc" not in proc.stdout

    # An evaluation list stands for who is on it: naming the same models again changes nothing
    # (an empty list names every model), and taking one model off AutoAttack's list (or putting it
    # on) reruns that model's evaluation (and the reports), nothing else.
    from hsat.config import resolve_study

    study, _ = resolve_study(workdir / "config/config.yaml", [workdir / "config/tiny.yaml"])
    listed = study["evaluation"]["whitebox"]["autoattack"]["models"] or list(study["models"])
    cfg = yaml.safe_load((workdir / "config/tiny.yaml").read_text())
    cfg["evaluation"]["whitebox"]["autoattack"] = {"models": list(listed)}
    (workdir / "config/tiny3.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake("-n", "all", "--configfile", "config/tiny3.yaml", cwd=workdir)
    assert proc.returncode == 0 and planned_jobs(proc) == {}, proc.stdout[-3000:]
    toggled = next(m for m in study["models"] if m not in study["evaluation"]["sanity"]["models"])
    cfg["evaluation"]["whitebox"]["autoattack"] = {
        "models": [m for m in listed if m != toggled] if toggled in listed else [*listed, toggled]}
    (workdir / "config/tiny3.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake("-n", "all", "--configfile", "config/tiny3.yaml", cwd=workdir)
    jobs = planned_jobs(proc)
    # (its embeddings are rewritten with it, so its own transfer set is crafted again)
    assert jobs.get("evaluate") == 1 and jobs.get("transfer_craft", 0) <= 1 and not {"pretrain", "sanity"} & set(jobs), jobs
    assert f"wildcards: model={toggled}" in proc.stdout

    # An interrupted pretraining job resumes from its checkpoint instead of starting afresh: lose
    # the final weights (as a kill before the end would), rerun that one target, and the run
    # continues from checkpoint.pt (the log is kept, not rewritten).
    run_dir = res / "runs" / "hsat"
    log_before = (run_dir / "log.jsonl").read_text()
    weights_before = (run_dir / "model.safetensors").read_bytes()
    (run_dir / "model.safetensors").unlink()
    proc = snakemake("--cores", "1", str(run_dir.relative_to(workdir) / "model.safetensors"),
                     "--configfile", "config/tiny.yaml", cwd=workdir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (run_dir / "log.jsonl").read_text() == log_before
    assert (run_dir / "model.safetensors").read_bytes() == weights_before


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_tiny_study_is_the_same_bytes_in_two_folders_and_after_a_move(tiny_dvc, tmp_path):
    """Every output but logs and benchmarks is a function of the commit, the config and the data:
    the tiny study under `dvc repro` in a second folder, at another depth, gives the same bytes
    and the same dvc.lock; moved elsewhere with a per-model CSV and a table deleted, `snakemake
    all` rebuilds them (and what depends on them) to the same bytes again."""
    first = tiny_dvc
    assert first.proc.returncode == 0, first.proc.stdout[-4000:] + first.proc.stderr[-4000:]
    second = copy_workflow(tmp_path / "a" / "deeper" / "folder")
    proc = dvc_repro_tiny(second)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert differing(study_files(second / "results" / "tiny"), first.files) == []
    assert (second / "dvc.lock").read_text() == first.lock

    moved = shutil.move(second, tmp_path / "moved")
    results = Path(moved) / "results" / "tiny"
    (results / "whitebox" / "hsat.csv").unlink()
    (results / "tables" / "table1.md").unlink()
    planned = planned_jobs(snakemake("-n", "all", "--configfile", "config/tiny.yaml", cwd=moved))
    assert planned.get("evaluate") == 1 and planned.get("tables") == 1 and "pretrain" not in planned, planned
    proc = snakemake("all", "--cores", "2", "--configfile", "config/tiny.yaml", cwd=moved)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert differing(study_files(results), first.files) == []


def documented_resume(doc: Path = REPO / "docs" / "workflow.md") -> list[list[str]]:
    """The commands docs/workflow.md gives for resuming after a kill (the ```bash block after
    "**After a kill**"), one argv each: the test runs what the reader is told to run."""
    text = doc.read_text(encoding="utf-8").split("**After a kill**", 1)[1]
    block = re.search(r"^```bash\n(.*?)^```", text, re.M | re.S).group(1)
    commands = [shlex.split(line, comments=True) for line in block.splitlines()]
    commands = [c for c in commands if c]
    assert commands and all(c[0] == "snakemake" for c in commands), block
    return commands


def leftovers(results: Path) -> list[str]:
    """Hidden files and folders a study folder holds but Snakemake's own marker of a directory
    output: temporary files of atomic writes (hsat.io), half-built cohorts, ..."""
    return sorted(p.relative_to(results).as_posix() for p in results.rglob(".*") if p.name != ".snakemake_timestamp")


def kill_when(proc: subprocess.Popen, condition: Callable[[], object], timeout: float = 900) -> None:
    """SIGKILL the process group of `proc` (started in a session of its own) once `condition()`
    holds, polled. The group is stopped (SIGSTOP) and the condition checked again before the
    kill, so it still holds after it whatever the scheduler did; `timeout` (generous) only ends a
    hung run."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if condition():
            os.killpg(proc.pid, signal.SIGSTOP)
            if condition():
                break
            os.killpg(proc.pid, signal.SIGCONT)
        time.sleep(0.1)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_a_killed_study_resumes_with_the_documented_commands_to_the_same_bytes(tiny_dvc, tmp_path):
    """SIGKILL to Snakemake and every job (its process group: `kill -9`, a lost node) while the
    first pretraining trains: what is left is whole, but an unfinished pretraining's run folder
    (it resumes) and the temporary files of interrupted writes; the same command stops on the
    stale lock, as the docs say; the docs' commands then finish the study to the bytes of an
    uninterrupted run, leaving no temporary file and no incomplete-job marker."""
    assert tiny_dvc.proc.returncode == 0, tiny_dvc.proc.stdout[-4000:] + tiny_dvc.proc.stderr[-4000:]
    from hsat.io import is_temporary

    commands = documented_resume()
    run = commands[-1]  # the docs: "rerun the same command"
    assert run[1] == "all" and "--unlock" not in run, commands
    workdir = copy_workflow(tmp_path / "study", extra=("profiles",))  # profiles/default: as in a checkout
    results = workdir / "results" / "tiny"
    training = lambda: {p.parent.name for p in results.glob("runs/*/log.jsonl")  # noqa: E731
                        if not (p.parent / "model.safetensors").exists()}  # took a step, not done
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", *run], cwd=workdir, env=_env(workdir), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            kill_when(proc, training)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]

    # Killed mid-run: a pretraining had taken a step and not finished, the report far off.
    unfinished = training()
    assert unfinished and not (results / "tables").exists()
    # Nothing truncated: every file is the uninterrupted run's, but those an unfinished
    # pretraining writes in place (it resumes from them) and atomic writes' temporary files.
    left = study_files(results)
    truncated = [rel for rel, digest in left.items() if digest != tiny_dvc.files.get(rel)
                 and not is_temporary(Path(rel).name)
                 and not (rel.split("/")[0] in ("runs", "training") and rel.split("/")[1] in unfinished)]
    assert truncated == []

    # The same command stops on the lock the kill left, with the message the docs quote.
    proc = snakemake(*run[1:], cwd=workdir)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Error: Directory cannot be locked." in out, out[-3000:]
    assert "Error: Directory cannot be locked." in (REPO / "docs" / "workflow.md").read_text()
    assert study_files(results) == left

    for command in commands:  # as documented: unlock, then the same command
        proc = snakemake(*command[1:], cwd=workdir, timeout=1200)
        assert proc.returncode == 0, f"{shlex.join(command)}\n" + proc.stdout[-3000:] + proc.stderr[-3000:]
    assert differing(study_files(results), tiny_dvc.files) == []
    assert leftovers(results) == []
    assert list((workdir / ".snakemake" / "incomplete").iterdir()) == []


DVC_COMMANDS = (("repro",), ("status",), ("metrics", "show"), ("plots", "show"))
"""The DVC commands the tiny study runs (test_tiny_study_under_dvc_...): the README's may only use these."""


def check_dvc_views(run, workdir: Path, res: Path) -> None:
    """`dvc metrics show` and `dvc plots show` after `dvc repro`: no warnings, one compact row of
    metrics, and every plot drawn from its data (one series per method, not one line through
    all rows)."""
    metrics = run("metrics", "show")
    out = metrics.stdout + metrics.stderr
    assert metrics.returncode == 0 and "WARNING" not in out and "ERROR" not in out, out
    shown = json.loads(run("metrics", "show", "--json").stdout)
    values = next(iter(shown.values()))["data"]
    assert list(values) == [str((res / "summary.json").relative_to(workdir))], values
    summary = next(iter(values.values()))["data"]
    assert set(summary["scratch/test_resnet"]) == {"hsat", "hidisc"} and "claims" in summary
    header = out.strip().splitlines()[0].split()
    assert "Path" in header and len(header) <= 12, out

    plots = run("plots", "show", "-o", str(workdir / "dvc_plots"))
    out = plots.stdout + plots.stderr
    assert plots.returncode == 0 and "WARNING" not in out and "failed to load" not in out, out
    assert (workdir / "dvc_plots" / "index.html").is_file()
    drawn = json.loads(run("plots", "show", "--json").stdout)["data"]
    for plot_id, series in (("robust_accuracy", "label"), ("training_loss", "model")):
        (plot,) = drawn[plot_id]
        rows = plot["content"]["data"]["values"]
        assert len({r[series] for r in rows}) > 1, plot_id
    figures = [k for k in drawn if k.endswith(".png")]
    # the five of every study, and the natural-shift figure (the tiny study runs the shift sweep)
    assert len(figures) == 6 and any(k.endswith("natural_shift.png") for k in figures), list(drawn)
    assert all(drawn[k][0]["type"] == "image" for k in figures), list(drawn)


def test_report_code_is_not_part_of_training_or_evaluation():
    """Editing src/hsat/report/ reruns only tables and figures (docs/workflow.md): no module of the report package is in
    the code version (hsat.provenance's import closure) of the stages that make data, train or evaluate."""
    from hsat.provenance import module_closure

    for entry in ("hsat.cli.data", "hsat.cli.train", "hsat.cli.evaluate"):
        report = [p.name for p in module_closure([entry]) if "report" in p.parts]
        assert not report, f"{entry} imports report modules {report}: editing a table would rerun that stage"


def test_opensrh_root_data_stage_runs_and_dvc_outputs_exist(workdir):
    """With dataset.root (a fake OpenSRH as downloaded: an empty slide, a missing patch, pruned meta
    files under other names) the data stage writes every output the DVC `pretrain` stage declares
    for it (the dataset folder holds the record of the root), and the rest of the DAG plans."""
    from hsat.data.fake_opensrh import write_fake_opensrh

    fake = write_fake_opensrh(workdir / "opensrh", size=32, patches=3, empty_slides=1, missing_patches=1)
    for name in ("opensrh.json", "train_val_split.json"):
        (fake.root / "meta" / name).rename(fake.root / "meta" / f"updated2_{name}")
    cfg = yaml.safe_load((workdir / "config/tiny.yaml").read_text())
    cfg["dataset"] = {"root": "opensrh", "meta_json": "updated2_opensrh.json", "split_json": "updated2_train_val_split.json"}
    (workdir / "config/root.yaml").write_text(yaml.safe_dump(cfg))
    res = workdir / "results" / "tiny"
    proc = snakemake("--cores", "1", "results/tiny/manifest.csv", "--configfile", "config/root.yaml", cwd=workdir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(pd.read_csv(res / "manifest.csv")) == fake.usable_patches
    report = pd.read_csv(res / "prepare_report.csv")
    assert (report["status"] == "skipped: none listed").sum() == 1 and report["missing"].sum() == 1
    assert "updated2_opensrh.json" in (res / "dataset" / "source.json").read_text()

    stages = yaml.safe_load((workdir / "dvc.yaml").read_text())["stages"]
    data_outs = [next(iter(o)) if isinstance(o, dict) else o for o in stages["pretrain"]["outs"]]
    data_outs = [o.replace("${study.results_dir}", "results/tiny") for o in data_outs]
    for out in data_outs:
        # runs/, training/ and text/ (HLSS attribute embeddings) come from pretrain_all, not this target.
        if not out.endswith(("/runs", "/training", "/text")):
            assert (workdir / out).exists(), f"dvc.yaml declares {out}, which the data stage did not write"

    proc = snakemake("-n", "all", "--configfile", "config/root.yaml", cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = planned_jobs(proc)
    assert "synth" not in jobs and "prepare" not in jobs and jobs["pretrain"] + jobs.get("import_encoder", 0) == len(cfg["models"])

    params = workdir / "params.yaml"
    p = yaml.safe_load(params.read_text())
    p["study"].update(configfile="config/root.yaml", results_dir="results/tiny")
    params.write_text(yaml.safe_dump(p))
    dvc = [str(Path(sys.executable).parent / "dvc")]
    assert subprocess.run(dvc + ["init", "--no-scm", "-q"], cwd=workdir, env=_env(workdir)).returncode == 0
    proc = subprocess.run(dvc + ["repro", "--dry", "pretrain"], cwd=workdir, env=_env(workdir), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "config/root.yaml" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
