"""The plan fails early, in one line, before any weight is read; outputs never touch an input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from moeprune.cli import cli
from moeprune.commands import pipeline_cmds, quantize_cmd, surgery  # noqa: F401
from moeprune.errors import MoePruneError
from moeprune.pipeline.plan import make_plan, resolve_device
from moeprune.units import parse_memory
from moeprune.pipeline.recipe import Recipe
from moeprune.testing import save_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("plan") / "tiny")


def _plan(model, tmp_path, **kw):
    data = {"model": str(model), "method": "reap", "ratio": 0.5, **kw}
    return make_plan(Recipe.model_validate(data), out_dir=tmp_path / "out")


@pytest.fixture
def no_weights(monkeypatch):
    """Any attempt to read weights fails the test: the plan must decide from the config alone."""
    import safetensors

    def refuse(*a, **k):
        raise AssertionError("weights were read")

    monkeypatch.setattr(safetensors, "safe_open", refuse)
    monkeypatch.setattr("moeprune.checkpoint.model_dir.load_model", refuse)


@pytest.mark.parametrize(("fields", "message"), [
    ({"ratio": 0.01}, "drops none"),
    ({"ratio": None, "keep": 8}, "drops none"),
    ({"calibration": {"max_length": 4096}}, "beyond the model's context of 128"),
    ({"calibration": {"spec": "/nonexistent/calib.txt"}}, "does not exist"),
    ({"eval": {"tasks": ["no_such_task"]}}, "no_such_task"),
    ({"device": "tpu9"}, "device"),
    ({"device": "cuda:0"}, "CUDA"),
    ({"quantize": {"bits": 4, "group_size": 48}}, "not a multiple of quantize.group_size 48"),
    ({"max_memory": "lots"}, "max_memory"),
    ({"method": "reap", "execution": "layerwise", "quantize": {"bits": 8, "mixed_budget": 12}}, "layer-wise"),
    ({"method": "reap", "execution": "layerwise", "max_memory": "20KB", "quantize": {"bits": 4, "method": "gptq"}},
     "for its largest decoder layer"),
])
def test_early_checks_fail_before_any_weight(tiny, tmp_path, no_weights, fields, message):
    import torch

    if fields.get("device") == "cuda:0" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(MoePruneError, match=message) as info:
        _plan(tiny, tmp_path, **fields)
    assert "\n" not in str(info.value)


def test_plan_decides_dtype_execution_and_keep(tiny, tmp_path, no_weights):
    plan = _plan(tiny, tmp_path)
    assert plan.dtype == plan.source_dtype == "float32" and plan.execution == "memory"
    assert plan.n_keep == 4 and plan.method.name == "reap" and plan.collect == ()
    small = _plan(tiny, tmp_path, max_memory=1000)
    assert small.execution == "layerwise" and "max_memory" in small.execution_reason
    assert _plan(tiny, tmp_path, method="hc_smoe").collect == ("all_means",)
    assert _plan(tiny, tmp_path, dtype="bfloat16").model_bytes * 2 == plan.model_bytes


def test_memory_sizes_and_devices():
    assert parse_memory("1GB") == 10**9 and parse_memory("512MiB") == 512 * 2**20 and parse_memory(2048) == 2048
    for bad in ("-1GB", "1XB", 0, True):
        with pytest.raises(MoePruneError):
            parse_memory(bad)
    assert resolve_device("cpu").type == "cpu"


def _invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_output_containing_the_input_is_refused_and_input_survives(tiny, tmp_path):
    """The data-loss case: -o PARENT --overwrite where PARENT contains the input model."""
    parent = tmp_path / "models"
    model = save_tiny(parent / "m")
    before = sorted(p.name for p in model.iterdir())
    keep = tmp_path / "keep.json"
    keep.write_text(json.dumps({"0": [0, 1, 2, 3], "1": [0, 1, 2, 3]}))
    calib = tmp_path / "c.txt"
    calib.write_text("the cat sat on the mat. " * 40)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {model}\nmethod: reap\nratio: 0.5\ncalibration: {{spec: '{calib}', max_length: 32}}\n")
    commands = {
        "prune --keep": ["prune", model, "--keep", keep],
        "prune --method": ["prune", model, "--method", "reap", "--ratio", "0.5", "--calib", calib],
        "merge": ["merge", model, "--ratio", "0.5", "--calib", calib],
        "observe": ["observe", model, "--calib", calib],
        "quantize": ["quantize", model, "--bits", "8", "--group-size", "32"],
        "prune-stream": ["prune-stream", model, "--keep", keep],
        "observe-stream": ["observe-stream", model, "--calib", calib],
    }
    for name, args in commands.items():
        for out in (parent, model, model / "sub"):
            res = _invoke(*args, "-o", out, "--overwrite")
            assert res.exit_code == 2, (name, out, res.output)
            assert "input folder" in res.output and res.output.count("\n") <= 1 + res.output.count("plan:"), name
    res = _invoke("run", recipe, "-o", parent, "--overwrite")
    assert res.exit_code == 2 and "contains the input folder" in res.output
    assert sorted(p.name for p in model.iterdir()) == before


def test_output_files_are_readable_by_others(tiny, tmp_path):
    import os
    import stat

    keep = tmp_path / "keep.json"
    keep.write_text(json.dumps({"0": [0, 1, 2, 3], "1": [0, 1, 2, 3]}))
    old = os.umask(0o022)
    try:
        assert _invoke("prune", tiny, "--keep", keep, "-o", tmp_path / "out").exit_code == 0
    finally:
        os.umask(old)
    for p in [tmp_path / "out", *(tmp_path / "out").rglob("*")]:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode & 0o044 == 0o044, (p, oct(mode))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]


def test_failed_final_rename_leaves_nothing(tmp_path, monkeypatch):
    import os

    from moeprune.checkpoint import OutputFolder

    real = os.rename

    def failing(a, b):
        if Path(b).name == "out":
            raise OSError(28, "No space left on device")
        return real(a, b)

    monkeypatch.setattr(os, "rename", failing)
    with pytest.raises(MoePruneError, match="No space left"):
        with OutputFolder(tmp_path / "out") as tmp:
            (tmp / "x").write_text("y")
    assert list(tmp_path.iterdir()) == []


def test_quantize_refuses_a_model_that_does_not_fit(tiny, tmp_path):
    res = _invoke("quantize", tiny, "-o", tmp_path / "q", "--bits", "8", "--max-memory", "1000")
    assert res.exit_code == 2 and res.output.startswith("Error: quantize needs the whole model in memory")
    assert not (tmp_path / "q").exists()


def test_processes_on_one_machine_share_its_free_memory(tiny, tmp_path, no_weights, monkeypatch):
    """Without max_memory the budget is the device's free memory; on a CPU the launcher's processes on this
    machine (LOCAL_WORLD_SIZE) share it, so each plans with its part."""
    import moeprune.pipeline.plan as plan_mod

    monkeypatch.setattr(plan_mod, "free_memory", lambda device: 8 * 10**9)
    assert _plan(tiny, tmp_path).max_memory == 8 * 10**9
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    plan = _plan(tiny, tmp_path)
    if plan.device.type == "cpu":
        assert plan.max_memory == 2 * 10**9 and "/ 4 processes on this machine" in plan.execution_reason
    assert _plan(tiny, tmp_path, max_memory="3GB").max_memory == 3 * 10**9  # a given budget is per process
