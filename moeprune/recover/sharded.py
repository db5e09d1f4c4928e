"""Sharded `moe_kd` under torchrun: the MoE blocks' training state split over the ranks by torch FSDP2.

Data-parallel recovery (recover/parallel.py) keeps every trained parameter's float32 master and gradient whole
on every rank; for full `moe_kd` on a 30 B model that is hundreds of GB per process. Here each MoE block is
replaced, for the training only, by a float32 copy of itself that `torch.distributed.fsdp.fully_shard` splits
over the ranks (fused expert tensors along the expert dimension): a rank keeps 1/N of every block's float32
parameters, of their gradients and (Adam running on the shards) of the two moments. FSDP2 gathers a block's
parameters in the model's dtype for its forward and backward (`MixedPrecisionPolicy(param_dtype=...)`) and
reduce-scatters its gradients in float32, summed (not averaged) over the ranks, so with each rank's loss
weighted by its rows' share of the batch's tokens (as in data-parallel), the step is one process's step: the
float32 master, its model-dtype copy for the forward, the float32 gradient, Adam.

The original blocks' parameters are released once their shards exist (the shards are then the only copy) and
refilled at the end from the gathered float32 values, cast back to the model's dtype; the model then holds its
own stock modules again, on every rank.
"""

from __future__ import annotations

import copy

import torch

__all__ = ["ShardedBlocks"]


class ShardedBlocks:
    """The model's MoE blocks swapped for FSDP2-sharded float32 training copies (see the module docstring).
    `trained`: {id(original parameter)} of what trains (moe_kd: every block parameter); use as a context manager
    or call `restore()` (every rank, at the same point: gathering is collective)."""

    def __init__(self, model, ctx, trained: set[int]):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        from moeprune.models import MoEAdapter

        names = {id(m): n for n, m in model.named_modules()}
        device = next(model.parameters()).device
        mesh = init_device_mesh(device.type, (ctx.world_size,))
        self.swaps: list[tuple[torch.nn.Module, str, torch.nn.Module, torch.nn.Module]] = []
        self.parameters: list[torch.nn.Parameter] = []  # the sharded float32 parameters that train
        try:
            for layer in MoEAdapter(model).layers:
                block = layer.block
                parent_name, _, attr = names[id(block)].rpartition(".")
                parent = model.get_submodule(parent_name)
                dtype = next(p.dtype for p in block.parameters() if p.is_floating_point())
                shard = copy.deepcopy(block)
                for (_, p), (_, q) in zip(block.named_parameters(), shard.named_parameters()):
                    q.data = q.data.float()
                    q.requires_grad_(id(p) in trained)
                shard.register_forward_hook(_own_outputs)  # before fully_shard: runs ahead of its post-forward
                fully_shard(shard, mesh=mesh, reshard_after_forward=True,
                            mp_policy=MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32))
                shard.set_gradient_divide_factor(1.0)  # each rank's loss is already its share of the batch mean
                shard.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no pre-scaled sum)
                for p in block.parameters():  # the shards are now the only copy
                    p.data = torch.empty(0, dtype=p.dtype, device=p.device)
                setattr(parent, attr, shard)
                self.swaps.append((parent, attr, block, shard))
                self.parameters += [q for q in shard.parameters() if q.requires_grad]
        except BaseException:
            self.restore(gather=False)
            raise

    def __enter__(self) -> "ShardedBlocks":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.restore(gather=exc_type is None)

    def restore(self, *, gather: bool = True) -> None:
        """Put the original blocks back, refilled with the trained values (gathered from every rank, in the
        model's dtype); with `gather=False` (after an error on this rank) the blocks go back unfilled, since the
        other ranks may not reach the gather: the run is failing and writes nothing."""
        while self.swaps:
            parent, attr, block, shard = self.swaps.pop(0)
            if gather:
                full = dict(shard.named_parameters())
                with torch.no_grad():
                    for name, p in block.named_parameters():
                        p.data = full[name].full_tensor().to(p.dtype)
            setattr(parent, attr, block)
        self.parameters = []


def _own_outputs(module, args, output):
    """A block's outputs that are views (a reshape of the routed sum) as tensors of their own: FSDP2 hooks its
    backward gathering onto the block's outputs, and an in-place op on a view (`x += y` in a decoder layer) would
    drop that hook silently."""
    def own(t):
        return t.clone() if isinstance(t, torch.Tensor) and t._base is not None else t

    if not isinstance(output, tuple):
        return own(output)
    items = [own(t) for t in output]
    return tuple(items) if type(output) is tuple else type(output)(*items)  # a named tuple keeps its type
