"""--max-bytes in mixed precision: experts are not "other weights", a tied embedding counts once."""

from __future__ import annotations

import pytest
import torch

from moeprune.compress.quantize import MixedBudget, quantize_model
from moeprune.compress.quantize_mixed import layer_costs
from moeprune.errors import MoePruneError
from moeprune.models import MoEAdapter
from moeprune.testing import tiny_model

pytest.importorskip("torchao")


def _sizes(model):
    """(bytes of every weight storage once, bytes of the routed-expert tensors at their cheapest)."""
    seen, total = set(), 0
    for p in model.parameters():  # parameters() yields a tied weight once
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    costs, _ = layer_costs(MoEAdapter(model))
    dense = sum(max(c.values()) for c in costs.values())
    cheapest = sum(min(c.values()) for c in costs.values())
    return total, dense, cheapest


@pytest.mark.parametrize("tied", [False, True])
def test_feasible_max_bytes_is_accepted_and_met(tied):
    model = tiny_model("qwen3_moe")
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    total, dense, cheapest = _sizes(model)
    budget = total - dense + cheapest + 64  # room for every layer in float8, not for a dense one
    result = quantize_model(model, bits=8, mixed=MixedBudget(max_bytes=budget), importance={0: 1.0, 1: 1.0})
    assert set(result.layer_bits.values()) == {8}
    assert result.bytes_before == total
    assert result.bytes_after <= budget


def test_max_bytes_at_or_above_the_model_size_is_refused():
    model = tiny_model("qwen3_moe")
    total, _, _ = _sizes(model)
    with pytest.raises(MoePruneError, match="at least the unquantized size"):
        quantize_model(model, bits=8, mixed=MixedBudget(max_bytes=total + 1), importance={0: 1.0, 1: 1.0})


def test_max_bytes_below_the_other_weights_is_refused():
    model = tiny_model("qwen3_moe")
    total, dense, _ = _sizes(model)
    with pytest.raises(MoePruneError, match="leaves nothing for the experts"):
        quantize_model(model, bits=8, mixed=MixedBudget(max_bytes=total - dense), importance={0: 1.0, 1: 1.0})
