"""Expert merging that really shrinks the checkpoint.

A merge plan lists, per MoE layer, clusters of experts; the first member of each cluster is its
representative ("dominant"). Merging writes the usage-frequency-weighted average of the members'
weights (optionally after aligning their intermediate neurons to the dominant) into the dominant's
slot, sets the dominant's router row (and router biases) by the chosen rule, then prunes every other
member: the saved model has one expert and one router row per cluster.

Methods:
- HC-SMoE: features = each expert's mean output over calibration tokens (E, H); agglomerative
  clustering (average linkage by default; single / complete / ward) to the target count; plain
  frequency-weighted average.
- M-SMoE: similarity = cosine of router-logit columns; dominant experts = the most used per layer;
  every other expert joins its most similar dominant; members' neurons are aligned to the dominant
  (Hungarian matching on weights) before the frequency-weighted average.
- REAM: centroids = the n_keep most REAP-salient experts; similarity = REAM's mean over calibration
  tokens of (cos(f_i(x), f_j(x)) + 1) / 2, averaged with the router-logit-column similarity; every
  other expert joins its most similar centroid (or, with group_size C > 0, REAM's pseudo-pruning: each
  centroid in saliency order takes its C - 1 most similar unassigned experts); neurons aligned to the
  centroid; members averaged with REAP-saliency weights.
Group-limited routers (n_group) are clustered within each group, the same count per group.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from moeprune.compress.experts_view import ExpertWeights, read_expert, write_expert
from moeprune.compress.prune import prune_experts
from moeprune.errors import MoePruneError
from moeprune.models import MoEAdapter

__all__ = ["METHOD_NEEDS", "plan_merge", "MergePlan", "hc_smoe_clusters", "m_smoe_clusters", "ream_clusters",
           "ream_similarity", "align_to", "merge_weights", "apply_merge",
           "merge_layer", "LINKAGES", "ROUTER_RULES"]

LINKAGES = ("average", "single", "complete", "ward")
ROUTER_RULES = ("dominant", "weighted")


@dataclass
class MergePlan:
    method: str
    clusters: dict[int, list[list[int]]]  # layer -> clusters; cluster[0] is the representative
    options: dict = field(default_factory=dict)

    @property
    def kept(self) -> dict[int, list[int]]:
        return {i: sorted(c[0] for c in cl) for i, cl in self.clusters.items()}

    def to_dict(self) -> dict:
        return asdict(self)


def _group_slices(num_experts: int, groups: int) -> list[list[int]]:
    size = num_experts // groups
    return [list(range(g * size, (g + 1) * size)) for g in range(groups)]


def _order_cluster(members: list[int], freq: torch.Tensor) -> list[int]:
    """Most used member first (the representative), then by index."""
    return sorted(members, key=lambda j: (-float(freq[j]), j))


def hc_smoe_clusters(features: torch.Tensor, freq: torch.Tensor, n_keep: int, *, linkage: str = "average",
                     groups: int = 1) -> list[list[int]]:
    """Agglomerative clustering of expert features (E, H) into exactly `n_keep` clusters."""
    from sklearn.cluster import AgglomerativeClustering

    if linkage not in LINKAGES:
        raise MoePruneError(f"merge.linkage: unknown linkage {linkage!r}; allowed: {', '.join(LINKAGES)}")
    clusters = []
    for members in _group_slices(features.shape[0], groups):
        k = n_keep // groups
        x = features[members].double().numpy()
        if k >= len(members):
            labels = np.arange(len(members))
        else:
            labels = AgglomerativeClustering(n_clusters=k, linkage=linkage).fit_predict(x)
        for c in range(int(labels.max()) + 1):
            clusters.append(_order_cluster([members[i] for i in np.flatnonzero(labels == c)], freq))
    return sorted(clusters, key=lambda c: c[0])


def m_smoe_clusters(similarity: torch.Tensor, freq: torch.Tensor, n_keep: int, *, groups: int = 1) -> list[list[int]]:
    """The `n_keep` most used experts lead; every other expert joins its most similar leader."""
    clusters = []
    for members in _group_slices(similarity.shape[0], groups):
        k = n_keep // groups
        leaders = sorted(members, key=lambda j: (-float(freq[j]), j))[:k]
        groups_of = {d: [d] for d in leaders}
        for j in members:
            if j not in groups_of:
                best = max(leaders, key=lambda d: (float(similarity[j, d]), -d))
                groups_of[best].append(j)
        clusters += [groups_of[d] for d in leaders]
    return sorted(clusters, key=lambda c: c[0])


def ream_similarity(stats) -> torch.Tensor:
    """REAM's expert similarity in [0, 1] (E, E): output similarity averaged with the gate similarity
    1 - d_ij / max d, d_ij the distance of the normalised router-logit columns (sqrt(2 - 2 cos))."""
    sim = stats.output_similarity
    if stats.logit_gram is not None:
        d = (2 - 2 * stats.logit_cosine).clamp(min=0).sqrt()
        sim = (sim + 1 - d / d.max().clamp(min=1e-30)) / 2
    return sim


def ream_clusters(similarity: torch.Tensor, saliency: torch.Tensor, n_keep: int, *, groups: int = 1,
                  group_size: int = 0) -> list[list[int]]:
    """The `n_keep` most salient experts are centroids; the others join their most similar centroid
    (group_size 0) or REAM's pseudo-pruning groups of at most `group_size` (group_size > 0)."""
    clusters = []
    for members in _group_slices(similarity.shape[0], groups):
        k = n_keep // groups
        centroids = sorted(members, key=lambda j: (-float(saliency[j]), j))[:k]
        of = {c: [c] for c in centroids}
        free = [j for j in members if j not in of]
        if group_size > 0:
            if k * group_size < len(members):
                raise MoePruneError(f"merge.group_size: {k} centroids of at most {group_size} experts cannot hold "
                                    f"{len(members)} experts; raise group_size to >= {-(-len(members) // k)} or use 0")
            for c in centroids:
                take = sorted(free, key=lambda j: (-float(similarity[c, j]), j))[:group_size - 1]
                of[c] += take
                free = [j for j in free if j not in take]
        for j in free:
            of[max(centroids, key=lambda c: (float(similarity[j, c]), -c))].append(j)
        clusters += [[c] + sorted(of[c][1:]) for c in centroids]
    return sorted(clusters, key=lambda c: c[0])


