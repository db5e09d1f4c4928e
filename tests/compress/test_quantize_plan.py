"""Quantization targets and group size, decided on a weightless (meta-device) model before any weight is read."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from moeprune.compress.quantize_plan import CHANNEL, check_quantize, quant_targets, resolve_group_size
from moeprune.errors import MoePruneError
from moeprune.checkpoint.model_dir import DEMO_MODEL_DIR
from moeprune.testing import tiny_config


def _meta(config):
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def test_routers_shared_gates_and_lm_head_stay_dense():
    model = _meta(tiny_config("qwen2_moe"))
    targets = quant_targets(model)
    assert set(targets.ignore) == {"lm_head"} | {f"model.layers.{i}.mlp.{m}" for i in range(2)
                                                 for m in ("gate", "shared_expert_gate")}
    linears = [name for name, _ in targets.linears]
    assert "model.layers.0.mlp.shared_expert.down_proj" in linears and "model.layers.0.self_attn.q_proj" in linears
    assert not any(name.endswith(("mlp.gate", "shared_expert_gate", "lm_head")) for name in linears)
    experts = dict(targets.experts)
    assert experts["model.layers.0.mlp.experts.gate_up_proj"] == 64  # hidden
    assert experts["model.layers.0.mlp.experts.down_proj"] == 32  # moe_intermediate_size


def test_auto_group_size_is_largest_common_divisor_of_128_64_32():
    assert resolve_group_size({256: "a", 128: "b"}, "auto") == 128
    assert resolve_group_size({256: "a", 192: "b"}, None) == 64
    assert check_quantize(_meta(tiny_config("qwen3_moe")), 4, None) == 32  # widths 64 (hidden), 32 (experts)
    assert check_quantize(_meta(tiny_config("qwen2_moe")), 4, None) == CHANNEL  # + 48 (shared expert)


def _demo_with_expert_width(width):
    # the demo's shapes with another routed-expert width (the demo was trained at 112 and ships padded to 128)
    config = AutoConfig.from_pretrained(DEMO_MODEL_DIR)
    config.moe_intermediate_size = width
    return _meta(config)


def test_auto_picks_group_128_on_the_demo():
    model = _meta(AutoConfig.from_pretrained(DEMO_MODEL_DIR))
    assert set(quant_targets(model).widths()) == {128, 256}  # expert/shared width 128, hidden 256
    assert check_quantize(model, 4, None) == 128


def test_auto_falls_back_to_one_scale_per_row_when_no_group_divides():
    model = _demo_with_expert_width(112)  # divisible by none of 128/64/32
    assert 112 in quant_targets(model).widths()
    assert check_quantize(model, 4, "auto") == CHANNEL
    assert check_quantize(model, 4, "channel") == CHANNEL
    assert check_quantize(model, 8, 16) == 16


def test_explicit_group_size_names_the_width_it_does_not_divide():
    model = _demo_with_expert_width(112)
    with pytest.raises(MoePruneError, match=r"input width 112 of model\.layers\.\d+\.mlp\.experts\.down_proj is not a "
                                            r"multiple of --group-size 64"):
        check_quantize(model, 4, 64)


@pytest.mark.parametrize("bits,group,needle", [(3, None, "--bits 3"), (4, 0, "--group-size"), (4, "x", "--group-size"),
                                               (4, -5, "--group-size")])
def test_bad_settings_are_errors(bits, group, needle):
    with pytest.raises(MoePruneError, match=needle):
        check_quantize(_meta(tiny_config("qwen3_moe")), bits, group)


def test_gptq_layer_memory_on_qwen3_30b_shapes():
    """GPTQ's largest decoder layer on Qwen3-30B-A3B's public shapes (meta device) at 64 of 128 experts, against
    a hand computation from its config numbers."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from moeprune.compress.quantize_plan import gptq_layer_memory

    config = CONFIG_MAPPING["qwen3_moe"](hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                                         num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=4,
                                         head_dim=128, num_experts=128, num_experts_per_tok=8, vocab_size=1000)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    h, i, keep = 2048, 768, 64
    attention = h * 4096 + 2 * h * 512 + 4096 * h  # q, k, v (4 kv heads x 128), o
    norms = 2 * h + 2 * 128  # input/post-attention norms, q/k norms
    weights = (attention + norms + 128 * h + keep * 3 * h * i) * 2 * 3  # bf16, router whole, kept experts, 3 copies
    hessians = (keep * (h * h + i * i) + 3 * h * h + 4096 * 4096) * 4
    solver = keep * h * h * 8 * 3  # the gate_up stack is the largest
    need = gptq_layer_memory(model, n_keep=keep, weight_bytes=2)
    assert need == {"weights": weights, "hessians": hessians, "solver": solver, "total": weights + hessians + solver}
    assert 9e9 < need["total"] < 10e9  # 9.7 GB: the float64 solver work on 64 stacked 2048-wide Hessians leads
