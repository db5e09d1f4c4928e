"""Damaged or unusual input model folders on the in-memory load path: one-line errors (issue 12)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from moeprune.checks import check_finite
from moeprune.errors import MoePruneError
from moeprune.checkpoint.model_dir import DEMO_MODEL_DIR, load_config, load_model, load_tokenizer, resolve_model_dir


@pytest.fixture()
def model_dir(tmp_path):
    path = tmp_path / "model"
    shutil.copytree(DEMO_MODEL_DIR, path)
    return path


@pytest.mark.parametrize("damage, reason", [
    (lambda data: data[: len(data) // 2], "incomplete metadata"),
    (lambda data: b"\xff" * 64, "header too large"),
    (lambda data: b"", "header too small"),
])
def test_damaged_safetensors_is_named(model_dir, damage, reason):
    shard = model_dir / "model.safetensors"
    shard.write_bytes(damage(shard.read_bytes()))
    with pytest.raises(MoePruneError, match=rf"{shard}: not a readable safetensors file .*{reason}"):
        load_model(model_dir)


def test_pickle_only_folder_is_refused_without_unpickling(model_dir, monkeypatch):
    (model_dir / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, model_dir / "pytorch_model.bin")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    with pytest.raises(MoePruneError, match="only pickle weights .*pytorch_model.bin.*never unpickles"):
        load_model(model_dir)


def test_config_without_expert_count_names_the_key(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    del config["num_experts"]
    (model_dir / "config.json").write_text(json.dumps(config))
    for load in (load_model, load_config):
        with pytest.raises(MoePruneError, match=r"config.json: no expert count .*'num_experts'"):
            load(model_dir)


def test_broken_tokenizer_json_is_one_error(model_dir):
    (model_dir / "tokenizer.json").write_text('{"broken": ')
    with pytest.raises(MoePruneError, match="cannot load the tokenizer"):
        load_tokenizer(model_dir)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weight_is_named(model_dir, value):
    shard = model_dir / "model.safetensors"
    tensors = load_file(shard)
    name = sorted(n for n in tensors if "experts" in n)[0]
    tensors[name].view(-1)[3] = value
    save_file(tensors, shard, metadata={"format": "pt"})
    layer = name.split(".experts")[0]  # the loaded model may fuse the experts into one tensor
    with pytest.raises(MoePruneError, match=rf"tensor {layer}\.experts\.\S*down_proj\S* holds 1 NaN/Inf"):
        load_model(model_dir)


def test_check_finite_skips_integer_tensors_and_passes_finite_ones():
    check_finite([("a", torch.ones(3)), ("b", torch.tensor([1, 2]))], where="x")
    with pytest.raises(MoePruneError, match="x: tensor c holds 1 NaN/Inf"):
        check_finite([("a", torch.ones(3)), ("c", torch.tensor([1.0, float("-inf")]))], where="x")


def test_local_demo_folder_wins_with_a_note(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert resolve_model_dir("demo") == DEMO_MODEL_DIR  # no local folder: the shipped one, silently
    assert capsys.readouterr().err == ""
    shutil.copytree(DEMO_MODEL_DIR, tmp_path / "demo")
    assert resolve_model_dir("demo") == (tmp_path / "demo").resolve()
    assert "using the local folder" in capsys.readouterr().err
