import itertools

import pytest
import torch

from moeprune.models import MoEAdapter
from moeprune.score.reconstruct import _layer_outputs, _search, capture_layer_inputs, layer_error, \
    masked_routing, reconstruct_select
from moeprune.testing import tiny_model


def _batches():
    return [{"input_ids": torch.randint(3, 128, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}]


def test_exact_search_finds_the_brute_force_minimum():
    model = tiny_model("mixtral")
    adapter = MoEAdapter(model)
    x = capture_layer_inputs(model, _batches(), [0], max_tokens=64)[0]
    layer = adapter.layer(0)
    keep, err, mode, alone = _search(adapter, layer, x, 5, budget=10_000, groups=1, protected=set())
    logits, outs, full = _layer_outputs(adapter, layer, x)
    brute = min(layer_error(adapter, layer, logits, outs, full, list(k)) for k in itertools.combinations(range(8), 5))
    assert mode == "exact" and err == pytest.approx(brute)
    assert layer_error(adapter, layer, logits, outs, full, list(range(8))) == pytest.approx(0, abs=1e-12)
    g_keep, g_err, g_mode, _ = _search(adapter, layer, x, 5, budget=1, groups=1, protected=set())
    assert g_mode == "greedy" and len(g_keep) == 5 and g_err >= err - 1e-12
    assert len(alone) == 8 and all(a >= 0 for a in alone)


def test_error_matches_the_pruned_layer_output():
    """The error is measured against what masking (= pruning) really produces in the model."""
    model = tiny_model("qwen3_moe")
    adapter = MoEAdapter(model)
    layer = adapter.layer(0)
    x = torch.randn(6, 64)
    keep = [0, 2, 3, 6]
    logits, outs, full = _layer_outputs(adapter, layer, x)
    with torch.no_grad():
        want_full = layer.block(x.unsqueeze(0))
        with masked_routing(adapter, {0: keep}):
            want_pruned = layer.block(x.unsqueeze(0))
    want = float(((want_full - want_pruned).double() ** 2).sum())
    assert layer_error(adapter, layer, logits, outs, full, keep) == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("progressive", [False, True])
def test_reconstruct_select_respects_groups_and_protection(progressive):
    model = tiny_model("deepseek_v3")
    sel = reconstruct_select(model, _batches(), n_keep=4, progressive=progressive, protected={1: [5]},
                             progress=False)
    for i, keep in sel.kept.items():
        assert len(keep) == 4 and sum(j < 4 for j in keep) == 2
    assert 5 in sel.kept[1]
    assert sel.method.startswith("reconstruct")
