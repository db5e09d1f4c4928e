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

    def fake_simple_evaluate(*, model, tasks, limit, task_manager):
        seen.update(model=model, tasks=tasks, limit=limit)
        return {"results": {"t": {"alias": "t", "exact_match,none": 1.0}}, "n-samples": {"t": {"effective": 2}}}

    monkeypatch.setattr(hf, "HFLM", FakeHFLM)
    monkeypatch.setattr(lm_eval, "simple_evaluate", fake_simple_evaluate)
    import lm_eval.tasks

    class FakeManager:
        all_tasks = ["t"]

        def __init__(self, **kwargs):
            pass

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", FakeManager)
    out = run_lm_eval(tiny_model, tiny_tokenizer, ["t"], limit=2, batch_size=4)
    assert seen["pretrained"] is tiny_model and seen["tasks"] == ["t"] and seen["limit"] == 2
    assert out["t"]["score"] == 1.0 and out["t"]["n"] == 2


def test_summary_skips_bookkeeping_entries():
    output = {"results": {"t": {"alias": "t", "sample_len": 20, "exact_match,last_number": 0.9,
                                "exact_match_stderr,last_number": 0.07}}}
    assert summarize_lm_eval(output, seconds=1.0)["t"]["metric"] == "lm_eval:exact_match,last_number"


def test_the_shipped_offline_task_runs_on_the_demo_without_a_hub():
    pytest.importorskip("lm_eval")
    from click.testing import CliRunner

    from moeprune.cli import _register_commands, cli

    _register_commands()
    res = CliRunner().invoke(cli, ["eval", "demo", "--tasks", "lm_eval:moeprune_demo_arith,demo_arith", "--limit", "8",
                                   "--no-progress"], env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert res.exit_code == 0, res.output
    line = next(ln for ln in res.output.splitlines() if ln.startswith("lm_eval:moeprune_demo_arith"))
    ours = next(ln for ln in res.output.splitlines() if ln.startswith("demo_arith"))
    assert "exact_match,last_number" in line and " 8 " in line
    # the same rows, the same greedy completions, the same answer rule: the same score as moeprune's task
    assert line.split()[2] == ours.split()[2]


def test_an_unknown_lm_eval_task_names_the_shipped_ones():
    pytest.importorskip("lm_eval")
    with pytest.raises(MoePruneError, match="lm_eval:moeprune_demo_arith"):
        run_lm_eval(None, None, ["no_such_task_here"])


def test_backend_adapter_answers_lm_evals_requests():
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from moeprune.evaluate.lm_eval_bridge import _backend_lm

    calls = []

    class FakeBackend:
        def generate(self, prompts, *, max_new_tokens, stop=()):
            calls.append((tuple(prompts), max_new_tokens, tuple(stop)))
            return [p.upper() for p in prompts]

        def token_nll(self, texts):
            return [(float(len(t)), len(t) - 1) for t in texts]

        def continuation_logprobs(self, pairs):
            return [(-1.0, True) for _ in pairs]

    lm = _backend_lm(FakeBackend())
    gen = [Instance("generate_until", {}, (c, {"until": u, "max_gen_toks": 5}), i)
           for i, (c, u) in enumerate([("a", ["\n"]), ("b", "x"), ("c", ["\n"])])]
    assert lm.generate_until(gen) == ["A", "B", "C"]  # input order kept across the groups
    assert sorted(calls) == [(("a", "c"), 5, ("\n",)), (("b",), 5, ("x",))]  # one call per (stop, length)
    ll = [Instance("loglikelihood", {}, ("ctx", " cont"), 0)]
    assert lm.loglikelihood(ll) == [(-1.0, True)]
    rolling = [Instance("loglikelihood_rolling", {}, ("abcd",), 0)]
    assert lm.loglikelihood_rolling(rolling) == [-4.0]
