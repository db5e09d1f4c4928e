"""`moeprune prune-stream` and `moeprune observe-stream` on a tiny sharded Mixtral."""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner
from moeprune.testing import save_tiny

from moeprune.cli import cli
from moeprune.commands import stream_cmd  # noqa: F401
from moeprune.observe import Observations


def test_prune_stream_cli(tmp_path):
    src = save_tiny(tmp_path / "m", "mixtral")
    keep = tmp_path / "keep.json"
    keep.write_text(json.dumps({"0": [1, 3, 4], "1": [0, 6, 7]}))
    res = CliRunner().invoke(cli, ["prune-stream", str(src), "-o", str(tmp_path / "out"), "--keep", str(keep)])
    assert res.exit_code == 0, res.output
    assert "kept 3 of 8 experts per MoE layer" in res.output and "layerwise execution" in res.output
    assert json.loads((tmp_path / "out/config.json").read_text())["num_local_experts"] == 3
    keep.write_text(json.dumps({"0": [1, 3, 4]}))
    res = CliRunner().invoke(cli, ["prune-stream", str(src), "-o", str(tmp_path / "out2"), "--keep", str(keep)])
    assert res.exit_code == 2 and "layer 1 is missing" in res.output


def test_observe_stream_cli(tmp_path):
    src = save_tiny(tmp_path / "m", "mixtral")
    texts = tmp_path / "calib.txt"
    texts.write_text("\n".join(f"sample {i}: the quick brown fox {i * 7}" for i in range(6)) + "\n")
    res = CliRunner().invoke(cli, ["observe-stream", str(src), "-o", str(tmp_path / "obs"), "--calib", str(texts),
                                   "--max-length", "32", "--batch-size", "2", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    obs = Observations.load(tmp_path / "obs")
    assert obs.meta["layerwise"] is True and obs.num_tokens > 0
    assert torch.isclose(obs.layers[0].count.sum(), torch.tensor(2.0 * obs.num_tokens, dtype=torch.float64))
