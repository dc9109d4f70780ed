"""The Snakemake profiles as shipped: the workflow profile (profiles/default, which Snakemake reads
beside every --profile) carries nothing that shapes a cluster run; the SLURM profile and its site
overlay name only rules that exist, place every GPU-using rule, ask SLURM for each rule's threads
as CPUs, and ask for GPUs only where the study's device is CUDA."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import yaml

from test_documented_commands import READER_FILES
from test_workflow import REPO, copy_workflow, snakemake

PROFILES = sorted(p.relative_to(REPO).as_posix() for p in REPO.glob("profiles/*/*.yaml"))
SITE = "profiles/slurm/site.example.yaml"
RULE = re.compile(r"^\s*rule (\w+):", re.M)
# Options that decide how many jobs run where with how many CPUs, GPUs or memory: a workflow
# profile that set one would override the cluster profile's value (Snakemake merges key by key).
MACHINE_KEYS = {"cores", "jobs", "local-cores", "executor", "resources", "default-resources", "set-threads",
                "set-resources", "max-threads", "set-resource-scopes", "retries", "latency-wait"}


def _load(path: str) -> dict:
    return yaml.safe_load((REPO / path).read_text(encoding="utf-8")) or {}


def _rule_sources() -> dict[str, str]:
    """Every rule of the workflow (those inside an `if` block too) and the text of its body."""
    out = {}
    for f in ["Snakefile", *sorted(p.relative_to(REPO).as_posix() for p in REPO.glob("rules/*.smk"))]:
        text = (REPO / f).read_text(encoding="utf-8")
        starts = list(RULE.finditer(text))
        for m, nxt in zip(starts, [*starts[1:], None]):
            out[m.group(1)] = text[m.end(): nxt.start() if nxt else len(text)]
    return out


RULES = _rule_sources()
GPU_RULES = sorted(name for name, body in RULES.items() if re.search(r"^\s*gpu=", body, re.M))


def test_the_rule_parser_sees_the_gpu_rules():
    """The parser finds the rules a reader knows to use a GPU (the MIL rule sits in an `if`)."""
    assert {"pretrain", "evaluate", "sanity", "mil", "attention", "language", "transfer_craft",
            "transfer_evaluate"} <= set(GPU_RULES)
    assert "report" not in GPU_RULES and "synth" not in GPU_RULES


@pytest.mark.parametrize("path", PROFILES)
def test_profile_names_only_rules_that_exist(path):
    profile = _load(path)
    for key in ("set-threads", "set-resources"):
        unknown = sorted(set(profile.get(key) or {}) - set(RULES))
        assert not unknown, f"{path}: {key} names rules that do not exist: {unknown}"


def test_site_overlay_places_every_gpu_rule():
    """Each rule with a `gpu` resource goes to a partition the overlay names; no other rule does."""
    placed = {rule: res.get("slurm_partition") for rule, res in (_load(SITE).get("set-resources") or {}).items()}
    default = _load(SITE)["default-resources"]["slurm_partition"]
    missing = [rule for rule in GPU_RULES if not placed.get(rule) or placed[rule] == default]
    assert not missing, f"{SITE}: GPU rules left on the default partition: {missing}"
    assert set(placed) <= set(GPU_RULES), f"{SITE}: CPU rules sent elsewhere: {sorted(set(placed) - set(GPU_RULES))}"


def test_workflow_profile_leaves_machine_settings_to_the_command_line():
    """profiles/default is read beside profiles/slurm: it must not cap cores or set resources."""
    workflow_profile = _load("profiles/default/config.yaml")
    assert not set(workflow_profile) & MACHINE_KEYS, sorted(set(workflow_profile) & MACHINE_KEYS)
    slurm = _load("profiles/slurm/config.yaml")
    differing = {k: (v, slurm[k]) for k, v in workflow_profile.items() if k in slurm and slurm[k] != v}
    assert not differing, differing


def test_slurm_profile_takes_cpus_from_threads_and_shares_no_key_with_the_overlay():
    """No cpus_per_task / cpus_per_gpu / set-threads: the plugin then asks for each rule's threads.
    The overlay is the workflow profile, whose keys replace the profile's whole: they share none."""
    slurm, site = _load("profiles/slurm/config.yaml"), _load(SITE)
    for path, profile in (("profiles/slurm/config.yaml", slurm), (SITE, site)):
        text = (REPO / path).read_text(encoding="utf-8")
        assert not re.search(r"^\s*(cpus_per_task|cpus_per_gpu)\s*:", text, re.M), path
        assert "cores" not in profile and "max-threads" not in profile, path
    assert "set-threads" not in slurm
    assert not set(slurm) & set(site), sorted(set(slurm) & set(site))
    assert slurm["executor"] == "slurm" and slurm["slurm-status-command"] == "squeue"
    assert slurm["retries"] >= 1 and slurm["rerun-incomplete"] is True


