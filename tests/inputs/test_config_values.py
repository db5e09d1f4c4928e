"""config.json numbers: NaN/Infinity anywhere, and sizes, counts, top-k, eps and rope theta out of range are one
`Error:` line naming config.json and the field, exit status 2 (inspect and run alike); every shipped and tiny
test model passes."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner
from cli_checks import one_error_line

from moeprune.checkpoint.model_dir import DEMO_MODEL_DIR


def _cli(*args: str):
    from moeprune.cli import _register_commands, cli

    _register_commands()
    return CliRunner().invoke(cli, list(args))


def _model(tmp_path, **changes):
    model = tmp_path / "m"
    shutil.copytree(DEMO_MODEL_DIR, model)
    config = json.loads((model / "config.json").read_text())
    for key, value in changes.items():
        node, parts = config, key.split("__")
        for part in parts[:-1]:
            node = node[part]
        node[parts[-1]] = value
    (model / "config.json").write_text(json.dumps(config))  # json writes NaN / Infinity bare, as damaged files do
    return model


BAD = [
    ("rms_norm_eps", float("nan")),
    ("rms_norm_eps", float("inf")),
    ("rms_norm_eps", 0.0),
    ("rms_norm_eps", -1e-6),
    ("rms_norm_eps", 5.0),
    ("initializer_range", float("nan")),
    ("router_aux_loss_coef", float("-inf")),
    ("rope_parameters__rope_theta", float("inf")),
    ("rope_parameters__rope_theta", -10000.0),
    ("rope_parameters__rope_theta", 0),
    ("hidden_size", 10**12),
    ("hidden_size", -256),
    ("hidden_size", 0),
    ("hidden_size", 256.5),
    ("hidden_size", "256"),
    ("hidden_size", True),
    ("intermediate_size", -1),
    ("moe_intermediate_size", 10**9),
    ("shared_expert_intermediate_size", -128),
    ("num_hidden_layers", -4),
    ("num_hidden_layers", 0),
    ("num_hidden_layers", 10**6),
    ("num_attention_heads", 0),
    ("num_key_value_heads", -4),
    ("num_key_value_heads", 3),  # does not divide 8 heads
    ("vocab_size", 0),
    ("vocab_size", 10**12),
    ("max_position_embeddings", -512),
    ("max_position_embeddings", 10**12),
    ("num_experts", 10**12),
    ("num_experts", -16),
    ("num_experts", 0),
    ("num_experts", 16.0),
    ("num_experts_per_tok", 0),
    ("num_experts_per_tok", -2),
    ("num_experts_per_tok", 17),
    ("decoder_sparse_step", 0),
]


@pytest.mark.parametrize("field,value", BAD, ids=[f"{f}={v!r}" for f, v in BAD])
def test_bad_config_value_is_one_line_naming_config_json_and_the_field(tmp_path, field, value):
    model = _model(tmp_path, **{field: value})
    name = field.replace("__", ".")
    line = one_error_line(_cli("inspect", str(model)), "config.json", name)
    assert line.count("Error:") == 1


def test_nan_eps_is_refused_by_run_before_any_output(tmp_path):
    """It used to be accepted and written back as {"__float__": "NaN"}."""
    model = _model(tmp_path, rms_norm_eps=float("nan"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {model}\nmethod: frequency\nratio: 0.25\n")
    one_error_line(_cli("run", str(recipe), "-o", str(tmp_path / "out")), "config.json", "rms_norm_eps", "NaN")
    assert not (tmp_path / "out").exists()


def test_nested_text_config_is_checked(tmp_path):
    from moeprune.checks import check_config_values
    from moeprune.errors import MoePruneError

    with pytest.raises(MoePruneError, match=r"config.json: text_config.hidden_size = -1"):
        check_config_values({"model_type": "x", "text_config": {"hidden_size": -1}}, tmp_path / "config.json")
    with pytest.raises(MoePruneError, match=r"config.json: text_config.rope_scaling.factor = NaN"):
        check_config_values({"text_config": {"rope_scaling": {"factor": float("nan")}}}, tmp_path / "config.json")


def test_values_at_the_bounds_are_accepted(tmp_path):
    """top-k equal to the expert count is a valid model (inspect works), only pruning it is impossible."""
    model = _model(tmp_path, num_experts_per_tok=16, num_key_value_heads=8, rms_norm_eps=0.5)
    done = _cli("inspect", str(model))
    assert done.exit_code == 0, done.output
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {model}\nmethod: frequency\nratio: 0.25\n")
    line = one_error_line(_cli("run", str(recipe), "-o", str(tmp_path / "out")), "top-k=16 of its 16 experts")
    assert "keep at least" not in line and "keep between" not in line  # never a count beyond the experts


def test_every_shipped_and_tiny_model_config_passes(tmp_path):
    from moeprune.checks import check_config_file
    from moeprune.testing import TINY, tiny_config

    for name in ("demo-moe", "study-moe"):
        check_config_file(DEMO_MODEL_DIR.parent / name)
    for model_type in TINY:
        folder = tmp_path / model_type
        tiny_config(model_type).save_pretrained(folder)
        check_config_file(folder)
