"""The statistics schema: generated storage/merge/save/load, exact combination, damaged folders refused."""

import copy
import json

import pytest
import torch
from click.testing import CliRunner

from moeprune.cli import cli
from moeprune.commands import pipeline_cmds  # noqa: F401
from moeprune.errors import MoePruneError
from moeprune.observe import Observations, observe
from moeprune.observe.combine import combine_observations
from moeprune.observe.stats import STATS, LayerStats, Stat
from moeprune.testing import tiny_model

ALL = ("routed_means", "all_means", "router_gram")


def _batches(n=4, seed=5):
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(n):
        ids = torch.randint(3, 128, (2, 8), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 3 + b:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


@pytest.fixture(scope="module")
def observed():
    model = tiny_model("mixtral")
    batches = _batches()
    whole = observe(model, batches, collect=ALL, progress=False)
    halves = [observe(model, batches[:2], collect=ALL, progress=False),
              observe(model, batches[2:], collect=ALL, progress=False)]
    return model, whole, halves


def _assert_equal_stats(a: Observations, b: Observations):
    assert a.num_tokens == b.num_tokens
    for i in a.layers:
        ta, tb = a.layers[i].tensors(), b.layers[i].tensors()
        assert sorted(ta) == sorted(tb)
        for name in ta:
            torch.testing.assert_close(ta[name], tb[name], rtol=1e-12, atol=1e-12, msg=name)


def test_a_new_row_in_the_table_is_stored_merged_and_saved(monkeypatch, tmp_path):
    monkeypatch.setitem(STATS, "peak", Stat(("E", "H"), "max", group="peaks"))
    a = LayerStats(3, 2, groups={"peaks"})
    assert a.peak.shape == (3, 2) and a.out_sum is None  # allocated only for its group
    b = copy.deepcopy(a)
    a.peak[0, 0], b.peak[0, 0], a.count[1], b.count[1] = 5.0, 2.0, 3.0, 4.0
    a.max_abs[2], b.max_abs[2] = 1.0, 7.0
    a.merge_(b)
    assert a.peak[0, 0] == 5.0 and a.count[1] == 7.0 and a.max_abs[2] == 7.0  # max, sum, max
    Observations({0: a}, {"num_experts": {"0": 3}}).save(tmp_path / "o")
    back = Observations.load(tmp_path / "o").layers[0]
    assert torch.equal(back.peak, a.peak) and torch.equal(back.count, a.count)


def test_merging_differently_collected_statistics_is_refused():
    with pytest.raises(MoePruneError, match="different kinds"):
        LayerStats(3, 2).merge_(LayerStats(3, 2, groups={"router_gram"}))


def test_combining_two_halves_equals_observing_the_whole(observed, tmp_path):
    model, whole, halves = observed
    assert halves[0].num_tokens and halves[1].num_tokens
    combined = combine_observations(halves, sources=["a", "b"])
    _assert_equal_stats(combined, whole)
    parts = combined.meta["calibration"]["combined"]
    assert [p["source"] for p in parts] == ["a", "b"] and sum(p["num_tokens"] for p in parts) == whole.num_tokens
    combined.check_model(model)  # same fingerprint and shapes as the model


def test_observe_merge_command(observed, tmp_path):
    model, whole, halves = observed
    halves[0].save(tmp_path / "a")
    halves[1].save(tmp_path / "b")
    result = CliRunner().invoke(cli, ["observe-merge", str(tmp_path / "a"), str(tmp_path / "b"), "-o",
                                      str(tmp_path / "ab")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    _assert_equal_stats(Observations.load(tmp_path / "ab"), whole)
    # another model's observations (other fingerprint) are refused, naming the field
    other = observe(tiny_model("mixtral", seed=1), _batches(1), collect=ALL, progress=False)
    other.save(tmp_path / "other")
    result = CliRunner().invoke(cli, ["observe-merge", str(tmp_path / "a"), str(tmp_path / "other"), "-o",
                                      str(tmp_path / "x")])
    assert result.exit_code == 2 and "model_fingerprint differs" in result.output
    assert not (tmp_path / "x").exists()


def _damage(whole, tmp_path, name):
    folder = tmp_path / name
    whole.save(folder)
    return folder


def test_damaged_observation_folders_are_one_error_naming_the_folder(observed, tmp_path):
    from safetensors.torch import load_file, save_file

    model, whole, _ = observed
    cases = {}
    f = _damage(whole, tmp_path, "badjson")
    (f / "observations.json").write_text("{not json")
    cases[f] = "not valid JSON"
    f = _damage(whole, tmp_path, "truncated")
    data = (f / "observations.safetensors").read_bytes()
    (f / "observations.safetensors").write_bytes(data[: len(data) // 3])
    cases[f] = "cannot be read"
    f = _damage(whole, tmp_path, "unknown")
    raw = load_file(f / "observations.safetensors")
    save_file({**raw, "layer.0.mystery": torch.zeros(8, dtype=torch.float64)}, f / "observations.safetensors")
    cases[f] = "unknown tensor 'layer.0.mystery'"
    f = _damage(whole, tmp_path, "nan")
    raw = load_file(f / "observations.safetensors")
    raw["layer.1.reap_sum"][3] = float("nan")
    save_file(raw, f / "observations.safetensors")
    cases[f] = "reap_sum holds NaN"
    f = _damage(whole, tmp_path, "shape")
    raw = load_file(f / "observations.safetensors")
    raw["layer.0.logit_gram"] = raw["layer.0.logit_gram"][:, :5].contiguous()
    save_file(raw, f / "observations.safetensors")
    cases[f] = "logit_gram has shape"
    for folder, message in cases.items():
        with pytest.raises(MoePruneError, match=message) as info:
            Observations.load(folder)
        assert str(folder) in str(info.value) and "\n" not in str(info.value)


def test_observations_of_another_expert_count_with_a_copied_fingerprint_are_refused(observed, tmp_path):
    model, whole, _ = observed
    fewer = Observations({i: LayerStats(6, 64, groups=set(ALL) | {"router_prob"}) for i in whole.layers},
                         {**whole.meta, "num_experts": {str(i): 6 for i in whole.layers}})
    fewer.save(tmp_path / "fewer")
    loaded = Observations.load(tmp_path / "fewer")  # consistent in itself
    with pytest.raises(MoePruneError, match="expected \\(8,\\)"):
        loaded.check_model(model)  # fingerprint copied from the 8-expert model, shapes say 6


def test_a_damaged_cache_entry_is_a_miss_and_is_replaced(tmp_path, monkeypatch):
    from moeprune.commands import surgery  # noqa: F401
    from moeprune.testing import save_tiny

    model = save_tiny(tmp_path / "tiny")
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(f"{i} + {i} = {2 * i}, said the cat." for i in range(12)))
    monkeypatch.setenv("MOEPRUNE_CACHE", str(tmp_path / "cache"))

    def prune(out):
        result = CliRunner().invoke(cli, ["prune", str(model), "-o", str(tmp_path / out), "--method", "frequency",
                                          "--ratio", "0.5", "--calib", str(calib), "--max-length", "16"])
        assert result.exit_code == 0, result.output
        return result.output

    prune("a")
    (entry,) = (tmp_path / "cache" / "observations").iterdir()
    (entry / "observations.json").write_text("{truncated")
    assert "ignoring a damaged cache entry" in prune("b")
    assert "reusing cached observations" in prune("c")  # replaced by a good entry
    assert json.loads((entry / "observations.json").read_text())["stats_version"] >= 3
    for damage in ("observations.json", "observations.safetensors"):  # half-written entries too
        (entry / damage).unlink()
        assert "reusing" not in prune(f"d-{damage}")
        assert "reusing cached observations" in prune(f"e-{damage}")
    assert [p.name for p in (tmp_path / "cache" / "observations").iterdir()] == [entry.name]
    assert json.loads((tmp_path / "b" / "moeprune.json").read_text())["kept"] == \
        json.loads((tmp_path / "a" / "moeprune.json").read_text())["kept"]


def test_prune_refuses_observations_whose_shapes_do_not_fit_the_model(observed, tmp_path):
    from moeprune.commands import surgery  # noqa: F401
    from moeprune.testing import save_tiny

    _, whole, _ = observed
    model = save_tiny(tmp_path / "tiny")  # the same weights as `observed`: the fingerprint matches
    fewer = Observations({i: LayerStats(6, 64, groups={"router_prob"}) for i in whole.layers},
                         {**whole.meta, "num_experts": {str(i): 6 for i in whole.layers}, "collected": []})
    fewer.save(tmp_path / "fewer")
    result = CliRunner().invoke(cli, ["prune", str(model), "-o", str(tmp_path / "out"), "--method", "reap",
                                      "--ratio", "0.5", "--observations", str(tmp_path / "fewer")])
    assert result.exit_code == 2, result.output
    assert "expected (8,)" in result.output and str(tmp_path / "fewer") in result.output
    assert not (tmp_path / "out").exists()
