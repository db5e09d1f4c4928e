import warnings

import pytest
import torch

from moeprune.errors import MoePruneError
from moeprune.checkpoint.model_dir import meta_model
from moeprune.models import MoEAdapter
from moeprune.observe.stats import LayerStats, Observations
from moeprune.score import SCORERS, score_layer, select_experts
from moeprune.testing import tiny_model


def _stats(count, gate, norm, reap, maxabs):
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return LayerStats(num_experts=len(count), hidden_size=4, count=t(count), gate_sum=t(gate), norm_sum=t(norm),
                      reap_sum=t(reap), max_abs=t(maxabs))


def _obs(layers):
    return Observations(layers=layers, meta={})


S = _stats(count=[10, 2, 0, 5, 8, 1, 4, 6], gate=[5, 1.5, 0, 1, 2, .9, 2, 3], norm=[20, 8, 0, 50, 8, 9, 4, 6],
           reap=[9, 6, 0, 4, 2, 8, 1, 3], maxabs=[1, 1, 0, 1, 1, 1, 1, 1])


def test_each_method_is_its_formula():
    inf = float("-inf")
    assert score_layer("frequency", S).tolist() == [10, 2, inf, 5, 8, 1, 4, 6]
    assert score_layer("soft_frequency", S).tolist() == [5, 1.5, inf, 1, 2, .9, 2, 3]
    assert score_layer("ean_sum", S).tolist() == [20, 8, inf, 50, 8, 9, 4, 6]
    assert score_layer("ean", S).tolist() == score_layer("ean_sum", S).tolist()
    assert score_layer("ean_mean", S)[3] == 10 and score_layer("ean_mean", S)[0] == 2
    assert score_layer("reap", S).tolist()[:2] == [0.9, 3.0] and score_layer("reap", S)[5] == 8
    r1, r2 = score_layer("random", S, seed=1), score_layer("random", S, seed=1)
    assert torch.equal(r1, r2) and not torch.equal(r1, score_layer("random", S, seed=2))
    assert set(SCORERS.names()) >= {"frequency", "soft_frequency", "ean", "ean_sum", "ean_mean", "reap", "random"}


def test_reap_prob_weighs_tokens_by_router_confidence():
    """Expert 0 carries many confident tokens with modest outputs; expert 1 a few unsure tokens (router
    probability 0.1) with large outputs. Renormalised top-2 gates are ~0.5 for both, so `reap` prefers
    the rare expert; `reap_prob` prefers the one the router relies on."""
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    count, norm = [100, 3], [100 * 10.0, 3 * 30.0]
    st = LayerStats(num_experts=2, hidden_size=4, count=t(count), gate_sum=t([50, 1.5]), norm_sum=t(norm),
                    reap_sum=t([0.5 * 1000, 0.5 * 90]), max_abs=t([1, 1]),
                    reap_prob_sum=t([0.45 * 1000, 0.1 * 90]))
    assert score_layer("reap", st).argmax() == 1
    assert score_layer("reap_prob", st).tolist() == [4.5, 3.0]
    assert score_layer("reap_prob", st).argmax() == 0
    with pytest.raises(MoePruneError, match="re-run `moeprune observe`"):
        score_layer("reap_prob", S)  # statistics without the router-probability sums


def test_unknown_method_lists_available():
    with pytest.raises(MoePruneError, match="available: .*reap"):
        score_layer("reapp", S)


@pytest.fixture(scope="module")
def mixtral():
    return MoEAdapter(tiny_model("mixtral"))


def test_uniform_selection_drops_lowest_and_never_routed(mixtral):
    obs = _obs({0: S, 1: S})
    with pytest.warns(UserWarning, match=r"never routed.*layer 0: \[2\]"):
        sel = select_experts(obs, mixtral, method="reap", ratio=0.5, protect_super=False)
    # reap = [0.9, 3, -inf, 0.8, 0.25, 8, 0.25, 0.5] -> keep 5, 1, 0, 3
    assert sel.kept[0] == [0, 1, 3, 5] and sel.dropped[0] == [2, 4, 6, 7]
    assert sel.never_routed == {0: [2], 1: [2]}
    sel = select_experts(obs, mixtral, method="frequency", keep=6, protect_super=False)
    assert sel.kept[0] == [0, 1, 3, 4, 6, 7]


