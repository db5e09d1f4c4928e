"""observe-merge refuses the same observations twice; a calibration row whose text is not a string says so;
a top-k the experts cannot serve never suggests keeping more experts than exist; published files of a quantize
output hold no absolute local path."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from click.testing import CliRunner

from moeprune.checkpoint.model_dir import DEMO_MODEL_DIR
from moeprune.errors import MoePruneError


def _cli(*args: str):
    from moeprune.cli import _register_commands, cli

    _register_commands()
    return CliRunner().invoke(cli, [str(a) for a in args])


def _one_error_line(done, *parts: str) -> str:
    assert done.exit_code == 2, (done.exit_code, done.output, done.exception)
    lines = done.stderr.strip().splitlines()
    errors = [line for line in lines if "Error" in line or "Traceback" in line]
    assert len(errors) == 1 and lines[-1] == errors[0] and errors[0].startswith("Error: "), done.stderr
    for part in parts:
        assert part in errors[0], errors[0]
    return errors[0]


# -- observe-merge --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_sets(tmp_path_factory):
    from moeprune.observe import observe
    from moeprune.testing import tiny_model

    model = tiny_model("mixtral")
    g = torch.Generator().manual_seed(3)
    batches = [{"input_ids": torch.randint(3, 128, (2, 8), generator=g)} for _ in range(4)]
    root = tmp_path_factory.mktemp("obs")
    observe(model, batches[:2], progress=False).save(root / "a")
    observe(model, batches[2:], progress=False).save(root / "b")
    return root


@pytest.mark.parametrize("second", ["a", "a/", "./a", "link", "copy"])
def test_observe_merge_refuses_the_same_observations_twice(two_sets, tmp_path, monkeypatch, second):
    monkeypatch.chdir(two_sets)
    if not (two_sets / "link").exists():
        (two_sets / "link").symlink_to(two_sets / "a", target_is_directory=True)
        shutil.copytree(two_sets / "a", two_sets / "copy")
    out = tmp_path / "ab"
    line = _one_error_line(_cli("observe-merge", "a", second, "-o", out), "twice")
    assert "same folder" in line if second != "copy" else "same observations" in line
    assert not out.exists()


def test_observe_merge_of_two_different_sets_still_works(two_sets, tmp_path):
    done = _cli("observe-merge", two_sets / "a", two_sets / "b", "-o", tmp_path / "ab")
    assert done.exit_code == 0, done.output
    meta = json.loads((tmp_path / "ab" / "observations.json").read_text())
    assert len(meta["calibration"]["combined"]) == 2


# -- calibration rows ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("value,kind", [(42, "a number"), (1.5, "a number"), (True, "a boolean"),
                                        (["x"], "a list"), ({"a": 1}, "an object")])
def test_jsonl_text_that_is_not_a_string_is_named(tmp_path, value, kind):
    from moeprune.observe.calibration import _read_json

    f = tmp_path / "rows.jsonl"
    f.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"text": value}) + "\n")
    with pytest.raises(MoePruneError) as e:
        _read_json(f, text_field="text", prefer_messages=False)
    msg = str(e.value)
    assert "rows.jsonl:2: field 'text' is " + kind + ", not a string" in msg and "\n" not in msg
    assert "has no 'text' field" not in msg


def test_jsonl_numeric_text_through_the_command_line(tmp_path):
    f = tmp_path / "rows.jsonl"
    f.write_text(json.dumps({"text": 12345}) + "\n")
    _one_error_line(_cli("observe", "demo", "--calib", str(f), "-o", tmp_path / "o"),
                    "rows.jsonl:1: field 'text' is a number, not a string")
    assert not (tmp_path / "o").exists()


# -- top-k the experts cannot serve -------------------------------------------------------------------------
def test_experts_to_keep_never_suggests_more_experts_than_exist():
    from moeprune.score import experts_to_keep

    with pytest.raises(MoePruneError, match="top-k=8 of its 8 experts, so no expert can be pruned") as e:
        experts_to_keep(8, ratio=0.25, top_k=8)
    assert "keep between" not in str(e.value)
    with pytest.raises(MoePruneError, match=r"keep between top-k=2 and 8 \(a ratio of at most 0.75\)"):
        experts_to_keep(8, ratio=0.9, top_k=2)
    assert experts_to_keep(8, ratio=0.75, top_k=2) == 2  # the suggested ratio works


def test_keep_plan_with_top_k_beyond_the_layer_names_the_config():
    from moeprune.models import MoEAdapter
    from moeprune.models.keep import validate_keep
    from moeprune.testing import tiny_model

    model = tiny_model("mixtral")
    adapter = MoEAdapter(model)
    n = adapter.layers[0].num_experts
    model.config.num_experts_per_tok = n + 2  # a config no folder can hold any more (config.json checks)
    keep = {layer.index: list(range(n)) for layer in adapter.layers}
    with pytest.raises(MoePruneError, match=f"has {n} experts but the router picks top-k={n + 2}") as e:
        validate_keep(MoEAdapter(model), keep)
    assert f"keep at least {n + 2}" not in str(e.value)


def test_prune_command_with_top_k_equal_to_the_experts(tmp_path):
    model = tmp_path / "m"
    shutil.copytree(DEMO_MODEL_DIR, model)
    config = json.loads((model / "config.json").read_text())
    config["num_experts_per_tok"] = config["num_experts"]
    (model / "config.json").write_text(json.dumps(config))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {model}\nmethod: frequency\nkeep: 8\n")
    line = _one_error_line(_cli("run", recipe, "-o", tmp_path / "o"), "top-k=16 of its 16 experts",
                           "no expert can be pruned")
    assert not re.search(r"keep (at least|between)", line)


# -- publish of a quantize output -----------------------------------------------------------------------------
def _absolute_paths(text: str, root: str) -> list[str]:
    return [m for m in re.findall(r"(?<![\w.~])/[^\s\"'`,;()\[\]{}]+", text) if m.startswith(root)]


def test_published_quantize_output_holds_no_absolute_local_path(tmp_path):
    model = tmp_path / "base-model"
    shutil.copytree(DEMO_MODEL_DIR, model)
    out = tmp_path / "q"
    done = _cli("quantize", model, "-o", out, "--bits", "8")
    assert done.exit_code == 0, done.output
    assert json.loads((out / "moeprune.json").read_text())["base_model"] == "base-model"
    done = _cli("publish", out)
    assert done.exit_code == 0, done.output
    for name in ("moeprune.json", "README.md"):
        text = (out / name).read_text()
        assert str(tmp_path) not in text and not _absolute_paths(text, "/"), (name, text)


def test_publish_rewrites_an_absolute_path_an_older_quantize_recorded(tmp_path):
    from moeprune.publish import ensure_provenance

    folder = tmp_path / "old"
    folder.mkdir()
    shutil.copy(DEMO_MODEL_DIR / "config.json", folder / "config.json")
    (folder / "moeprune.json").write_text(json.dumps({"base_model": str(tmp_path / "models" / "base"),
                                                      "method": "quantize"}))
    record = json.loads(ensure_provenance(folder).read_text())
    assert record == {"base_model": "base", "method": "quantize", "moeprune_version": record["moeprune_version"]}
