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
    """Decide with `recipe.method` and rewrite `model` in place (merge, then slice); returns the Decision.

    With a `recover` section that works block by block (`router_kd_block`, `moe_kd_block`, `method: none`,
    or any `gate_scale` other than keep) the surgery runs inside that pass and `decision.details["recovery"]`
    holds the record, exactly as `run_recipe` computes it in memory. Logit KD (`router_kd`, `moe_kd`) is left
    to the caller (moeprune.recover.RouterKD: its targets come from the model before this call)."""
    from moeprune.compress import prune_experts
    from moeprune.methods import get_method
    from moeprune.pipeline.recovery import needs_block_pass
    from moeprune.score import experts_to_keep

    adapter = MoEAdapter(model)
    n_keep = None if recipe.ratio is None and recipe.keep is None else experts_to_keep(
        adapter.num_experts, ratio=recipe.ratio, keep=recipe.keep, top_k=adapter.top_k, where="recipe")
    plan = _LoadedPlan(recipe=recipe, shape=adapter, method=get_method(recipe.method), n_keep=n_keep)
    plan.method.check(plan)
    decision = plan.method.decide(obs, plan, _LoadedModel(model, calibration, progress))
    if needs_block_pass(recipe.recover):
        decision.details["recovery"] = _recover_blocks(model, adapter, plan, decision, obs, calibration, progress)
        return decision
    for layer in adapter.layers:
        if decision.changed_experts(layer.index):
            plan.method.apply_layer(adapter, layer, decision, obs, plan)
    prune_experts(model, decision.kept, where="decision")
    return decision


def _recover_blocks(model, adapter, plan, decision, obs, calibration, progress: bool) -> dict:
    """Surgery and block recovery in one pass over the loaded model (pipeline/recovery.py)."""
    from moeprune.errors import MoePruneError
    from moeprune.pipeline.recovery import gate_candidates, run_block_recovery

    if calibration is None:
        raise MoePruneError("recover: block recovery needs the calibration batches (calibration=...)")
    gate_candidates(plan.recipe.recover.gate_scale, adapter.spec, adapter.config)  # a forced scale needs the flag
    blocks = run_block_recovery(plan, decision, obs, list(getattr(calibration, "batches", calibration)), model,
                                adapter, device=next(model.parameters()).device, progress=progress)
    blocks.apply_to(adapter)
    return blocks.record()
