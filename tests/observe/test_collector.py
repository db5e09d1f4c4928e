"""Every statistic against a brute-force loop over tokens, running each expert by hand."""

import pytest
import torch
import torch.nn.functional as F

from moeprune.models import MoEAdapter
from moeprune.observe import Collector, Observations, observe
from moeprune.testing import TINY, tiny_model

ALL = ("routed_means", "all_means", "router_gram")


def _batches():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding
    mask[2, 4:] = 0
    return [{"input_ids": ids[:2], "attention_mask": mask[:2]}, {"input_ids": ids[2:], "attention_mask": mask[2:]}]


def _expert_by_hand(experts, j, x):
    """SwiGLU expert from the raw fused weights: gate rows first, then up rows."""
    gate_up = experts.gate_up_proj[j].double()  # (2I, H)
    inter = gate_up.shape[0] // 2
    gate, up = x @ gate_up[:inter].T, x @ gate_up[inter:].T
    return (F.silu(gate) * up) @ experts.down_proj[j].double().T


# the router's probability of each expert, written out per architecture (not read from the table)
ROUTER_PROB = {"mixtral": lambda z: torch.softmax(z, dim=-1), "deepseek_v3": torch.sigmoid}


def _brute_force(model, batches):
    """Per layer, per valid token: the real gates (captured from the model) and hand-run experts."""
    adapter = MoEAdapter(model)
    seen = {layer.index: [] for layer in adapter.layers}
    handles = []
    for layer in adapter.layers:
        def pre(_m, args, kwargs, i=layer.index):
            seen[i].append((args[0].detach().double(), args[1].detach(), args[2].detach().double()))
        handles.append(layer.experts.register_forward_pre_hook(pre, with_kwargs=True))
    masks = []
    with torch.no_grad():
        for b in batches:
            model(**b, use_cache=False)
            masks.append(b["attention_mask"].reshape(-1).bool())
    for h in handles:
        h.remove()
    out = {}
    for layer in adapter.layers:
        e, hsz = layer.num_experts, model.config.hidden_size
        r = dict(count=torch.zeros(e), gate_sum=torch.zeros(e), norm_sum=torch.zeros(e), reap_sum=torch.zeros(e),
                 reap_prob_sum=torch.zeros(e),
                 max_abs=torch.zeros(e), out_sum=torch.zeros(e, hsz), all_out_sum=torch.zeros(e, hsz),
                 gram=torch.zeros(e, e), n=0)
        r = {k: (v.double() if torch.is_tensor(v) else v) for k, v in r.items()}
        w_router = adapter.tensor(layer, "gate.weight").double()
        for (x, idx, gates), valid in zip(seen[layer.index], masks):
            for t in range(x.shape[0]):
                if not valid[t]:
                    continue
                z = w_router @ x[t]
                prob = ROUTER_PROB[model.config.model_type](z)
                r["gram"] += torch.outer(z, z)
                r["n"] += 1
                for j in range(e):
                    r["all_out_sum"][j] += _expert_by_hand(layer.experts, j, x[t:t + 1])[0]
                for s in range(idx.shape[1]):
                    j = int(idx[t, s])
                    f = _expert_by_hand(layer.experts, j, x[t:t + 1])[0]
                    g = gates[t, s]
                    r["count"][j] += 1
                    r["gate_sum"][j] += g
                    r["norm_sum"][j] += f.norm()
                    r["reap_sum"][j] += g * f.norm()
                    r["reap_prob_sum"][j] += prob[j] * f.norm()
                    r["max_abs"][j] = max(r["max_abs"][j], f.abs().max())
                    r["out_sum"][j] += f
        out[layer.index] = r
    return out


