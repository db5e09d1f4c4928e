"""scripts/pad_demo_experts.py: zero-padded routed experts compute the same function; the source is untouched."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from moeprune.testing import save_tiny

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("pad_demo_experts", ROOT / "scripts" / "pad_demo_experts.py")
pad = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pad)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("src") / "qwen2", "qwen2_moe")  # experts 32 wide


def _logits(folder):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([[1, 5, 9, 40, 7, 3, 60, 2]])).logits


def test_padding_keeps_the_function_and_the_source(tiny, tmp_path):
    before = {p.name: p.read_bytes() for p in tiny.iterdir()}
    out = tmp_path / "padded"
    assert pad.main([str(tiny), str(out), "--width", "64"]) == 0
    assert {p.name: p.read_bytes() for p in tiny.iterdir()} == before  # the input model is only read
    config = json.loads((out / "config.json").read_text())
    assert config["moe_intermediate_size"] == 64
    tensors = load_file(out / "model.safetensors")
    gate = [t for k, t in tensors.items() if k.endswith("experts.0.gate_proj.weight")][0]
    down = [t for k, t in tensors.items() if k.endswith("experts.0.down_proj.weight")][0]
    assert gate.shape[0] == 64 and down.shape[1] == 64 and not gate[32:].any() and not down[:, 32:].any()
    torch.testing.assert_close(_logits(out), _logits(tiny), rtol=0, atol=1e-5)
    again = tmp_path / "again"
    assert pad.main([str(tiny), str(again), "--width", "64"]) == 0
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()  # deterministic


@pytest.mark.parametrize("width", [16, 48])  # narrower than trained; not a multiple of 32
def test_bad_width_is_a_one_line_error(tiny, tmp_path, width, capsys):
    assert pad.main([str(tiny), str(tmp_path / "out"), "--width", str(width)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Error: --width") and err.count("\n") == 1
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_existing_output_is_refused(tiny, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    assert pad.main([str(tiny), str(tmp_path / "out")]) == 2
    assert "exists" in capsys.readouterr().err and (tmp_path / "out" / "keep.txt").read_text() == "x"