def align_to(dominant: ExpertWeights, member: ExpertWeights) -> tuple[ExpertWeights, torch.Tensor]:
    """Permute `member`'s intermediate neurons to best match `dominant` (Hungarian matching on the
    neurons' weight vectors: gate row, up row and down column concatenated)."""
    from scipy.optimize import linear_sum_assignment

    def feats(w: ExpertWeights) -> torch.Tensor:
        return torch.cat([w.gate, w.up, w.down.T], dim=1)  # (I, 3H)

    sim = (feats(dominant) @ feats(member).T).numpy()  # (I, I): dominant neuron x member neuron
    rows, cols = linear_sum_assignment(sim, maximize=True)
    perm = torch.as_tensor(cols[np.argsort(rows)], dtype=torch.long)
    return member.permuted(perm), perm


def merge_weights(members: list[ExpertWeights], weights: torch.Tensor) -> ExpertWeights:
    """Weighted average of every field (weights are normalised; all-zero weights mean equal weights)."""
    w = weights.double()
    w = torch.ones_like(w) if float(w.sum()) <= 0 else w
    w = w / w.sum()
    out = {}
    for name, first in members[0].fields().items():
        if first is None:
            out[name] = None
        else:
            out[name] = sum(wi * m.fields()[name] for wi, m in zip(w, members))
    return ExpertWeights(**out)


