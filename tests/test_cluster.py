"""How a pretraining job is started and what it asks of SLURM: one node as before (hsat, or
torchrun --standalone), several nodes through srun with a c10d rendezvous read from the job's
environment -- built and checked here without a SLURM."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hsat.cluster import (
    PORT_BASE,
    first_host,
    launch_command,
    launcher_prefix,
    node_address,
    pretrain_resources,
    rendezvous_port,
    slurm_allocation,
    slurm_launch_command,
)
from hsat.config import validate
from hsat.errors import HSATError

ARGV = ["pretrain", "--study", "results/config.resolved.yaml", "--model", "hsat", "--out", "runs/hsat"]
# What SLURM puts in a two-node job's environment (sbatch --nodes=2 --ntasks-per-node=1 -c 8).
JOB = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_NUM_NODES": "2",
       "SLURM_CPUS_PER_TASK": "8", "PATH": os.environ.get("PATH", "")}


def test_one_node_starts_as_it_always_did():
    """launcher.nodes: 1 gives the commands the rule ran before nodes existed (so a study that
    stays on one node reruns nothing), and reads nothing of the environment."""
    assert launcher_prefix(1) == "hsat"
    assert launcher_prefix(4) == "torchrun --standalone --nproc_per_node 4 -m hsat"
    assert launch_command(ARGV, 1, 1, env=JOB) == ["hsat", *ARGV]
    assert launch_command(ARGV, 4, 1, env={}) == ["torchrun", "--standalone", "--nproc_per_node", "4", "-m", "hsat",
                                                 *ARGV]


def test_two_nodes_start_one_torchrun_per_node_at_the_jobs_rendezvous():
    assert launcher_prefix(4, 2) == "hsat launch --nodes 2 --nproc-per-node 4 --"
    assert launch_command(ARGV, 4, 2, env=JOB) == [
        "srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--cpus-per-task=8",
        "torchrun", "--nnodes=2", "--nproc_per_node=4", "--rdzv_backend=c10d",
        f"--rdzv_endpoint=gpu07:{PORT_BASE + 4242}", "--rdzv_id=4242", "-m", "hsat", *ARGV]


def test_the_srun_way_on_one_node():
    """The same launch inside a one-node job (what `make slurm-check` tries on its one node)."""
    one = {**JOB, "SLURM_JOB_NODELIST": "gpu07", "SLURM_JOB_NUM_NODES": "1"}
    cmd = slurm_launch_command(ARGV, 2, 1, env=one)
    assert cmd[:3] == ["srun", "--nodes=1", "--ntasks=1"] and "--nnodes=1" in cmd
    assert f"--rdzv_endpoint=gpu07:{PORT_BASE + 4242}" in cmd and cmd[-len(ARGV):] == ARGV


def test_rendezvous_follows_the_job():
    """Another job (other nodes, another id) meets elsewhere; without SLURM_CPUS_PER_TASK the
    CPUs per task are the threads the rule set in OMP_NUM_THREADS."""
    other = {"SLURM_JOB_ID": "4243", "SLURM_JOB_NODELIST": "cn-12,cn-3", "SLURM_JOB_NUM_NODES": "2",
             "OMP_NUM_THREADS": "6"}
    cmd = launch_command(ARGV, 1, 2, env=other)
    assert f"--rdzv_endpoint=cn-12:{PORT_BASE + 4243}" in cmd and "--rdzv_id=4243" in cmd
    assert "--cpus-per-task=6" in cmd and "--nproc_per_node=1" in cmd
    assert rendezvous_port("4242") != rendezvous_port("4243")
    assert rendezvous_port("977_3") == rendezvous_port(977)  # an array task
    assert all(PORT_BASE <= rendezvous_port(j) < 32768 for j in (0, 1, 14999, 15000, 10**9))


@pytest.mark.parametrize("nodelist, host", [
    ("node1", "node1"), ("gpu[07-09,12],cpu1", "gpu07"), ("a[3,1-2]", "a3"),
    ("rack[01-02]-n[5-6]", "rack01-n5"), ("n1,n[2-3]", "n1"), ("c0.cluster", "c0.cluster")])
def test_first_host_of_a_node_list(nodelist, host):
    assert first_host(nodelist) == host


def test_several_nodes_outside_slurm_say_what_to_do():
    for env in ({}, {"SLURM_JOB_ID": "7"}):
        with pytest.raises(HSATError, match="launcher.nodes > 1 needs a SLURM allocation"):
            launch_command(ARGV, 2, 2, env=env)
    with pytest.raises(HSATError, match="SLURM_JOB_ID is not set"):
        slurm_allocation({"PATH": "/bin"})
    with pytest.raises(HSATError, match=r"launcher.nodes is 3 but SLURM job 4242 holds 2 node\(s\).*--nodes=3"):
        launch_command(ARGV, 4, 3, env=JOB)
    with pytest.raises(HSATError, match="node list"):
        first_host("")
    with pytest.raises(HSATError, match="launcher.nodes: expected an integer of at least 1, got 0"):
        launcher_prefix(1, 0)


# scontrol as it answers inside job 4242 (`show job -o ID`, `show node -o NAME`); other jobs: unknown.
SCONTROL = """case "$2 $4" in
  "job 4242") echo "JobId=4242 JobName=x NodeList=gpu[07-08] NumNodes=2 NumCPUs=16" ;;
  "node gpu07") echo "NodeName=gpu07 Arch=x86_64 NodeAddr=10.1.0.7 NodeHostName=gpu07" ;;
  *) echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1 ;;
