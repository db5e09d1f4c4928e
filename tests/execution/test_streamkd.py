"""Logit KD under layer-wise execution (execution/streamkd.py): the same trained tensors and files as in memory
(same batches, seed, steps), the frozen weights never all resident, and the streaming rule itself."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from moeprune.pipeline.run import run_recipe
from moeprune.testing import save_tiny
from recover.common import calib_file, reap_recipe

SKIPPED = {"report.json", "report.md", "model.safetensors"}  # execution mode and timings; tensors compared apart


def _quiet(recipe, out):
    return run_recipe(recipe, out_dir=out, progress=False, log=lambda *_: None)


@pytest.mark.parametrize("model_type,recover", [
    ("mixtral", {"method": "router_kd"}),
    ("qwen2_moe", {"method": "moe_kd"}),  # shared expert and its gate train too
    ("qwen2_moe", {"method": "router_kd", "gate_scale": "auto"}),  # the block pass first, then streamed KD
    ("qwen3_moe", {"method": "moe_kd", "generate": {"samples": 1, "prompt_tokens": 4, "max_new_tokens": 8}}),
    ("qwen2_moe", {"method": "moe_kd", "adapter": "lora", "rank": 4}),  # expert bases streamed, shared expert too
    ("mixtral", {"method": "moe_kd", "adapter": "lora", "rank": 4}),
])
def test_layerwise_logit_kd_equals_memory(tmp_path, monkeypatch, model_type, recover):
    monkeypatch.setenv("MOEPRUNE_CACHE", str(tmp_path / "cache"))
    model, calib = save_tiny(tmp_path / "m", model_type), calib_file(tmp_path / "calib.txt")
    recover = {"steps": 6, "lr": 1e-3, "tokens": 200, "top_k": 1000, **recover}
    mem = _quiet(reap_recipe(model, calib, recover=recover, execution="memory"), tmp_path / "mem")
    lay = _quiet(reap_recipe(model, calib, recover=recover, execution="layerwise"), tmp_path / "lay")
    assert (mem["execution"], lay["execution"]) == ("memory", "layerwise")
    a, b = mem["recovery"], lay["recovery"]
    assert a["trained"] == b["trained"] and a["trained_params"] == b["trained_params"]
    assert a.get("generated", {}).get("tokens") == b.get("generated", {}).get("tokens")
    for key in ("kl_before", "kl_after", "loss_first", "loss_last"):
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-7), key
    assert a.get("gate_scale") == b.get("gate_scale")
    wa, wb = load_file(tmp_path / "mem" / "model.safetensors"), load_file(tmp_path / "lay" / "model.safetensors")
    assert wa.keys() == wb.keys()
    plain = load_file(model / "model.safetensors")
    trained = [k for k in wa if k not in plain or wa[k].shape != plain[k].shape or not torch.equal(wa[k], plain[k])]
    assert trained  # the comparison covers tensors that recovery changed
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-5, msg=k)
    side = sorted(p.name for p in (tmp_path / "mem").iterdir() if p.is_file() and p.name not in SKIPPED)
    assert side == sorted(p.name for p in (tmp_path / "lay").iterdir() if p.is_file() and p.name not in SKIPPED)
    assert json.loads((tmp_path / "lay" / "config.json").read_text()) == json.loads(
        (tmp_path / "mem" / "config.json").read_text())
    assert not any(p.name.startswith(".moeprune-student") for p in (tmp_path / "lay").iterdir())  # scratch gone


def _compressed(tmp_path, overrides=None):
    """A tiny Mixtral with 4 decoder layers, half its experts pruned on disk."""
    from moeprune.checkpoint.rewrite import prune_checkpoint
    from moeprune.testing import tiny_model, tiny_tokenizer

    src = tmp_path / "src"
    tiny_model("mixtral", overrides={"num_hidden_layers": 4, **(overrides or {})}).save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    prune_checkpoint(src, tmp_path / "pruned", {i: [0, 2, 4, 6] for i in range(4)})
    return tmp_path / "pruned"


@pytest.mark.parametrize("trains", ["router", "moe"])
def test_streamed_student_keeps_only_what_trains_resident(tmp_path, trains):
    """Resident parameter bytes, sampled before and after every module call (forward, and the recomputation
    in the backward pass), never exceed the resident part plus one decoder layer, and stay below the whole
    model; gradients match the same model loaded whole."""
    from transformers import AutoModelForCausalLM

    from moeprune.execution.streamkd import checkpointed_layers, resident_bytes, streamed_model
    from moeprune.recover import kd_loss, trainable_parameters

    folder = _compressed(tmp_path)
    pick = lambda m: [p for _, _, p in trainable_parameters(m, trains).values()]  # noqa: E731
    student, info = streamed_model(folder, dtype="float32", device=torch.device("cpu"), trains=pick)
    whole = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    total = sum(p.numel() * 4 for p in whole.parameters())
    layers = whole.model.layers
    trained_bytes = sum(p.numel() * 4 for p in pick(whole))
    outer = total - sum(p.numel() * 4 for p in layers.parameters())
    largest = max(sum(p.numel() * 4 for p in layer.parameters()) for layer in layers)
    at_rest = resident_bytes(student)
    buffers = sum(b.numel() * b.element_size() for b in student.buffers() if b.device.type != "meta")
    assert at_rest == outer + trained_bytes + buffers  # embedding, norm, head, what trains, computed buffers
    assert info["streamed_modules"] > 0

    peak = [0]
    sample = lambda *_: peak.__setitem__(0, max(peak[0], resident_bytes(student)))  # noqa: E731
    handles = [m.register_forward_pre_hook(sample) for m in student.modules()]
    handles += [m.register_forward_hook(sample) for m in student.modules()]
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        target = whole(input_ids=ids).logits.log_softmax(-1).topk(8, dim=-1)
    grads = {}
    for name, model in (("streamed", student), ("whole", whole)):
        params = pick(model)
        for p in params:
            p.requires_grad_(True)
        with checkpointed_layers(model):
            logits = model(input_ids=ids).logits
            loss = kd_loss(logits, target.indices, target.values, torch.ones(2, 12, dtype=torch.bool))
            grads[name] = torch.autograd.grad(loss, params)
    for h in handles:
        h.remove()
    assert at_rest < peak[0] <= at_rest + largest, (peak[0], at_rest, largest)
    assert peak[0] < total
    for g, w in zip(grads["streamed"], grads["whole"]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    assert resident_bytes(student) == at_rest  # every streamed weight freed again


def test_resident_rule_keeps_siblings_of_trained_tensors():
    from moeprune.execution.streamkd import resident_names

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    assert resident_names(model, [model[1].weight]) == {"1.weight", "1.bias"}
    assert resident_names(model, []) == set()
