"""The gate-scale choice: `auto` keeps the renormalisation setting with the lower block-output error on the
held-back calibration tokens (recomputed here from stock-loaded checkpoints, with the flag set each way);
forced settings land in config.json; architectures without the flag are skipped with a note or refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from moeprune.errors import MoePruneError
from moeprune.pipeline.recipe import Recipe
from moeprune.pipeline.run import run_recipe
from recover.common import calib_file as _calib
from recover.common import reap_recipe as _recipe
from moeprune.testing import save_tiny


def _held_batches(recipe):
    """The held-back calibration batches: the last eighth of the calibration set, as recovery holds back."""
    from moeprune.checkpoint.model_dir import load_tokenizer
    from moeprune.observe.calibration import load_calibration
    from moeprune.pipeline.recipe import calibration_spec
    from moeprune.recover.router_kd import split_batches

    calib = load_calibration(calibration_spec(recipe), load_tokenizer(Path(recipe.model)), batch_size=2)
    return split_batches(calib.batches, tokens=recipe.recover.tokens)[1]


def _moe_blocks(model) -> dict[int, torch.nn.Module]:
    return {i: layer.mlp for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")}


def _independent_errors(src: Path, out: Path, batches) -> dict[bool, float]:
    """Sum over MoE layers of ||Z - Z'||^2 / ||Z||^2, Z the original block's output on its own inputs (the
    original model's, non-padding tokens), Z' the stock-loaded output checkpoint's block, flag each way."""
    base = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    blocks = _moe_blocks(base)
    inputs: dict[int, list] = {i: [] for i in blocks}
    mask = {}
    hooks = [b.register_forward_pre_hook(lambda _m, a, i=i: inputs[i].append(a[0].reshape(-1, a[0].shape[-1])[mask["m"]]))
             for i, b in blocks.items()]
    with torch.no_grad():
        for b in batches:
            mask["m"] = b["attention_mask"].reshape(-1).bool()
            base(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    for h in hooks:
        h.remove()
    x = {i: torch.cat(v) for i, v in inputs.items()}
    errors = {}
    for flag in (True, False):
        pruned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, norm_topk_prob=flag).eval()
        total = 0.0
        with torch.no_grad():
            for i, block in _moe_blocks(pruned).items():
                z = blocks[i](x[i].unsqueeze(0)).reshape(-1, x[i].shape[-1]).double()
                zp = block(x[i].unsqueeze(0)).reshape(-1, x[i].shape[-1]).double()
                total += float(((z - zp) ** 2).sum() / (z ** 2).sum())
        errors[flag] = total
    return errors


@pytest.mark.parametrize("model_type", ["qwen2_moe", "olmoe"])
def test_auto_keeps_the_setting_with_the_lower_measured_error(tmp_path, monkeypatch, model_type):
    monkeypatch.setenv("MOEPRUNE_CACHE", str(tmp_path / "cache"))
    model, calib = save_tiny(tmp_path / "m", model_type), _calib(tmp_path / "calib.txt")
    recipe = _recipe(model, calib, execution="layerwise", recover={"method": "none", "gate_scale": "auto"})
    report = run_recipe(recipe, out_dir=tmp_path / "o", progress=False, log=lambda *_: None)
    gs = report["recovery"]["gate_scale"]
    source = json.loads((model / "config.json").read_text())["norm_topk_prob"]
    assert gs["key"] == "norm_topk_prob" and gs["source"] == source
    errors = _independent_errors(model, tmp_path / "o", _held_batches(recipe))
    assert errors[True] != errors[False]
    want = min(errors, key=errors.get)
    assert gs["chosen"] == want
    assert json.loads((tmp_path / "o" / "config.json").read_text())["norm_topk_prob"] == want
    for flag, err in errors.items():
        assert gs["error"][str(flag).lower()] == pytest.approx(err, rel=1e-5)
    # nothing but the config changes without training: the weights are those of plain pruning
    plain = run_recipe(_recipe(model, calib), out_dir=tmp_path / "plain", progress=False, log=lambda *_: None)
    assert "recovery" not in plain
    assert (tmp_path / "o" / "model.safetensors").read_bytes() == (tmp_path / "plain" / "model.safetensors").read_bytes()


def test_gate_scale_without_a_flag_is_skipped_with_a_note_or_refused(tmp_path, monkeypatch):
    from moeprune.pipeline.plan import make_plan

    monkeypatch.setenv("MOEPRUNE_CACHE", str(tmp_path / "cache"))
    model, calib = save_tiny(tmp_path / "m", "mixtral"), _calib(tmp_path / "calib.txt")  # always renormalised
    with pytest.raises(MoePruneError, match="recover.gate_scale: renormalize needs a renormalisation flag"):
        make_plan(_recipe(model, calib, recover={"method": "none", "gate_scale": "renormalize"}), out_dir=tmp_path / "x")
    report = run_recipe(_recipe(model, calib, recover={"method": "none", "gate_scale": "auto"}),
                        out_dir=tmp_path / "o", progress=False, log=lambda *_: None)
    gs = report["recovery"]["gate_scale"]
    assert gs["applicable"] is False and gs["note"].startswith("not applicable: Mixtral")
    assert json.loads((tmp_path / "o" / "config.json").read_text()).keys() == \
        json.loads((model / "config.json").read_text()).keys()


def test_recover_none_needs_a_gate_scale_and_logit_kd_layerwise_fits_the_budget(tmp_path):
    from pydantic import ValidationError

    from moeprune.pipeline.plan import make_plan

    with pytest.raises(ValidationError, match="method none with gate_scale keep does nothing"):
        Recipe.model_validate({"model": "demo", "ratio": 0.5, "recover": {"method": "none"}})
    model, calib = save_tiny(tmp_path / "m", "qwen2_moe"), _calib(tmp_path / "calib.txt")
    plan = make_plan(_recipe(model, calib, execution="layerwise", recover={"gate_scale": "auto"}), out_dir=tmp_path / "x")
    assert plan.execution == "layerwise" and plan.recovery_row.method == "router_kd"  # streamed (execution/streamkd.py)
    from moeprune.pipeline.plan import recovery_rows

    need = {row.method: row.total for row in recovery_rows(plan)}
    assert need["router_kd_block"] < need["router_kd"]
    budget = (need["router_kd_block"] + need["router_kd"]) // 2
    with pytest.raises(MoePruneError, match="router_kd needs about .* methods that fit: router_kd_block"):
        make_plan(_recipe(model, calib, execution="layerwise", max_memory=budget, recover={"gate_scale": "auto"}),
                  out_dir=tmp_path / "x")
    plan = make_plan(_recipe(model, calib, execution="layerwise", recover={"method": "router_kd_block"}),
                     out_dir=tmp_path / "y")
    assert plan.execution == "layerwise" and plan.calibration is not None


def test_cli_gate_scale_alone_and_logit_kd_with_gate_scale(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from moeprune.cli import cli
    from moeprune.commands import surgery  # noqa: F401

    monkeypatch.setenv("MOEPRUNE_CACHE", str(tmp_path / "cache"))
    model, calib = save_tiny(tmp_path / "m", "qwen2_moe"), _calib(tmp_path / "calib.txt")
    common = ["prune", model, "--method", "reap", "--ratio", 0.5, "--calib", calib, "--max-length", 32,
              "--batch-size", 2, "--dtype", "float32"]
    res = CliRunner().invoke(cli, [str(a) for a in [*common, "-o", tmp_path / "a", "--gate-scale", "no_renormalize",
                                                    "--execution", "layerwise"]])
    assert res.exit_code == 0, res.output
    assert "recover: no training" in res.output and "gate scale: norm_topk_prob = False (source True)" in res.output
    assert json.loads((tmp_path / "a" / "config.json").read_text())["norm_topk_prob"] is False
    res = CliRunner().invoke(cli, [str(a) for a in [*common, "-o", tmp_path / "b", "--recover", "router_kd",
                                                    "--recover-steps", 3, "--gate-scale", "auto"]])
    assert res.exit_code == 0, res.output
    rec = json.loads((tmp_path / "b" / "moeprune.json").read_text())["recovery"]
    assert rec["method"] == "router_kd" and rec["steps"] == 3 and rec["gate_scale"]["mode"] == "auto"
    chosen = rec["gate_scale"]["chosen"]
    assert json.loads((tmp_path / "b" / "config.json").read_text())["norm_topk_prob"] == chosen
    assert f"gate scale: norm_topk_prob = {chosen}" in res.output