esac"""


def _fake_tool(folder: Path, name: str, body: str) -> None:
    folder.mkdir(exist_ok=True)
    tool = folder / name
    tool.write_text(f"#!/bin/sh\n{body}\n", encoding="utf-8")
    tool.chmod(0o755)


def test_allocation_is_asked_of_scontrol_when_the_executor_left_it_out(tmp_path):
    """The SLURM executor starts a job's command with SLURM_JOB_ID only: the node list and count
    then come from `scontrol show job`."""
    _fake_tool(tmp_path / "bin", "scontrol", SCONTROL)
    path = {"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    env = slurm_allocation({"SLURM_JOB_ID": "4242", **path})
    assert env["SLURM_JOB_NODELIST"] == "gpu[07-08]" and env["SLURM_JOB_NUM_NODES"] == "2"
    assert slurm_allocation({**JOB, **path}) == {**JOB, **path}  # nothing asked where the environment has it
    with pytest.raises(HSATError, match="scontrol show job 99 gives no node list"):
        slurm_allocation({"SLURM_JOB_ID": "99", **path})


def test_rendezvous_host_is_the_first_nodes_address(tmp_path):
    """Reached where SLURM reaches it (NodeAddr), the node's name where scontrol cannot say."""
    _fake_tool(tmp_path / "bin", "scontrol", SCONTROL)
    assert node_address("gpu07", {"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}) == "10.1.0.7"
    assert node_address("gpu07", {"PATH": str(tmp_path / "nothing")}) == "gpu07"
    assert f"--rdzv_endpoint=10.1.0.7:{PORT_BASE + 4242}" in launch_command(ARGV, 4, 2, env=JOB, host="10.1.0.7")


def test_hsat_launch_runs_the_built_command(tmp_path):
    """`hsat launch` (what the pretrain rule runs for launcher.nodes > 1) replaces itself by srun
    with the command built from the job's environment."""
    _fake_tool(tmp_path / "bin", "srun", f'printf "%s\\n" "$@" > {tmp_path / "argv"}')
    _fake_tool(tmp_path / "bin", "scontrol", SCONTROL)
    env = {**os.environ, **JOB, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    proc = subprocess.run([sys.executable, "-m", "hsat", "launch", "--nodes", "2", "--nproc-per-node", "4", "--", *ARGV],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "argv").read_text().split("\n")[:-1] == launch_command(ARGV, 4, 2, env=JOB, host="10.1.0.7")[1:]
    env.pop("SLURM_JOB_ID")
    proc = subprocess.run([sys.executable, "-m", "hsat", "launch", "--nodes", "2", "--", *ARGV],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "SLURM_JOB_ID is not set" in proc.stderr, proc.stderr


def test_pretrain_resources_one_node_and_several():
    """One node: `gpu` GPUs (SLURM's --gpus), as before. Several: one task per node with the
    GPUs per node (--gpus-per-node), and `mpi` so that the executor lets the job's srun start
    the tasks; no per-job `gpu`, which SLURM could spread unevenly over the nodes."""
    unset = {"tasks": None, "mpi": None, "slurm_extra": None}
    assert pretrain_resources("cuda", 4) == {"gpu": 4, "nodes": 1, **unset}
    assert pretrain_resources("cpu", 4) == pretrain_resources("auto", 1) == {"gpu": 0, "nodes": 1, **unset}
    assert pretrain_resources("cuda", 4, 2) == {"gpu": 0, "nodes": 2, "tasks": 2, "mpi": "srun",
                                               "slurm_extra": "--ntasks-per-node=1 --gpus-per-node=4"}
    assert pretrain_resources("cpu", 2, 3) == {"gpu": 0, "nodes": 3, "tasks": 3, "mpi": "srun",
                                              "slurm_extra": "--ntasks-per-node=1"}


@pytest.mark.parametrize("nodes", [0, -1, "two", 1.5, True])
def test_launcher_nodes_is_validated(nodes):
    with pytest.raises(HSATError, match="launcher.nodes"):
        validate({"models": {"m": {}}, "launcher": {"nodes": nodes}}, "study", source="study.yaml")


def test_launcher_nodes_defaults_to_one():
    assert validate({"models": {"m": {}}}, "study")["launcher"] == {"nproc_per_node": 1, "nodes": 1}
    assert validate({"models": {"m": {}}, "launcher": {"nodes": 4}}, "study")["launcher"]["nodes"] == 4
