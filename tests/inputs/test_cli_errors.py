"""The command line: bad input is exactly one `Error:` line on stderr and exit code 2 (issue 12)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moeprune.checkpoint.model_dir import DEMO_MODEL_DIR

REPO = Path(__file__).resolve().parents[2]


def _moeprune(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "moeprune", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def _cli(*args: str):
    from click.testing import CliRunner

    from moeprune.cli import _register_commands, cli

    _register_commands()
    return CliRunner().invoke(cli, list(args))


def _one_error_line(done, *parts: str) -> None:
    assert getattr(done, "returncode", getattr(done, "exit_code", None)) == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), done.stderr
    for part in parts:
        assert part in lines[0]


def test_negative_all_means_tokens_is_one_error_line(tmp_path):
    _one_error_line(_cli("prune", "demo", "-o", str(tmp_path / "o"), "--all-means-tokens", "-1"),
                    "--all-means-tokens")


def test_inspect_with_top_k_above_the_expert_count_is_refused_(tmp_path):
    model = tmp_path / "m"
    shutil.copytree(DEMO_MODEL_DIR, model)
    config = json.loads((model / "config.json").read_text())
    config["num_experts_per_tok"] = config["num_experts"] * 2
    (model / "config.json").write_text(json.dumps(config))
    _one_error_line(_cli("inspect", str(model)), "num_experts_per_tok = 32", "16 experts")


def test_inspect_demo_prints_no_torchao_noise():
    done = _moeprune("inspect", "demo")
    assert done.returncode == 0
    assert done.stderr.strip() == "", done.stderr


def test_unknown_option_is_one_error_line():
    _one_error_line(_cli("inspect", "demo", "--bogus"), "--bogus")


def test_bad_input_exits_2_and_a_bug_exits_1():
    import click
    from click.testing import CliRunner

    from moeprune.cli import _Group
    from moeprune.errors import MoePruneError

    @click.group(cls=_Group)
    def group():
        pass

    @group.command()
    def bad():
        raise MoePruneError("field x is wrong; set it to 1")

    @group.command()
    def bug():
        raise RuntimeError("a bug")

    result = CliRunner().invoke(group, ["bad"])
    assert result.exit_code == 2 and result.stderr == "Error: field x is wrong; set it to 1\n"
    result = CliRunner().invoke(group, ["bug"])
    assert result.exit_code == 1 and isinstance(result.exception, RuntimeError)