@pytest.mark.parametrize("impl", ["grouped_mm", "eager"])  # the fused kernel's pairs, and the per-expert loop
@pytest.mark.parametrize("model_type", ["mixtral", "deepseek_v3"])  # softmax router; sigmoid + bias + groups
def test_statistics_equal_brute_force(model_type, impl):
    model = tiny_model(model_type)
    model.set_experts_implementation(impl)
    batches = _batches()
    obs = observe(model, batches, collect=ALL, progress=False)
    want = _brute_force(model, batches)
    valid_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    assert obs.meta["num_tokens"] == valid_tokens
    for i, s in obs.layers.items():
        r = want[i]
        assert int(s.count.sum()) == valid_tokens * MoEAdapter(model).top_k
        for name in ("count", "gate_sum", "norm_sum", "reap_sum", "reap_prob_sum", "max_abs", "out_sum",
                     "all_out_sum"):
            torch.testing.assert_close(getattr(s, name), r[name], rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(s.logit_gram, r["gram"], rtol=1e-5, atol=1e-6)
        assert s.all_count == r["n"] == s.logit_count
        torch.testing.assert_close(s.reap, r["reap_sum"] / r["count"].clamp(min=1))
        # renormalised top-k gates and router probabilities differ, so the two REAP variants do too
        assert not torch.allclose(s.reap_prob_sum, s.reap_sum)


@pytest.mark.parametrize("model_type,dtype", [("qwen2_moe", torch.float32), ("qwen2_moe", torch.bfloat16),
                                              ("deepseek_v3", torch.float32), ("llama4_text", torch.float32)])
def test_observation_leaves_output_bit_identical_and_model_unchanged(model_type, dtype):
    model = tiny_model(model_type).to(dtype)
    ids = torch.randint(3, 128, (2, 12))
    with torch.no_grad():
        before = model(ids).logits
        with Collector(model, collect=ALL):
            during = model(ids).logits
        after = model(ids).logits
    assert torch.equal(during, before)
    assert torch.equal(after, before)
    assert "forward" not in vars(MoEAdapter(model).layers[0].experts)


INDEXED = [t for t in TINY if t != "llama4_text"]  # llama4's experts are dense-prescaled (hooks, not a swap)


@pytest.mark.parametrize("model_type,impl", [(t, i) for t in INDEXED for i in ("grouped_mm", "eager")]
                         + [(t, "batched_mm") for t in ("qwen3_moe", "gpt_oss", "deepseek_v3")])
def test_every_family_and_experts_kernel_keeps_bfloat16_output_bit_identical(model_type, impl):
    from moeprune.observe.collector import _fused_implementation

    model = tiny_model(model_type).to(torch.bfloat16)
    model.set_experts_implementation(impl)
    assert _fused_implementation(MoEAdapter(model).layers[0].experts) == (impl != "eager")
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
        with Collector(model):
            during = model(ids).logits
    assert torch.equal(during, before)


def test_low_precision_outputs_accumulate_close_to_float64_brute_force():
    """Norms in the compute dtype with float32 accumulation, sums in float64: bounded against float64."""
    from moeprune.observe.collector import _LayerObserver

    model = tiny_model("mixtral")
    adapter = MoEAdapter(model)
    obs = _LayerObserver(adapter, adapter.layers[0], frozenset({"routed_means"}), None)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 8, (4096,), generator=g)
    gates = torch.rand(4096, generator=g).to(torch.bfloat16)
    outputs = (torch.randn(4096, 64, generator=g) * 3).to(torch.bfloat16)
    obs.add_pairs(ids, gates, outputs, None)
    out64, g64 = outputs.double(), gates.double()
    norms = out64.norm(dim=-1)
    s = obs.stats
    want = {"count": torch.bincount(ids, minlength=8).double(),
            "norm_sum": torch.zeros(8, dtype=torch.float64).index_add_(0, ids, norms),
            "reap_sum": torch.zeros(8, dtype=torch.float64).index_add_(0, ids, g64 * norms),
            "gate_sum": torch.zeros(8, dtype=torch.float64).index_add_(0, ids, g64),
            "out_sum": torch.zeros(8, 64, dtype=torch.float64).index_add_(0, ids, out64),
            "max_abs": torch.zeros(8, dtype=torch.float64).scatter_reduce_(0, ids, out64.abs().amax(-1), "amax")}
    for name, value in want.items():
        torch.testing.assert_close(getattr(s, name), value, rtol=1e-6, atol=0, msg=name)
    assert torch.equal(s.max_abs, want["max_abs"]) and torch.equal(s.count, want["count"])


def test_dense_prescaled_architecture_is_observed():
    model = tiny_model("llama4_text")
    batches = _batches()
    obs = observe(model, batches, progress=False)
    valid_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    (stats,) = obs.layers.values()
    assert int(stats.count.sum()) == valid_tokens * 2
    assert (stats.gate_sum > 0).sum() == (stats.count > 0).sum()


def test_observations_round_trip_and_fingerprint(tmp_path):
    model = tiny_model("mixtral")
    obs = observe(model, _batches(), collect=("router_gram",), progress=False)
    obs.save(tmp_path / "obs")
    back = Observations.load(tmp_path / "obs")
    assert back.meta == obs.meta
    for i in obs.layers:
        for name, t in obs.layers[i].tensors().items():
            assert torch.equal(back.layers[i].tensors()[name], t)
    back.check_model(model)
    from moeprune.errors import MoePruneError

    # observations written before the router-probability statistic existed load, and say what to do
    old = tmp_path / "old"
    obs.save(old)
    from safetensors.torch import load_file, save_file
    raw = load_file(old / "observations.safetensors")
    save_file({k: v for k, v in raw.items() if not k.endswith("reap_prob_sum")}, old / "observations.safetensors")
    stale = Observations.load(old)
    torch.testing.assert_close(stale.layers[0].reap, obs.layers[0].reap)
    with pytest.raises(MoePruneError, match="re-run `moeprune observe`"):
        stale.layers[0].reap_prob

    with pytest.raises(MoePruneError, match="different model"):
        back.check_model(tiny_model("mixtral", seed=1))
    with pytest.raises(MoePruneError, match="holds no observations"):
        Observations.load(tmp_path)


def test_unknown_statistic_refused():
    from moeprune.errors import MoePruneError

    with pytest.raises(MoePruneError, match="available: routed_means"):
        Collector(tiny_model("mixtral"), collect=("nope",))
