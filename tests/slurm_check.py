"""`make slurm-check`: the study through profiles/slurm on a real, throwaway, one-node SLURM.

Installs Debian's slurm-wlm and munge when missing (root, apt-get), writes a cluster of one node
with a CPU and a GPU partition (two GPUs declared as a generic resource over plain files, so GPU
requests are accepted and recorded), starts munged, slurmctld and slurmd, and runs a chain of the
tiny study (synth, prepare, one model's pretraining as a two-process gloo torchrun job, its
evaluation) with `--profile profiles/slurm` plus a site overlay made from
profiles/slurm/site.example.yaml, while the same chain runs locally. Then it checks, from SLURM's
own job records (`scontrol show job`): every job ran through sbatch, asked for its rule's threads
as CPUs, went to its partition and asked for no GPU (device cpu); the pretraining, cancelled after
its first checkpoint, was submitted again by the profile and resumed from it; every result file
equals the local run's, byte for byte. The GPU side: a dry run under `device: cuda` lists GPUs for
the GPU rules only, and the cluster accepts and records each such request (an sbatch with the
same partition, GPUs and CPUs). The launch that `launcher.nodes` > 1 uses (srun starting torchrun
with a c10d rendezvous read from the job's environment) runs the same pretraining once more in a
one-node job and must end byte-identical too; a cluster of several nodes is not tried.

Exit status 0: passed; 1: a check failed; 77: skipped (no root, no apt-get, a SLURM of the
machine's own, SLURM does not start), with the reason on a `SKIP:` line. Every daemon it starts is
stopped by its own process id; the config it writes to /etc/slurm is removed.
"""

from __future__ import annotations

import filecmp
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = ["Snakefile", "rules", "workflow", "config", "envs", "profiles"]
SKIP = 77
# Seconds the check may take once the cluster is up (10 minutes); the runs are stopped when it is spent.
BUDGET = float(os.environ.get("HSAT_SLURM_CHECK_BUDGET", 600))
MODEL = "hsat"
# The chain's study: the tiny one, pretraining as two gloo processes, long enough (and
# checkpointed often enough) that a job cancelled after its first checkpoint has steps left.
STUDY = {"launcher": {"nproc_per_node": 2, "nodes": 1},
         "pretrain": {"train": {"steps": 40, "checkpoint_every": 5, "log_every": 5}}}
RESULTS = "results/tiny"
COMPARED = ["manifest.csv", f"runs/{MODEL}/model.safetensors", f"embeddings/{MODEL}/features.safetensors",
            f"embeddings/{MODEL}/probe.safetensors", f"embeddings/{MODEL}/index.csv", f"whitebox/{MODEL}.csv",
            ]
TARGET = f"{RESULTS}/whitebox/{MODEL}.csv"  # the chain: synth, prepare, pretrain, evaluate


class Skip(Exception):
    """SLURM cannot be installed or started here: not a failure of the workflow."""


