"""The processes of one command under ``torchrun``: their process group, each one's device, who speaks.

``torchrun --nproc-per-node P -m vdit_accel.cli.app COMMAND ...`` starts P processes with ``RANK``,
``LOCAL_RANK`` and ``WORLD_SIZE`` set. ``search`` splits its prompts over them; ``generate --ulysses P``
and ``bench pipeline --ulysses P`` run one generation (one step) on all of them, by Ulysses context
parallelism. There is no launcher of our own: torchrun is the one way to start them (its options --
``--standalone``, a rendezvous, several nodes -- stay the user's), and a command given ``--ulysses P``
without it says the torchrun line to run.
"""

from __future__ import annotations

import datetime
import os
import shlex
from dataclasses import dataclass

# The command line the app was given (set by the app's group at each call; tests call it with args).
ARGV: list[str] = []


@dataclass(frozen=True)
class Ranks:
    """This process among the command's: ``rank`` of ``world``, on ``device``."""

    rank: int = 0
    world: int = 1
    device: str | None = None

    @property
    def speaks(self) -> bool:
        """Whether this process prints and writes files (rank 0 only)."""
        return self.rank == 0


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_rank() -> int:
    """This process's rank as torchrun set it (0 alone), known before the process group is joined."""
    return int(os.environ.get("RANK", "0"))


def torchrun_command(nproc: int) -> str:
    """The command line to run this command on ``nproc`` processes."""
    return f"torchrun --nproc-per-node {nproc} -m vdit_accel.cli.app {shlex.join(ARGV)}"


def check_ulysses_world(degree: int) -> None:
    """``--ulysses degree`` needs exactly ``degree`` processes (1: none besides this one); a plain run
    under torchrun without it would run the whole command in every process, each writing the same files."""
    world = world_size()
    if degree < 1:
        raise ValueError(f"--ulysses must be >= 1, got {degree}")
    if degree > 1 and world != degree:
        started = "one process" if world == 1 else f"{world} processes"
        raise ValueError(f"--ulysses {degree} runs one process per GPU under torchrun, but {started} started; "
                         f"run: {torchrun_command(degree)}")
    if degree == 1 and world > 1:
        raise ValueError(f"{world} processes started (torchrun) without --ulysses: each would run the whole command; "
                         f"add --ulysses {world}, or run one process")


def init_ranks(device: str, timeout: datetime.timedelta | None = None) -> Ranks:
    """Join the process group of ``WORLD_SIZE`` processes (NCCL on CUDA, one GPU per ``LOCAL_RANK``;
    gloo on the CPU) unless joined or alone; this process's rank and device."""
    import torch
    import torch.distributed as dist

    world = world_size()
    if world == 1:
        return Ranks(device=device)
    cuda = device.startswith("cuda") and torch.cuda.is_available()
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        kwargs = {"timeout": timeout} if timeout is not None else {}
        dist.init_process_group("nccl" if cuda else "gloo", **kwargs)
    return Ranks(dist.get_rank(), dist.get_world_size(), device)


def leave() -> None:
    """Leave the process group, if joined."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
