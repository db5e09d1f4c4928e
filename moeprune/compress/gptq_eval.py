"""Input-weighted output error of quantized weights on held-out tokens: ||W X - Wq X||^2 / ||W X||^2.

The error GPTQ minimises, measured on tokens it did not see. X are the inputs each quantized tensor receives in
the *unquantized* model (routed experts: the rows routed to each expert; down: their intermediate
activations), gathered once as Gram matrices G = X^T X (the Hessian accumulators of `gptq`), so that
||(W - Wq) X^T||^2 = tr(D G D^T) with D = W - Wq. Never judge GPTQ by the weight distance ||W - Wq||: it moves
weights further than round-to-nearest while lowering this error.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["heldout_grams", "output_errors", "layer_means"]


def heldout_grams(model: nn.Module, batches: list[dict]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{tensor name: (G, rows)} for every quantized linear (G (in, in)) and routed-expert tensor
    (G (E, in, in), rows (E,)) of `model` (left unchanged), from the token batches."""
    from moeprune.compress.gptq import HessianSet, _capture_inputs, _run_layer
    from moeprune.compress.quantize_plan import quant_targets
    from moeprune.models import MoEAdapter
    from moeprune.models.adapter import _get_path

    adapter = MoEAdapter(model)
    spec = adapter.spec
    layers = _get_path(model, spec.layers)
    modules = dict(model.named_modules())
    names = [n for n, _ in quant_targets(model, adapter).linears]
    moe = {layer.index: layer for layer in adapter.layers}
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    with torch.no_grad():
        inputs = _capture_inputs(model, layers, batches)
        for index, layer in enumerate(layers):
            prefix = f"{spec.layers}.{index}."
            linears = {n: modules[n] for n in names if n.startswith(prefix)}
            hs = HessianSet(adapter, prefix, linears, moe.get(index)).accumulate(layer, index, inputs)
            for n, acc in hs.acc.items():
                out[n] = (acc.sum, acc.rows)
            if index in moe:
                base = f"{prefix}{spec.block}.{spec.experts}."
                lay = spec.layout
                out[base + lay.gate_up] = (hs.expert_acc["gate_up"].sum, hs.expert_acc["gate_up"].rows)
                out[base + lay.down] = (hs.expert_acc["down"].sum, hs.expert_acc["down"].rows)
            for batch in inputs:
                batch["hidden"] = _run_layer(layer, index, batch).detach()
    return out


def _oriented(model: nn.Module, name: str) -> torch.Tensor:
    """The weight as (out, in), or (E, out, in) for a fused expert tensor."""
    from moeprune.models import MoEAdapter

    obj = model
    for part in name.split("."):
        obj = getattr(obj, part)
    if isinstance(obj, nn.Linear):
        return obj.weight.detach()
    t = obj.detach()
    return t.transpose(-1, -2) if MoEAdapter(model).spec.layout.transposed else t


def output_errors(base: nn.Module, quantized: nn.Module, grams: dict) -> dict[str, float]:
    """{tensor name: ||(W - Wq) X^T||^2 / ||W X^T||^2} (experts pooled over their routed rows)."""
    out = {}
    for name, (g, _rows) in grams.items():
        w = _oriented(base, name).double()
        d = w - _oriented(quantized, name).double()
        g = g.double()
        num = torch.einsum("...oi,...ij,...oj->", d, g, d)
        den = torch.einsum("...oi,...ij,...oj->", w, g, w)
        out[name] = float(num / den) if float(den) > 0 else 0.0
    return out


def layer_means(errors: dict[str, float], layers_prefix: str) -> dict[int, float]:
    """{decoder layer: mean of its tensors' errors} (each linear and each fused expert tensor counts once)."""
    groups: dict[int, list[float]] = {}
    for name, e in errors.items():
        head = name[len(layers_prefix) + 1:].split(".", 1)[0] if name.startswith(layers_prefix + ".") else ""
        if head.isdigit():
            groups.setdefault(int(head), []).append(e)
    return {i: sum(v) / len(v) for i, v in sorted(groups.items())}
