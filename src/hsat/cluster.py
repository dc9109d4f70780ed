"""What a workflow job asks of the machine that runs it, and how pretraining is started on it.

A job asks for GPUs only when its model is configured to run on CUDA (`device: cuda`). `auto` and
`cpu` ask for none: a CPU study never waits for, or is refused, a GPU it would not use, and the
scheduler (SLURM's `--gpus`, or Snakemake's own `--resources gpu=N` locally) sees exactly the
devices each job takes.

Pretraining runs as one process (`hsat`), as `launcher.nproc_per_node` processes on one machine
(`torchrun --standalone`: the rendezvous is local and its port picked by the system), or, with
`launcher.nodes` > 1, across the nodes of one SLURM allocation: `srun` starts one torchrun per
node and they meet at a c10d rendezvous on the allocation's first node, at a port derived from
the job id. Both come from the job's environment at run time, so nothing about the cluster is
written into the workflow, and two jobs sharing a node do not pick the same port (unless their ids
are a multiple of `PORT_SPAN` apart).
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Mapping, Sequence

from hsat.errors import HSATError

__all__ = [
    "job_gpus",
    "pretrain_resources",
    "launcher_prefix",
    "first_host",
    "node_address",
    "rendezvous_port",
    "slurm_allocation",
    "launch_command",
    "slurm_launch_command",
]

# Rendezvous ports: PORT_BASE + job id mod PORT_SPAN, below Linux's ephemeral range (32768-60999),
# where an outgoing connection could hold the port.
PORT_BASE = 15000
PORT_SPAN = 15000


def job_gpus(device: str, per_job: int = 1) -> int:
    """GPUs one job asks for: `per_job` (a pretraining's processes, or 1) on CUDA, else 0."""
    if device not in {"auto", "cpu", "cuda"}:
        raise HSATError(f"device: expected auto, cpu or cuda, got {device!r}")
    if per_job < 1:
        raise HSATError(f"GPUs per job must be at least 1, got {per_job}")
    return per_job if device == "cuda" else 0


def _check_launcher(nproc_per_node: int, nodes: int) -> None:
    for key, value in (("nproc_per_node", nproc_per_node), ("nodes", nodes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise HSATError(f"launcher.{key}: expected an integer of at least 1, got {value!r}")


def pretrain_resources(device: str, nproc_per_node: int = 1, nodes: int = 1) -> dict[str, int | str | None]:
    """The pretrain rule's Snakemake resources (None: not set), as the SLURM executor reads them.

    One node: `gpu` GPUs on it (`--gpus`), as every other GPU rule. Several nodes: one task per
    node (`--nodes`, `--ntasks`, `--ntasks-per-node=1`) with `nproc_per_node` GPUs on each
    (`--gpus-per-node`; `--gpus` counts per job, which SLURM may spread unevenly); `mpi` tells
    the executor that the job's own command starts its tasks with srun.
    """
    _check_launcher(nproc_per_node, nodes)
    gpus = job_gpus(device, nproc_per_node)
    if nodes == 1:
        return {"gpu": gpus, "nodes": 1, "tasks": None, "mpi": None, "slurm_extra": None}
    extra = "--ntasks-per-node=1" + (f" --gpus-per-node={gpus}" if gpus else "")
    return {"gpu": 0, "nodes": nodes, "tasks": nodes, "mpi": "srun", "slurm_extra": extra}


def launcher_prefix(nproc_per_node: int = 1, nodes: int = 1) -> str:
    """What the pretrain rule's command puts before `pretrain ...`.

    `hsat` for one process, torchrun for several on one node (both as they always were, so a
    study that does not span nodes reruns nothing), and `hsat launch` across nodes: what it runs
    depends on the allocation, so it is built inside the job (`launch_command`).
    """
    _check_launcher(nproc_per_node, nodes)
    if nodes > 1:
        return f"hsat launch --nodes {nodes} --nproc-per-node {nproc_per_node} --"
    if nproc_per_node > 1:
        return f"torchrun --standalone --nproc_per_node {nproc_per_node} -m hsat"
    return "hsat"


_RANGE = re.compile(r"\[([^\]]*)\]")


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list (`gpu[07-09,12],cpu1` -> `gpu07`), as `scontrol show
    hostnames` would list it first, without asking scontrol."""
    text = nodelist.strip()
    depth, end = 0, len(text)
    for i, ch in enumerate(text):
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            end = i
            break
    host = _RANGE.sub(lambda m: re.split(r"[-,]", m.group(1))[0], text[:end])
    if not host or not re.fullmatch(r"[A-Za-z0-9._-]+", host):
        raise HSATError(f"SLURM node list {nodelist!r}: cannot read its first host")
    return host


def rendezvous_port(job_id: str | int) -> int:
    """The c10d rendezvous port of a SLURM job: the same on every node of it, different for jobs
    whose ids differ by less than PORT_SPAN."""
    try:
        job = int(str(job_id).split("_")[0])  # an array task's id reads `123_4`
    except ValueError as exc:
        raise HSATError(f"SLURM_JOB_ID={job_id!r} is not a job id") from exc
    return PORT_BASE + job % PORT_SPAN


def _scontrol(args: Sequence[str], env: Mapping[str, str]) -> tuple[dict[str, str], str]:
    """The KEY=VALUE fields of a one-line `scontrol show ...` record, and what went wrong ('' if nothing)."""
    try:
        proc = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=60, env=dict(env))
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {}, str(exc)
    if proc.returncode != 0:
        return {}, (proc.stderr or proc.stdout).strip()[:300]
    return dict(re.findall(r"(\w+)=(\S*)", proc.stdout)), ""


def node_address(node: str, env: Mapping[str, str] | None = None) -> str:
    """Where the other nodes reach `node`: its NodeAddr as SLURM knows it (the node's name unless
    the cluster maps names to addresses), or the name itself when scontrol cannot say."""
    record, _ = _scontrol(["show", "node", "-o", node], os.environ if env is None else env)
    return record.get("NodeAddr") or node


def slurm_allocation(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with the allocation's node list and node count, asked of `scontrol show job` where the
    environment lacks them (the SLURM executor starts a job's command without SLURM's variables
    other than the job id)."""
    out = dict(env)
    job_id = out.get("SLURM_JOB_ID") or out.get("SLURM_JOBID")
    if not job_id:
        raise HSATError("launcher.nodes > 1 needs a SLURM allocation (SLURM_JOB_ID is not set): run the workflow "
                        "through the SLURM profile (docs/workflow.md, \"SLURM\"), or set launcher.nodes: 1")
    out["SLURM_JOB_ID"] = job_id
    out.setdefault("SLURM_JOB_NODELIST", out.get("SLURM_NODELIST", ""))
    out.setdefault("SLURM_JOB_NUM_NODES", out.get("SLURM_NNODES", ""))
    if out["SLURM_JOB_NODELIST"] and out["SLURM_JOB_NUM_NODES"]:
        return out
    record, problem = _scontrol(["show", "job", "-o", job_id], out)
    if not record.get("NodeList") or not record.get("NumNodes"):
        raise HSATError(f"scontrol show job {job_id} gives no node list: {problem or record}")
    out["SLURM_JOB_NODELIST"] = out["SLURM_JOB_NODELIST"] or record["NodeList"]
    out["SLURM_JOB_NUM_NODES"] = out["SLURM_JOB_NUM_NODES"] or record["NumNodes"].split("-")[0]
    return out


def launch_command(argv: Sequence[str], nproc_per_node: int = 1, nodes: int = 1,
                   env: Mapping[str, str] | None = None, host: str | None = None) -> list[str]:
    """The command that runs `hsat ARGV` with `nproc_per_node` processes on each of `nodes` nodes.

    One node: `launcher_prefix` + ARGV, nothing read from `env`. Several: srun, inside the SLURM
    allocation that `env` describes (`slurm_allocation`), starts one torchrun per node; they meet
    at a c10d rendezvous on the first node of SLURM_JOB_NODELIST (reached at `host`, by default
    that node's name; `node_address` asks SLURM), port `rendezvous_port`, id the job id. Each task
    gets the job's CPUs per task (SLURM_CPUS_PER_TASK, else OMP_NUM_THREADS, which the rule sets
    to the threads it asked SLURM for) and, by srun's default, all of the job's GPUs on its node.
    """
    _check_launcher(nproc_per_node, nodes)
    if nodes == 1:
        return [*launcher_prefix(nproc_per_node, 1).split(), *argv]
    return slurm_launch_command(argv, nproc_per_node, nodes, env, host)


def slurm_launch_command(argv: Sequence[str], nproc_per_node: int = 1, nodes: int = 1,
                         env: Mapping[str, str] | None = None, host: str | None = None) -> list[str]:
    """`launch_command`'s way across nodes, for any number of them (one: to try it on a one-node
    SLURM): srun, one torchrun per node, the c10d rendezvous from the job's environment."""
    _check_launcher(nproc_per_node, nodes)
    env = os.environ if env is None else env
    job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
    if not job_id or not env.get("SLURM_JOB_NODELIST"):
        raise HSATError("launcher.nodes > 1 needs a SLURM allocation (SLURM_JOB_ID and SLURM_JOB_NODELIST): run the "
                        "workflow through the SLURM profile (docs/workflow.md, \"SLURM\"), or set launcher.nodes: 1")
    allocated = env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES")
    if allocated and allocated.isdigit() and int(allocated) != nodes:
        raise HSATError(f"launcher.nodes is {nodes} but SLURM job {job_id} holds {allocated} node(s) "
                        f"({env['SLURM_JOB_NODELIST']}): submit it with --nodes={nodes}")
    cpus = env.get("SLURM_CPUS_PER_TASK") or env.get("OMP_NUM_THREADS")
    srun = ["srun", f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    if cpus and cpus.isdigit() and int(cpus) > 0:
        srun.append(f"--cpus-per-task={cpus}")
    torchrun = ["torchrun", f"--nnodes={nodes}", f"--nproc_per_node={nproc_per_node}", "--rdzv_backend=c10d",
                f"--rdzv_endpoint={host or first_host(env['SLURM_JOB_NODELIST'])}:{rendezvous_port(job_id)}",
                f"--rdzv_id={job_id}", "-m", "hsat"]
    return [*srun, *torchrun, *argv]
