"""Compress a model already loaded in memory with a method object: for experiments and studies that
evaluate many variants of one loaded model (scripts/study_methods.py, the demo quality tests). Commands
and recipes go through `run_recipe`, which also writes the checkpoint."""

from __future__ import annotations

from dataclasses import dataclass

from moeprune.models import MoEAdapter

__all__ = ["compress_model"]


@dataclass
class _LoadedPlan:
    recipe: object
    shape: MoEAdapter
    method: object
    n_keep: int | None


class _LoadedModel:
    """The executor interface the methods need, over a loaded model."""

    def __init__(self, model, calibration, progress: bool):
        self.model, self.calib, self.progress = model, calibration, progress

    def layer_search(self, choose, *, max_tokens: int, progressive: bool):
        from moeprune.score.reconstruct import search_layers

        return search_layers(self.model, self.calib, choose, max_tokens=max_tokens, progressive=progressive,
                             progress=self.progress)


def compress_model(model, obs, recipe, *, calibration=None, progress: bool = False):
    """Decide with `recipe.method` and rewrite `model` in place (merge, then slice); returns the Decision."""
    from moeprune.compress import prune_experts
    from moeprune.methods import get_method

    from moeprune.score import experts_to_keep

    adapter = MoEAdapter(model)
    n_keep = None if recipe.ratio is None and recipe.keep is None else experts_to_keep(
        adapter.num_experts, ratio=recipe.ratio, keep=recipe.keep, top_k=adapter.top_k, where="recipe")
    plan = _LoadedPlan(recipe=recipe, shape=adapter, method=get_method(recipe.method), n_keep=n_keep)
    plan.method.check(plan)
    decision = plan.method.decide(obs, plan, _LoadedModel(model, calibration, progress))
    for layer in adapter.layers:
        if decision.changed_experts(layer.index):
            plan.method.apply_layer(adapter, layer, decision, obs, plan)
    prune_experts(model, decision.kept, where="decision")
    return decision
