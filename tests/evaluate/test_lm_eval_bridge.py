"""The optional lm-evaluation-harness bridge."""

from __future__ import annotations

import importlib.util

import pytest

from moeprune.errors import MoePruneError
from moeprune.evaluate.lm_eval_bridge import run_lm_eval, summarize_lm_eval

HAS_LM_EVAL = importlib.util.find_spec("lm_eval") is not None


def test_summary_reduces_lm_eval_output_to_the_contract():
    output = {
        "results": {"arc_easy": {"alias": "arc_easy", "acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.6}},
        "higher_is_better": {"arc_easy": {"acc": True, "acc_norm": True}},
        "n-samples": {"arc_easy": {"original": 2376, "effective": 10}},
    }
    summary = summarize_lm_eval(output, seconds=4.0)
    assert summary == {"arc_easy": {"score": 0.5, "metric": "lm_eval:acc,none", "n": 10, "seconds": 4.0,
                                    "higher_is_better": True}}


@pytest.mark.skipif(HAS_LM_EVAL, reason="lm-eval is installed")
def test_missing_lm_eval_is_a_one_line_install_hint():
    with pytest.raises(MoePruneError, match=r"^lm-eval is not installed: pip install 'lm-eval'$"):
        run_lm_eval(None, None, ["arc_easy"])


def test_lm_eval_wraps_the_loaded_model(tiny_model, tiny_tokenizer, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    import lm_eval.models.huggingface as hf

    seen = {}

    class FakeHFLM:
        def __init__(self, *, pretrained, tokenizer, batch_size):
            seen.update(pretrained=pretrained, tokenizer=tokenizer, batch_size=batch_size)

    def fake_simple_evaluate(*, model, tasks, limit):
        seen.update(model=model, tasks=tasks, limit=limit)
        return {"results": {"t": {"alias": "t", "exact_match,none": 1.0}}, "n-samples": {"t": {"effective": 2}}}

    monkeypatch.setattr(hf, "HFLM", FakeHFLM)
    monkeypatch.setattr(lm_eval, "simple_evaluate", fake_simple_evaluate)
    out = run_lm_eval(tiny_model, tiny_tokenizer, ["t"], limit=2, batch_size=4)
    assert seen["pretrained"] is tiny_model and seen["tasks"] == ["t"] and seen["limit"] == 2
    assert out["t"]["score"] == 1.0 and out["t"]["n"] == 2
