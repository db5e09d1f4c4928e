"""Selection by reconstruction (`reconstruct`, `reconstruct_progressive`): per layer, the kept subset
whose routed output best matches the full layer's on cached calibration inputs (exact search within a
budget, greedy beyond). The executor supplies each layer's inputs: the in-memory one from hooks on a
full forward, the layer-wise one from its layer-by-layer pass, so both decide on the same tensors.
See moeprune/score/reconstruct.py for the search."""

from __future__ import annotations

from moeprune.errors import MoePruneError
from moeprune.methods.base import Decision, Method, register
from moeprune.score import super_experts
from moeprune.score.reconstruct import selection_from_search, subset_chooser
from moeprune.score.select import routing_groups

__all__ = ["Reconstruct"]


class Reconstruct(Method):
    kind = "prune"
    needs_layer_inputs = True

    def __init__(self, name: str, progressive: bool):
        self.name, self.progressive = name, progressive
        self.help = "keep the subset that best reconstructs each layer's output" + (
            ", layer by layer on the already-pruned model" if progressive else "")

    def check(self, plan) -> None:
        if plan.shape.spec.gate is None:
            raise MoePruneError(f"method {self.name}: {plan.shape.spec.name} uses a model-specific router that "
                                "moeprune cannot re-simulate; use reap, ean or frequency")
        if plan.recipe.allocation != "uniform":
            raise MoePruneError(f"method {self.name} keeps the same number per layer; set allocation: uniform")

    def decide(self, obs, plan, executor) -> Decision:
        r, shape = plan.recipe, plan.shape
        n_keep = plan.n_keep
        groups = routing_groups(shape, n_keep, "reconstruct")
        num_layers = int(shape.config.num_hidden_layers)
        protected = super_experts(obs, num_layers) if r.protect_super_experts else {}
        record: dict[int, dict] = {}
        choose = subset_chooser(n_keep=n_keep, budget=r.reconstruct.budget, groups=groups, protected=protected,
                                record=record)
        kept = executor.layer_search(choose, max_tokens=r.reconstruct.max_tokens, progressive=self.progressive)
        sel = selection_from_search(shape, kept, record, protected, self.progressive)
        return Decision(sel, details={"search": {str(i): rec["mode"] for i, rec in record.items()}})


register(Reconstruct("reconstruct", False))
register(Reconstruct("reconstruct_progressive", True))