def log(msg: str) -> None:
    print(f"[slurm-check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd: list[str], *, check: bool = True, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return proc


# ---------------------------------------------------------------- install
def install() -> None:
    """slurm-wlm and munge from Debian's archive when any of their programs is missing."""
    needed = ["slurmctld", "slurmd", "sbatch", "squeue", "scancel", "munged"]
    if all(shutil.which(p) for p in needed):
        return
    if os.geteuid() != 0:
        raise Skip("SLURM is not installed and installing it needs root")
    if not shutil.which("apt-get"):
        raise Skip("SLURM is not installed and there is no apt-get to install it")
    log("installing slurm-wlm and munge (apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    lock = ["-o", "DPkg::Lock::Timeout=300"]
    for cmd in (["apt-get", *lock, "update", "-qq"],
                ["apt-get", *lock, "install", "-y", "-qq", "--no-install-recommends", "slurm-wlm", "munge"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=480)
        if proc.returncode != 0:
            raise Skip(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-500:]}")
    missing = [p for p in needed if not shutil.which(p)]
    if missing:
        raise Skip(f"after installing slurm-wlm and munge, still missing: {missing}")


def ensure_plugin() -> None:
    """The project's `slurm` extra in this Python."""
    try:
        import snakemake_executor_plugin_slurm  # noqa: F401
    except ImportError:
        log('installing the slurm extra (snakemake-executor-plugin-slurm)')
        extra = re.search(r'^slurm = \["([^"]+)"\]', (REPO / "pyproject.toml").read_text(encoding="utf-8"), re.M)
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", extra.group(1)],
                              capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise Skip(f"cannot install {extra.group(1)}: {proc.stderr.strip()[-500:]}")


# ---------------------------------------------------------------- the cluster
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_hardware() -> dict[str, int]:
    """CPUs, sockets, cores, threads and memory as slurmd itself reports them (`slurmd -C`)."""
    out = run(["slurmd", "-C"]).stdout
    fields = dict(re.findall(r"(\w+)=(\d+)", out))
    return {k: int(fields[k]) for k in ("CPUs", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore", "RealMemory")}


class Cluster:
    """munged + slurmctld + slurmd in `root`, stopped by their own process ids."""

    def __init__(self, root: Path):
        self.root = root
        self.procs: list[tuple[str, subprocess.Popen]] = []
        # The default path: the plugin runs each job's command under a nested srun with every
        # SLURM_* variable but the job's identity removed (SLURM_CONF too), so srun reads this one.
        self.conf = Path("/etc/slurm/slurm.conf")
        self.node = "hsatnode"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.written: list[Path] = []

    def write(self) -> dict[str, int]:
        hw = node_hardware()
        r = self.root
        for f in (self.conf, self.conf.with_name("gres.conf")):
            if f.exists():
                raise Skip(f"{f} exists: this machine has a SLURM of its own, which the check leaves alone")
        self.conf.parent.mkdir(parents=True, exist_ok=True)
        self.written = [self.conf, self.conf.with_name("gres.conf")]
        for d in ("state", "spool", "munge"):
            (r / d).mkdir(mode=0o700, exist_ok=True)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        host = socket.gethostname()
        self.conf.write_text(f"""\
ClusterName=hsatcheck
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r}/munge/munge.socket
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
# no accounting (as on many small clusters): squeue is the profile's status command
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc={r}/jobcomp.txt
# finished jobs stay in slurmctld's memory for the checks (and squeue sees them: MinJobAge >= 120 s)
MinJobAge=3600
GresTypes=gpu
NodeName={self.node} NodeHostname={host} NodeAddr=127.0.0.1 CPUs={hw['CPUs']} Sockets={hw['SocketsPerBoard']} \
CoresPerSocket={hw['CoresPerSocket']} ThreadsPerCore={hw['ThreadsPerCore']} RealMemory={hw['RealMemory']} Gres=gpu:2 State=UNKNOWN
PartitionName=cpu Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes={self.node} MaxTime=INFINITE State=UP
""", encoding="utf-8")
        # Two GPUs on paper: plain files stand for the device files (task/none binds no devices).
        (r / "dev").mkdir(exist_ok=True)
        for i in range(2):
            (r / "dev" / f"gpu{i}").touch()
        self.conf.with_name("gres.conf").write_text(f"AutoDetect=off\nNodeName={self.node} Name=gpu File={r}/dev/gpu[0-1]\n",
                                     encoding="utf-8")
        return hw

    def _start(self, name: str, cmd: list[str]) -> None:
        out = open(self.root / f"{name}.out", "w")
        self.procs.append((name, subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                                  start_new_session=True)))

    def start(self) -> None:
        m = self.root / "munge"
        self._start("munged", ["munged", "--foreground", "--force", f"--key-file={m}/munge.key",
                               f"--socket={m}/munge.socket", f"--pid-file={m}/munged.pid",
                               f"--log-file={m}/munged.log", f"--seed-file={m}/munged.seed"])
        self._wait(lambda: (m / "munge.socket").exists(), 20, "munged")
        self._start("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._wait(lambda: run(["scontrol", "ping"], check=False, env=self.env).stdout.count("UP") > 0, 60, "slurmctld")
        self._start("slurmd", ["slurmd", "-D", "-N", self.node, "-f", str(self.conf)])

        def idle() -> bool:
            state = run(["sinfo", "-h", "-n", self.node, "-o", "%t"], check=False, env=self.env).stdout.split()
            if state and state[0].startswith(("down", "drain")):
                run(["scontrol", "update", f"nodename={self.node}", "state=resume"], check=False, env=self.env)
            return bool(state) and state[0] in {"idle", "mix", "alloc"}

        self._wait(idle, 90, "slurmd (node idle)")

    def _wait(self, ready, seconds: float, what: str) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for name, p in self.procs:
                if p.poll() is not None:
                    raise Skip(f"{name} exited with {p.returncode}: {self.tail(name)}")
            if ready():
                return
            time.sleep(0.5)
        raise Skip(f"{what} did not come up within {seconds:.0f} s: {self.tail(what.split()[0])}")

    def tail(self, name: str) -> str:
        texts = []
        for f in (self.root / f"{name}.out", self.root / f"{name}.log", self.root / "munge" / f"{name}.log"):
            if f.is_file():
                texts.append(f.read_text(errors="replace")[-600:])
        return " | ".join(texts) or "(no log)"

    def stop(self) -> None:
        """Every daemon this run started, by its process id; first every job still on the
        cluster (after a failure), through SLURM, so that no job step outlives slurmd."""
        if self.procs and all(p.poll() is None for _, p in self.procs):
            jobs = run(["squeue", "-h", "-o", "%i"], check=False, env=self.env).stdout.split()
            if jobs:
                run(["scancel", *jobs], check=False, env=self.env)
                end = time.monotonic() + 30
                while time.monotonic() < end and run(["squeue", "-h", "-t", "R,CG", "-o", "%i"], check=False,
                                                      env=self.env).stdout.strip():
                    time.sleep(1)
        for name, p in reversed(self.procs):
            if p.poll() is None:
                os.kill(p.pid, signal.SIGTERM)
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.kill(p.pid, signal.SIGKILL)
                    p.wait(timeout=10)
            log(f"stopped {name} (pid {p.pid})")
        for f in self.written:
            f.unlink(missing_ok=True)


# ---------------------------------------------------------------- the workflow
def workflow_copy(dest: Path) -> Path:
    dest.mkdir(parents=True)
    for name in WORKFLOW:
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dest / name)
    shutil.copytree(REPO / "src" / "hsat", dest / "src" / "hsat", ignore=shutil.ignore_patterns("__pycache__"))
    (dest / "check.yaml").write_text(yaml.safe_dump(STUDY), encoding="utf-8")
    (dest / "cuda.yaml").write_text(yaml.safe_dump({**STUDY, "pretrain": {**STUDY["pretrain"], "device": "cuda"}}),
                                    encoding="utf-8")
    return dest


def site_overlay(wf: Path) -> Path:
    """profiles/slurm/site.example.yaml filled in for this cluster: no account (none exists), the
    partitions `cpu` and `gpu`, memory and run times that fit one small node, pretraining on two
    threads (so CPUs per job are seen to follow the threads), quick first status checks."""
    site = yaml.safe_load((REPO / "profiles/slurm/site.example.yaml").read_text(encoding="utf-8"))
    site["default-resources"] = {"slurm_partition": "cpu", "runtime": 10, "mem_mb": 200}
    for res in site["set-resources"].values():
        res.update(runtime=10, mem_mb=200)
    site["set-threads"] = {"pretrain": 2}
    site["slurm-no-account"] = True
    site["slurm-init-seconds-before-status-checks"] = 3
    path = wf / "profiles" / "slurm" / "site.yaml"
    path.write_text(yaml.safe_dump(site, sort_keys=False), encoding="utf-8")
    return path


def env_for(wf: Path, cluster: Cluster | None) -> dict:
    env = dict(cluster.env if cluster else os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(wf / "src")
    env["OMP_NUM_THREADS"] = "1"
    return env


def snakemake(wf: Path, *args: str, cluster: Cluster | None = None) -> subprocess.Popen:
    out = open(wf / f"snakemake-{int(time.time() * 1000)}.log", "w")
    cmd = [sys.executable, "-m", "snakemake", TARGET, *args, "--configfile", "config/tiny.yaml", "check.yaml"]
    proc = subprocess.Popen(cmd, cwd=wf, env=env_for(wf, cluster), stdout=out, stderr=subprocess.STDOUT, text=True)
    proc.logfile = Path(out.name)  # type: ignore[attr-defined]
    return proc


def same_result(local: Path, remote: Path, name: str) -> bool:
    """Byte-identical, except that a CSV may name files under its own run's folder (the
    embeddings' index holds absolute patch paths): that prefix is taken out of both."""
    a, b = local / RESULTS / name, remote / RESULTS / name
    if name.endswith(".csv"):
        return (a.read_text(encoding="utf-8").replace(f"{local}/", "")
                == b.read_text(encoding="utf-8").replace(f"{remote}/", ""))
    return filecmp.cmp(a, b, shallow=False)


def job_records(cluster: Cluster) -> dict[str, dict[str, str]]:
    """SLURM's own record of every job this cluster ran (`scontrol show job`: MinJobAge keeps
    finished jobs), by job id: state, partition, CPUs, and TresPerJob for GPU requests."""
    out = run(["scontrol", "show", "job", "-o"], env=cluster.env).stdout
    records = [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.splitlines() if line.startswith("JobId=")]
    return {r["JobId"]: r for r in records}


def cancel_pretraining_after_first_checkpoint(wf: Path, cluster: Cluster, proc: subprocess.Popen,
                                              deadline: float) -> str | None:
    """scancel the pretraining job as soon as its first checkpoint is on disk (and before its
    weights are): the profile must submit it again and it must resume. Returns the job id."""
    run_dir = wf / RESULTS / "runs" / MODEL
    submitted = re.compile(r"submitted with SLURM jobid (\d+) \(log: \S*/rule_pretrain/")
    while proc.poll() is None and time.monotonic() < deadline:
        if (run_dir / "model.safetensors").exists():
            return None
        if (run_dir / "checkpoint.pt").exists():
            ids = submitted.findall(proc.logfile.read_text(errors="replace"))
            if ids:
                run(["scancel", ids[-1]], env=cluster.env)
                log(f"cancelled the running pretraining job {ids[-1]} after its first checkpoint")
                return ids[-1]
        time.sleep(0.1)
    return None


# Inside a one-node job, the launch `hsat launch` builds for several nodes (srun, one torchrun per
# node, c10d rendezvous from the job's environment), with the environment the SLURM executor
# leaves a job's command (the job's identity only).
SRUN_WAY = """\
import os, sys
from hsat.cluster import first_host, node_address, slurm_allocation, slurm_launch_command
keep = {"SLURM_JOB_ID", "SLURM_JOBID", "SLURM_CLUSTER_NAME", "SLURM_SUBMIT_DIR", "SLURM_SUBMIT_HOST"}
env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SRUN_", "SBATCH_")) or k in keep}
env = slurm_allocation(env)
host = node_address(first_host(env["SLURM_JOB_NODELIST"]), env)
cmd = slurm_launch_command(sys.argv[2:], int(sys.argv[1]), 1, env, host)
print("launch: " + " ".join(cmd), flush=True)
os.execvpe(cmd[0], cmd, env)
"""


def srun_way_pretraining(local: Path, remote: Path, cluster: Cluster, seconds: float) -> list[str]:
    """The model's 2-process pretraining started the multi-node way inside one sbatch job of one
    node: it must meet at the rendezvous SLURM's records give (the node's address, the port of the
    job id) and end byte-identical to the local run. Returns the failures."""
    sys.path.insert(0, str(REPO / "src"))
    from hsat.cluster import rendezvous_port

    (remote / "srun_way.py").write_text(SRUN_WAY, encoding="utf-8")
    argv = ["pretrain", "--study", f"{RESULTS}/config.resolved.yaml", "--model", MODEL, "--manifest",
            f"{RESULTS}/manifest.csv", "--out", "srun-way/run", "--live-dir", "srun-way/live"]
    wrap = shlex.join(["env", "OMP_NUM_THREADS=2", sys.executable, "srun_way.py", "2", *argv])
    job = run(["sbatch", "--parsable", "-p", "cpu", "--nodes=1", "--ntasks=1", "--ntasks-per-node=1",
               "--cpus-per-task=2", "--mem=200", "-t", "10", "-J", "srun-way", "-o", str(remote / "srun-way.log"),
               "-D", str(remote), "--wrap", wrap], env=env_for(remote, cluster)).stdout.strip()
    end, state = time.monotonic() + seconds, ""
    while time.monotonic() < end:
        state = job_records(cluster).get(job, {}).get("JobState", "")
        if state in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}:
            break
        time.sleep(1)
    else:
        run(["scancel", job], check=False, env=cluster.env)
    text = (remote / "srun-way.log").read_text(errors="replace") if (remote / "srun-way.log").exists() else ""
    if state != "COMPLETED":
        return [f"the srun-way pretraining (job {job}) ended {state or 'not in time'}:\n{text[-2000:]}"]
    failures = []
    node = run(["scontrol", "show", "node", "-o", cluster.node], env=cluster.env).stdout
    addr = dict(re.findall(r"(\w+)=(\S*)", node))
    endpoint = f"--rdzv_endpoint={addr.get('NodeAddr')}:{rendezvous_port(job)} --rdzv_id={job} "
    if not re.search(r"^launch: srun --nodes=1 .*--cpus-per-task=2 torchrun --nnodes=1 --nproc_per_node=2 "
                     r"--rdzv_backend=c10d " + re.escape(endpoint), text, re.M):
        failures.append(f"the srun-way launch is not srun + torchrun at {endpoint.strip()}:\n{text[-1500:]}")
    weights = "model.safetensors"
    if not filecmp.cmp(local / RESULTS / "runs" / MODEL / weights, remote / "srun-way" / "run" / weights, shallow=False):
        failures.append("the srun-way pretraining's weights differ from the local run's")
    return failures


def main() -> int:
    started = time.monotonic()
    failures: list[str] = []
    # HSAT_SLURM_CHECK_KEEP=1 keeps the cluster's folder (logs, job records, both runs) for a look.
    keep = os.environ.get("HSAT_SLURM_CHECK_KEEP") == "1"
    tmp = Path(tempfile.mkdtemp(prefix="hsat-slurm-"))
    tmp.chmod(0o700)
    try:
        cluster = Cluster(tmp / "cluster")
        cluster.root.mkdir(mode=0o700)
        try:
            install()
            ensure_plugin()
            hw = cluster.write()
            cluster.start()
            log(f"cluster up: one node, {hw['CPUs']} CPUs, partitions cpu and gpu (2 GPUs declared)")
            started = time.monotonic()  # the budget is the check's, not the install's

            local = workflow_copy(tmp / "local")
            remote = workflow_copy(tmp / "slurm")
            site = site_overlay(remote)
            profile = ["--profile", "profiles/slurm", "--workflow-profile", str(site.relative_to(remote))]

            # The GPU side, first: a dry run under device cuda lists GPU requests for the GPU rules
            # only; the cluster accepts and records each distinct request.
            dry = subprocess.run([sys.executable, "-m", "snakemake", TARGET, "-n", *profile,
                                  "--configfile", "config/tiny.yaml", "cuda.yaml"],
                                 cwd=remote, env=env_for(remote, cluster), capture_output=True, text=True, timeout=300)
            if dry.returncode != 0:
                raise RuntimeError(f"dry run under cuda failed: {dry.stderr[-2000:]}")
            requests = set()
            for block in re.split(r"^rule ", dry.stdout + dry.stderr, flags=re.M)[1:]:
                name = block.split(":", 1)[0]
                if name.startswith("model_"):
                    continue
                res = dict(kv.split("=", 1) for kv in re.search(r"^\s+resources: (.*)$", block, re.M).group(1).split(", "))
                threads = int((re.search(r"^\s+threads: (\d+)$", block, re.M) or [0, 1])[1])
                gpus = int(res.get("gpu", 0))
                want = 2 if name == "pretrain" else 1 if name == "evaluate" else 0
                if gpus != want:
                    failures.append(f"cuda dry run: rule {name} asks for {gpus} GPUs, expected {want}")
                requests.add((name, res["slurm_partition"], gpus, threads))
            gpu_ids = []
            for name, partition, gpus, threads in sorted(requests):
                cmd = ["sbatch", "--parsable", "-p", partition, f"--cpus-per-task={threads}", "--nodes=1",
                       "--mem=100", "-t", "1", "-J", f"gpu-request-{name}", "-o", "/dev/null"]
                cmd += [f"--gpus={gpus}"] if gpus else ["--ntasks=1"]
                gpu_ids.append((name, gpus, run([*cmd, "--wrap", "true"], env=cluster.env).stdout.strip()))
            log(f"cuda dry run: GPU requests {sorted((n, g) for n, _, g, _ in requests)}; submitted each once")

            # The chain, locally and through SLURM at once (2-process gloo pretraining in both).
            log(f"running {TARGET} of the tiny study locally and through profiles/slurm")
            local_proc = snakemake(local, "--cores", "2")
            remote_proc = snakemake(remote, *profile, cluster=cluster)
            cancelled = cancel_pretraining_after_first_checkpoint(remote, cluster, remote_proc, started + BUDGET)
            for name, proc in (("local", local_proc), ("slurm", remote_proc)):
                try:
                    rc = proc.wait(timeout=max(60, BUDGET - (time.monotonic() - started)))
                except subprocess.TimeoutExpired:
                    proc.send_signal(signal.SIGINT)
                    proc.wait(timeout=60)
                    rc = "timeout"
                if rc != 0:
                    raise RuntimeError(f"the {name} run ended with {rc}:\n{proc.logfile.read_text()[-3000:]}")
            log_text = remote_proc.logfile.read_text()

            # Every job through sbatch, with its rule's threads as CPUs and no GPU (device cpu).
            by_id = job_records(cluster)
            records = list(by_id.values())
            submitted = re.findall(r"Job (\d+) has been submitted with SLURM jobid (\d+)", log_text)
            jobid_rule = {}
            for block in re.split(r"^rule ", log_text, flags=re.M)[1:]:
                m = re.search(r"^\s+jobid: (\d+)$", block, re.M)
                if m:
                    jobid_rule[m.group(1)] = block.split(":", 1)[0]
            expected = {"synth", "prepare", "pretrain", "evaluate"}
            ran = {jobid_rule.get(j) for j, _ in submitted}
            if not expected <= ran:
                failures.append(f"rules submitted through sbatch: {sorted(r for r in ran if r)}, expected {sorted(expected)}")
            local_rules = set(re.findall(r"^localrule (\w+):", log_text, re.M))
            if local_rules:
                failures.append(f"jobs that ran outside SLURM: {sorted(local_rules)}")
            for job, slurm_id in submitted:
                rule = jobid_rule.get(job, "?")
                rec = by_id.get(slurm_id)
                if rec is None:
                    failures.append(f"SLURM has no record of job {slurm_id} (rule {rule})")
                    continue
                want_cpus = 2 if rule == "pretrain" else 1
                if int(rec.get("NumCPUs", 0)) != want_cpus:
                    failures.append(f"job {slurm_id} (rule {rule}) had {rec.get('NumCPUs')} CPUs, its rule {want_cpus} threads")
                if "gpu" in rec.get("TresPerJob", "") or rec.get("Partition") != ("gpu" if rule in {"pretrain", "evaluate"} else "cpu"):
                    failures.append(f"job {slurm_id} (rule {rule}): partition {rec.get('Partition')}, GPUs {rec.get('TresPerJob')}")
            for name, gpus, slurm_id in gpu_ids:
                rec = by_id.get(slurm_id, {})
                if bool(gpus) != (rec.get("TresPerJob", "") == f"gres:gpu:{gpus}") or rec.get("JobState") != "COMPLETED":
                    failures.append(f"GPU request of rule {name} ({gpus}) not recorded: {rec}")

            # Preemption: the cancelled pretraining was submitted again and resumed.
            if cancelled is None:
                log("the pretraining finished before it could be cancelled: resume not exercised")
                failures.append("could not cancel the pretraining between its first checkpoint and its end")
            else:
                pretrain_log = (remote / RESULTS / "logs" / "pretrain" / f"{MODEL}.log").read_text(errors="replace")
                if by_id.get(cancelled, {}).get("JobState") != "CANCELLED":
                    failures.append(f"job {cancelled} is not recorded as cancelled: {by_id.get(cancelled)}")
                if not re.search(r"resuming \S+ from step [1-9]", pretrain_log):
                    failures.append(f"the resubmitted pretraining did not resume from its checkpoint:\n{pretrain_log[-1500:]}")

            # Results: byte-identical to the local run.
            same = [f for f in COMPARED if same_result(local, remote, f)]
            differ = sorted(set(COMPARED) - set(same))
            if differ:
                failures.append(f"files that differ from the local run: {differ}")
            log(f"{len(submitted)} jobs through sbatch ({len(records)} SLURM job records incl. the GPU requests); "
                f"{len(same)}/{len(COMPARED)} result files byte-identical to the local run "
                f"(2-process gloo pretraining{', cancelled once and resumed' if cancelled else ''})")

            # The launch across nodes (srun, one torchrun per node, c10d), tried on this one node.
            srun_failures = srun_way_pretraining(local, remote, cluster, max(300, BUDGET - (time.monotonic() - started)))
            failures += srun_failures
            log(f"srun + c10d launch (launcher.nodes > 1's way) on one node: "
                f"{'weights byte-identical to the local run' if not srun_failures else 'FAILED'}")
        except Skip as exc:
            print(f"SKIP: {exc}", flush=True)
            return SKIP
        except Exception as exc:  # a failed check or step: report and clean up
            failures.append(str(exc))
        finally:
            cluster.stop()
    finally:
        if keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    took = time.monotonic() - started
    if failures:
        for f in failures:
            print(f"FAIL: {f}", flush=True)
        print(f"slurm-check failed after {took:.0f} s", flush=True)
        return 1
    print(f"slurm-check passed in {took:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
