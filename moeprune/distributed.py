"""Data-parallel calibration on torch.distributed.

Launched with `torchrun`, `accelerate launch` or Slurm's `srun torchrun`, every process sees RANK,
WORLD_SIZE and LOCAL_RANK (and MASTER_ADDR/MASTER_PORT). `context()` then joins the process group
(nccl on CUDA, gloo on CPU) once; without those variables it is a single process and nothing here
communicates. Each rank observes a deterministic, disjoint share of the calibration batches (`shard`:
batches rank, rank + world, ...), and `reduce_observations` combines the statistics with one all-reduce
per statistic (sums add, maxima max, as the `STATS` table says), so every rank ends with exactly what
one process would have computed. Rank 0 alone scores and writes (`is_main`).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch

from moeprune.errors import MoePruneError

__all__ = ["Context", "RankDone", "context", "launched", "shard", "reduce_observations", "broadcast_flag", "local_only",
           "is_main", "leave_unless_main", "finish", "broadcast_batches", "all_reduce_sum", "gather_ints",
           "launched_processes", "local_processes"]

_SOLO = {"on": False}


class RankDone(Exception):
    """Raised on ranks other than 0 once their share of the calibration is reduced: rank 0 alone scores
    and writes. The CLI ends such a rank with status 0 and no output; Python callers catch it (or test
    `is_main()` first)."""


def launched() -> bool:
    """True when a launcher (torchrun, accelerate launch, srun torchrun) started several processes."""
    return _env_int("WORLD_SIZE", 1) > 1


def launched_processes() -> int:
    """How many processes the launcher started (1 without one); joins no process group."""
    return max(_env_int("WORLD_SIZE", 1), 1)


def local_processes() -> int:
    """How many of the launcher's processes run on this machine (LOCAL_WORLD_SIZE; 1 without a launcher)."""
    return max(_env_int("LOCAL_WORLD_SIZE", 1), 1)


@dataclass(frozen=True)
class Context:
    """Where this process stands: rank, world size, local rank (its GPU), the collective backend."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        """The compute device of this rank: its own GPU when CUDA is there, else the CPU."""
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank if self.enabled else torch.cuda.current_device())
        return torch.device("cpu")

    @property
    def collective_device(self) -> torch.device | None:
        """Where tensors must be for the backend's collectives (nccl: the rank's GPU)."""
        return self.device if self.backend == "nccl" else None


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise MoePruneError(f"environment variable {name}={value!r} is not an integer; launch with torchrun "
                            "or accelerate launch, which set it") from None


def context() -> Context:
    """The distributed context from the launcher's environment; joins the process group on first use."""
    import torch.distributed as dist

    if _SOLO["on"]:
        return Context()
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return Context()
    local = _env_int("LOCAL_RANK", 0)
    if not dist.is_available():
        raise MoePruneError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return Context(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local,
                   backend=dist.get_backend())


def is_main() -> bool:
    """True on rank 0, and in a single process."""
    return context().is_main


def leave_unless_main(ctx: Context | None = None) -> None:
    """Raise `RankDone` on ranks other than 0 (nothing to do there after the reduction)."""
    if not (ctx or context()).is_main:
        raise RankDone


@contextmanager
def local_only():
    """Within the block, this process calibrates alone (no sharding, no collectives): for work that rank 0
    does by itself, such as the reconstruction search."""
    before = _SOLO["on"]
    _SOLO["on"] = True
    try:
        yield
    finally:
        _SOLO["on"] = before


def shard(batches: list, ctx: Context | None = None) -> list:
    """This rank's share of `batches`: a deterministic, disjoint round-robin (rank, rank + world, ...)."""
    ctx = ctx or context()
    return list(batches) if not ctx.enabled else list(batches)[ctx.rank::ctx.world_size]


