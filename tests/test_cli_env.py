"""The command bounds oneDNN's kernel cache before any command runs, keeping a value the user exported."""

from __future__ import annotations

import os
import subprocess
import sys

from moeprune import cli


def test_onednn_cache_bounded_unless_exported(monkeypatch):
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    cli._bound_onednn_cache()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == cli.ONEDNN_CACHE_CAPACITY == "64"
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "8")
    cli._bound_onednn_cache()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "8"


def test_main_sets_it_before_torch_is_imported():
    code = ("import sys; from moeprune import cli; cli._register_commands = lambda: None; "
            "cli.cli.main = lambda *a, **k: print('torch' in sys.modules, __import__('os').environ["
            "'ONEDNN_PRIMITIVE_CACHE_CAPACITY']); cli.main()")
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["False", "64"]
