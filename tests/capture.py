"""Capture what a model's own MoE blocks compute, for comparison with the adapter's re-simulation."""

from __future__ import annotations

import torch

from moeprune.models import MoEAdapter


def capture_routing(adapter: MoEAdapter, input_ids: torch.Tensor) -> dict[int, dict]:
    """Per MoE layer: block input hidden (T, H), and the real gates as dense (T, E) and top-k index sets."""
    records: dict[int, dict] = {}
    handles = []
    for layer in adapter.layers:
        rec = records.setdefault(layer.index, {})

        def pre(_m, args, kwargs, rec=rec):
            h = args[0] if args else kwargs["hidden_states"]
            rec["hidden"] = h.reshape(-1, h.shape[-1]).detach().clone()

        handles.append(layer.block.register_forward_pre_hook(pre, with_kwargs=True))
        if adapter.spec.experts_call == "indexed":
            def exp_pre(_m, args, kwargs, rec=rec):
                idx = args[1] if len(args) > 1 else kwargs["top_k_index"]
                w = args[2] if len(args) > 2 else kwargs["top_k_weights"]
                rec["dense"] = torch.zeros(idx.shape[0], layer.num_experts).scatter(
                    1, idx.long(), w.float())
                rec["idx"] = idx
            handles.append(layer.experts.register_forward_pre_hook(exp_pre, with_kwargs=True))
        else:
            def router_hook(_m, _args, out, rec=rec):
                rec["dense"] = out[0].float().detach().clone()
            handles.append(layer.router.register_forward_hook(router_hook))
    try:
        with torch.no_grad():
            adapter.model(input_ids)
    finally:
        for h in handles:
            h.remove()
    return records


def dense_gates(weights: torch.Tensor, idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    return torch.zeros(idx.shape[0], num_experts).scatter(1, idx.long(), weights.float())

