"""One GPU per job: each job that uses CUDA holds devices of its own, chosen by lock files.

Without this every process sees every GPU and uses the first: `snakemake --resources gpu=4` on a
4-GPU node runs four jobs on GPU 0. A job here claims its devices before torch starts CUDA, by
taking an exclusive `flock` on one lock file per device (`<lock dir>/gpu<id>.lock`), and sets
`CUDA_VISIBLE_DEVICES` to them. The kernel drops a `flock` when the last descriptor of the file
closes, so a job that exits, crashes or is killed (SIGKILL included) frees its devices at once:
no stale lock to clean up.

Which devices, in order of precedence:

- `HSAT_GPU_IDS` ("0,1,2,3"): the pool, named explicitly (tests use it as a fake device list; a
  user may use it to lend the study some GPUs only, or on a machine without `nvidia-smi`);
- `CUDA_VISIBLE_DEVICES`, when set: the pool is those devices (a job takes some of them);
- else the GPUs `nvidia-smi -L` lists. None found: nothing happens (a CPU machine is untouched).

Under SLURM (`SLURM_JOB_ID` set) SLURM has already allocated the job's GPUs in
`CUDA_VISIBLE_DEVICES`: a job that asks for as many as it was given uses exactly those, with no
lock; several jobs inside one allocation (Snakemake run locally within `salloc --gpus 4`) share
its devices through locks scoped to that SLURM job, so never a device of another job.

Asking for more devices than the pool holds is an error at once; asking for more than are free
waits until enough are released (`HSAT_GPU_WAIT` seconds at most, unset: as long as it takes),
saying once on stderr what it waits for.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, MutableMapping

from hsat.errors import HSATError

__all__ = ["Claim", "claim", "claim_for_process", "gpu_pool", "lock_dir", "main"]

# Set in a process that holds its devices, so that an `hsat` it starts (torchrun's workers, a
# command run by `python -m hsat.gpus`) does not claim again.
HELD = "HSAT_GPUS_HELD"
POLL_S = 2.0


@dataclass
class Claim:
    """Devices held by this process while `fds` stay open (closing them, or exiting, frees them)."""

    devices: list[str]
    fds: list[int] = field(default_factory=list)

    def release(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _nvidia_smi_gpus() -> list[str]:
    """Indices of the GPUs `nvidia-smi -L` lists ("GPU 0: ..."); none without the tool."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=60, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [m.group(1) for m in re.finditer(r"^GPU (\d+):", out, re.M)]


def gpu_pool(env: Mapping[str, str] | None = None) -> list[str]:
    """The device ids a job may claim (module docstring: HSAT_GPU_IDS, CUDA_VISIBLE_DEVICES, nvidia-smi)."""
    env = os.environ if env is None else env
    if env.get("HSAT_GPU_IDS", "").strip():
        return _split(env["HSAT_GPU_IDS"])
    if "CUDA_VISIBLE_DEVICES" in env:
        # SLURM writes "NoDevFiles" (or nothing) for a job without GPUs.
        return [d for d in _split(env["CUDA_VISIBLE_DEVICES"]) if d != "NoDevFiles"]
    return _nvidia_smi_gpus()


def lock_dir(env: Mapping[str, str] | None = None) -> Path:
    """Where the lock files live: HSAT_GPU_LOCKS, else one folder per user in the temp dir; under
    SLURM a subfolder per SLURM job (its device ids mean its own devices, not another job's)."""
    env = os.environ if env is None else env
    base = Path(env.get("HSAT_GPU_LOCKS") or Path(tempfile.gettempdir()) / f"hsat-gpus-{os.getuid()}")
    job = env.get("SLURM_JOB_ID")
    return base / f"slurm-{job}" if job else base


