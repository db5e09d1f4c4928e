"""Logit-KD recovery on several processes (`torchrun`): data-parallel training with sharded optimizer state.

Every rank holds the compressed model, the same training batches (rank 0's, broadcast: the text the original
model wrote included) and the teacher's targets. Each optimizer step takes one batch as one process would and
splits its rows round-robin over the ranks (rows rank, rank + world, ...); each rank's loss is its rows' KL sum
over the whole batch's token count, so the gradients summed over the ranks (one all-reduce per trained
tensor) are the one-process gradient of the batch mean. Adam's two moments are sharded over the ranks by
torch's `ZeroRedundancyOptimizer` (each rank updates its share of the float32 master tensors and broadcasts
them); masters and gradients stay whole on every rank. So N processes train each step's rows N times faster
and hold (4 + 4 + d + 8 / N) bytes per trained parameter instead of (16 + d) (the gradients are summed in
float32, which the master's float32 gradient then is).
"""

from __future__ import annotations

import resource

import torch

from moeprune import distributed

__all__ = ["DataParallel", "state_bytes"]


class DataParallel:
    """One rank's part in data-parallel recovery (`current()` is None in a single process)."""

    def __init__(self, ctx):
        self.ctx = ctx

    @classmethod
    def current(cls) -> "DataParallel | None":
        ctx = distributed.context()
        return cls(ctx) if ctx.enabled else None

    @property
    def world(self) -> int:
        return self.ctx.world_size

    def local(self, batch: dict, idx: torch.Tensor, logp: torch.Tensor, mask: torch.Tensor):
        """This rank's rows of a batch and of its targets, and the weight of their mean loss (their share of the
        batch's tokens); None when the batch has no row for this rank."""
        rows = slice(self.ctx.rank, None, self.world)
        local_mask = mask[rows]
        if local_mask.shape[0] == 0:
            return None
        weight = float(local_mask.sum()) / max(float(mask.sum()), 1.0)
        return {k: v[rows] for k, v in batch.items()}, idx[rows], logp[rows], local_mask, weight

    def reduce_gradients(self, grads, params) -> list[torch.Tensor]:
        """The gradients summed over the ranks in float32 (a bfloat16 sum would round each rank's share once more
        than one process rounds its gradient; a rank without rows contributes zeros)."""
        out = [torch.zeros_like(p, dtype=torch.float32) if g is None else g.float().contiguous()
               for g, p in zip(grads, params)]
        distributed.all_reduce_sum(out, self.ctx)
        return out

    def reduce_loss(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64)
        distributed.all_reduce_sum([t], self.ctx)
        return float(t.item())

    def optimizer(self, masters: list[torch.Tensor], lr: float):
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(masters, optimizer_class=torch.optim.Adam, lr=lr)

    def idle(self, batch: dict, idx: torch.Tensor, logp: torch.Tensor, mask: torch.Tensor):
        """A stand-in share for a rank without rows in a batch, where every rank must run the step's forward and
        backward (sharded training gathers each block collectively): the batch's first row at weight 0."""
        return {k: v[:1] for k, v in batch.items()}, idx[:1], logp[:1], mask[:1], 0.0

    def record(self, state: int, *, sharded: bool = False) -> dict:
        """What each rank held: trainable-state bytes (measured) and its peak resident memory."""
        optimizer = ("FSDP2 (fully_shard): MoE-block parameters, gradients and Adam's moments sharded over the ranks"
                     if sharded else "ZeroRedundancyOptimizer(Adam): moments sharded over the ranks")
        return {"processes": self.world, "mode": "sharded" if sharded else "data",
                "rows": "each batch's rows round-robin over the ranks", "optimizer": optimizer,
                "state_bytes_per_process": distributed.gather_ints(state, self.ctx),
                "peak_rss_bytes_per_process": distributed.gather_ints(_peak_rss(), self.ctx)}


def _peak_rss() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def state_bytes(masters: list[torch.Tensor], grads: list[torch.Tensor], opt) -> int:
    """Bytes this process holds for training, measured on the tensors: float32 masters and their gradients, the
    last step's gradients in the model's dtype, and the optimizer's state (this rank's share under ZeRO; of
    sharded parameters, this rank's shards)."""
    seen: dict[int, torch.Tensor] = {}  # holding each tensor counted, so that no id is reused while counting
    total = 0

    def add(t):
        nonlocal total
        if hasattr(t, "to_local"):  # a DTensor (sharded training): this rank's shard
            t = t.to_local()
        if isinstance(t, torch.Tensor) and id(t) not in seen and t.device.type != "meta":
            seen[id(t)] = t
            total += t.numel() * t.element_size()

    for m in masters:
        add(m)
        add(m.grad)
    for g in grads:
        add(g)
    inner = getattr(opt, "optim", opt)  # ZeroRedundancyOptimizer keeps this rank's Adam in .optim
    for per_param in inner.state.values():
        for v in per_param.values():
            if isinstance(v, torch.Tensor) and v.numel() > 1:
                add(v)
    return total
