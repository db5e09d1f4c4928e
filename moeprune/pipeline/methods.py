"""The three families of compression methods behind one interface: decide, then apply.

- scoring methods (frequency, soft_frequency, ean, ean_mean, reap, random): observations -> scores
  -> experts kept per layer;
- merging methods (hc_smoe, m_smoe): observations -> clusters -> merged experts;
- reconstruction (reconstruct, reconstruct_progressive): cached layer inputs -> best subsets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeprune.compress import prune_experts
from moeprune.compress.merge import METHOD_NEEDS, MergePlan, apply_merge, plan_merge
from moeprune.models import MoEAdapter
from moeprune.score import SCORERS, Selection, experts_to_keep, select_experts, super_experts

__all__ = ["MERGE_METHODS", "RECONSTRUCT_METHODS", "all_methods", "method_collect", "Decision", "decide",
           "apply_decision"]

MERGE_METHODS = tuple(METHOD_NEEDS)
RECONSTRUCT_METHODS = ("reconstruct", "reconstruct_progressive")


def all_methods() -> list[str]:
    return sorted([*SCORERS.names(), *MERGE_METHODS, *RECONSTRUCT_METHODS])


def method_collect(method: str) -> tuple[str, ...]:
    return METHOD_NEEDS.get(method, ())


@dataclass
class Decision:
    selection: Selection
    merge_plan: MergePlan | None = None


def decide(model, obs, recipe, *, calibration=None, progress: bool = True) -> Decision:
    """What to keep (and merge) in every layer; the model is not modified."""
    adapter = MoEAdapter(model)
    method = recipe.method
    n_keep = experts_to_keep(adapter.num_experts, ratio=recipe.ratio, keep=recipe.keep, top_k=adapter.top_k,
                             where="recipe")
    if method in MERGE_METHODS:
        plan = plan_merge(obs, adapter, method=method, n_keep=n_keep, linkage=recipe.merge.linkage, where="recipe")
        kept = plan.kept
        dropped = {i: [j for c in cl for j in c[1:]] for i, cl in plan.clusters.items()}
        sel = Selection(method=method, allocation="uniform", kept=kept, dropped=dropped,
                        scores={i: [float(x) for x in s.count] for i, s in obs.layers.items()})
        return Decision(sel, plan)
    if method in RECONSTRUCT_METHODS:
        from moeprune.score.reconstruct import reconstruct_select

        num_layers = int(model.config.num_hidden_layers)
        protected = super_experts(obs, num_layers) if recipe.protect_super_experts else {}
        sel = reconstruct_select(model, calibration() if callable(calibration) else calibration, n_keep=n_keep,
                                 budget=recipe.reconstruct.budget, max_tokens=recipe.reconstruct.max_tokens,
                                 progressive=method.endswith("progressive"), protected=protected, progress=progress)
        return Decision(sel)
    sel = select_experts(obs, adapter, method=method, ratio=recipe.ratio, keep=recipe.keep,
                         protect_super=recipe.protect_super_experts, allocation=recipe.allocation,
                         seed=recipe.seed, where="recipe")
    return Decision(sel)


def apply_decision(model, decision: Decision, obs, recipe) -> dict[int, list[int]]:
    """Rewrite the model in place; returns the kept (representative) experts per layer."""
    if decision.merge_plan is None:
        return prune_experts(model, decision.selection.kept, where="selection")
    align = recipe.merge.align if recipe.merge.align is not None else recipe.method == "m_smoe"
    freq = {i: s.count.to(torch.float64) for i, s in obs.layers.items()}
    return apply_merge(model, decision.merge_plan, freq=freq, router=recipe.merge.router, align=align,
                       where="recipe")
