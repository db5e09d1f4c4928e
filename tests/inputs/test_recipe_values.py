"""Every numeric recipe value has a range: out of it (or NaN, Infinity, a boolean) is one `Error:` line on
stderr naming the field, exit status 2, and nothing is written; values at the bounds are accepted."""

from __future__ import annotations

import pytest
import yaml
from click.testing import CliRunner
from cli_checks import one_error_line

from moeprune.pipeline.recipe import Recipe

BASE = {"model": "demo", "ratio": 0.25}
KD = {"recover": {"method": "router_kd"}}


def _cli(*args: str):
    from moeprune.cli import _register_commands, cli

    _register_commands()
    return CliRunner().invoke(cli, list(args))


def _run(tmp_path, data: dict, *sets: str):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(data))
    args = ["run", str(recipe), "-o", str(tmp_path / "out")]
    for s in sets:
        args += ["--set", s]
    return _cli(*args)


# (--set override, the field the message must name, extra recipe data)
BAD = [
    ("seed=-1", "'seed'", {}),
    ("seed=4294967296", "'seed'", {}),
    ("seed=true", "'seed'", {}),
    ("keep=0", "'keep'", {}),
    ("keep=1000000000000", "'keep'", {}),
    ("ratio=.nan", "'ratio'", {}),
    ("ratio=.inf", "'ratio'", {}),
    ("max_memory=.inf", "'max_memory'", {}),
    ("max_memory=.nan", "'max_memory'", {}),
    ("max_shard_size=.inf", "'max_shard_size'", {}),
    ("calibration.max_length=1", "'calibration.max_length'", {}),
    ("calibration.max_length=100000000", "'calibration.max_length'", {}),
    ("calibration.batch_size=0", "'calibration.batch_size'", {}),
    ("calibration.batch_size=100000", "'calibration.batch_size'", {}),
    ("calibration.batch_size=true", "'calibration.batch_size'", {}),
    ("eval.limit=0", "'eval.limit'", {}),
    ("eval.limit=100000000000", "'eval.limit'", {}),
    ("eval.batch_size=-1", "'eval.batch_size'", {}),
    ("eval.batch_size=1000000", "'eval.batch_size'", {}),
    ("merge.all_means_tokens=0", "'merge.all_means_tokens'", {}),
    ("merge.all_means_tokens=10000000000", "'merge.all_means_tokens'", {}),
    ("merge.group_size=-1", "'merge.group_size'", {}),
    ("merge.group_size=1000000", "'merge.group_size'", {}),
    ("reconstruct.budget=0", "'reconstruct.budget'", {}),
    ("reconstruct.budget=100000000000", "'reconstruct.budget'", {}),
    ("reconstruct.max_tokens=0", "'reconstruct.max_tokens'", {}),
    ("reconstruct.max_tokens=10000000000", "'reconstruct.max_tokens'", {}),
    ("quantize.group_size=0", "'quantize.group_size'", {}),
    ("quantize.group_size=-64", "'quantize.group_size'", {}),
    ("quantize.group_size=1000000", "'quantize.group_size'", {}),
    ("quantize.mixed_budget=.nan", "'quantize.mixed_budget'", {}),
    ("quantize.mixed_budget=.inf", "'quantize.mixed_budget'", {}),
    ("quantize.mixed_budget=2", "'quantize.mixed_budget'", {}),
    ("quantize.mixed_budget=100", "'quantize.mixed_budget'", {}),
    ("recover.steps=0", "'recover.steps'", KD),
    ("recover.steps=1000000000", "'recover.steps'", KD),
    ("recover.lr=.inf", "'recover.lr'", KD),
    ("recover.lr=-.inf", "'recover.lr'", KD),
    ("recover.lr=.nan", "'recover.lr'", KD),
    ("recover.lr=-0.001", "'recover.lr'", KD),
    ("recover.lr=0", "'recover.lr'", KD),
    ("recover.lr=1e30", "'recover.lr'", KD),
    ("recover.tokens=0", "'recover.tokens'", KD),
    ("recover.tokens=100000000000", "'recover.tokens'", KD),
    ("recover.top_k=0", "'recover.top_k'", KD),
    ("recover.top_k=100000000", "'recover.top_k'", KD),
    ("recover.batch_tokens=0", "'recover.batch_tokens'", KD),
    ("recover.batch_tokens=100000000000", "'recover.batch_tokens'", KD),
    ("recover.seed=-1", "'recover.seed'", KD),
    ("recover.seed=99999999999999", "'recover.seed'", KD),
    ("recover.generate.samples=0", "'recover.generate.samples'", KD),
    ("recover.generate.samples=100000", "'recover.generate.samples'", KD),
    ("recover.generate.prompt_tokens=0", "'recover.generate.prompt_tokens'", KD),
    ("recover.generate.prompt_tokens=100000000", "'recover.generate.prompt_tokens'", KD),
    ("recover.generate.max_new_tokens=0", "'recover.generate.max_new_tokens'", KD),
    ("recover.generate.max_new_tokens=100000000", "'recover.generate.max_new_tokens'", KD),
    ("recover.generate.temperature=0", "'recover.generate.temperature'", KD),
    ("recover.generate.temperature=1e-9", "'recover.generate.temperature'", KD),
    ("recover.generate.temperature=.inf", "'recover.generate.temperature'", KD),
    ("recover.generate.temperature=.nan", "'recover.generate.temperature'", KD),
    ("recover.generate.temperature=1000", "'recover.generate.temperature'", KD),
    ("recover.generate.batch_size=0", "'recover.generate.batch_size'", KD),
    ("recover.generate.batch_size=100000", "'recover.generate.batch_size'", KD),
]


