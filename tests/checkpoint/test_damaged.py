"""Damaged safetensors shards (truncated, garbage header, zero bytes) fail in one line that names the shard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from moeprune.testing import tiny_model, tiny_tokenizer

from moeprune.cli import cli
from moeprune.commands import stream_cmd  # noqa: F401
from moeprune.errors import MoePruneError
from moeprune.checkpoint.model_dir import meta_model
from moeprune.checkpoint.loader import WeightLoader
from moeprune.checkpoint.rewrite import prune_checkpoint
from moeprune.checkpoint.names import CheckpointNames
from moeprune.checkpoint.safetensors_io import Checkpoint, read_tensor


def _sharded(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny sharded Mixtral and its second shard."""
    src = tmp_path / "src"
    tiny_model("mixtral").save_pretrained(src, max_shard_size="100KB")
    tiny_tokenizer().save_pretrained(src)
    shards = sorted(src.glob("model-*.safetensors"))
    assert len(shards) >= 3
    return src, shards[1]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _garbage(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:40] = b"\xff" * 32  # the header's JSON
    path.write_bytes(bytes(data))


def _huge_length(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[:8] = (1 << 40).to_bytes(8, "little")
    path.write_bytes(bytes(data))


def _empty(path: Path) -> None:
    path.write_bytes(b"")


DAMAGE = {"truncated": (_truncate, "truncated"), "garbage header": (_garbage, "unreadable header"),
          "header length past the end": (_huge_length, "header length"), "zero bytes": (_empty, "0 bytes")}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_checkpoint_names_the_damaged_shard(tmp_path, damage):
    src, shard = _sharded(tmp_path)
    spoil, why = DAMAGE[damage]
    spoil(shard)
    with pytest.raises(MoePruneError) as err:
        Checkpoint(src)
    msg = str(err.value)
    assert str(shard) in msg and why in msg and "\n" not in msg


def test_shard_truncated_after_opening_fails_on_read(tmp_path):
    """A shard cut short while the loader holds its header: the read names it, no partial tensor."""
    src, _ = _sharded(tmp_path)
    ckpt = Checkpoint(src)
    loader = WeightLoader(ckpt, CheckpointNames(meta_model(src)))
    memory = next(n for n in loader.sources if "experts" in n)
    info = ckpt.tensors[loader.sources[memory][0][2]]
    assert torch.equal(read_tensor(info), loader.ckpt.load(info.name))
    info.file.write_bytes(info.file.read_bytes()[:info.begin + 3])
    with pytest.raises(MoePruneError, match=f"{info.file}: damaged safetensors file \\(truncated"):
        loader.tensor(memory)


def test_wrong_offsets_and_bad_index(tmp_path):
    src, shard = _sharded(tmp_path)
    data = shard.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [d + 1 for d in header[name]["shape"]]
    raw = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(raw) == n
    shard.write_bytes(data[:8] + raw + data[8 + n:])
    with pytest.raises(MoePruneError, match=f"{shard}: damaged safetensors file \\(tensor '{name}': data_offsets"):
        Checkpoint(src)
    (src / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(MoePruneError, match="model.safetensors.index.json: not a readable safetensors index"):
        Checkpoint(src)


@pytest.mark.parametrize("damage", ["truncated", "zero bytes"])
def test_rewrite_and_cli_name_the_shard(tmp_path, damage):
    src, shard = _sharded(tmp_path)
    DAMAGE[damage][0](shard)
    keep = {0: [0, 1, 2], 1: [3, 4, 5]}
    with pytest.raises(MoePruneError, match=str(shard)):
        prune_checkpoint(src, tmp_path / "out", keep)
    assert not (tmp_path / "out").exists()
    keep_file = tmp_path / "keep.json"
    keep_file.write_text(json.dumps({str(k): v for k, v in keep.items()}))
    res = CliRunner().invoke(cli, ["prune-stream", str(src), "-o", str(tmp_path / "out"), "--keep", str(keep_file)])
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and str(shard) in lines[0], res.output
