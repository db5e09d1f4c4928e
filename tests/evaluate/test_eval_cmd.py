"""`moeprune eval` through click's CliRunner on the tiny saved model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import moeprune
from moeprune.cli import cli


@pytest.fixture(scope="module", autouse=True)
def _register_eval_command():
    from moeprune.cli import _register_commands

    _register_commands()
    assert "eval" in cli.commands


@pytest.fixture()
def qa_yaml(tmp_path, make_jsonl):
    make_jsonl(tmp_path / "qa.jsonl", [{"prompt": f"Q: {i}+2=?\nA: ", "answer": str(i + 2)} for i in range(4)])
    path = tmp_path / "qa.yaml"
    path.write_text("name: qa\ndata: qa.jsonl\nscorer: numeric_match\ngeneration: {max_new_tokens: 3}\n")
    return path


def test_eval_writes_a_json_report_and_prints_a_table(tiny_model_dir, qa_yaml, tmp_path, make_jsonl):
    texts = make_jsonl(tmp_path / "texts.jsonl", [{"text": "some held out text"}])
    report = tmp_path / "out" / "report.json"
    result = CliRunner().invoke(cli, ["eval", str(tiny_model_dir), "--tasks", f"{qa_yaml},{texts}",
                                      "--limit", "2", "--batch-size", "2", "-o", str(report), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "qa" in result.output and "numeric_match" in result.output and "perplexity" in result.output
    data = json.loads(report.read_text())
    assert data["model"] == str(tiny_model_dir.resolve())
    assert set(data["tasks"]) == {"qa", "texts"}
    assert data["tasks"]["qa"]["n"] == 2 and data["tasks"]["texts"]["n"] == 1
    assert set(data["tasks"]["qa"]) == {"score", "metric", "n", "seconds", "higher_is_better"}
    assert data["total_seconds"] >= 0 and data["settings"]["limit"] == 2


def test_unknown_task_is_a_one_line_error_listing_tasks(tiny_model_dir):
    result = CliRunner().invoke(cli, ["eval", str(tiny_model_dir), "--tasks", "nope"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: unknown task 'nope'; available:") and "demo_arith" in lines[0]


def test_missing_data_file_is_a_one_line_error_naming_it(tiny_model_dir, tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("name: t\ndata: gone.jsonl\nscorer: exact_match\n")
    result = CliRunner().invoke(cli, ["eval", str(tiny_model_dir), "--tasks", str(path)])
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1 and str(tmp_path / "gone.jsonl") in result.output


@pytest.mark.parametrize("kind", ["folder", "under_a_file"])
def test_bad_report_path_is_refused_before_the_model_loads(tiny_model_dir, qa_yaml, tmp_path, monkeypatch, kind):
    import moeprune.checkpoint.model_dir as model_dir

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the report path was checked")
    monkeypatch.setattr(model_dir, "load_model", no_load)
    (tmp_path / "afile").write_text("x")
    output = tmp_path if kind == "folder" else tmp_path / "afile" / "report.json"
    result = CliRunner().invoke(cli, ["eval", str(tiny_model_dir), "--tasks", str(qa_yaml), "-o", str(output)])
    assert result.exit_code == 2, result.output
    assert ("is a folder" if kind == "folder" else "is a file") in result.output


def test_eval_layerwise_matches_memory(tiny_model_dir, qa_yaml, tmp_path, make_jsonl):
    """`--execution layerwise` (weights streamed from the files) scores what the loaded model scores."""
    texts = make_jsonl(tmp_path / "texts.jsonl", [{"text": "some held out text"}, {"text": "and more of it"}])
    scores = {}
    for execution in ("memory", "layerwise"):
        report = tmp_path / f"{execution}.json"
        result = CliRunner().invoke(cli, ["eval", str(tiny_model_dir), "--tasks", f"{qa_yaml},{texts}",
                                          "--execution", execution, "-o", str(report), "--no-progress"])
        assert result.exit_code == 0, result.output
        data = json.loads(report.read_text())
        assert data["settings"]["execution"] == execution
        scores[execution] = {t: r["score"] for t, r in data["tasks"].items()}
    assert scores["memory"]["qa"] == scores["layerwise"]["qa"]
    assert abs(scores["memory"]["texts"] - scores["layerwise"]["texts"]) <= 1e-4 * scores["memory"]["texts"]
