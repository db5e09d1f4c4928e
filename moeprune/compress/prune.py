"""Expert surgery: keep a subset of experts in every MoE layer, in place.

Slices the fused expert tensors, the router rows and every per-expert router bias, updates the cached
expert counts on the modules and in the config. Shared experts are never touched. Kept experts are
renumbered 0..n-1 in ascending order of their original index.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from moeprune.errors import MoePruneError
from moeprune.inputs import read_text
from moeprune.models import MoEAdapter

__all__ = ["KeepPlan", "validate_keep", "prune_experts", "prune_layer", "set_expert_count", "load_keep_file"]

KeepPlan = dict[int, list[int]]


class _Pairs(list):
    """A JSON object as its list of (key, value) pairs."""


def load_keep_file(path: str | Path) -> KeepPlan:
    """Read KEEP.json: {"<layer index>": [kept expert indices], ...}."""
    path = Path(path)
    text = read_text(path, what="keep file")
    try:
        pairs = json.loads(text, object_pairs_hook=_Pairs)  # keeps repeated keys visible
    except json.JSONDecodeError as exc:
        raise MoePruneError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(pairs, _Pairs):
        raise MoePruneError(f"{path}: expected an object mapping layer index to a list of kept experts")
    plan: KeepPlan = {}
    for key, value in pairs:
        try:
            layer = int(key)
        except ValueError:
            raise MoePruneError(f"{path}: key {key!r} is not a layer index (use e.g. \"0\")") from None
        if layer in plan:
            raise MoePruneError(f"{path}: layer {layer} is listed twice (key {key!r}); give each layer once")
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise MoePruneError(f"{path}: layer {layer} must map to a list of integer expert indices")
        plan[layer] = value
    return plan


def _check_groups(adapter: MoEAdapter, layer: int, kept: list[int], n_before: int, where: str) -> None:
    gate = adapter.spec.gate
    from moeprune.models.routing import group_routing_active

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
            raise MoePruneError(f"{where}: layer {layer.index} keeps {len(kept)} experts but the router picks "
                                f"top-k={adapter.top_k}; keep at least {adapter.top_k}")
        _check_groups(adapter, layer.index, kept, n, where)
        plan[layer.index] = sorted(kept)
    counts = {i: len(v) for i, v in plan.items()}
    if len(set(counts.values())) > 1:
        detail = ", ".join(f"{i}: {c}" for i, c in counts.items())
        raise MoePruneError(f"{where}: layers keep different numbers of experts ({detail}); the "
                            f"{adapter.spec.name} config stores one expert count for all layers, so keep the same "
                            "number in every layer")
    return plan


def _slice_tensor(root: nn.Module, path: str, idx: torch.Tensor, dim: int) -> None:
    *parents, name = path.split(".")
    module = root
    for part in parents:
        module = getattr(module, part)
    old = getattr(module, name)
    new = old.detach().index_select(dim, idx.to(old.device)).clone()
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(new, requires_grad=old.requires_grad))
    else:
        module._buffers[name] = new


def prune_layer(adapter: MoEAdapter, layer, kept: Sequence[int]) -> int:
    """Keep only `kept` (sorted) experts of one MoE layer, in place: expert tensors, router rows and biases,
    the modules' cached expert counts. The config is left to the caller. Returns the new count."""
    spec = adapter.spec
    n_before = layer.num_experts
    idx = torch.tensor(list(kept), dtype=torch.long)
    for name in spec.layout.tensors:
        _slice_tensor(layer.experts, name, idx, 0)
    for path, dim in spec.router_tensors:
        _slice_tensor(layer.block, path, idx, dim)
    n_after = len(idx)
    for module in (layer.block, layer.router, layer.experts):
        for attr in spec.count_attrs:
            if getattr(module, attr, None) == n_before:
                setattr(module, attr, n_after)
    return n_after


def set_expert_count(config, spec, n_after: int) -> None:
    """The config's expert-count keys after pruning."""
    for key in spec.num_experts_keys:
        if hasattr(config, key):
            setattr(config, key, n_after)


def prune_experts(model: nn.Module, keep: Mapping[int, Sequence[int]], *, where: str = "keep") -> KeepPlan:
    """Keep only the listed experts in every MoE layer of `model` (in place). Returns the sorted plan."""
    adapter = MoEAdapter(model)
    plan = validate_keep(adapter, keep, where=where)
    n_after = None
    for layer in adapter.layers:
        n_after = prune_layer(adapter, layer, plan[layer.index])
    set_expert_count(model.config, adapter.spec, n_after)
    return plan
