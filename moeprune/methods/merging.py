"""Merging methods: clusters of experts become one expert each, so the checkpoint shrinks.

- `hc_smoe` (HC-SMoE, arXiv 2410.08589): agglomerative clustering of the experts' mean outputs over
  calibration tokens, then a frequency-weighted average of each cluster's weights.
- `m_smoe` (M-SMoE, arXiv 2310.01334): the most used experts lead, every other expert joins the leader
  whose router-logit column is most similar; neurons are aligned to the leader before averaging.
- `ream` (REAM, arXiv 2604.04356): the most REAP-salient experts are centroids, every other expert joins
  the most similar one (expert-output and router similarity), neurons aligned, members averaged with
  REAP-saliency weights. One-shot: all layers are decided from one calibration pass (the paper
  re-forwards calibration data through each merged layer before deciding the next).

Clusters are decided from observations alone (the meta model suffices); the averaging runs one loaded
layer at a time (`apply_layer`), identically under both executors. Details: moeprune/compress/merge.py.
"""

from __future__ import annotations

import torch

from moeprune.compress.merge import ROUTER_RULES, merge_layer, plan_merge
from moeprune.errors import MoePruneError
from moeprune.methods.base import Decision, Method, register
from moeprune.score import Selection

__all__ = ["Merge", "Ream"]


class Merge(Method):
    kind = "merge"

    def __init__(self, name: str, needs: tuple[str, ...], align_default: bool, help: str):
        self.name, self.needs, self.align_default, self.help = name, needs, align_default, help

    def check(self, plan) -> None:
        if plan.recipe.merge.router not in ROUTER_RULES:
            raise MoePruneError(f"merge.router must be one of {', '.join(ROUTER_RULES)}")

    def align(self, plan) -> bool:
        a = plan.recipe.merge.align
        return self.align_default if a is None else bool(a)

    def changed_router(self, plan) -> bool:
        return plan.recipe.merge.router == "weighted"

    def decide(self, obs, plan, executor) -> Decision:
        r = plan.recipe
        mp = plan_merge(obs, plan.shape, method=self.name, n_keep=plan.n_keep, linkage=r.merge.linkage,
                        group_size=r.merge.group_size, where="recipe")
        dropped = {i: [j for c in cl for j in c[1:]] for i, cl in mp.clusters.items()}
        sel = Selection(method=self.name, allocation="uniform", kept=mp.kept, dropped=dropped,
                        scores={i: [float(x) for x in s.count] for i, s in obs.layers.items()})
        return Decision(sel, clusters=mp.clusters, details={"merge_options": {**r.merge.model_dump(),
                                                                              "align": self.align(plan)}})

    def weights(self, stats) -> torch.Tensor:
        """Averaging weight of every expert (E,): its usage frequency."""
        return stats.count.to(torch.float64)

    def apply_layer(self, adapter, layer, decision: Decision, obs, plan) -> None:
        merge_layer(adapter, layer, decision.clusters[layer.index], self.weights(obs.layers[layer.index]),
                    router=plan.recipe.merge.router, align=self.align(plan))


class Ream(Merge):
    """REAM: REAP-salient centroids, similarity-grouped members, aligned, averaged by REAP saliency."""

    def check(self, plan) -> None:
        from moeprune.score.select import routing_groups

        super().check(plan)
        c = plan.recipe.merge.group_size
        if c and plan.n_keep:
            groups = routing_groups(plan.shape, plan.n_keep, "recipe")
            k, members = plan.n_keep // groups, plan.shape.num_experts // groups
            if k * c < members:
                raise MoePruneError(f"merge.group_size: {k} centroids of at most {c} experts cannot hold {members} "
                                    f"experts; use group_size >= {-(-members // k)} or 0")

    def weights(self, stats) -> torch.Tensor:
        return stats.reap.to(torch.float64)


register(Merge("hc_smoe", ("all_means",), False, "cluster experts by mean output, average each cluster"))
register(Merge("m_smoe", ("router_gram",), True, "merge into the most used experts by router similarity, "
                                                 "neurons aligned"))
register(Ream("ream", ("output_cosine", "router_gram"), True, "merge into the most REAP-salient experts by "
                                                             "output similarity, neurons aligned, saliency-weighted"))