def _try_lock(path: Path) -> int | None:
    """The locked descriptor of `path`, or None when another process holds it. Another user's
    lock file (in a shared HSAT_GPU_LOCKS) is locked read-only: flock needs no write access."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        writable = True
    except PermissionError:
        fd, writable = os.open(path, os.O_RDONLY), False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
            return None
        raise
    if writable:  # who holds it, for a person looking; the lock itself is the flock
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _holder(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip() or "?"
    except OSError:
        return "?"


def _lock_name(device: str) -> str:
    return "gpu" + re.sub(r"[^A-Za-z0-9_.-]", "_", device) + ".lock"


def claim(count: int, pool: list[str], locks: Path, wait: float | None = None) -> Claim:
    """Hold `count` devices of `pool` (the first free ones, in pool order) by their lock files in
    `locks`. Busy: retry every few seconds for `wait` seconds (None: until they are free; 0: fail
    at once) -- all or nothing, so two waiting jobs never each hold half of what they need."""
    if count < 1:
        raise HSATError(f"GPUs per job must be at least 1, got {count}")
    if count > len(pool):
        raise HSATError(f"a job asks for {count} GPU(s) but only {len(pool)} are visible "
                        f"({','.join(pool) or 'none'}; HSAT_GPU_IDS / CUDA_VISIBLE_DEVICES / nvidia-smi -L)")
    try:
        locks.mkdir(parents=True, exist_ok=True)
        return _claim(count, pool, locks, wait)
    except OSError as exc:
        raise HSATError(f"{locks}: cannot use the GPU lock files there ({exc.strerror}); "
                        "set HSAT_GPU_LOCKS to a folder you can write") from None


def _claim(count: int, pool: list[str], locks: Path, wait: float | None) -> Claim:
    deadline = None if wait is None else time.monotonic() + wait
    said = False
    while True:
        held: list[tuple[str, int]] = []
        for device in pool:
            fd = _try_lock(locks / _lock_name(device))
            if fd is not None:
                held.append((device, fd))
                if len(held) == count:
                    return Claim([d for d, _ in held], [f for _, f in held])
        for _, fd in held:
            os.close(fd)
        busy = ", ".join(f"{d} (pid {_holder(locks / _lock_name(d))})" for d in pool
                         if d not in {h for h, _ in held})
        if deadline is not None and time.monotonic() >= deadline:
            raise HSATError(f"no {count} free GPU(s) of {','.join(pool)} after {wait:g} s: busy {busy} "
                            f"(locks in {locks}; HSAT_GPU_WAIT sets how long to wait)")
        if not said:
            print(f"hsat: waiting for {count} free GPU(s) of {','.join(pool)}: busy {busy} (locks in {locks})",
                  file=sys.stderr, flush=True)
            said = True
        time.sleep(POLL_S if deadline is None else max(0.0, min(POLL_S, deadline - time.monotonic())))


def _wait_seconds(env: Mapping[str, str]) -> float | None:
    value = env.get("HSAT_GPU_WAIT", "").strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        raise HSATError(f"HSAT_GPU_WAIT: expected seconds, got {value!r}") from None
    if seconds < 0:
        raise HSATError(f"HSAT_GPU_WAIT: expected seconds >= 0, got {value!r}")
    return seconds


_HELD: list[Claim] = []  # this process's claim: open descriptors until the process exits


def claim_for_process(count: int, env: MutableMapping[str, str] | None = None) -> list[str] | None:
    """Give this process `count` GPUs of its own, before torch initialises CUDA: set
    CUDA_VISIBLE_DEVICES to them and hold their locks until the process exits. Returns the
    devices, or None where nothing was done: no GPU visible, count 0, a torchrun worker or a
    child of a process that already holds them, or a SLURM job using exactly what SLURM gave it."""
    env = os.environ if env is None else env
    if count < 1 or HELD in env or "LOCAL_RANK" in env or _HELD:
        return None
    pool = gpu_pool(env)
    if not pool:
        return None
    if env.get("SLURM_JOB_ID") and "CUDA_VISIBLE_DEVICES" in env and not env.get("HSAT_GPU_IDS"):
        if len(pool) < count:
            raise HSATError(f"a job asks for {count} GPU(s) but SLURM gave it {len(pool)} "
                            f"(CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']})")
        if len(pool) == count:
            env[HELD] = ",".join(pool)
            return None
    held = claim(count, pool, lock_dir(env), _wait_seconds(env))
    _HELD.append(held)
    env["CUDA_VISIBLE_DEVICES"] = env[HELD] = ",".join(held.devices)
    print(f"hsat: GPU {env[HELD]} for this job (pid {os.getpid()}, of {','.join(pool)})", file=sys.stderr, flush=True)
    return held.devices


def main(argv: list[str] | None = None) -> int:
    """`python -m hsat.gpus N COMMAND ...`: run COMMAND holding N GPUs of its own (a torchrun
    launcher takes its `nproc_per_node` this way). The command replaces this process and keeps
    the locks until it exits; N = 0 runs it unchanged."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] and args[0] == "--":
        args = args[1:]
    if len(args) < 2 or not args[0].isdigit():
        print("usage: python -m hsat.gpus N COMMAND [ARG ...]", file=sys.stderr)
        return 2
    count, command = int(args[0]), args[1:]
    if command[0] == "--":
        command = command[1:]
    try:
        claim_for_process(count)
    except HSATError as exc:
        print(f"hsat.gpus: error: {exc}", file=sys.stderr)
        return 2
    for held in _HELD:
        for fd in held.fds:
            os.set_inheritable(fd, True)
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        print(f"hsat.gpus: error: cannot run {command[0]!r}: {exc.strerror}", file=sys.stderr)
    return 127


if __name__ == "__main__":
    raise SystemExit(main())
