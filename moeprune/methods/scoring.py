"""Score-based pruning: observations -> (E,) importance per layer -> the experts kept.

One object per scorer of `moeprune.score.SCORERS` (frequency, soft_frequency, ean, ean_mean, reap,
reap_prob, random); the formulas and papers are in the scorers' docstrings and docs/methods.md.
Deciding needs only saved statistics and the model's shape, so it runs on a model built on the meta
device whatever the model's size.
"""

from __future__ import annotations

from moeprune.errors import MoePruneError
from moeprune.methods.base import Decision, Method, register
from moeprune.score import SCORERS, select_experts

__all__ = ["ScorePrune"]

_NEEDS_ROUTER_RULE = {"reap_prob"}


class ScorePrune(Method):
    kind = "prune"

    def __init__(self, name: str):
        self.name = name
        doc = (SCORERS.get(name).__doc__ or "").strip()
        self.help = doc.splitlines()[0] if doc else f"prune by {name} score"

    def check(self, plan) -> None:
        if self.name in _NEEDS_ROUTER_RULE and plan.shape.spec.gate is None:
            raise MoePruneError(f"method {self.name}: {plan.shape.spec.name} uses a model-specific router whose "
                                "probabilities moeprune cannot compute; use reap, ean or frequency")

    def decide(self, obs, plan, executor) -> Decision:
        r = plan.recipe
        sel = select_experts(obs, plan.shape, method=self.name, ratio=r.ratio, keep=r.keep,
                             protect_super=r.protect_super_experts, allocation=r.allocation, seed=r.seed,
                             where="recipe")
        return Decision(sel)


for _name in SCORERS.names():
    register(ScorePrune(_name))
