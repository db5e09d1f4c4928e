"""Block-output recovery primitives: one MoE block at a time, on cached inputs of that block.

`router_kd_block` (arXiv 2603.02217, the layer-wise variant): for every MoE layer, the original block's
output Z = block(X) on the block's calibration inputs X is computed once, before surgery; after pruning
or merging, only that block's router parameters are trained so that the compressed block's output Z'
matches Z. Loss = ||Z - Z'||^2 / ||Z||^2 over a mini-batch of tokens (the relative squared error, so
the learning rate does not depend on the hidden states' scale). Each layer trains on its own inputs,
independently of the others, so the layer-wise executor and the in-memory one compute the same thing.

The gate-scale flag (e.g. `norm_topk_prob`) is set on the block's modules that copied it from the
config (transformers' routers keep `self.norm_topk_prob`), so the block's own forward measures both
choices exactly as a reloaded checkpoint with that config computes them.

`moe_kd_block` is the same objective training every parameter of the block (router, surviving experts,
shared experts), still one layer at a time on that layer's own inputs.
"""

from __future__ import annotations

import torch

__all__ = ["block_outputs", "relative_error", "layer_router_parameters", "layer_trainable_parameters", "fit_block",
           "set_gate_flag"]

CHUNK = 1024  # tokens per forward when computing outputs (memory bound, not a result)


def _forward(block, x: torch.Tensor) -> torch.Tensor:
    """The block's output (T, H) for inputs (T, H), in the block's dtype."""
    out = block(x.unsqueeze(0))  # (1, T, H): every MoE block here is token-wise
    out = out[0] if isinstance(out, tuple) else out
    return out.reshape(-1, x.shape[-1])


def _dtype_device(block) -> tuple[torch.dtype, torch.device]:
    p = next(p for p in block.parameters() if p.is_floating_point())
    return p.dtype, p.device


@torch.no_grad()
def block_outputs(block, x: torch.Tensor) -> torch.Tensor:
    """Outputs (T, H) of `block` for float inputs (T, H), computed in the block's dtype on its device and
    returned as float32 on the CPU."""
    dtype, dev = _dtype_device(block)
    outs = [_forward(block, x[s:s + CHUNK].to(dev, dtype)).float().cpu() for s in range(0, x.shape[0], CHUNK)]
    return torch.cat(outs) if outs else x.new_zeros(x.shape)


def relative_error(block, x: torch.Tensor, target: torch.Tensor) -> float:
    """||Z - block(X)||^2 / ||Z||^2 over all tokens, in float64."""
    out = block_outputs(block, x)
    num = float(((target.double() - out.double()) ** 2).sum())
    den = float((target.double() ** 2).sum())
    return num / max(den, 1e-30)


def layer_router_parameters(adapter, layer) -> dict[str, torch.nn.Parameter]:
    """path -> parameter for the layer's router tensors that are trainable parameters (ArchSpec.router_tensors;
    buffers such as DeepSeek-V3's correction bias are left out: they only pick experts, no gradient reaches them)."""
    out = {}
    for path, _dim in adapter.spec.router_tensors:
        t = adapter.tensor(layer, path)
        if isinstance(t, torch.nn.Parameter):
            out[path] = t
    return out


def layer_trainable_parameters(adapter, layer, trains: str) -> dict[str, torch.nn.Parameter]:
    """path within the block -> parameter of what a block method trains: "router" (layer_router_parameters)
    or "moe" (every parameter of the MoE block)."""
    if trains == "router":
        return layer_router_parameters(adapter, layer)
    return dict(layer.block.named_parameters())


def fit_block(block, params: dict[str, torch.nn.Parameter], x: torch.Tensor, target: torch.Tensor, *,
              steps: int, lr: float, batch_tokens: int, seed: int, layer: int | None = None
              ) -> tuple[list[float], list[str]]:
    """Train `params` (the block's router tensors, or all of its parameters) in place with Adam on float32
    master copies, so that block(x) matches `target`; x, target (T, H) float32. One mini-batch of
    `batch_tokens` tokens per step, drawn without replacement in a permutation seeded by `seed`. Returns the
    loss of every step and the names of the parameters that received a gradient (selection-only biases get
    none and stay as they are). A non-finite loss or trained tensor raises (recover.finite), naming `layer`."""
    from moeprune.recover.finite import check_loss, check_trained

    dtype, dev = _dtype_device(block)
    flags = {id(p): p.requires_grad for p in block.parameters()}
    masters = {k: p.detach().float().clone().requires_grad_(True) for k, p in params.items()}
    opt = torch.optim.Adam(list(masters.values()), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    losses, reached = [], set()
    n = x.shape[0]
    try:
        block.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
        for step in range(1, steps + 1):
            if len(order) < min(batch_tokens, n):
                order = torch.randperm(n, generator=gen).tolist()
            rows = torch.tensor(order[:batch_tokens], dtype=torch.long)
            del order[:batch_tokens]
            xb, zb = x[rows].to(dev, dtype), target[rows].to(dev)
            with torch.enable_grad():
                out = _forward(block, xb).float()
                loss = ((out - zb) ** 2).sum() / (zb ** 2).sum().clamp(min=1e-30)
                check_loss(float(loss.detach()), step=step, lr=lr, layer=layer)
                grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for (k, m), g in zip(masters.items(), grads):
                m.grad = None if g is None else g.float()
                if g is not None:
                    reached.add(k)
            opt.step()
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(masters[k].to(p.dtype))
            losses.append(float(loss.detach()))
    finally:
        for p in block.parameters():
            p.requires_grad_(flags.get(id(p), False))
    prefix = "" if layer is None else f"layer {layer}: "
    check_trained(((prefix + k, p) for k, p in params.items()), lr=lr, steps=steps)
    return losses, sorted(reached)


def set_gate_flag(block, key: str, value: bool) -> None:
    """Set the gate-scale flag `key` (a boolean config attribute, e.g. norm_topk_prob) on every module of
    `block` that keeps its own copy of it (the config itself is left to the caller, so that routing rules
    read from it elsewhere are not changed in the middle of a pass)."""
    found = False
    for module in block.modules():
        if key in vars(module):
            setattr(module, key, value)
            found = True
    if not found:
        from moeprune.errors import MoePruneError

        raise MoePruneError(f"recover.gate_scale: no module of the MoE block keeps {key!r}; this architecture's "
                            "gate scale cannot be switched here (use gate_scale: keep)")
