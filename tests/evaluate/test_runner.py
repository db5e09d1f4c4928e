"""evaluate(): the result contract, limit, samples and early task validation."""

from __future__ import annotations

import math

import pytest

from moeprune.errors import MoePruneError
from moeprune.evaluate import evaluate, resolve_tasks

KEYS = {"score", "metric", "n", "seconds", "higher_is_better"}


@pytest.fixture()
def task_files(tmp_path, make_jsonl):
    make_jsonl(tmp_path / "qa.jsonl", [{"prompt": f"Q: {i}+1=?\nA: ", "answer": str(i + 1)} for i in range(5)])
    make_jsonl(tmp_path / "texts.jsonl", [{"text": "hello world"}, {"text": "the quick brown fox"}])
    (tmp_path / "qa.yaml").write_text(
        "name: qa\ndata: qa.jsonl\nscorer: numeric_match\ngeneration: {max_new_tokens: 4, stop: [\"\\n\"]}\n")
    return tmp_path


def test_evaluate_returns_the_contract(tiny_model, tiny_tokenizer, task_files):
    results = evaluate(tiny_model, tiny_tokenizer, [str(task_files / "qa.yaml"), str(task_files / "texts.jsonl")],
                       limit=3, batch_size=2, progress=False)
    assert list(results) == ["qa", "texts"]
    for res in results.values():
        assert set(res) == KEYS
        assert isinstance(res["score"], float) and res["seconds"] >= 0
    assert results["qa"]["n"] == 3 and results["qa"]["metric"] == "numeric_match"
    assert 0.0 <= results["qa"]["score"] <= 1.0 and results["qa"]["higher_is_better"] is True
    assert results["texts"]["n"] == 2 and results["texts"]["metric"] == "perplexity"
    assert results["texts"]["higher_is_better"] is False and math.isfinite(results["texts"]["score"])


def test_samples_hold_per_row_outputs(tiny_model, tiny_tokenizer, task_files):
    results = evaluate(tiny_model, tiny_tokenizer, [str(task_files / "qa.yaml"), str(task_files / "texts.jsonl")],
                       limit=2, progress=False, samples=True)
    qa = results["qa"]["samples"]
    assert len(qa) == 2 and qa[0]["prompt"] == "Q: 0+1=?\nA: " and qa[0]["answer"] == "1"
    assert {"completion", "filtered", "score"} <= qa[0].keys() and "\n" not in qa[0]["completion"]
    assert set(results["texts"]["samples"][0]) == {"text", "tokens", "nll", "score"}


def test_limit_takes_the_first_rows_deterministically(tiny_model, tiny_tokenizer, task_files):
    spec = [str(task_files / "qa.yaml")]
    a = evaluate(tiny_model, tiny_tokenizer, spec, limit=2, progress=False, samples=True)
    b = evaluate(tiny_model, tiny_tokenizer, spec, limit=2, batch_size=1, progress=False, samples=True)
    assert [s["prompt"] for s in a["qa"]["samples"]] == ["Q: 0+1=?\nA: ", "Q: 1+1=?\nA: "]
    assert a["qa"]["samples"] == b["qa"]["samples"]


def test_bad_tasks_fail_before_any_model_work(task_files):
    with pytest.raises(MoePruneError, match="unknown task 'nope'"):
        evaluate(None, None, ["nope"])
    with pytest.raises(MoePruneError, match="listed twice"):
        resolve_tasks([str(task_files / "qa.yaml"), str(task_files / "qa.yaml")])
    with pytest.raises(MoePruneError, match="no tasks"):
        resolve_tasks(["", " "])
    assert resolve_tasks(["lm_eval:hellaswag"]) == ["lm_eval:hellaswag"]
