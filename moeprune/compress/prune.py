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
from moeprune.models.keep import KeepPlan, set_expert_count, validate_keep

__all__ = ["prune_experts", "prune_layer", "load_keep_file"]

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


def prune_experts(model: nn.Module, keep: Mapping[int, Sequence[int]], *, where: str = "keep") -> KeepPlan:
    """Keep only the listed experts in every MoE layer of `model` (in place). Returns the sorted plan."""
    adapter = MoEAdapter(model)
    plan = validate_keep(adapter, keep, where=where)
    n_after = None
    for layer in adapter.layers:
        n_after = prune_layer(adapter, layer, plan[layer.index])
    set_expert_count(model.config, adapter.spec, n_after)
    return plan
