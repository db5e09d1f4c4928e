"""Selection by reconstruction: per layer, keep the expert subset whose routed output best matches the
full layer's on cached calibration inputs.

For layer inputs X (calibration tokens), every expert's output F_j = f_j(X) is computed once. For a
candidate set of experts to keep, the router is re-run with the dropped experts' logits at -inf
(exactly what the pruned model computes) and the routed output Z' = sum_k g_k F_{idx_k} is compared
with the full Z: error = ||Z - Z'||^2 in float64. All C(E, E-n) subsets are tried while that count is
within `budget`; beyond it a greedy search drops, one at a time, the expert whose removal raises the
error least. The progressive mode re-captures each layer's inputs with the earlier layers already
pruned (by routing masks, which equal pruning exactly).
"""

from __future__ import annotations

import itertools
import math

import torch
from tqdm.auto import tqdm

from moeprune.models import MoEAdapter, MoELayer
from moeprune.score.select import Selection, routing_groups

__all__ = ["reconstruct_select", "search_layers", "subset_chooser", "selection_from_search", "capture_layer_inputs",
           "masked_routing", "layer_error"]


class masked_routing:
    """Context manager: route the listed layers as if only `plan[layer]` experts existed."""

    def __init__(self, adapter: MoEAdapter, plan: dict[int, list[int]]):
        self.adapter, self.plan, self.handles = adapter, plan, []

    def _mask(self, layer: MoELayer) -> torch.Tensor:
        mask = torch.zeros(layer.num_experts, dtype=torch.bool)
        mask[self.plan[layer.index]] = True
        return mask

    def __enter__(self):
        for layer in self.adapter.layers:
            if layer.index not in self.plan:
                continue
            state = {}

            def pre(_m, args, kwargs, state=state):
                h = args[0] if args else kwargs["hidden_states"]
                state["h"] = h.reshape(-1, h.shape[-1])

            def route(layer=layer, state=state):
                logits = self.adapter.router_logits(layer, state["h"])
                return self.adapter.route(layer, logits, self._mask(layer).to(logits.device))

            self.handles.append(layer.block.register_forward_pre_hook(pre, with_kwargs=True))
            if self.adapter.spec.experts_call == "indexed":
                def exp_pre(_m, args, kwargs, route=route):
                    w, idx = route()
                    return (args[0], idx, w.to(args[0].dtype)), {}
                self.handles.append(layer.experts.register_forward_pre_hook(exp_pre, with_kwargs=True))
            else:
                def router_hook(_m, _a, out, route=route, layer=layer):
                    w, idx = route()
                    dense = torch.zeros_like(out[0]).scatter(1, idx, w.to(out[0].dtype))
                    return dense, out[1]
                self.handles.append(layer.router.register_forward_hook(router_hook))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def capture_layer_inputs(model, batches, layer_indices, *, max_tokens: int) -> dict[int, torch.Tensor]:
    """Inputs (T, H) of the listed MoE blocks for non-padding calibration tokens, at most `max_tokens`."""
    adapter = MoEAdapter(model)
    batches = getattr(batches, "batches", batches)  # a CalibrationSet or a list of batches
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in layer_indices}
    state = {"mask": None}
    handles = []
    for i in layer_indices:
        def pre(_m, args, kwargs, i=i):
            h = args[0] if args else kwargs["hidden_states"]
            h = h.reshape(-1, h.shape[-1])
            seen[i].append(h[state["mask"]].detach().float().cpu())
        handles.append(adapter.layer(i).block.register_forward_pre_hook(pre, with_kwargs=True))
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for b in batches:
                if sum(len(x) for x in seen[layer_indices[0]]) >= max_tokens:
                    break
                ids = b["input_ids"].to(device)
                mask = b.get("attention_mask")
                mask = torch.ones_like(ids) if mask is None else mask.to(device)
                state["mask"] = mask.reshape(-1).bool()
                model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {i: torch.cat(v)[:max_tokens] for i, v in seen.items()}


def layer_error(adapter: MoEAdapter, layer: MoELayer, logits: torch.Tensor, outs: torch.Tensor,
                full: torch.Tensor, keep: list[int]) -> float:
    """||Z - Z'||^2 for the routed output with only `keep` experts; outs (E, T, H), full Z (T, H)."""
    mask = torch.zeros(layer.num_experts, dtype=torch.bool)
    mask[keep] = True
    w, idx = adapter.route(layer, logits, mask)
    t = torch.arange(idx.shape[0]).unsqueeze(1)
    approx = (w.double().unsqueeze(-1) * outs[idx, t]).sum(1)
    return float(((full - approx) ** 2).sum())


