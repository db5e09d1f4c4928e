"""Task files and task data that are not what they should be: one-line errors (issue 12)."""

from __future__ import annotations

import pytest

from moeprune.errors import MoePruneError
from moeprune.evaluate.config import data_file_location, load_task_config
from moeprune.evaluate.tasks import read_jsonl, resolve_task


def test_non_utf8_task_yaml_names_the_file(tmp_path):
    path = tmp_path / "task.yaml"
    path.write_bytes(b"name: t\ndescription: \xff\xfe caf\xe9\n")
    with pytest.raises(MoePruneError, match=r"task file .*task.yaml is not UTF-8"):
        load_task_config(path)


def test_non_utf8_jsonl_data_names_the_file(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(MoePruneError, match=r"data file .*rows.jsonl is not UTF-8"):
        read_jsonl(path)


def test_folder_given_as_task_file_says_folder(tmp_path):
    folder = tmp_path / "tasks.yaml"
    folder.mkdir()
    with pytest.raises(MoePruneError, match="is a folder"):
        resolve_task(str(folder))


@pytest.mark.parametrize("data", ["python:os/x.jsonl", "python:antigravity/x", "python:moeprunex/x"])
def test_python_data_outside_moeprune_is_refused_without_importing(tmp_path, data):
    path = tmp_path / "task.yaml"
    path.write_text(f"name: t\ndata: {data}\nscorer: exact_match\n", encoding="utf-8")
    with pytest.raises(MoePruneError, match="moeprune's own assets"):
        load_task_config(path)


def test_python_data_inside_moeprune_still_resolves():
    assert data_file_location("python:moeprune/assets/demo-corpus/eval/arith.jsonl").is_file()
