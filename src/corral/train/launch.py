"""`corral train --nproc-per-node N`: start this command again under torchrun.

    corral train cfg.yaml --nproc-per-node 2
    # runs: python -m torch.distributed.run --standalone --nproc-per-node 2 -m corral train cfg.yaml

torchrun (torch.distributed.run) starts the processes, sets RANK/LOCAL_RANK/WORLD_SIZE and the
rendezvous, shows every process's output, ends them all when one fails and prints which rank
failed and why. corral only builds its command line: nothing here is a launcher of its own.
"""

from __future__ import annotations

import argparse
import os
import sys

from corral.utils.distributed import under_launcher
from corral.utils.errors import CorralError

# Values torchrun's --nproc-per-node takes besides a number.
NPROC_WORDS = ("auto", "cpu", "gpu")


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    """The torchrun options `corral train` passes on (same names as torchrun's)."""
    group = parser.add_argument_group(
        "multi-process training (re-launches under torchrun; omit under an existing launcher)"
    )
    group.add_argument(
        "--nproc-per-node",
        metavar="N",
        help="processes on this machine: a number, or gpu (one per GPU), cpu, auto",
    )
    group.add_argument("--nnodes", type=int, default=1, help="machines taking part (default 1)")
    group.add_argument("--node-rank", type=int, default=0, help="this machine's index (0-based)")
    group.add_argument("--master-addr", help="address of the node-rank 0 machine")
    group.add_argument("--master-port", type=int, help="a free port on the master (29500)")


def wants_launch(args: argparse.Namespace) -> bool:
    """Whether the command line asks corral to start the processes itself."""
    if args.nnodes < 1 or not 0 <= args.node_rank < args.nnodes:
        raise CorralError(
            f"--nnodes {args.nnodes} --node-rank {args.node_rank}: give --nnodes of 1 or more "
            "and a --node-rank from 0 to nnodes - 1"
        )
    if args.master_port is not None and not 1 <= args.master_port <= 65535:
        raise CorralError(f"--master-port {args.master_port}: give a port from 1 to 65535")
    multi_node = args.nnodes > 1 or args.master_addr is not None or args.master_port is not None
    if args.nproc_per_node is None:
        if multi_node or args.node_rank != 0:
            raise CorralError(
                "--nnodes/--node-rank/--master-addr/--master-port need --nproc-per-node"
            )
        return False
    if under_launcher():
        raise CorralError(
            "--nproc-per-node was given but this process already runs under a launcher "
            f"(WORLD_SIZE={os.environ['WORLD_SIZE']}): drop the flag, the launcher sets the processes"
        )
    return True


def torchrun_command(args: argparse.Namespace, corral_args: list[str]) -> list[str]:
    """The torchrun command line that runs `corral <corral_args>` in every process."""
    nproc = args.nproc_per_node
    if not (nproc.isdigit() and int(nproc) > 0) and nproc not in NPROC_WORDS:
        raise CorralError(
            f"--nproc-per-node '{nproc}': give a positive number or one of {', '.join(NPROC_WORDS)}"
        )
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", nproc]
    if args.nnodes == 1 and args.master_addr is None:
        # one machine: a private rendezvous on a free port, so two runs never collide
        command.append("--standalone")
    else:
        if args.master_addr is None:
            raise CorralError("--nnodes above 1 needs --master-addr (the node-rank 0 machine)")
        command += [
            f"--nnodes={args.nnodes}",
            f"--node-rank={args.node_rank}",
            f"--master-addr={args.master_addr}",
            f"--master-port={args.master_port or 29500}",
        ]
    return [*command, "-m", "corral", *corral_args]


def relaunch(args: argparse.Namespace, corral_args: list[str]) -> None:
    """Replace this process with torchrun running `corral <corral_args>` (never returns)."""
    command = torchrun_command(args, corral_args)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)
