"""From scores to the experts each layer keeps: uniform or global allocation, super-expert protection."""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field

import torch

from moeprune.errors import MoePruneError
from moeprune.models import MoEAdapter
from moeprune.models.routing import group_routing_active
from moeprune.observe.stats import Observations
from moeprune.score.scorers import score_layer

__all__ = ["Selection", "select_experts", "super_experts", "experts_to_keep", "routing_groups"]


@dataclass
class Selection:
    method: str
    allocation: str
    kept: dict[int, list[int]]
    dropped: dict[int, list[int]]
    protected: dict[int, list[int]] = field(default_factory=dict)
    never_routed: dict[int, list[int]] = field(default_factory=dict)
    scores: dict[int, list[float]] = field(default_factory=dict)

    @property
    def per_layer_counts(self) -> dict[int, int]:
        return {i: len(v) for i, v in self.kept.items()}

    def to_dict(self) -> dict:
        return asdict(self)


def experts_to_keep(num_experts: int, *, ratio: float | None = None, keep: int | None = None,
                    top_k: int, where: str = "ratio") -> int:
    """Experts kept per layer: E - floor(E * ratio), or `keep`; at least top-k."""
    if (ratio is None) == (keep is None):
        raise MoePruneError(f"{where}: give exactly one of ratio (fraction of experts to drop) or keep (experts to keep)")
    if ratio is not None:
        if not 0 < ratio < 1:
            raise MoePruneError(f"{where}: ratio must be in (0, 1), the fraction of experts to drop; got {ratio}")
        keep = num_experts - math.floor(num_experts * ratio)
    if top_k >= num_experts and keep < num_experts:
        raise MoePruneError(f"{where}: the model routes every token to top-k={top_k} of its {num_experts} experts, so "
                            "no expert can be pruned with this router (a layer keeps at least top-k experts); "
                            "check the config's top-k, or compress otherwise (e.g. moeprune quantize)")
    if not top_k <= keep <= num_experts:
        hint = (f" (a ratio of at most {(num_experts - top_k) / num_experts:.4g})"
                if ratio is not None and keep < top_k else "")
        raise MoePruneError(f"{where}: keeping {keep} of {num_experts} experts is invalid; keep between "
                            f"top-k={top_k} and {num_experts}{hint}")
    return keep


def super_experts(obs: Observations, num_layers: int) -> dict[int, list[int]]:
    """Experts whose max |output| is above the 99.5th percentile of all experts' maxima and above a
    tenth of the global max, in the first three quarters of the layers."""
    maxima = torch.cat([s.max_abs for s in obs.layers.values()])
    if maxima.numel() == 0 or float(maxima.max()) <= 0:
        return {}
    threshold = max(float(torch.quantile(maxima, 0.995)), 0.1 * float(maxima.max()))
    found = {}
    for i, s in obs.layers.items():
        if i < 0.75 * num_layers:
            hits = [j for j in range(s.num_experts) if float(s.max_abs[j]) > threshold]
            if hits:
                found[i] = hits
    return found


def _top(scores: torch.Tensor, candidates: list[int], n: int, protected: set[int]) -> list[int]:
    """The n best of `candidates`, protected experts first (ties broken by lower index)."""
    ranked = sorted(candidates, key=lambda j: (j not in protected, -float(scores[j]), j))
    return sorted(ranked[:n])


def _layer_keep(scores: torch.Tensor, n_keep: int, protected: set[int], groups: int) -> list[int]:
    e = scores.numel()
    if groups <= 1:
        return _top(scores, list(range(e)), n_keep, protected)
    size = e // groups
    per_group = n_keep // groups
    kept = []
    for g in range(groups):
        kept += _top(scores, list(range(g * size, (g + 1) * size)), per_group, protected)
    return sorted(kept)


