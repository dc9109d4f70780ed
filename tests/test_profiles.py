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
