"""Training on several processes (GPUs or machines) with PyTorch's own launcher, torchrun.

`torchrun --nproc_per_node N -m bus_core train ...` starts N processes; each finds its place
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) in its environment. Without those
variables a run is a single process and nothing here changes it.

Every rank builds the same seeded, class-balanced epoch plan and trains on its shard of it
(`shard`: DistributedSampler's rule), so balancing holds over the whole epoch; evaluation sets
are split the same way and their logits gathered back in order (`gather_rows`), so every rank
computes the same metrics. Rank 0 alone writes progress, checkpoints and the model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DistributedSampler

from bus_core.errors import DeviceError
from bus_core.runtime.device import DeviceConfig

T = TypeVar("T")

TIMEOUT = datetime.timedelta(minutes=30)
"""How long a rank waits for the others (rank 0 alone makes the split and writes checkpoints
while they wait)."""


@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes of a run (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """True for the process that writes the run's files (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when the run has more than one process."""
        return self.world_size > 1

    @classmethod
    def from_env(cls) -> Ranks:
        """The place torchrun gave this process (RANK, WORLD_SIZE, LOCAL_RANK), or rank 0 of 1."""
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)),
                   int(env.get("LOCAL_RANK", 0)))


def launched() -> bool:
    """True inside a process started by torchrun (or another launcher setting WORLD_SIZE)."""
    return "WORLD_SIZE" in os.environ


def local_gpus(device_choice: str) -> int:
    """How many GPUs of this machine a run on the device `device_choice` can train on, one
    process each (0 when the choice is not a CUDA GPU or there is none)."""
    if device_choice not in ("auto", "cuda") or not torch.cuda.is_available():
        return 0
    return torch.cuda.device_count()


def torchrun_command(nproc_per_node: int, module_argv: Sequence[str]) -> list[str]:
    """The command that runs `python -m <module_argv>` as `nproc_per_node` processes of one
    run on this machine (torchrun, single node)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc_per_node}", "-m", *module_argv]


@contextlib.contextmanager
def process_group(ranks: Ranks, device: DeviceConfig) -> Iterator[DeviceConfig]:
    """The device of this process for the duration of a run: under torchrun, also joins the
    run's process group (NCCL on CUDA, gloo on the CPU), on the GPU of its LOCAL_RANK."""
    if not ranks.distributed:
        yield device
        return
    if device.device.type == "cuda":
        if ranks.local_rank >= torch.cuda.device_count():
            raise DeviceError(f"Process {ranks.local_rank} of this machine needs GPU "
                              f"#{ranks.local_rank}, but the machine has "
                              f"{torch.cuda.device_count()}: start fewer processes per node.")
        torch.cuda.set_device(ranks.local_rank)
        device = dataclasses.replace(device, device=torch.device("cuda", ranks.local_rank))
        backend = "nccl"
    elif device.device.type == "cpu":
        backend = "gloo"
    else:
        raise DeviceError("Training on several processes needs CUDA GPUs or the CPU; choose "
                          "the device 'cuda' or 'cpu'.")
    dist.init_process_group(backend, timeout=TIMEOUT)
    try:
        yield device
    finally:
        dist.destroy_process_group()


def shard(items: Sequence[T], ranks: Ranks) -> list[T]:
    """This rank's share of `items`: every world_size-th item from its rank on, padded by
    repeating the first items so that every rank has as many (DistributedSampler without
    shuffling: the items are already in their epoch's order)."""
    if not ranks.distributed:
        return list(items)
    sampler: DistributedSampler[int] = DistributedSampler(
        items, num_replicas=ranks.world_size,  # type: ignore[arg-type]
        rank=ranks.rank, shuffle=False)
    return [items[i] for i in sampler]


def broadcast(value: T | None, ranks: Ranks) -> T:
    """Rank 0's `value`, on every rank (the others pass None)."""
    if not ranks.distributed:
        return value  # type: ignore[return-value]
    box: list[T | None] = [value if ranks.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]  # type: ignore[return-value]


def gather_rows(part: np.ndarray, ranks: Ranks) -> np.ndarray:
    """The rows every rank computed for its items `all[rank::world_size]`, in the order of
    `all` (on every rank)."""
    if not ranks.distributed:
        return part
    parts: list[np.ndarray | None] = [None] * ranks.world_size
    dist.all_gather_object(parts, part)
    return interleave([p for p in parts if p is not None])


def interleave(parts: Sequence[np.ndarray]) -> np.ndarray:
    """Undo `all[rank::len(parts)]`: row i of the result is row i // n of part i % n."""
    total = sum(len(p) for p in parts)
    out = np.empty((total, *parts[0].shape[1:]), dtype=parts[0].dtype)
    for rank, part in enumerate(parts):
        if len(part):  # a rank with no items may hold an array of another width
            out[rank::len(parts)] = part
    return out


def sum_over_ranks(values: Sequence[float], ranks: Ranks, device: torch.device) -> list[float]:
    """Each of `values` summed over all ranks."""
    if not ranks.distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


@torch.no_grad()
def share_buffers(model: nn.Module, ranks: Ranks) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics), so that all ranks
    evaluate the weights rank 0 saves."""
    if ranks.distributed:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def rank_seed(seed: int, ranks: Ranks, epoch: int, step: int) -> int:
    """A seed for the random augmentations of a rank other than 0, distinct per rank and per
    point the run (re)starts from."""
    return int(np.random.SeedSequence([seed, ranks.rank, epoch, step]).generate_state(1)[0])
