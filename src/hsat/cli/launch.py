"""`hsat launch`: run a verb as several processes per node, across the nodes of a SLURM job.

Its own module, not in `hsat.cli.train`: the pretrain stage's code version covers the modules
`hsat pretrain` imports, and how processes are started changes no result.
"""

from __future__ import annotations

import argparse
import os
import sys

from hsat.errors import HSATError


def _launch(args: argparse.Namespace) -> int:
    """Replace this process by the command that runs `hsat ARGV` over the SLURM allocation."""
    from hsat.cluster import first_host, launch_command, node_address, slurm_allocation

    argv = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not argv:
        raise HSATError("launch needs the hsat verb to run after `--` (e.g. hsat launch --nodes 2 -- pretrain ...)")
    env, host = dict(os.environ), None
    if args.nodes > 1:
        env = slurm_allocation(env)
        host = node_address(first_host(env["SLURM_JOB_NODELIST"]), env)
    cmd = launch_command(argv, args.nproc_per_node, args.nodes, env, host)
    print("hsat launch: " + " ".join(cmd), file=sys.stderr, flush=True)
    try:
        os.execvpe(cmd[0], cmd, env)
    except FileNotFoundError as exc:
        raise HSATError(f"{cmd[0]} is not on PATH: {exc}") from exc
    return 0  # not reached: exec replaced this process


def add_parsers(subparsers) -> None:
    p = subparsers.add_parser(
        "launch",
        help="run an hsat verb with several processes per node, across the nodes of a SLURM job",
        description="Start `hsat VERB ARGS` as --nproc-per-node processes on each of --nodes nodes. One node: "
        "torchrun --standalone (or hsat itself for one process). Several: inside a SLURM job of that many "
        "nodes, srun starts one torchrun per node, meeting at a c10d rendezvous on the job's first node at a "
        "port derived from the job id (the pretrain rule does this for launcher.nodes > 1).",
        epilog="example (inside `sbatch --nodes=2 --ntasks-per-node=1 --gpus-per-node=4`):\n"
        "  hsat launch --nodes 2 --nproc-per-node 4 -- pretrain --study config.yaml --model hsat --out runs/hsat",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--nodes", type=int, default=1, help="nodes of the SLURM job to span (default 1)")
    p.add_argument("--nproc-per-node", type=int, default=1, help="processes per node, one per GPU (default 1)")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- VERB ARGS",
                   help="the hsat verb to run and its arguments")
    p.set_defaults(func=_launch)
