"""One GPU per job, on the CPU: a fake device list (HSAT_GPU_IDS) and real lock files.

Holders are real processes (`python -m hsat.gpus N python -c ...`, the way a torchrun launcher
is started) that report their CUDA_VISIBLE_DEVICES and then hold it until their stdin closes, or
until they are killed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hsat.cli import build_parser, gpus_needed, main
from hsat.errors import HSATError
from hsat.gpus import claim, claim_for_process, lock_dir

REPO = Path(__file__).resolve().parents[1]
# Prints its devices, then holds them until stdin closes.
HOLD = "import os, sys; print(os.environ['CUDA_VISIBLE_DEVICES'], flush=True); sys.stdin.read()"


def _env(locks: Path, ids: str = "0,1,2,3", wait: str | None = "0") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in {"CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID", "LOCAL_RANK", "HSAT_GPUS_HELD", "HSAT_GPU_WAIT"}}
    env.update(HSAT_GPU_IDS=ids, HSAT_GPU_LOCKS=str(locks),
               PYTHONPATH=str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", ""))
    if wait is not None:
        env["HSAT_GPU_WAIT"] = wait
    return env


def _holder(env: dict[str, str], count: int = 1) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hsat.gpus", str(count), sys.executable, "-c", HOLD],
                            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _devices(proc: subprocess.Popen) -> list[str]:
    line = proc.stdout.readline().strip()
    assert line, proc.stderr.read()
    return line.split(",")


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.stdin.close()
            p.wait(timeout=60)


def test_concurrent_jobs_never_share_a_device_and_a_killed_one_frees_its_own(tmp_path):
    env = _env(tmp_path / "locks")
    holders = [_holder(env) for _ in range(4)]
    try:
        got = [_devices(p) for p in holders]
        assert sorted(d for devs in got for d in devs) == ["0", "1", "2", "3"]
        # A fifth job finds none free and, told not to wait, says so and which are busy.
        fifth = subprocess.run([sys.executable, "-m", "hsat.gpus", "1", "true"], env=env,
                               capture_output=True, text=True, timeout=120)
        assert fifth.returncode == 2 and "no 1 free GPU(s) of 0,1,2,3" in fifth.stderr, fifth.stderr
        # SIGKILL leaves no chance to clean up: the kernel drops the lock all the same.
        victim = holders.pop(2)
        victim.kill()
        victim.wait(timeout=60)
        heir = _holder(env)
        holders.append(heir)
        assert _devices(heir) == got[2]
    finally:
        _stop(holders)


# Marks its device in use with an exclusive create (fails if another job holds the same device),
# keeps it a moment, then clears it: a shared device makes some job exit 3.
USE = ("import os, sys, time; d = os.environ['CUDA_VISIBLE_DEVICES']; p = os.path.join(sys.argv[1], d)\n"
       "try:\n    open(p, 'x').close()\nexcept FileExistsError:\n    sys.exit(3)\n"
       "time.sleep(0.3); os.remove(p); print(d)")


def test_more_jobs_than_devices_take_turns_and_never_overlap(tmp_path):
    """Eight jobs on four devices, all started at once: the surplus waits its turn (no
    HSAT_GPU_WAIT), and no two ever hold a device together."""
    env = _env(tmp_path / "locks", wait=None)
    marks = tmp_path / "in_use"
    marks.mkdir()
    jobs = [subprocess.Popen([sys.executable, "-m", "hsat.gpus", "1", sys.executable, "-c", USE, str(marks)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(8)]
    results = [(j.wait(timeout=300), j.stdout.read().strip(), j.stderr.read()) for j in jobs]
    assert all(code == 0 for code, _, _ in results), results
    assert {device for _, device, _ in results} <= {"0", "1", "2", "3"}
    assert not any(marks.iterdir())


def test_a_torchrun_launcher_takes_its_processes_worth_of_devices(tmp_path):
    env = _env(tmp_path / "locks")
    holders = [_holder(env, count=2) for _ in range(2)]
    try:
        a, b = (_devices(p) for p in holders)
        assert len(a) == len(b) == 2 and sorted(a + b) == ["0", "1", "2", "3"]
    finally:
        _stop(holders)


def test_a_busy_device_is_waited_for(tmp_path):
    """With no limit on the wait (HSAT_GPU_WAIT unset) a job says what it waits for and starts
    as soon as the holder ends."""
    env = _env(tmp_path / "locks", ids="7", wait=None)
    holder = _holder(env)
    waiter = None
    try:
        assert _devices(holder) == ["7"]
        waiter = _holder(env)
        assert "waiting for 1 free GPU(s) of 7: busy 7" in waiter.stderr.readline()
        _stop([holder])
        assert _devices(waiter) == ["7"]
    finally:
        _stop([holder] + ([waiter] if waiter else []))


def test_asking_for_more_devices_than_exist_fails_at_once(tmp_path):
    with pytest.raises(HSATError, match="asks for 3 GPU.* only 2 are visible"):
        claim(3, ["0", "1"], tmp_path)
    held = claim(2, ["0", "1"], tmp_path)
    with pytest.raises(HSATError, match="no 1 free GPU"):
        claim(1, ["0", "1"], tmp_path, wait=0)
    held.release()
    assert claim(1, ["0", "1"], tmp_path, wait=0).devices == ["0"]


def test_under_slurm_a_job_uses_what_slurm_gave_it(tmp_path):
    env = {"SLURM_JOB_ID": "41", "CUDA_VISIBLE_DEVICES": "3", "HSAT_GPU_LOCKS": str(tmp_path)}
    assert claim_for_process(1, env) is None
    assert env["CUDA_VISIBLE_DEVICES"] == "3" and not any(tmp_path.iterdir())  # unchanged, no lock
    with pytest.raises(HSATError, match="SLURM gave it 1"):
        claim_for_process(2, {"SLURM_JOB_ID": "41", "CUDA_VISIBLE_DEVICES": "3", "HSAT_GPU_LOCKS": str(tmp_path)})
    # Several jobs inside one allocation share its devices by locks of that SLURM job only.
    assert lock_dir({"SLURM_JOB_ID": "41", "HSAT_GPU_LOCKS": str(tmp_path)}) == tmp_path / "slurm-41"
    shared = claim(1, ["0", "1"], lock_dir({"SLURM_JOB_ID": "41", "HSAT_GPU_LOCKS": str(tmp_path)}), wait=0)
    other_job = claim(1, ["0", "1"], lock_dir({"SLURM_JOB_ID": "42", "HSAT_GPU_LOCKS": str(tmp_path)}), wait=0)
    assert shared.devices == other_job.devices == ["0"]  # different jobs: their "0" is not the same GPU


def test_nothing_happens_without_gpus_or_inside_a_torchrun_worker(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi
    for env in ({}, {"CUDA_VISIBLE_DEVICES": ""}, {"CUDA_VISIBLE_DEVICES": "NoDevFiles", "SLURM_JOB_ID": "1"},
                {"HSAT_GPU_IDS": "0", "LOCAL_RANK": "1", "HSAT_GPU_LOCKS": str(tmp_path)}):
        before = dict(env)
        assert claim_for_process(1, env) is None
        assert env == before
    assert claim_for_process(0, {"HSAT_GPU_IDS": "0"}) is None


def test_gpu_verbs_claim_before_they_run(monkeypatch):
    parser = build_parser()
    common = ["--run", "r", "--manifest", "m", "--study", "s", "--out", "o"]
    assert gpus_needed(parser.parse_args(["embed", *common])) == 1
    assert gpus_needed(parser.parse_args(["evaluate", *common, "--embeddings", "e", "--model", "x"])) == 1
    assert gpus_needed(parser.parse_args(["mil", "--embeddings", "e", "--study", "s", "--model", "x", "--out", "o"])) == 0
    assert gpus_needed(parser.parse_args(["mil", "--embeddings", "e", "--study", "s", "--model", "x", "--out", "o",
                                          "--run", "r"])) == 1
    assert gpus_needed(parser.parse_args(["bench", "--json", "b.json"])) == 1
    assert gpus_needed(parser.parse_args(["report", "collect", "--out", "o", "a.csv"])) == 0
    assert gpus_needed(parser.parse_args(["plan"])) == 0
    asked = []

    def refuse(count):
        asked.append(count)
        raise HSATError("no GPU for you")

    monkeypatch.setattr("hsat.cli.claim_for_process", refuse)
    # The claim comes before any verb runs (the study file does not exist: a verb would fail on it).
    assert main(["embed", *common, "--then", "evaluate", *common, "--embeddings", "e", "--model", "x"]) == 2
    assert asked == [1]


@pytest.mark.slow
def test_workflow_wraps_torchrun_only_on_cuda(tmp_path):
    """A dry run of pretraining with two processes: on CUDA torchrun is started holding its two
    GPUs; on the CPU the command is unchanged."""
    from test_workflow import copy_workflow, snakemake

    wf = copy_workflow(tmp_path / "wf")
    (wf / "two.yaml").write_text(yaml.safe_dump({"launcher": {"nproc_per_node": 2}}), encoding="utf-8")
    (wf / "cuda.yaml").write_text(yaml.safe_dump({"pretrain": {"device": "cuda"}}), encoding="utf-8")
    for extra, want in (([], "torchrun --standalone"), (["cuda.yaml"], "python -m hsat.gpus 2 torchrun --standalone")):
        proc = snakemake("-n", "-p", "pretrain_all", "--configfile", "config/tiny.yaml", "two.yaml", *extra, cwd=wf)
        assert proc.returncode == 0, proc.stderr[-3000:]
        cmds = [line.strip() for line in (proc.stdout + proc.stderr).splitlines()
                if " pretrain --study" in line and "--live-dir" in line]  # training jobs (an imported encoder trains nothing)
        assert cmds and all(c.split("OMP_NUM_THREADS=1 ", 1)[1].startswith(want) for c in cmds), cmds


def test_an_unusable_lock_folder_is_named(tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("", encoding="utf-8")
    with pytest.raises(HSATError, match="not_a_folder.*cannot use the GPU lock files.*HSAT_GPU_LOCKS"):
        claim(1, ["0"], blocker / "locks")
