"""The rules a keep plan must follow on an architecture ({MoE layer: kept expert indices}): every MoE layer
listed, indices in range and unique, at least top-k kept, equal counts per routing group, one count for all
layers (the config stores one); and the config keys that hold the expert count."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from moeprune.errors import MoePruneError
from moeprune.models.adapter import MoEAdapter
from moeprune.models.routing import group_routing_active

__all__ = ["KeepPlan", "validate_keep", "set_expert_count"]

KeepPlan = dict[int, list[int]]


def _check_groups(adapter: MoEAdapter, layer: int, kept: list[int], n_before: int, where: str) -> None:
    gate = adapter.spec.gate
    if gate is None or not group_routing_active(gate, adapter.config):
        return
    n_group, topk_group = (int(getattr(adapter.config, k)) for k in gate.group_keys)
    size = n_before // n_group
    counts = [sum(1 for j in kept if j // size == g) for g in range(n_group)]
    if len(set(counts)) != 1:
        raise MoePruneError(
            f"{where}: layer {layer} keeps {counts} experts per group; {adapter.spec.name} routes within "
            f"{n_group} groups of {size} experts (n_group={n_group}), so keep the same number in every group")
    per_group = counts[0]
    if gate.group == "top2sum" and per_group < 2:
        raise MoePruneError(
            f"{where}: layer {layer} keeps {per_group} expert per group; the group score sums each group's "
            "best two experts, so keep at least 2 per group")
    if size * topk_group < adapter.top_k:
        raise MoePruneError(
            f"{where}: {adapter.spec.name} routes each token to top-k={adapter.top_k} experts within topk_group="
            f"{topk_group} groups of {size} experts, fewer than top-k even with every expert kept; check the "
            "config's n_group, topk_group and top-k")
    if per_group * topk_group < adapter.top_k:
        raise MoePruneError(
            f"{where}: layer {layer} keeps {per_group} experts per group and tokens use topk_group={topk_group} "
            f"groups, fewer than top-k={adapter.top_k}; keep at least {-(-adapter.top_k // topk_group)} per group")


def validate_keep(adapter: MoEAdapter, keep: Mapping[int, Sequence[int]], *, where: str = "keep") -> KeepPlan:
    """Check a keep plan against the model; return it with sorted indices. Errors are one line."""
    moe = adapter.layer_indices
    listed = ", ".join(map(str, moe))
    for layer in keep:
        if layer not in moe:
            raise MoePruneError(f"{where}: layer {layer} is not an MoE layer (MoE layers: {listed})")
    plan: KeepPlan = {}
    for layer in adapter.layers:
        if layer.index not in keep:
            raise MoePruneError(f"{where}: layer {layer.index} is missing; list the kept experts of every MoE "
                                f"layer ({listed})")
        kept = list(keep[layer.index])
        n = layer.num_experts
        for j in kept:
            if not 0 <= j < n:
                raise MoePruneError(f"{where}: layer {layer.index} keeps expert {j}, but the layer has {n} experts "
                                    f"(valid 0..{n - 1})")
        dup = sorted({j for j in kept if kept.count(j) > 1})
        if dup:
            raise MoePruneError(f"{where}: layer {layer.index} lists expert {dup[0]} more than once")
        if len(kept) < adapter.top_k:
            if adapter.top_k > n:
                raise MoePruneError(f"{where}: layer {layer.index} has {n} experts but the router picks "
                                    f"top-k={adapter.top_k}; no keep plan can serve this router: check the config's "
                                    "top-k")
            raise MoePruneError(f"{where}: layer {layer.index} keeps {len(kept)} experts but the router picks "
                                f"top-k={adapter.top_k}; keep at least {adapter.top_k} (of its {n})")
        _check_groups(adapter, layer.index, kept, n, where)
        plan[layer.index] = sorted(kept)
    counts = {i: len(v) for i, v in plan.items()}
    if len(set(counts.values())) > 1:
        detail = ", ".join(f"{i}: {c}" for i, c in counts.items())
        raise MoePruneError(f"{where}: layers keep different numbers of experts ({detail}); the "
                            f"{adapter.spec.name} config stores one expert count for all layers, so keep the same "
                            "number in every layer")
    return plan


def set_expert_count(config, spec, n_after: int) -> None:
    """The config's expert-count keys after pruning."""
    for key in spec.num_experts_keys:
        if hasattr(config, key):
            setattr(config, key, n_after)
