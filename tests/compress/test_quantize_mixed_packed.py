"""Importance-aware widths per MoE layer stored as compressed-tensors config groups (`--mixed-format packed`):
the allocation follows importance within the budget, each layer's experts are packed at its width (or left
dense), the config groups target exactly their layers' expert linears, and the packed values decode to the
quantized model in memory. vLLM serving is checked in CI's vLLM stage (scripts/check_vllm.py)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from click.testing import CliRunner

from moeprune.compress.quantize import MixedBudget, dequantized_tensors, quantize_model, save_quantized
from moeprune.testing import save_tiny, tiny_model

pytest.importorskip("compressed_tensors")


def _experts(model):
    from moeprune.models import MoEAdapter

    adapter = MoEAdapter(model)
    return adapter, {layer.index: layer for layer in adapter.layers}


@pytest.mark.parametrize("model_type", ["qwen2_moe", "mixtral"])
def test_the_important_layer_stays_dense_and_the_other_is_packed(tmp_path, model_type):
    model = tiny_model(model_type)
    adapter, layers = _experts(model)
    first, second = sorted(layers)[:2]
    before = {i: [getattr(layers[i].experts, t).detach().clone() for t in adapter.spec.layout.tensors]
              for i in layers}
    importance = {i: (10.0 if i == first else 1.0) for i in layers}
    # float32, group 16: int4 costs 4 + 32 / 16 = 6 bits per weight, dense 32; room for one dense layer, the
    # rest at 4 bits: the most important layer is the dense one
    n = len(layers)
    result = quantize_model(model, bits=4, mixed=MixedBudget(avg_bits=6 + 26 / n + 1), importance=importance,
                            mixed_format="packed", widths=(4, 16), group_size=16)
    assert result.layer_bits[str(first)] == 16 and result.layer_bits[str(second)] == 4
    assert result.allocation["cost_bytes"] <= result.allocation["budget_bytes"]
    gu = getattr(layers[first].experts, adapter.spec.layout.gate_up)
    assert torch.equal(gu, before[first][0])  # dense layer untouched
    assert not torch.equal(getattr(layers[second].experts, adapter.spec.layout.gate_up), before[second][0])
    out = save_quantized(model, result, tmp_path / "q")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    (group,) = config["config_groups"].values()
    assert group["weights"]["num_bits"] == 4 and group["weights"]["group_size"] == 16
    (target,) = group["targets"]
    pattern = re.compile(target[3:])
    from safetensors import safe_open

    keys = [k for f in out.glob("*.safetensors") for k in safe_open(f, "pt").keys()]
    packed = {k[: -len(".weight_packed")] for k in keys if k.endswith(".weight_packed")}
    assert packed and all(f".{second}." in k for k in packed)  # only the 4-bit layer's experts are packed
    assert all(pattern.match(m) for m in packed)
    dense_experts = [k[: -len(".weight")] for k in keys if k.endswith(".weight") and ".experts." in k]
    assert dense_experts and not any(pattern.match(m) for m in dense_experts)
    # the packed values are the quantized model's weights
    from moeprune.checkpoint.replacements import to_disk_names

    spec = adapter.spec
    mem = {f"{spec.layers}.{i}.{spec.block}.{spec.experts}.{t}": getattr(layers[i].experts, t).detach()
           for i in layers for t in (spec.layout.gate_up, spec.layout.down)}
    on_disk = to_disk_names(model, mem)
    back = dequantized_tensors(out)
    for name, t in on_disk.items():
        torch.testing.assert_close(back[name], t, rtol=0, atol=0, msg=name)


def test_cli_packed_mixed_and_its_refusals(tmp_path):
    from moeprune.cli import _register_commands, cli

    _register_commands()
    src = save_tiny(tmp_path / "src", "qwen3_moe")
    obs = tmp_path / "obs"
    runner = CliRunner()
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(f"{i} + {i} = {2 * i}; the cat sat on mat {i}." for i in range(8)))
    res = runner.invoke(cli, ["observe", str(src), "-o", str(obs), "--calib", str(calib), "--max-length", "16"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "q"
    res = runner.invoke(cli, ["quantize", str(src), "-o", str(out), "--mixed-budget", "8", "--mixed-format", "packed",
                              "--mixed-widths", "4,8,16", "--observations", str(obs)])
    assert res.exit_code == 0, res.output
    record = json.loads((out / "moeprune.json").read_text())["quantization"]
    assert record["format"] == "compressed-tensors/pack-quantized-per-layer"
    assert "not transformers" in record["serves_in"]
    for args, message in [(["--mixed-widths", "4,5"], "--mixed-widths"), (["--mixed-format", "fp6"], "--mixed-format")]:
        res = runner.invoke(cli, ["quantize", str(src), "-o", str(tmp_path / "bad"), "--mixed-budget", "8",
                                  "--mixed-format", "packed", "--observations", str(obs), *args])
        assert res.exit_code == 2 and res.output.startswith("Error: ") and res.output.count("\n") == 1, res.output
        assert message in res.output and not (tmp_path / "bad").exists()
