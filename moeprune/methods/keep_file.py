"""`keep_file`: the experts to keep come from a KEEP.json computed elsewhere ({"layer": [experts]});
nothing is observed. Checked against the model's shape before any weight is read."""

from __future__ import annotations

from moeprune.compress.prune import load_keep_file
from moeprune.models.keep import validate_keep
from moeprune.methods.base import Decision, Method, register
from moeprune.score import Selection

__all__ = ["KeepFile"]


class KeepFile(Method):
    name = "keep_file"
    kind = "prune"
    needs_observations = False
    help = "keep the experts listed in a KEEP.json"

    def check(self, plan) -> None:
        plan.keep_plan = validate_keep(plan.shape, load_keep_file(plan.recipe.keep_file),
                                       where=str(plan.recipe.keep_file))

    def decide(self, obs, plan, executor) -> Decision:
        kept = plan.keep_plan
        dropped = {i: [j for j in range(plan.shape.layer(i).num_experts) if j not in k] for i, k in kept.items()}
        return Decision(Selection(method=self.name, allocation="uniform", kept=kept, dropped=dropped))


register(KeepFile())
