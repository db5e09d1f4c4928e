"""Layer-wise observation == whole-model `observe`, with padding, dense first layers and disk spill."""

from __future__ import annotations

import pytest
import torch
from moeprune.testing import tiny_model

from moeprune.checkpoint.model_dir import load_model
from moeprune.observe import observe
from moeprune.execution.layers import HiddenStore, observe_layerwise

_COLLECT = ("routed_means", "router_gram", "all_means")


def _batches() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for b in range(3):
        ids = torch.randint(3, 120, (2, 16), generator=g)
        mask = torch.ones_like(ids)
        ids[0, -5:], mask[0, -5:] = 0, 0  # right padding
        if b == 1:
            ids[1, :3], mask[1, :3] = 0, 0  # left padding
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


@pytest.mark.parametrize(("model_type", "budget"), [("mixtral", None), ("deepseek_v3", 3000)])
def test_layerwise_equals_whole_model(tmp_path, model_type, budget):
    tiny_model(model_type).save_pretrained(tmp_path / "m", max_shard_size="100KB")
    batches = _batches()
    ref = observe(load_model(tmp_path / "m", device="cpu"), batches, collect=_COLLECT, progress=False)
    got = observe_layerwise(tmp_path / "m", batches, collect=_COLLECT, progress=False, device="cpu",
                            max_ram_bytes=budget)
    assert got.layers.keys() == ref.layers.keys()
    for i, stats in ref.layers.items():
        want, have = stats.tensors(), got.layers[i].tensors()
        assert want.keys() == have.keys()
        for name, t in want.items():
            torch.testing.assert_close(have[name], t, rtol=1e-5, atol=1e-5, msg=f"layer {i} {name}")
    assert got.layers[ref.meta["moe_layers"][0]].count.sum() == ref.meta["num_tokens"] * ref.meta["top_k"]
    for key in ("model_fingerprint", "num_tokens", "moe_layers", "num_experts", "top_k", "collected"):
        assert got.meta[key] == ref.meta[key], key
    assert (got.meta["spilled_batches"] > 0) == (budget is not None)


def test_saved_observations_round_trip(tmp_path):
    from moeprune.observe import Observations

    tiny_model("mixtral").save_pretrained(tmp_path / "m")
    obs = observe_layerwise(tmp_path / "m", _batches(), progress=False)
    back = Observations.load(obs.save(tmp_path / "obs"))
    assert torch.equal(back.layers[0].reap_sum, obs.layers[0].reap_sum)
    back.check_model(load_model(tmp_path / "m", device="cpu"))  # same fingerprint as the loaded model


def test_hidden_store_spills_past_budget():
    store = HiddenStore(max_ram_bytes=100, device=torch.device("cpu"))
    a, b = torch.randn(5), torch.randn(50)
    store.put(0, a)
    store.put(1, b)
    assert store.spilled == 1 and torch.equal(store.get(0), a) and torch.equal(store.get(1), b)
    store.close()