def reduce_observations(obs, ctx: Context | None = None):
    """All-reduce the statistics and token count of `obs` (in place) so every rank holds the whole set's."""
    import torch.distributed as dist

    ctx = ctx or context()
    if not ctx.enabled:
        return obs
    dev = ctx.collective_device
    for i in sorted(obs.layers):
        obs.layers[i].all_reduce_(device=dev)
    tokens = torch.tensor([obs.num_tokens], dtype=torch.float64, device=dev)
    dist.all_reduce(tokens)
    obs.meta["num_tokens"] = int(tokens.item())
    obs.meta["distributed"] = {"world_size": ctx.world_size, "backend": ctx.backend,
                               "sharding": "batch i on rank i % world_size"}
    return obs


def broadcast_flag(flag: bool, ctx: Context | None = None) -> bool:
    """Rank 0's value of `flag` on every rank (e.g. whether rank 0 found the observations in its cache)."""
    import torch.distributed as dist

    ctx = ctx or context()
    if not ctx.enabled:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=ctx.collective_device)
    dist.broadcast(t, src=0)
    return bool(t.item())


# How long ranks wait for each other at a clean end: rank 0 may still be writing a large checkpoint.
FINISH_TIMEOUT = timedelta(hours=24)


def finish(wait: bool = False) -> None:
    """Leave the process group (a no-op in a single process).

    With `wait` (a command that ended cleanly) the ranks first wait for each other on a gloo group of their
    own, so that none tears its connections down while another still works: a rank that left while rank 0
    was writing its outputs was seen to abort in gloo ("terminate called without an active exception"), and
    torchrun then reports the job failed. After an error there is no wait: the rank leaves at once and
    torchrun stops the others."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if wait and dist.get_world_size() > 1:
            dist.barrier(group=dist.new_group(backend="gloo", timeout=FINISH_TIMEOUT))
    finally:
        dist.destroy_process_group()


def broadcast_batches(batches: list[dict], ctx: Context | None = None) -> list[dict]:
    """Rank 0's list of token batches ({"input_ids", "attention_mask"} integer tensors) on every rank: its count,
    each tensor's shape, then the tensors (no pickling)."""
    import torch.distributed as dist

    ctx = ctx or context()
    if not ctx.enabled:
        return batches
    dev = ctx.collective_device
    n = torch.tensor([len(batches)], dtype=torch.int64, device=dev)
    dist.broadcast(n, src=0)
    out = []
    for i in range(int(n.item())):
        mine = batches[i] if ctx.is_main else None
        shape = torch.tensor(list(mine["input_ids"].shape) if mine is not None else [0, 0], dtype=torch.int64,
                             device=dev)
        dist.broadcast(shape, src=0)
        batch = {}
        for key in ("input_ids", "attention_mask"):
            t = (mine[key].to(torch.int64) if mine is not None and key in mine
                 else torch.ones(*shape.tolist(), dtype=torch.int64))
            t = t.contiguous().to(dev) if dev is not None else t.contiguous()
            dist.broadcast(t, src=0)
            batch[key] = t.cpu()
        out.append(batch)
    return out


def all_reduce_sum(tensors: list[torch.Tensor], ctx: Context | None = None) -> None:
    """Sum `tensors` (in place) over the ranks."""
    import torch.distributed as dist

    ctx = ctx or context()
    if not ctx.enabled:
        return
    dev = ctx.collective_device
    for t in tensors:
        if dev is None or t.device == dev:
            dist.all_reduce(t)
        else:
            moved = t.to(dev)
            dist.all_reduce(moved)
            t.copy_(moved)


def gather_ints(value: int, ctx: Context | None = None) -> list[int]:
    """Every rank's `value`, in rank order (a single process: [value])."""
    import torch.distributed as dist

    ctx = ctx or context()
    if not ctx.enabled:
        return [int(value)]
    dev = ctx.collective_device
    mine = torch.tensor([int(value)], dtype=torch.int64, device=dev)
    every = [torch.zeros_like(mine) for _ in range(ctx.world_size)]
    dist.all_gather(every, mine)
    return [int(t.item()) for t in every]