def test_docs_print_the_site_overlay_as_shipped():
    """docs/workflow.md shows the overlay the reader copies: the same text as the example file."""
    assert READER_FILES.get("profiles/slurm/site.yaml") == (REPO / SITE).read_text(encoding="utf-8")


# ---------------------------------------------------------------- dry runs through the profile
def _jobs(out: str) -> list[dict]:
    """(rule, threads, resources) of every job a dry run lists."""
    jobs = []
    for block in re.split(r"^rule ", out, flags=re.M)[1:]:
        name = block.split(":", 1)[0]
        threads = re.search(r"^\s+threads: (\d+)$", block, re.M)
        res = re.search(r"^\s+resources: (.*)$", block, re.M)
        resources = dict(kv.split("=", 1) for kv in res.group(1).split(", ")) if res else {}
        jobs.append({"rule": name, "threads": int(threads.group(1)) if threads else 1, "resources": resources})
    return jobs


@pytest.fixture
def workflow_with_profiles(tmp_path: Path) -> Path:
    copy_workflow(tmp_path, extra=("profiles",))
    (tmp_path / "cuda.yaml").write_text("pretrain: {device: cuda}\nlauncher: {nproc_per_node: 2}\n", encoding="utf-8")
    return tmp_path


needs_plugin = pytest.mark.skipif(importlib.util.find_spec("snakemake_executor_plugin_slurm") is None,
                                  reason='snakemake-executor-plugin-slurm is not installed (pip install -e ".[slurm]")')


@needs_plugin
@pytest.mark.slow
def test_dry_run_asks_for_gpus_only_under_cuda(workflow_with_profiles):
    """The tiny study through profiles/slurm + the site overlay: with `device: cpu` no job asks for a
    GPU; with `device: cuda` and two processes, pretraining asks for 2 on one node, every other GPU
    rule for 1, the rest for none, and the GPU rules' jobs go to the GPU partition."""
    profile = ["--profile", "profiles/slurm", "--workflow-profile", SITE]
    results = {}
    for device, extra in (("cpu", []), ("cuda", ["cuda.yaml"])):
        proc = snakemake("-n", "all", *profile, "--configfile", "config/tiny.yaml", *extra, cwd=workflow_with_profiles)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[device] = _jobs(proc.stdout + proc.stderr)
    site = _load(SITE)
    assert {j["rule"] for j in results["cpu"]} >= {"pretrain", "evaluate", "mil", "attention", "language", "transfer_craft"}
    assert all(int(j["resources"].get("gpu", 0)) == 0 for j in results["cpu"])
    for job in results["cuda"]:
        want = 2 if job["rule"] == "pretrain" else 1 if job["rule"] in GPU_RULES else 0
        assert int(job["resources"].get("gpu", 0)) == want, job
        partition = site["set-resources"][job["rule"]]["slurm_partition"] if want else site["default-resources"]["slurm_partition"]
        assert job["resources"]["slurm_partition"] == partition, job
        assert job["resources"].get("nodes", "1") == "1", job
        assert "cpus_per_task" not in job["resources"], job


@needs_plugin
@pytest.mark.parametrize("overlay", [[], ["--workflow-profile", SITE]], ids=["profile alone", "with the overlay"])
def test_cluster_command_line_caps_no_threads(workflow_with_profiles, monkeypatch, capsys, overlay):
    """The options Snakemake builds from the cluster command (profiles/default read beside
    profiles/slurm when no overlay is named, as Snakemake does): no core count, so a rule's threads
    reach its job uncapped (a `cores: 2` there once turned pretraining's 8 threads into 2), no
    CPUs per task (the plugin takes the threads), and squeue for the job status."""
    from snakemake.cli import parse_args

    monkeypatch.chdir(workflow_with_profiles)
    _, args = parse_args(["all", "--profile", "profiles/slurm", *overlay, "--configfile", "config/tiny.yaml"])
    read = capsys.readouterr().err
    assert ("workflow specific profile profiles/default" in read) == (not overlay), read
    assert args.cores is None and args.max_threads is None
    assert set(args.set_threads or {}) == set(_load(SITE).get("set-threads", {}) if overlay else {})
    resources = [set(args.default_resources or {}), *map(set, (args.set_resources or {}).values())]
    assert not any(name.startswith("cpus_per") for names in resources for name in names), resources
    assert args.slurm_status_command == "squeue" and args.executor == "slurm"
    assert args.retries >= 1 and args.rerun_incomplete and args.slurm_requeue
    if overlay:
        assert args.default_resources["slurm_partition"].raw == "cpu"
        assert args.set_resources["pretrain"]["slurm_partition"].raw == "gpu"


def test_job_gpus_follow_the_device():
    from hsat.cluster import job_gpus
    from hsat.errors import HSATError

    assert [job_gpus(d, 4) for d in ("cuda", "auto", "cpu")] == [4, 0, 0]
    assert job_gpus("cuda") == 1
    with pytest.raises(HSATError, match="mps"):
        job_gpus("mps")


