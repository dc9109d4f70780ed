"""What a workflow job asks of the machine that runs it: GPUs follow the configured device.

A job asks for GPUs only when its model is configured to run on CUDA (`device: cuda`). `auto` and
`cpu` ask for none: a CPU study never waits for, or is refused, a GPU it would not use, and the
scheduler (SLURM's `--gpus`, or Snakemake's own `--resources gpu=N` locally) sees exactly the
devices each job takes.
"""

from __future__ import annotations

from hsat.errors import HSATError

__all__ = ["job_gpus"]


def job_gpus(device: str, per_job: int = 1) -> int:
    """GPUs one job asks for: `per_job` (a pretraining's processes, or 1) on CUDA, else 0."""
    if device not in {"auto", "cpu", "cuda"}:
        raise HSATError(f"device: expected auto, cpu or cuda, got {device!r}")
    if per_job < 1:
        raise HSATError(f"GPUs per job must be at least 1, got {per_job}")
    return per_job if device == "cuda" else 0
