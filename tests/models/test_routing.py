"""The gate rule in the architecture table reproduces each model's own router exactly."""

import pytest
import torch

from capture import capture_routing, dense_gates
from moeprune.errors import MoePruneError
from moeprune.models import ARCHS, MoEAdapter
from moeprune.testing import TINY, tiny_model

ROUTED = [mt for mt in TINY if ARCHS[mt].gate is not None]


def test_every_table_entry_has_a_tiny_model():
    assert set(TINY) == set(ARCHS)


@pytest.mark.parametrize("model_type", ROUTED)
def test_gate_rule_matches_router(model_type):
    adapter = MoEAdapter(tiny_model(model_type))
    ids = torch.randint(3, 128, (2, 9))
    records = capture_routing(adapter, ids)
    for layer in adapter.layers:
        rec = records[layer.index]
        logits = adapter.router_logits(layer, rec["hidden"])
        w, idx = adapter.route(layer, logits)
        ours = dense_gates(w, idx, layer.num_experts)
        if adapter.spec.experts_call == "dense_prescaled":
            ours = torch.where(ours > 0, ours, torch.zeros_like(ours))
        torch.testing.assert_close(ours, rec["dense"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_expert_forward_reproduces_experts_module(model_type):
    adapter = MoEAdapter(tiny_model(model_type))
    if adapter.spec.experts_call != "indexed":
        pytest.skip("dense-prescaled experts are checked in the surgery tests")
    layer = adapter.layers[0]
    x = torch.randn(5, adapter.config.hidden_size)
    idx = torch.stack([torch.randperm(layer.num_experts)[:2] for _ in range(5)])
    w = torch.rand(5, 2)
    with torch.no_grad():
        want = layer.experts(x, idx, w)
        got = torch.zeros_like(x)
        for t in range(5):
            for s in range(2):
                got[t] += w[t, s] * adapter.expert_forward(layer, int(idx[t, s]), x[t:t + 1])[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_model_specific_router_is_refused_for_resimulation():
    adapter = MoEAdapter(tiny_model("phimoe"))
    with pytest.raises(MoePruneError, match="model-specific router"):
        adapter.route(adapter.layers[0], torch.zeros(1, 8))


def test_unsupported_model_lists_supported():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=64))
    with pytest.raises(MoePruneError, match="'llama' is not a supported MoE architecture; supported: .*mixtral"):
        MoEAdapter(model)