@pytest.mark.parametrize("override,field,extra", BAD, ids=[b[0] for b in BAD])
def test_out_of_range_value_is_one_error_line_naming_the_field(tmp_path, override, field, extra):
    line = one_error_line(_run(tmp_path, {**BASE, **extra}, override), "recipe.yaml", field)
    assert "Traceback" not in line
    assert not (tmp_path / "out").exists()


def test_every_numeric_field_is_bounded():
    """A new numeric field without a range fails here (add it to the table in docs/recipes.md too)."""
    from typing import get_args

    from pydantic import BaseModel

    from moeprune.pipeline.recipe import _leaf_types

    unbounded = []

    def walk(model: type[BaseModel], prefix: str):
        for name, info in model.model_fields.items():
            leaves = _leaf_types(info.annotation)
            sub = [t for t in leaves if isinstance(t, type) and issubclass(t, BaseModel)]
            if sub:
                walk(sub[0], f"{prefix}{name}.")
                continue
            if not ({int, float} & leaves) or bool in leaves:
                continue
            metas = list(info.metadata)
            for t in get_args(info.annotation):  # Annotated members of a union (quantize.group_size)
                metas += [m for x in getattr(t, "__metadata__", ()) for m in getattr(x, "metadata", [])]
            lows = [m for m in metas if getattr(m, "ge", None) is not None or getattr(m, "gt", None) is not None]
            highs = [m for m in metas if getattr(m, "le", None) is not None or getattr(m, "lt", None) is not None]
            if not (lows and highs) and f"{prefix}{name}" not in ("ratio", "max_memory", "max_shard_size"):
                unbounded.append(f"{prefix}{name}")

    walk(Recipe, "")
    assert unbounded == []


@pytest.mark.parametrize("override,field", [("max_memory=-5", "max_memory"), ("max_shard_size=0", "max_shard_size"),
                                            ("max_shard_size=lots", "max_shard_size")])
def test_sizes_that_are_not_positive_fail_in_the_plan(tmp_path, override, field):
    one_error_line(_run(tmp_path, BASE, override), f"{field}:")
    assert not (tmp_path / "out").exists()


def test_messages_state_the_range_and_the_value(tmp_path):
    line = one_error_line(_run(tmp_path, {**BASE, **KD}, "recover.lr=.inf"), "'recover.lr'")
    assert "finite number in (0, 10]" in line and "got Infinity" in line
    line = one_error_line(_run(tmp_path, BASE, "calibration.batch_size=0"))
    assert "an integer in [1, 4096]" in line and "got 0" in line
    line = one_error_line(_run(tmp_path, BASE, "quantize.group_size=abc"), "'quantize.group_size'")
    assert "'auto'" in line and "'channel'" in line and "[1, 65536]" in line


ACCEPTED = [
    {"seed": 0}, {"seed": 2**32 - 1}, {"keep": 2, "ratio": None},
    {"recover": {"method": "router_kd", "lr": 10.0, "steps": 1_000_000, "tokens": 10**9, "top_k": 2**20,
                 "seed": 0, "generate": {"samples": 1000, "temperature": 0.01, "max_new_tokens": 1,
                                         "batch_size": 4096}}},
    {"recover": {"method": "moe_kd", "lr": 1e-9, "generate": {"temperature": 100}}},
    {"quantize": {"group_size": 64, "mixed_budget": 4}}, {"quantize": {"mixed_budget": 16}},
    {"merge": {"group_size": 0, "all_means_tokens": None}}, {"eval": {"limit": 1, "batch_size": 4096}},
    {"calibration": {"max_length": 2, "batch_size": 1}}, {"max_memory": "24GB", "max_shard_size": 1000},
]


@pytest.mark.parametrize("data", ACCEPTED)
def test_values_at_the_bounds_are_accepted(data):
    data = {**BASE, **data}
    if data.get("ratio", 0) is None:
        data.pop("ratio")
    Recipe.model_validate(data)


def test_generate_beyond_the_context_fails_in_the_plan(tmp_path):
    """The demo model's context is 512 tokens: 100000 new tokens ran until killed; now one line, no weights read."""
    data = {**BASE, "recover": {"method": "router_kd", "generate": {"max_new_tokens": 100000}}}
    line = one_error_line(_run(tmp_path, data), "recover.generate.max_new_tokens", "512")
    assert "at most 508" in line
    assert not (tmp_path / "out").exists()
    data["recover"]["generate"] = {"prompt_tokens": 512}
    one_error_line(_run(tmp_path, data), "recover.generate.prompt_tokens", "at most 511")
    # the largest continuation that fits passes the plan
    from moeprune.pipeline.plan import make_plan

    data["recover"]["generate"] = {"prompt_tokens": 12, "max_new_tokens": 500}
    make_plan(Recipe.model_validate(data), needs_output=False)
