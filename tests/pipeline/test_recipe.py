from pathlib import Path

import pytest

from moeprune.errors import MoePruneError
from moeprune.pipeline import load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_validate_and_document_their_command(path):
    recipe = load_recipe(path)
    text = path.read_text()
    assert text.startswith("#") and "moeprune run recipes/" in text  # launch command in the header
    assert recipe.ratio is not None or recipe.keep is not None


def test_demo_recipe_exists():
    assert any(p.name == "demo.yaml" for p in RECIPES)


def _write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, message", [
    ("model: demo\nratio: [0.5\n", "malformed YAML at line"),
    ("model: demo\nmethod: reapp\nratio: 0.5\n", "unknown method 'reapp'; allowed: ean"),
    ("model: demo\nratio: 1.5\n", "field 'ratio': must be in (0, 1)"),
    ("model: demo\nratio: 0\n", "field 'ratio': must be in (0, 1)"),
    ("model: demo\nratio: 0.5\nkeep: 4\n", "exactly one of 'ratio'"),
    ("model: demo\nratio: 0.5\nratoi: 1\n", "unknown field 'ratoi'; allowed fields: model, method"),
    ("model: demo\nratio: 0.5\neval: {task: [a]}\n", "unknown field 'eval.task'; allowed fields: tasks, limit"),
    ("model: demo\nratio: 0.5\nallocation: global-ish\n", "field 'allocation'"),
    ("ratio: 0.5\n", "field 'model' is required"),
    ("- model\n", "a recipe is a mapping"),
])
def test_bad_recipes_are_one_line_errors(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(MoePruneError) as exc:
        load_recipe(path)
    assert message in str(exc.value) and str(path) in str(exc.value)
    assert "\n" not in str(exc.value)


def test_overrides(tmp_path):
    path = _write(tmp_path, "model: demo\nratio: 0.5\n")
    recipe = load_recipe(path, ["keep=6", "eval.limit=7", "calibration.spec=code:16,arith:8"])
    assert recipe.keep == 6 and recipe.ratio is None and recipe.eval.limit == 7
    assert recipe.calibration.spec == "code:16,arith:8"
    with pytest.raises(MoePruneError, match="expected KEY=VALUE"):
        load_recipe(path, ["ratio"])
    with pytest.raises(MoePruneError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")