# ---------------------------------------------------------------- the paper's study, one node and several
@pytest.fixture
def opensrh_workflow(tmp_path: Path) -> Path:
    """The workflow with its profiles; config/opensrh.yaml's dataset.root is a fake OpenSRH."""
    from hsat.data.fake_opensrh import write_fake_opensrh

    copy_workflow(tmp_path, extra=("profiles",))
    write_fake_opensrh(tmp_path / "opensrh", size=16, patches=1)
    for nodes in (1, 2):
        (tmp_path / f"nodes{nodes}.yaml").write_text(yaml.safe_dump(
            {"dataset": {"root": str(tmp_path / "opensrh")}, "launcher": {"nproc_per_node": 4, "nodes": nodes}}),
            encoding="utf-8")
    return tmp_path


@needs_plugin
@pytest.mark.slow
@pytest.mark.parametrize("nodes", [1, 2])
def test_opensrh_dry_run_lists_gpus_per_job(opensrh_workflow, nodes):
    """`snakemake all --profile profiles/slurm --workflow-profile <site overlay> --configfile
    config/opensrh.yaml -n` (device cuda) with four processes per node: one GPU for each evaluation
    job, four for each pretraining -- on its one node (`gpu`), or on each of two nodes, one task per
    node (`slurm_extra`'s --gpus-per-node) -- and none for the CPU-only rules."""
    proc = snakemake("-n", "all", "--profile", "profiles/slurm", "--workflow-profile", SITE,
                     "--configfile", "config/opensrh.yaml", f"nodes{nodes}.yaml", cwd=opensrh_workflow)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = _jobs(proc.stdout + proc.stderr)
    models = _load("config/opensrh.yaml")["models"]
    rules = [j["rule"] for j in jobs]
    assert rules.count("pretrain") == len(models) and rules.count("evaluate") == len(models)
    assert {"sanity", "attention", "language", "transfer_craft", "transfer_evaluate", "prepare", "tables"} <= set(rules)
    gpu_partition = _load(SITE)["set-resources"]["pretrain"]["slurm_partition"]
    for job in jobs:
        res, rule = job["resources"], job["rule"]
        if rule == "pretrain" and nodes == 1:
            assert (res["gpu"], res["nodes"]) == ("4", "1") and not {"tasks", "mpi", "slurm_extra"} & set(res), job
        elif rule == "pretrain":
            assert (res["gpu"], res["nodes"], res["tasks"]) == ("0", "2", "2") and "mpi" in res, job
            assert res["slurm_extra"] == "--ntasks-per-node=1 --gpus-per-node=4", job
        elif rule in GPU_RULES:
            assert res["gpu"] == "1" and "slurm_extra" not in res and "gres" not in res, job
        else:
            assert int(res.get("gpu", 0)) == 0 and not {"slurm_extra", "gres", "nodes"} & set(res), job
        assert (res["slurm_partition"] == gpu_partition) == (rule in GPU_RULES), job


class _Resources(dict):
    """A job's resources as the executor reads them (`.get` and attributes)."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError as exc:
            raise AttributeError(name) from exc


@needs_plugin
@pytest.mark.parametrize("nodes", [1, 2])
def test_pretraining_sbatch_request(nodes):
    """The sbatch options the SLURM executor builds from the pretrain rule's resources (four GPUs
    per node, eight threads): --gpus on one node; on two, both nodes with one task each and four
    GPUs on each, never a per-job GPU count or tasks per GPU."""
    from types import SimpleNamespace

    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string
    from snakemake_executor_plugin_slurm.validation import validate_slurm_extra

    from hsat.cluster import pretrain_resources

    resources = {k: v for k, v in pretrain_resources("cuda", 4, nodes).items() if v is not None}
    job = SimpleNamespace(resources=_Resources(resources), threads=8)
    validate_slurm_extra(job)  # no option the executor sets itself
    params = {"run_uuid": "run", "slurm_logfile": "log", "comment_str": "rule_pretrain", "account": "",
              "partition": "-p gpu", "workdir": ""}
    options = (get_submit_command(job, params) + set_gres_string(job)).split()
    assert "--cpus-per-task=8" in options and f"--nodes={nodes}" in options
    assert not any(o.startswith(("--ntasks-per-gpu", "--gres")) for o in options), options
    if nodes == 1:
        assert "--gpus=4" in options and not any(o.startswith("--ntasks-per-node") for o in options), options
        assert "mpi" not in job.resources  # the executor runs the command in a one-task srun step
    else:
        assert {"--ntasks=2", "--ntasks-per-node=1", "--gpus-per-node=4"} <= set(options), options
        assert not any(o.startswith("--gpus=") for o in options), options
        assert "mpi" in job.resources  # the command itself starts the tasks (hsat launch -> srun)
