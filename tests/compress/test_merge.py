"""Merging: exact cluster counts, neuron alignment, weighted averages, and a checkpoint that shrinks."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moeprune.checkpoint.writer import save_compressed
from moeprune.compress.experts_view import read_expert, write_expert
from moeprune.compress.merge import (MergePlan, align_to, apply_merge, hc_smoe_clusters, m_smoe_clusters,
                                     merge_weights, plan_merge)
from moeprune.inspect import summarize_module
from moeprune.models import MoEAdapter
from moeprune.observe import observe
from moeprune.testing import tiny_model

HERE = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("linkage", ["average", "single", "complete", "ward"])
@pytest.mark.parametrize("n_keep", [2, 3, 5, 7])
def test_hc_smoe_gives_exactly_the_requested_count(linkage, n_keep):
    feats = torch.randn(8, 16)
    freq = torch.arange(8.0)
    clusters = hc_smoe_clusters(feats, freq, n_keep, linkage=linkage)
    assert len(clusters) == n_keep
    assert sorted(j for c in clusters for j in c) == list(range(8))
    assert all(c[0] == max(c, key=lambda j: (freq[j], -j)) for c in clusters)  # most used represents


def test_hc_smoe_groups_cluster_within_groups():
    clusters = hc_smoe_clusters(torch.randn(8, 4), torch.ones(8), 4, groups=2)
    assert len(clusters) == 4
    assert all(len({j // 4 for j in c}) == 1 for c in clusters)
    assert sum(1 for c in clusters if c[0] < 4) == 2


def test_m_smoe_leaders_are_most_used_and_members_join_most_similar():
    freq = torch.tensor([5.0, 9, 1, 7, 2, 3, 8, 4])
    sim = torch.eye(8)
    sim[2, 3] = sim[3, 2] = 0.9  # expert 2 is most like 3
    clusters = m_smoe_clusters(sim, freq, 3)
    assert len(clusters) == 3 and sorted(c[0] for c in clusters) == [1, 3, 6]
    assert 2 in next(c for c in clusters if c[0] == 3)


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss"])  # concat and interleaved/transposed layouts
def test_alignment_recovers_a_permuted_copy(model_type):
    adapter = MoEAdapter(tiny_model(model_type))
    layer = adapter.layers[0]
    dom = read_expert(adapter, layer, 0)
    perm = torch.randperm(dom.gate.shape[0])
    aligned, found = align_to(dom, dom.permuted(perm))
    for name, value in dom.fields().items():
        if value is not None:
            torch.testing.assert_close(aligned.fields()[name], value, rtol=0, atol=0)
    assert torch.equal(perm[found], torch.arange(len(perm)))
    merged = merge_weights([dom, aligned], torch.tensor([3.0, 1.0]))
    torch.testing.assert_close(merged.gate, dom.gate)
    # the canonical view writes back exactly
    write_expert(adapter, layer, 1, dom)
    torch.testing.assert_close(read_expert(adapter, layer, 1).down, dom.down)


def test_merge_is_the_frequency_weighted_average_and_router_rules():
    model = tiny_model("mixtral")
    adapter = MoEAdapter(model)
    layer = adapter.layers[0]
    e0, e5 = read_expert(adapter, layer, 0), read_expert(adapter, layer, 5)
    rows = adapter.tensor(layer, "gate.weight").detach().clone()
    plan = MergePlan("test", {i: [[0, 5], [1], [2, 3], [4, 6, 7]] for i in (0, 1)})
    freq = {i: torch.tensor([3.0, 1, 1, 1, 1, 1, 1, 1]) for i in (0, 1)}
    kept = apply_merge(model, plan, freq=freq, router="weighted")
    assert kept[0] == [0, 1, 2, 4]
    got = read_expert(adapter.__class__(model), MoEAdapter(model).layers[0], 0)
    torch.testing.assert_close(got.gate, (0.75 * e0.gate + 0.25 * e5.gate).float().double(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(MoEAdapter(model).tensor(MoEAdapter(model).layers[0], "gate.weight")[0],
                               0.75 * rows[0] + 0.25 * rows[5])
    model2 = tiny_model("mixtral")
    apply_merge(model2, plan, freq=freq, router="dominant")
    torch.testing.assert_close(MoEAdapter(model2).tensor(MoEAdapter(model2).layers[0], "gate.weight")[0], rows[0])


@pytest.mark.parametrize("method", ["hc_smoe", "m_smoe"])
def test_merged_checkpoint_reloads_smaller_in_stock_transformers(method, tmp_path):
    model = tiny_model("qwen2_moe")
    batches = [{"input_ids": torch.randint(3, 128, (2, 16))}]
    obs = observe(model, batches, collect=("all_means", "router_gram"), progress=False)
    adapter = MoEAdapter(model)
    plan = plan_merge(obs, adapter, method=method, n_keep=3)
    assert all(len(c) == 3 for c in plan.clusters.values())
    before = summarize_module(model)
    apply_merge(model, plan, freq={i: s.count for i, s in obs.layers.items()}, align=method == "m_smoe")
    after = summarize_module(model)
    out = save_compressed(model, tmp_path / "m", provenance={"clusters": plan.clusters})
    per_expert = before.bytes["expert"] // (2 * 8)
    assert after.bytes["expert"] == 2 * 3 * per_expert
    disk = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert abs(disk - after.bytes["total"]) < 0.02 * after.bytes["total"]  # header overhead only
    jobs = [{"model_dir": str(out), "input_ids": [[5, 6, 7, 8]], "out": str(tmp_path / "r.st")}]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    proc = subprocess.run([sys.executable, str(HERE / "stock_loader.py"), str(tmp_path / "jobs.json")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    reloaded = load_file(tmp_path / "r.st")
    assert reloaded["param.model.layers.0.mlp.experts.gate_up_proj"].shape[0] == 3
    assert json.loads((out / "config.json").read_text())["num_experts"] == 3
    with torch.no_grad():
        torch.testing.assert_close(reloaded["logits"], model(torch.tensor([[5, 6, 7, 8]])).logits,
                                   rtol=1e-4, atol=1e-5)
