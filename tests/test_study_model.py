"""The shipped study model (moeprune/assets/study-moe): a stock Qwen3-MoE checkpoint that loads without
moeprune, has the shape its card states, and reproduces the scores recorded in its card."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from moeprune.checkpoint.model_dir import SHIPPED_MODELS, resolve_model_dir

MODEL = SHIPPED_MODELS["study"]
TESTS = Path(__file__).resolve().parent
SCORES = MODEL / "eval_scores.json"


@pytest.fixture(scope="module")
def recorded():
    if not SCORES.is_file():
        pytest.fail(f"{SCORES} is missing: run `python scripts/demo_eval_scores.py --model study`")
    return json.loads(SCORES.read_text())


def test_study_is_a_model_name():
    assert resolve_model_dir("study") == MODEL.resolve()


def test_config_is_a_fine_grained_qwen3_moe():
    cfg = json.loads((MODEL / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_moe" and cfg["architectures"] == ["Qwen3MoeForCausalLM"]
    n_experts = cfg.get("num_experts") or cfg["num_local_experts"]  # transformers 5 writes the latter
    assert n_experts >= 32 and cfg["num_experts_per_tok"] >= 4 and cfg["norm_topk_prob"] is True
    assert cfg["moe_intermediate_size"] % 32 == 0  # int4 group size 32 serves in vLLM
    assert cfg["mlp_only_layers"] == [] and cfg["decoder_sparse_step"] == 1  # every layer is MoE
    assert cfg["dtype"] == "bfloat16" and not cfg.get("output_router_logits")
    assert "auto_map" not in cfg  # stock classes, no remote code


def test_loads_with_stock_transformers_only(tmp_path):
    """A process that never imports moeprune loads it, runs it and generates."""
    from safetensors.torch import load_file

    out = tmp_path / "out.safetensors"
    (tmp_path / "jobs.json").write_text(json.dumps([{"model_dir": str(MODEL), "input_ids": [[0, 50, 60, 70]],
                                                     "out": str(out)}]))
    proc = subprocess.run([sys.executable, str(TESTS / "stock_loader.py"), str(tmp_path / "jobs.json")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "stock-loader-ok" in proc.stdout, proc.stderr[-2000:]
    got = load_file(out)
    cfg = json.loads((MODEL / "config.json").read_text())
    n_experts = cfg.get("num_experts") or cfg["num_local_experts"]
    down = [k for k in got if k.startswith("param.") and k.endswith("mlp.experts.down_proj")]
    assert len(down) == cfg["num_hidden_layers"] and all(got[k].shape[0] == n_experts for k in down)
    assert got["generated"].shape == (1, 8)
    assert got["logits"].isfinite().all()


def test_card_scores_reproduce(recorded):
    from moeprune.evaluate import evaluate
    from moeprune.checkpoint.model_dir import load_model, load_tokenizer

    check = recorded["ci_check"]
    model, tok = load_model("study", device="cpu"), load_tokenizer("study")
    got = evaluate(model, tok, list(check["scores"]), limit=check["limit"], batch_size=32, progress=False)
    for task, want in check["scores"].items():
        assert got[task]["n"] == check["limit"]
        assert got[task]["score"] == pytest.approx(want, abs=1 / check["limit"] + 1e-9), task  # one flip at most


def test_card_states_the_recorded_numbers(recorded):
    card = (MODEL / "MODEL_CARD.md").read_text()
    for task, res in recorded["full"]["tasks"].items():
        assert f"{res['score']:.3f}" in card, task