def test_super_experts_are_protected_in_early_layers_only(mixtral):
    spike = _stats(count=[10] * 8, gate=[1] * 8, norm=[1] * 8, reap=[5, 5, 5, 5, 1, 5, 5, 5],
                   maxabs=[1, 1, 1, 1, 500, 1, 1, 1])
    late = _stats(count=[10] * 8, gate=[1] * 8, norm=[1] * 8, reap=[5, 5, 5, 5, 5, 5, 1, 5],
                  maxabs=[1, 1, 1, 1, 1, 1, 400, 1])
    layers = {i: S for i in range(2, 8)}
    layers.update({0: spike, 1: late})
    cfg = mixtral.config
    old = cfg.num_hidden_layers
    try:
        cfg.num_hidden_layers = 2  # layer 1 is in the last quarter of a 2-layer model
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sel = select_experts(_obs({0: spike, 1: late}), mixtral, method="reap", keep=4)
    finally:
        cfg.num_hidden_layers = old
    assert sel.protected == {0: [4]}
    assert 4 in sel.kept[0]  # lowest REAP but a super expert
    assert 6 not in sel.kept[1]  # spike in a late layer is not protected


def test_ratio_and_keep_errors(mixtral):
    obs = _obs({0: S, 1: S})
    for bad in (0, 1, 1.5, -0.2):
        with pytest.raises(MoePruneError, match="ratio must be in \\(0, 1\\)"):
            select_experts(obs, mixtral, method="reap", ratio=bad)
    with pytest.raises(MoePruneError, match="keep between top-k=2 and 8"):
        select_experts(obs, mixtral, method="reap", keep=1)
    with pytest.raises(MoePruneError, match="exactly one of ratio"):
        select_experts(obs, mixtral, method="reap", ratio=0.5, keep=4)


def test_group_limited_selection_keeps_equal_groups():
    adapter = MoEAdapter(tiny_model("deepseek_v3"))
    skew = _stats(count=[9, 8, 7, 6, 1, 1, 1, 1], gate=[1] * 8, norm=[1] * 8,
                  reap=[9, 8, 7, 6, 1, 2, 3, 4], maxabs=[1] * 8)
    sel = select_experts(_obs({1: skew, 2: skew}), adapter, method="reap", keep=4, protect_super=False)
    assert sel.kept[1] == [0, 1, 6, 7]  # two per group of four, best of each group
    with pytest.raises(MoePruneError, match="multiple of 2"):
        select_experts(_obs({1: skew, 2: skew}), adapter, method="reap", keep=3)


def test_global_allocation_reports_uneven_counts(mixtral):
    flat = _stats(count=[10] * 8, gate=[1] * 8, norm=[1] * 8, reap=[1] * 8, maxabs=[1] * 8)
    peaky = _stats(count=[10] * 8, gate=[1] * 8, norm=[1] * 8, reap=[50, 1, 1, 1, 1, 1, 1, 40], maxabs=[1] * 8)
    sel = select_experts(_obs({0: flat, 1: peaky}), mixtral, method="reap", keep=4, protect_super=False,
                         allocation="global")
    counts = sel.per_layer_counts
    assert sum(counts.values()) == 8 and min(counts.values()) >= 2 and counts[0] != counts[1]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_scores_are_refused_naming_layer_and_method(mixtral, bad):
    poisoned = _stats(count=[10, 2, 0, 5, 8, 1, 4, 6], gate=[5, 1.5, 0, 1, 2, .9, 2, 3],
                      norm=[20, 8, 0, 50, 8, 9, 4, 6], reap=[9, bad, 0, 4, 2, 8, 1, 3], maxabs=[1] * 8)
    with pytest.raises(MoePruneError, match=r"method 'reap' scored layer 1 non-finite .*experts \[1\]"):
        select_experts(_obs({0: S, 1: poisoned}), mixtral, method="reap", ratio=0.5, protect_super=False)


def test_minus_inf_for_never_routed_experts_is_still_accepted(mixtral):
    with pytest.warns(UserWarning, match="never routed"):
        sel = select_experts(_obs({0: S}), mixtral, method="reap", ratio=0.5, protect_super=False)
    assert 2 in sel.dropped[0]