def _layer_outputs(adapter, layer, x):
    with torch.no_grad():
        logits = adapter.router_logits(layer, x)
        outs = torch.stack([adapter.expert_forward(layer, j, x.to(layer.experts.down_proj.dtype)).double()
                            for j in range(layer.num_experts)])
    w, idx = adapter.route(layer, logits)
    full = (w.double().unsqueeze(-1) * outs[idx, torch.arange(idx.shape[0]).unsqueeze(1)]).sum(1)
    return logits, outs, full


def _valid(keep: tuple[int, ...], e: int, groups: int, protected: set[int]) -> bool:
    if not protected <= set(keep):
        return False
    if groups <= 1:
        return True
    size = e // groups
    counts = [sum(1 for j in keep if j // size == g) for g in range(groups)]
    return len(set(counts)) == 1


def _search(adapter, layer, x, n_keep: int, budget: int, groups: int, protected: set[int]):
    """Returns (kept experts, their error, "exact" | "greedy", per-expert error when dropped alone)."""
    logits, outs, full = _layer_outputs(adapter, layer, x)
    e = layer.num_experts
    err = lambda keep: layer_error(adapter, layer, logits, outs, full, list(keep))  # noqa: E731
    alone = [err([k for k in range(e) if k != j]) if e - 1 >= adapter.top_k else 0.0 for j in range(e)]
    if math.comb(e, n_keep) <= budget:
        cands = [k for k in itertools.combinations(range(e), n_keep) if _valid(k, e, groups, protected)]
        best = min(cands, key=err)
        return sorted(best), err(best), "exact", alone
    keep = list(range(e))
    size = e // max(groups, 1)
    in_group = lambda g: sum(1 for j in keep if j // size == g)  # noqa: E731
    while len(keep) > n_keep:
        fullest = max(in_group(g) for g in range(max(groups, 1)))
        droppable = [d for d in keep if d not in protected and (groups <= 1 or in_group(d // size) == fullest)]
        keep = min(([j for j in keep if j != d] for d in droppable), key=err)
    return sorted(keep), err(keep), "greedy", alone


def search_layers(model, batches, choose, *, max_tokens: int, progressive: bool = False,
                  progress: bool = True) -> dict[int, list[int]]:
    """For every MoE layer of a loaded model, `choose(adapter, layer, x)` -> kept experts, where x (T, H)
    holds the layer's calibration inputs (at most `max_tokens`). Progressive: each layer's inputs come
    from the model with the earlier layers already pruned (routing masks, equal to pruning)."""
    adapter = MoEAdapter(model)
    indices = adapter.layer_indices
    kept: dict[int, list[int]] = {}
    inputs = None if progressive else capture_layer_inputs(model, batches, indices, max_tokens=max_tokens)
    for i in tqdm(indices, desc="subset search", unit="layer", disable=not progress):
        if progressive:
            with masked_routing(adapter, kept):
                x = capture_layer_inputs(model, batches, [i], max_tokens=max_tokens)[i]
        else:
            x = inputs[i]
        kept[i] = choose(adapter, adapter.layer(i), x)
    return kept


def subset_chooser(*, n_keep: int, budget: int, groups: int, protected: dict[int, list[int]],
                   record: dict[int, dict]):
    """The `choose` of the reconstruction search; per-layer details go into `record`."""

    def choose(adapter, layer, x):
        keep, err, mode, alone = _search(adapter, layer, x, n_keep, budget, groups, set(protected.get(layer.index, [])))
        record[layer.index] = {"mode": mode, "error": err, "alone": alone}
        return keep

    return choose


def reconstruct_select(model, batches, *, n_keep: int, budget: int = 5000, progressive: bool = False,
                       max_tokens: int = 2048, protected: dict[int, list[int]] | None = None,
                       progress: bool = True) -> Selection:
    """Choose the kept experts of every layer by reconstruction error (see module docstring)."""
    adapter = MoEAdapter(model)
    groups = routing_groups(adapter, n_keep, "reconstruct")
    protected = protected or {}
    record: dict[int, dict] = {}
    choose = subset_chooser(n_keep=n_keep, budget=budget, groups=groups, protected=protected, record=record)
    kept = search_layers(model, batches, choose, max_tokens=max_tokens, progressive=progressive, progress=progress)
    return selection_from_search(adapter, kept, record, protected, progressive)


def selection_from_search(adapter, kept, record, protected, progressive: bool) -> Selection:
    dropped = {i: [j for j in range(adapter.layer(i).num_experts) if j not in k] for i, k in kept.items()}
    method = "reconstruct_progressive" if progressive else "reconstruct"
    return Selection(method=method, allocation="uniform", kept=kept, dropped=dropped, protected=protected,
                     scores={i: r["alone"] for i, r in record.items()})