def routing_groups(adapter: MoEAdapter, n_keep: int, where: str) -> int:
    gate = adapter.spec.gate
    if gate is None or not group_routing_active(gate, adapter.config):
        return 1
    n_group = int(getattr(adapter.config, gate.group_keys[0]))
    if n_keep % n_group:
        raise MoePruneError(f"{where}: {adapter.spec.name} routes within n_group={n_group} groups, so the experts "
                            f"kept per layer must be a multiple of {n_group}; {n_keep} is not")
    return n_group


def select_experts(obs: Observations, adapter: MoEAdapter, *, method: str, ratio: float | None = None,
                   keep: int | None = None, protect_super: bool = True, allocation: str = "uniform",
                   seed: int = 0, where: str = "selection") -> Selection:
    """Score every layer and choose the experts to keep."""
    if allocation not in ("uniform", "global"):
        raise MoePruneError(f"{where}: allocation must be 'uniform' or 'global', got {allocation!r}")
    e = adapter.num_experts
    n_keep = experts_to_keep(e, ratio=ratio, keep=keep, top_k=adapter.top_k, where=where)
    groups = routing_groups(adapter, n_keep, where)
    num_layers = int(getattr(adapter.config, "num_hidden_layers", max(obs.layers) + 1))
    protected = super_experts(obs, num_layers) if protect_super else {}
    scores = {i: score_layer(method, s, seed=seed, layer=i) for i, s in obs.layers.items()}
    _check_scores(scores, obs, method, where)
    never = {i: [j for j in range(s.num_experts) if s.count[j] == 0] for i, s in obs.layers.items()}
    never = {i: v for i, v in never.items() if v}
    if never:
        listed = "; ".join(f"layer {i}: {v}" for i, v in never.items())
        warnings.warn(f"experts never routed during calibration (scored lowest): {listed}", stacklevel=2)
    if allocation == "uniform":
        kept = {i: _layer_keep(scores[i], n_keep, set(protected.get(i, [])), groups) for i in scores}
    else:
        kept = _global_keep(scores, n_keep * len(scores), adapter.top_k, protected)
    dropped = {i: [j for j in range(obs.layers[i].num_experts) if j not in kept[i]] for i in kept}
    return Selection(method=method, allocation=allocation, kept=kept, dropped=dropped, protected=protected,
                     never_routed=never,
                     scores={i: [float(x) for x in s] for i, s in scores.items()})


def _check_scores(scores: dict[int, torch.Tensor], obs: Observations, method: str, where: str) -> None:
    """Refuse NaN and +-Inf scores; -inf is only allowed for experts never routed during calibration."""
    for i, s in scores.items():
        unrouted = obs.layers[i].count.to(s.device) == 0
        bad = ~torch.isfinite(s) & ~((s == float("-inf")) & unrouted)
        if bool(bad.any()):
            experts = bad.nonzero().flatten().tolist()
            raise MoePruneError(f"{where}: method {method!r} scored layer {i} non-finite (NaN/Inf) for experts "
                                f"{experts[:8]}; the observations or the model hold NaN/Inf values: observe again "
                                "from a model with finite weights")


def _global_keep(scores: dict[int, torch.Tensor], budget: int, top_k: int,
                 protected: dict[int, list[int]]) -> dict[int, list[int]]:
    """Rank experts across layers on their scores normalised by the layer's mean finite score; every
    layer keeps at least top-k and its protected experts."""
    kept = {i: set(protected.get(i, [])) for i in scores}
    normed = {}
    for i, s in scores.items():
        finite = s[torch.isfinite(s)]
        scale = float(finite.abs().mean()) if finite.numel() else 1.0
        normed[i] = s / (scale or 1.0)
        for j in _top(s, list(range(s.numel())), top_k, set()):
            kept[i].add(j)
    pool = sorted(((float(normed[i][j]), i, j) for i in scores for j in range(scores[i].numel())
                   if j not in kept[i]), reverse=True)
    remaining = budget - sum(len(v) for v in kept.values())
    for _, i, j in pool[:max(remaining, 0)]:
        kept[i].add(j)
    return {i: sorted(v) for i, v in kept.items()}
