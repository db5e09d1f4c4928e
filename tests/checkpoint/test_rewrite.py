"""Streaming rewrite == in-memory prune + save (names, values, config), on sharded tiny checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from moeprune.testing import tiny_model, tiny_tokenizer

from moeprune.compress import prune_experts
from moeprune.checkpoint.writer import save_compressed
from moeprune.errors import MoePruneError
from moeprune.checkpoint.model_dir import load_model
from moeprune.models import MoEAdapter
from moeprune.checkpoint.rewrite import parse_size, prune_checkpoint
from moeprune.checkpoint.safetensors_io import Checkpoint

def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def _save(tmp_path: Path, model_type: str, *, shard: str | None = "100KB") -> tuple[Path, dict]:
    src = tmp_path / "src"
    model = tiny_model(model_type)
    model.save_pretrained(src, **({"max_shard_size": shard} if shard else {}))
    tiny_tokenizer().save_pretrained(src)
    keep = {i: [0, 2, 5, 7] for i in MoEAdapter(model).layer_indices}
    return src, keep


# hub per-expert layout (mixtral renamed block, qwen2 shared expert, deepseek dense first layer + correction
# bias, ernie (1, E) bias sliced along dim 1) and fused on-disk experts (gpt_oss)
@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "deepseek_v3", "ernie4_5_moe", "gpt_oss"])
def test_streaming_equals_in_memory(tmp_path, model_type):
    src, keep = _save(tmp_path, model_type)
    assert len(list(src.glob("*.safetensors"))) > 1  # the source really is sharded
    result = prune_checkpoint(src, tmp_path / "stream", keep, max_shard_size="100KB")
    model = load_model(src, dtype="auto", device="cpu")
    prune_experts(model, keep)
    save_compressed(model, tmp_path / "mem", source_dir=src)

    got, want = _tensors(tmp_path / "stream"), _tensors(tmp_path / "mem")
    assert set(got) == set(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    assert json.loads((tmp_path / "stream/config.json").read_text()) == \
        json.loads((tmp_path / "mem/config.json").read_text())
    assert result.shards > 1 and (tmp_path / "stream/model.safetensors.index.json").is_file()
    for name in ("tokenizer.json", "generation_config.json", "moeprune.json"):
        assert (tmp_path / "stream" / name).is_file()
    record = json.loads((tmp_path / "stream/moeprune.json").read_text())
    assert record["kept"] == {str(k): v for k, v in keep.items()} and not Path(record["base_model"]).is_absolute()


def test_reloads_with_stock_loader_and_matches_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    src, keep = _save(tmp_path, "mixtral")
    prune_checkpoint(src, tmp_path / "out", keep)
    assert (tmp_path / "out/model.safetensors").is_file()  # fits one shard: no index, like save_pretrained
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ref = load_model(src, device="cpu")
    prune_experts(ref, keep)
    ids = torch.randint(3, 120, (2, 12))
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, ref(ids).logits, atol=1e-6)
    assert reloaded.config.num_local_experts == 4


def test_output_size_is_non_expert_plus_kept_share(tmp_path):
    src, keep = _save(tmp_path, "mixtral", shard=None)
    result = prune_checkpoint(src, tmp_path / "out", keep)
    ckpt = Checkpoint(src)
    # per-expert bytes: the expert weights and the router rows
    expert = sum(t.nbytes for n, t in ckpt.tensors.items() if ".experts." in n or ".block_sparse_moe.gate." in n)
    assert result.bytes_after == ckpt.total_bytes - expert + expert * 4 // 8
    assert result.bytes_before == ckpt.total_bytes


def test_bad_plan_fails_before_writing(tmp_path):
    src, keep = _save(tmp_path, "mixtral", shard=None)
    keep[1] = [0]  # fewer than top-k
    with pytest.raises(MoePruneError, match="top-k"):
        prune_checkpoint(src, tmp_path / "out", keep)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_refuses_output_inside_input_and_non_empty(tmp_path):
    src, keep = _save(tmp_path, "mixtral", shard=None)
    with pytest.raises(MoePruneError, match="input folder"):
        prune_checkpoint(src, src / "sub", keep)
    (tmp_path / "full").mkdir()
    (tmp_path / "full/x").write_text("x")
    with pytest.raises(MoePruneError, match="not empty"):
        prune_checkpoint(src, tmp_path / "full", keep)


def test_missing_expert_tensor_is_an_error(tmp_path):
    src, keep = _save(tmp_path, "qwen2_moe", shard=None)
    # drop expert 3 of layer 0 from the file: the rewrite must refuse rather than write a broken model
    from safetensors.torch import load_file, save_file

    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.0.mlp.experts.3.up_proj.weight"]
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MoePruneError, match="layer 0 has experts"):
        prune_checkpoint(src, tmp_path / "out", keep)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size(100) == 100
    with pytest.raises(MoePruneError):
        parse_size("lots")


def test_names_come_from_the_conversion_table():
    from moeprune.checkpoint.names import CheckpointNames

    with torch.device("meta"):
        names = CheckpointNames(tiny_model("mixtral"))
    role = names.role("model.layers.1.block_sparse_moe.experts.6.w3.weight")
    assert (role.kind, role.layer, role.expert) == ("expert", 1, 6)
    assert role.memory_name == "model.layers.1.mlp.experts.gate_up_proj"
    assert role.renamed("model.layers.1.block_sparse_moe.experts.6.w3.weight", 2) == \
        "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    router = names.role("model.layers.0.block_sparse_moe.gate.weight")
    assert (router.kind, router.dim, router.memory_name) == ("router", 0, "model.layers.0.mlp.gate.weight")
    assert names.role("model.layers.0.self_attn.q_proj.weight").kind == "copy"
    with pytest.raises(MoePruneError, match="does not understand.*absmax"):
        names.role("model.layers.0.block_sparse_moe.experts.3.w1.weight.absmax")
