"""Which process of a multi-process run this is, read from the launcher's environment.

torchrun (and `corral train --nproc-per-node`, accelerate and srun set-ups that export the same
variables) give every process RANK, LOCAL_RANK and WORLD_SIZE. These helpers read them without
importing torch, so the lower layers can decide what only one process does (write a file,
tokenise the data) before the Trainer creates the process group.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE")


def world_size() -> int:
    """How many processes train together (1 outside a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's rank among all processes (0 outside a launcher)."""
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's rank on its own machine (0 outside a launcher)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    """Whether this process writes the run's files and prints its log (rank 0)."""
    return rank() == 0


def is_local_main_process() -> bool:
    """Whether this process does the per-machine work, like tokenising into the local cache."""
    return local_rank() == 0


def under_launcher() -> bool:
    """Whether a launcher (torchrun, accelerate, srun with the torch variables) started us."""
    return "WORLD_SIZE" in os.environ


def wait_until(ready: Callable[[], bool], poll_seconds: float = 0.5) -> None:
    """Block until `ready()` holds, polling.

    Used instead of a barrier while another process does long work (tokenising a big
    dataset): a barrier fails after the process group's timeout, a poll does not, and when the
    other process fails its launcher ends this one.
    """
    while not ready():
        time.sleep(poll_seconds)


def record_error(exc: BaseException) -> None:
    """Write `exc` to torchrun's error file for this process, so the launcher's summary shows
    which rank failed and why (no-op outside torch.distributed.elastic)."""
    if not os.environ.get("TORCHELASTIC_ERROR_FILE"):
        return
    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

    ErrorHandler().record_exception(exc)


def end_process_group() -> None:
    """Destroy torch.distributed's process group, when this process has one, before exit.

    Called after a run that ended well on every rank. Left to the interpreter's exit, gloo's
    worker threads can still hold work when their C++ objects are torn down: std::terminate
    ("terminate called without an active exception"), SIGABRT, and torchrun reports a finished
    run as failed (seen once in a CI run of a 2-process ZeRO-3 run on the CPU; pytorch/pytorch
    #190489). Not called after an error: destroying the group while another rank still waits
    in a collective can hang.
    """
    import sys

    torch = sys.modules.get("torch")  # nothing to do in a process that never imported it
    if torch is None or not torch.distributed.is_available():
        return
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
