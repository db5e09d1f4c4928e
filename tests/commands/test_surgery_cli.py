"""`moeprune prune --keep` and `moeprune inspect`, including every bad input named in the spec."""

import json

import pytest
from click.testing import CliRunner
from transformers import AutoTokenizer

from moeprune.cli import cli
from moeprune.commands import surgery  # noqa: F401
from moeprune.testing import save_tiny

KEEP = {"0": [1, 2, 6, 7], "1": [0, 3, 4, 5]}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("src") / "tiny-mixtral")


def _run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _keep(tmp_path, plan):
    path = tmp_path / "keep.json"
    path.write_text(json.dumps(plan))
    return path


def test_prune_writes_loadable_checkpoint_with_tokenizer(model_dir, tmp_path):
    before = sorted((p.name, p.stat().st_mtime_ns) for p in model_dir.iterdir())
    result = _run("prune", model_dir, "-o", tmp_path / "out", "--keep", _keep(tmp_path, KEEP))
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_local_experts"] == 4
    assert AutoTokenizer.from_pretrained(out)("12+3")["input_ids"]
    assert json.loads((out / "moeprune.json").read_text())["kept"] == KEEP
    assert sorted((p.name, p.stat().st_mtime_ns) for p in model_dir.iterdir()) == before  # input untouched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]  # no temp leftovers


def test_inspect_matches_hand_count(model_dir):
    result = _run("inspect", model_dir, "--json")
    assert result.exit_code == 0, result.output
    s = json.loads(result.output)
    h, i, e, layers, vocab = 64, 64, 8, 2, 128
    expert = layers * e * (2 * i * h + h * i)  # gate_up (E, 2I, H) + down (E, H, I)
    router = layers * e * h
    attn = layers * (h * 4 * 16 + 2 * h * 2 * 16 + 4 * 16 * h)  # q, k, v, o with 4 heads / 2 kv heads of 16
    norms = layers * 2 * h + h
    embed = 2 * vocab * h  # untied embedding and lm_head
    assert s["params"]["expert"] == expert
    assert s["params"]["router"] == router
    assert s["params"]["other"] == attn + norms + embed
    assert s["params"]["total"] == expert + router + attn + norms + embed
    assert s["bytes"]["expert"] == 4 * expert  # float32
    assert s["experts_per_layer"] == {"0": 8, "1": 8} and s["top_k"] == 2
    assert s["files_bytes"] > 4 * expert
    text = _run("inspect", model_dir).output
    assert "Mixtral" in text and "expert" in text


def _error(result):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


@pytest.mark.parametrize("plan, message", [
    ({"0": [0, 1, 2, 9], "1": [0, 1, 2, 3]}, "layer 0 keeps expert 9, but the layer has 8 experts"),
    ({"0": [0, 1, 1, 3], "1": [0, 1, 2, 3]}, "layer 0 lists expert 1 more than once"),
    ({"0": [0, 1, 2, 3]}, "layer 1 is missing"),
    ({"0": [0, 1, 2, 3], "1": [0, 1, 2, 3], "5": [0, 1]}, "layer 5 is not an MoE layer"),
    ({"0": [3], "1": [4]}, "keeps 1 experts but the router picks top-k=2"),
    ({"0": [0, 1, 2, 3], "1": [0, 1, 2]}, "layers keep different numbers of experts"),
])
def test_bad_keep_files(model_dir, tmp_path, plan, message):
    line = _error(_run("prune", model_dir, "-o", tmp_path / "out", "--keep", _keep(tmp_path, plan)))
    assert message in line and "keep.json" in line
    assert not (tmp_path / "out").exists()


def test_keep_file_not_json(model_dir, tmp_path):
    bad = tmp_path / "keep.json"
    bad.write_text("{0: [1,2]")
    assert "not valid JSON" in _error(_run("prune", model_dir, "-o", tmp_path / "o", "--keep", bad))


def test_output_equal_to_input_refused(model_dir, tmp_path):
    line = _error(_run("prune", model_dir, "-o", model_dir, "--keep", _keep(tmp_path, KEEP)))
    assert "is the input folder" in line


def test_non_empty_output_refused(model_dir, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "x.txt").write_text("mine")
    line = _error(_run("prune", model_dir, "-o", out, "--keep", _keep(tmp_path, KEEP)))
    assert "not empty" in line and (out / "x.txt").read_text() == "mine"


def test_missing_config(tmp_path):
    (tmp_path / "empty").mkdir()
    line = _error(_run("inspect", tmp_path / "empty"))
    assert "has no config.json" in line
    line = _error(_run("prune", tmp_path / "nowhere", "-o", tmp_path / "o", "--keep", _keep(tmp_path, KEEP)))
    assert "does not exist" in line


def test_non_moe_model(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=2, vocab_size=64)).save_pretrained(tmp_path / "llama")
    line = _error(_run("inspect", tmp_path / "llama"))
    assert "'llama' is not a supported MoE architecture" in line and "mixtral" in line
    line = _error(_run("prune", tmp_path / "llama", "-o", tmp_path / "o", "--keep", _keep(tmp_path, KEEP)))
    assert "not a supported MoE architecture" in line


def test_group_limited_router_needs_equal_groups(tmp_path):
    path = save_tiny(tmp_path / "dsv3", "deepseek_v3")
    bad = {"1": [0, 1, 2, 4], "2": [0, 1, 4, 5]}  # layer 1: three in group 0, one in group 1
    line = _error(_run("prune", path, "-o", tmp_path / "o", "--keep", _keep(tmp_path, bad)))
    assert "keeps [3, 1] experts per group" in line
    thin = {"1": [0, 4], "2": [1, 5]}
    line = _error(_run("prune", path, "-o", tmp_path / "o", "--keep", _keep(tmp_path, thin)))
    assert "keep at least 2 per group" in line
