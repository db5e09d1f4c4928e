"""Recovery that diverges stops with one `Error:` line naming recover.lr, exit status 2, and writes nothing:
a non-finite loss at the step it appears, non-finite trained tensors before the checkpoint is written (logit
KD in memory and layer-wise, block KD in memory and layer-wise)."""

from __future__ import annotations

import pytest
import torch
import yaml
from click.testing import CliRunner

from moeprune.errors import MoePruneError
from moeprune.recover.finite import check_loss, check_trained
from recover.common import calib_file


def _cli(*args: str):
    from moeprune.cli import _register_commands, cli

    _register_commands()
    return CliRunner().invoke(cli, list(args))


def _poison_adam(monkeypatch):
    """Every optimizer step writes NaN into the trained (master) tensors, as a diverging learning rate does."""
    def step(self, closure=None):
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    p.fill_(float("nan"))

    monkeypatch.setattr(torch.optim.Adam, "step", step)


def _run(tmp_path, recover: dict, execution: str = "memory"):
    calib = calib_file(tmp_path / "calib.txt")
    recipe = {"model": "demo", "method": "frequency", "ratio": 0.25, "dtype": "float32", "execution": execution,
              "calibration": {"spec": str(calib), "max_length": 32, "batch_size": 4},
              "recover": {"tokens": 256, "lr": 10.0, **recover}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return _cli("run", str(path), "-o", str(tmp_path / "out"))


def _one_error_line(done, *parts: str) -> str:
    assert done.exit_code == 2, (done.exit_code, done.output, done.exception)
    lines = done.stderr.strip().splitlines()  # progress bars come before it
    errors = [line for line in lines if "Error" in line or "Traceback" in line]
    assert len(errors) == 1 and lines[-1] == errors[0] and errors[0].startswith("Error: "), done.stderr
    for part in parts:
        assert part in errors[0], errors[0]
    return errors[0]


@pytest.mark.parametrize("method,execution", [("router_kd", "memory"), ("moe_kd", "memory"),
                                              ("router_kd_block", "memory"), ("router_kd_block", "layerwise")])
def test_nan_loss_stops_at_its_step_naming_the_learning_rate(tmp_path, monkeypatch, method, execution):
    _poison_adam(monkeypatch)
    done = _run(tmp_path, {"method": method, "steps": 3}, execution)
    # step 1 is computed from the untouched weights; the NaN written by its update shows at step 2
    _one_error_line(done, "recover: the training loss became NaN at step 2", "lower recover.lr (now 10)")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method,execution", [("router_kd", "memory"), ("moe_kd_block", "layerwise"),
                                              ("moe_kd", "layerwise")])
def test_nan_weights_after_the_last_step_are_never_written(tmp_path, monkeypatch, method, execution):
    _poison_adam(monkeypatch)
    done = _run(tmp_path, {"method": method, "steps": 1}, execution)
    _one_error_line(done, "recover: training left", "NaN/Inf value(s)", "nothing was written",
                    "lower recover.lr (now 10)")
    assert not (tmp_path / "out").exists()


def test_a_run_that_stays_finite_is_written(tmp_path):
    """The same recipe without the poisoned optimizer trains and writes (the checks do not refuse sound runs)."""
    done = _run(tmp_path, {"method": "router_kd", "steps": 2, "lr": 1e-3})
    assert done.exit_code == 0, done.output
    assert (tmp_path / "out" / "config.json").is_file()


def test_fit_block_on_non_finite_inputs_stops_at_step_one():
    from moeprune.recover.block import fit_block

    block = torch.nn.Linear(4, 4)
    block.forward = lambda x: torch.nn.functional.linear(x, block.weight, block.bias)  # (1, T, H) -> (1, T, H)
    x = torch.randn(8, 4)
    x[3, 1] = float("inf")
    with pytest.raises(MoePruneError, match=r"loss became (NaN|\+Inf) at step 1 in MoE layer 5; lower recover.lr"):
        fit_block(block, dict(block.named_parameters()), x, torch.randn(8, 4), steps=2, lr=1e-3, batch_tokens=8,
                  seed=0, layer=5)


def test_check_helpers_name_the_value():
    check_loss(0.5, step=1, lr=1e-3)
    with pytest.raises(MoePruneError, match=r"became -Inf at step 4; lower recover.lr \(now 0.5\)"):
        check_loss(float("-inf"), step=4, lr=0.5)
    check_trained([("a", torch.ones(3)), ("ids", torch.tensor([1, 2]))], lr=1e-3)
    half = torch.tensor([1.0, 70000.0]).to(torch.float16)  # overflows to inf in the written dtype
    with pytest.raises(MoePruneError, match=r"1 NaN/Inf value\(s\) in layer 0: gate.weight after 7 steps"):
        check_trained([("layer 0: gate.weight", half)], lr=1e-3, steps=7)
