"""Expert-importance scorers: pure functions from one layer's statistics to a (E,) score, higher = keep.

| name            | score of expert j                                   | source                         |
|-----------------|-----------------------------------------------------|--------------------------------|
| frequency       | |X_j|, tokens routed to j                           | usage-count pruning baselines  |
| soft_frequency  | sum over X_j of the gate g_j(x)                     |                                |
| ean / ean_sum   | sum over X_j of ||f_j(x)||                          | expert activation norm (EAN)   |
| ean_mean        | mean over X_j of ||f_j(x)||                         |                                |
| reap            | mean over X_j of g_j(x) * ||f_j(x)||                | REAP (router-weighted expert activation pruning) |
| random          | seeded uniform noise (a control)                    |                                |

g_j is the gate the model really multiplies by (its own softmax / top-k / renormalisation / sigmoid
+ correction bias / scaling). Experts never routed during calibration score -inf for every method
but random: they are dropped first, and the selection warns naming them.

Example recipe::

    method: reap
    ratio: 0.5
"""

from __future__ import annotations

from typing import Callable

import torch

from moeprune.observe.stats import LayerStats
from moeprune.registry import Registry

__all__ = ["SCORERS", "score_layer", "ScoreFn"]

ScoreFn = Callable[..., torch.Tensor]
SCORERS: Registry[ScoreFn] = Registry("scoring method")


@SCORERS.register("frequency")
def frequency(stats: LayerStats, **_) -> torch.Tensor:
    return stats.count.clone()


@SCORERS.register("soft_frequency")
def soft_frequency(stats: LayerStats, **_) -> torch.Tensor:
    return stats.gate_sum.clone()


@SCORERS.register("ean_sum")
def ean_sum(stats: LayerStats, **_) -> torch.Tensor:
    return stats.norm_sum.clone()


SCORERS.register("ean", ean_sum)


@SCORERS.register("ean_mean")
def ean_mean(stats: LayerStats, **_) -> torch.Tensor:
    return stats.ean_mean


@SCORERS.register("reap")
def reap(stats: LayerStats, **_) -> torch.Tensor:
    return stats.reap


@SCORERS.register("reap_prob")
def reap_prob(stats: LayerStats, **_) -> torch.Tensor:
    """REAP with the router's probability (before top-k renormalisation) as the gate, as the reference
    code computes it for softmax routers. With renormalised top-k gates every routed token's gates sum
    to 1, so a token the router was unsure about weighs as much as a confident one; the probability
    keeps that confidence."""
    return stats.reap_prob


@SCORERS.register("random")
def random(stats: LayerStats, *, seed: int = 0, layer: int = 0, **_) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 100_003 + layer)
    return torch.rand(stats.num_experts, generator=g, dtype=torch.float64)


def score_layer(method: str, stats: LayerStats, *, seed: int = 0, layer: int = 0) -> torch.Tensor:
    """Scores (E,) float64 for one layer; never-routed experts get -inf (except for `random`)."""
    scores = SCORERS.get(method)(stats, seed=seed, layer=layer).double()
    if method != "random":
        scores = scores.masked_fill(stats.count == 0, float("-inf"))
    return scores
