"""WeightLoader builds every in-memory tensor exactly as `from_pretrained` does, experts read into place."""

from __future__ import annotations

import pytest
import torch
from moeprune.testing import tiny_model

import moeprune.checkpoint.loader as loader_mod
from moeprune.checkpoint.model_dir import load_model
from moeprune.execution.layers import _skeleton
from moeprune.checkpoint.loader import WeightLoader
from moeprune.checkpoint.names import CheckpointNames
from moeprune.checkpoint.safetensors_io import Checkpoint, read_tensor


@pytest.mark.parametrize(("model_type", "stacked"), [("mixtral", True), ("qwen2_moe", True), ("gpt_oss", False)])
def test_every_tensor_equals_the_stock_loader(tmp_path, monkeypatch, model_type, stacked):
    tiny_model(model_type).to(torch.bfloat16).save_pretrained(tmp_path / "m", max_shard_size="100KB")
    want = load_model(tmp_path / "m", dtype="auto", device="cpu").state_dict()
    model = _skeleton(tmp_path / "m", torch.bfloat16)
    loader = WeightLoader(Checkpoint(tmp_path / "m"), CheckpointNames(model))
    calls = []
    real = WeightLoader._stacked
    monkeypatch.setattr(WeightLoader, "_stacked", lambda self, group: calls.append(len(group)) or real(self, group))
    for name in loader.sources:
        got = loader.tensor(name)
        assert got.dtype == want[name].dtype and torch.equal(got, want[name]), name
    # per-expert tensors on disk are read straight into one stacked tensor; fused ones need no stacking
    assert bool(calls) == stacked
    if stacked:  # and the stacked read equals the table's own list-then-stack conversion
        monkeypatch.setattr(loader_mod, "_stacks_first", lambda conv: False)
        for name in [n for n in loader.sources if "experts" in n]:
            assert torch.equal(loader.tensor(name), want[name]), name


def test_read_into_refuses_a_wrong_target(tmp_path):
    tiny_model("mixtral").save_pretrained(tmp_path / "m")
    ckpt = Checkpoint(tmp_path / "m")
    info = next(i for i in ckpt.tensors.values() if len(i.shape) == 2)
    out = torch.empty(info.shape, dtype=torch.float32)
    assert read_tensor(info, out=out) is out and torch.equal(out, read_tensor(info))
    with pytest.raises(ValueError):
        read_tensor(info, out=torch.empty(info.shape[0] + 1, info.shape[1]))
    with pytest.raises(ValueError):
        read_tensor(info, out=torch.empty(info.shape, dtype=torch.float64))
