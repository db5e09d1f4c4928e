"""User-given text files that are not UTF-8, folders, duplicate keys: one-line errors (issue 12)."""

from __future__ import annotations

import pytest

from moeprune.compress.prune import load_keep_file
from moeprune.errors import MoePruneError
from moeprune.observe.calibration import load_calibration
from moeprune.pipeline.recipe import load_recipe

LATIN1 = "caf\u00e9 cr\u00e8me".encode("latin-1")


def _recipe(path):
    return load_recipe(path)


def _calibration(path):
    return load_calibration(str(path), tokenizer=None)


@pytest.mark.parametrize("loader, name, what", [
    (_recipe, "recipe.yaml", "recipe"),
    (load_keep_file, "KEEP.json", "keep file"),
    (_calibration, "calib.txt", "calibration file"),
    (_calibration, "calib.jsonl", "calibration file"),
])
def test_non_utf8_file_is_one_error_naming_it(tmp_path, loader, name, what):
    path = tmp_path / name
    body = {"recipe.yaml": b"model: demo\nnote: ", "KEEP.json": b'{"0": [1], "x": "', "calib.txt": b"",
            "calib.jsonl": b'{"text": "'}[name]
    path.write_bytes(body + LATIN1 + (b'"}\n' if name.endswith("json") or name.endswith("jsonl") else b"\n"))
    with pytest.raises(MoePruneError, match=rf"{what} .*{name} is not UTF-8 text .*save it as UTF-8"):
        loader(path)


@pytest.mark.parametrize("loader, what", [(_recipe, "recipe"), (load_keep_file, "keep file")])
def test_folder_where_a_file_is_expected_says_folder(tmp_path, loader, what):
    folder = tmp_path / "thing.json"
    folder.mkdir()
    with pytest.raises(MoePruneError, match=rf"{what} .* is a folder, not a file"):
        loader(folder)


@pytest.mark.parametrize("text", ['{"0": [1, 2], "00": [3]}', '{"0": [1, 2], "0": [3]}'])
def test_duplicate_layer_keys_in_keep_file_are_refused(tmp_path, text):
    path = tmp_path / "KEEP.json"
    path.write_text(text)
    with pytest.raises(MoePruneError, match="layer 0 is listed twice"):
        load_keep_file(path)


def test_keep_file_still_reads_distinct_layers(tmp_path):
    path = tmp_path / "KEEP.json"
    path.write_text('{"0": [1, 2], "1": [3]}')
    assert load_keep_file(path) == {0: [1, 2], 1: [3]}


def test_keep_file_that_is_not_an_object_is_refused(tmp_path):
    path = tmp_path / "KEEP.json"
    path.write_text("[[1, 2]]")
    with pytest.raises(MoePruneError, match="expected an object"):
        load_keep_file(path)


def test_strict_json_writes_null_for_nan_and_inf():
    import json

    from moeprune import strict_json

    text = strict_json.dumps({"a": float("nan"), "b": [1.5, float("inf"), -float("inf")], "c": (2,)})
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"a": None, "b": [1.5, None, None], "c": [2]}