def _merge_router(adapter: MoEAdapter, layer, cluster: list[int], weights: torch.Tensor) -> None:
    w = weights.double()
    w = torch.ones_like(w) if float(w.sum()) <= 0 else w
    w = w / w.sum()
    idx = torch.tensor(cluster)
    with torch.no_grad():
        for path, dim in adapter.spec.router_tensors:
            t = adapter.tensor(layer, path)
            rows = t.index_select(dim, idx).double()
            shape = [1] * rows.dim()
            shape[dim] = -1
            merged = (rows * w.reshape(shape)).sum(dim=dim, keepdim=True)
            t.index_copy_(dim, idx[:1], merged.to(t.dtype))


def merge_layer(adapter: MoEAdapter, layer, clusters: list[list[int]], freq: torch.Tensor, *,
                router: str = "dominant", align: bool = False) -> None:
    """Merge every cluster of one loaded layer into its representative's slot (in place; nothing pruned)."""
    for cluster in clusters:
        if len(cluster) == 1:
            continue
        weights = freq[cluster]
        members = [read_expert(adapter, layer, j) for j in cluster]
        if align:
            members = [members[0]] + [align_to(members[0], m)[0] for m in members[1:]]
        write_expert(adapter, layer, cluster[0], merge_weights(members, weights))
        if router == "weighted":
            _merge_router(adapter, layer, cluster, weights)


def apply_merge(model, plan: MergePlan, *, freq: dict[int, torch.Tensor], router: str = "dominant",
                align: bool = False, where: str = "merge") -> dict[int, list[int]]:
    """Merge every cluster into its representative and prune the other members (in place)."""
    if router not in ROUTER_RULES:
        raise MoePruneError(f"{where}: router rule must be one of {', '.join(ROUTER_RULES)}; got {router!r}")
    adapter = MoEAdapter(model)
    for layer in adapter.layers:
        merge_layer(adapter, layer, plan.clusters[layer.index], freq[layer.index], router=router, align=align)
    return prune_experts(model, plan.kept, where=where)


METHOD_NEEDS = {"hc_smoe": ("all_means",), "m_smoe": ("router_gram",), "ream": ("output_cosine", "router_gram")}


def plan_merge(obs, adapter: MoEAdapter, *, method: str, n_keep: int, linkage: str = "average",
               group_size: int = 0, where: str = "merge") -> MergePlan:
    """Cluster every layer's experts from saved observations."""
    from moeprune.score.select import routing_groups

    if method not in METHOD_NEEDS:
        raise MoePruneError(f"{where}: unknown merge method {method!r}; allowed: {', '.join(METHOD_NEEDS)}")
    groups = routing_groups(adapter, n_keep, where)
    clusters = {}
    for i, stats in obs.layers.items():
        if method == "hc_smoe":
            if stats.all_out_sum is None:
                raise MoePruneError(f"{where}: hc_smoe needs observations collected with 'all_means' "
                                    "(moeprune observe --collect all_means)")
            clusters[i] = hc_smoe_clusters(stats.all_mean, stats.count, n_keep, linkage=linkage, groups=groups)
        elif method == "ream":
            if stats.out_cos_sum is None:
                raise MoePruneError(f"{where}: ream needs observations collected with 'output_cosine' "
                                    "(moeprune observe --collect output_cosine,router_gram)")
            clusters[i] = ream_clusters(ream_similarity(stats), stats.reap, n_keep, groups=groups,
                                        group_size=group_size)
        else:
            if stats.logit_gram is None:
                raise MoePruneError(f"{where}: m_smoe needs observations collected with 'router_gram' "
                                    "(moeprune observe --collect router_gram)")
            clusters[i] = m_smoe_clusters(stats.logit_cosine, stats.count, n_keep, groups=groups)
    options = {"hc_smoe": {"linkage": linkage}, "ream": {"group_size": group_size}}.get(method, {})
    return MergePlan(method=method, clusters=clusters, options=options)
