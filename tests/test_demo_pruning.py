"""Quality claims on the shipped demo model: calibrate on one domain, prune half of the routed experts,
and that domain's generative task keeps its score (docs/study.md has the full-size measurement).

These run the real pipeline functions (observe -> method decide -> apply -> evaluate) on the first
rows of the held-out tasks, so they fail if a statistic, a scorer, the selection or the rewrite breaks.
"""
from __future__ import annotations

import copy

import pytest

LIMIT = 50
# domain -> (task, least fraction of the base score that REAP at 50% must keep on the first LIMIT rows)
CASES = {"json": ("demo_json", 0.9), "arith": ("demo_arith", 0.9)}
METHOD = "reap_prob"  # REAP weighing routed tokens by the router's probability (docs/methods.md)


@pytest.fixture(scope="module")
def demo():
    import torch

    from moeprune.checkpoint.model_dir import load_model, load_tokenizer

    torch.manual_seed(0)
    return load_model("demo", device="cpu"), load_tokenizer("demo")


def _score(model, tok, task):
    from moeprune.evaluate import evaluate

    return evaluate(model, tok, [task], limit=LIMIT, batch_size=50, progress=False)[task]["score"]


def _pruned(model, tok, domain, method, ratio=0.5):
    from moeprune.observe import observe
    from moeprune.observe.calibration import load_calibration, parse_calibration_spec
    from moeprune.pipeline import Recipe
    from moeprune.execution.memory import compress_model

    spec = f"demo/{domain}"
    calib = load_calibration(parse_calibration_spec(spec, max_length=256), tok, batch_size=8)
    obs = observe(model, calib, progress=False)
    recipe = Recipe.model_validate({"model": "demo", "method": method, "ratio": ratio, "seed": 0,
                                    "calibration": {"spec": spec, "max_length": 256}})
    m = copy.deepcopy(model)
    decision = compress_model(m, obs, recipe, calibration=calib)
    return m, decision


@pytest.mark.parametrize("domain", list(CASES))
def test_reap_half_the_experts_keeps_the_calibrated_domain(demo, domain):
    model, tok = demo
    task, keep_at_least = CASES[domain]
    base = _score(model, tok, task)
    pruned, _ = _pruned(model, tok, domain, METHOD)
    n_experts = pruned.config.num_experts
    assert n_experts == model.config.num_experts // 2
    got = _score(pruned, tok, task)
    assert got >= keep_at_least * base, f"{task}: base {base:.3f}, {METHOD} 50% {got:.3f}"


def test_random_half_the_experts_is_clearly_worse(demo):
    """The control: the informed selection is what keeps the score, not the model's slack."""
    model, tok = demo
    task = CASES["arith"][0]
    reap, _ = _pruned(model, tok, "arith", METHOD)
    rand, _ = _pruned(model, tok, "arith", "random")
    assert _score(rand, tok, task) < _score(reap, tok, task) - 0.2
