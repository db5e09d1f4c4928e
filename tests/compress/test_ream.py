"""REAM: saliency centroids, similarity grouping, the collected output similarity, saliency-weighted merge."""

from __future__ import annotations

import pytest
import torch

from moeprune.compress.experts_view import read_expert
from moeprune.compress.merge import align_to, ream_clusters, ream_similarity
from moeprune.models import MoEAdapter
from moeprune.observe import LayerStats, observe
from moeprune.execution.memory import compress_model
from moeprune.pipeline.recipe import Recipe
from moeprune.testing import tiny_model


def test_centroids_are_most_salient_and_members_join_most_similar():
    sal = torch.tensor([5.0, 9, 1, 7, 2, 3, 8, 4])
    sim = torch.eye(8)
    sim[2, 3] = sim[3, 2] = 0.9  # 2 is most like 3
    sim[4, 1] = sim[1, 4] = 0.8
    for n_keep in (3, 5):
        clusters = ream_clusters(sim, sal, n_keep)
        assert len(clusters) == n_keep
        assert sorted(j for c in clusters for j in c) == list(range(8))
        assert sorted(c[0] for c in clusters) == sorted(sorted(range(8), key=lambda j: -sal[j])[:n_keep])
    clusters = ream_clusters(sim, sal, 3)
    assert 2 in next(c for c in clusters if c[0] == 3) and 4 in next(c for c in clusters if c[0] == 1)


def test_groups_and_pseudo_pruning_group_size():
    sal = torch.arange(8.0)
    sim = torch.rand(8, 8)
    clusters = ream_clusters(sim, sal, 4, groups=2)
    assert len(clusters) == 4 and all(len({j // 4 for j in c}) == 1 for c in clusters)
    # group_size 3: the most salient centroid (7) takes its two most similar free experts first
    sim = torch.zeros(8, 8)
    sim[7, 0], sim[7, 1], sim[7, 2] = 0.9, 0.8, 0.7
    sim[6, 0], sim[6, 2] = 1.0, 0.95
    clusters = ream_clusters(sim, sal, 3, group_size=3)
    assert next(c for c in clusters if c[0] == 7) == [7, 0, 1]
    assert next(c for c in clusters if c[0] == 6)[1] == 2
    assert all(len(c) <= 3 for c in clusters)
    from moeprune.errors import MoePruneError

    with pytest.raises(MoePruneError, match="group_size"):
        ream_clusters(sim, sal, 2, group_size=3)


def test_similarity_mixes_output_and_gate_similarity():
    cos = torch.tensor([[1.0, 0.5], [0.5, 1.0]])
    gram = torch.tensor([[4.0, 0.0], [0.0, 1.0]])  # orthogonal router columns: distance sqrt(2) = max
    s = LayerStats(2, 3, groups=("output_cosine", "router_gram"))
    s.out_cos_sum = (cos * 4).double()
    s.data["out_cos_count"] += 4
    s.logit_gram = gram.double()
    want_out = torch.tensor([[1.0, 0.75], [0.75, 1.0]])
    torch.testing.assert_close(s.output_similarity, want_out.double())
    torch.testing.assert_close(ream_similarity(s), ((want_out + torch.eye(2)) / 2).double())


def test_collected_output_cosine_equals_a_hand_computation():
    model = tiny_model("mixtral")
    adapter = MoEAdapter(model)
    layer = adapter.layers[0]
    seen = []
    handle = layer.block.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    ids = torch.randint(3, 128, (2, 6))
    obs = observe(model, [{"input_ids": ids}], collect=("output_cosine",), progress=False)
    handle.remove()
    x = seen[0].reshape(-1, seen[0].shape[-1])
    with torch.no_grad():
        f = torch.stack([adapter.expert_forward(layer, j, x) for j in range(layer.num_experts)]).double()
    u = f / f.norm(dim=-1, keepdim=True)
    want = torch.zeros(layer.num_experts, layer.num_experts, dtype=torch.float64)
    for t in range(x.shape[0]):
        want += u[:, t] @ u[:, t].T
    torch.testing.assert_close(obs.layers[0].out_cos_sum, want, rtol=1e-5, atol=1e-5)
    assert int(obs.layers[0].out_cos_count.sum()) == x.shape[0]


def test_ream_keeps_the_count_and_merges_by_saliency_after_alignment():
    model, ref = tiny_model("mixtral"), tiny_model("mixtral")
    ids = torch.randint(3, 128, (2, 16))
    obs = observe(model, [{"input_ids": ids}], collect=("output_cosine", "router_gram"), progress=False)
    recipe = Recipe.model_validate({"model": "x", "method": "ream", "keep": 3})
    decision = compress_model(model, obs, recipe)
    adapter, ref_adapter = MoEAdapter(model), MoEAdapter(ref)
    for i, clusters in decision.clusters.items():
        stats = obs.layers[i]
        assert len(clusters) == 3 == adapter.layer(i).num_experts
        assert sorted(c[0] for c in clusters) == sorted(sorted(range(8), key=lambda j: (-stats.reap[j], j))[:3])
        merged_any = False
        for new, cluster in enumerate(sorted(clusters, key=lambda c: c[0])):
            members = [read_expert(ref_adapter, ref_adapter.layer(i), j) for j in cluster]
            members = [members[0]] + [align_to(members[0], m)[0] for m in members[1:]]
            w = stats.reap[cluster] / stats.reap[cluster].sum()
            want = sum(float(wi) * m.gate.double() for wi, m in zip(w, members))
            got = read_expert(adapter, adapter.layer(i), new)
            torch.testing.assert_close(got.gate.double(), want, rtol=1e-5, atol=1e-6)
            merged_any |= len(cluster) > 1
        assert merged_any
    # the hand computation differs from plain frequency weighting (so the test can tell them apart)
    c = next(c for c in decision.clusters[0] if len(c) > 1)
    s = obs.layers[0]
    assert not torch.allclose(s.reap[c] / s.reap[c].sum(), s.count[c] / s.count[c].sum())


def test_infeasible_group_size_fails_in_the_plan(tmp_path):
    from moeprune.errors import MoePruneError
    from moeprune.pipeline.plan import make_plan
    from moeprune.testing import save_tiny

    model = save_tiny(tmp_path / "m", "mixtral")
    recipe = Recipe.model_validate({"model": str(model), "method": "ream", "keep": 2, "merge": {"group_size": 3}})
    with pytest.raises(MoePruneError, match="merge.group_size: 2 centroids of at most 3 experts cannot hold 8"):
        make_plan(recipe, out_dir=tmp_path / "o")
    recipe = Recipe.model_validate({"model": str(model), "method": "ream", "keep": 2, "merge": {"group_size": 4}})
    assert make_plan(recipe, out_dir=tmp_path / "o2").n_keep == 2
