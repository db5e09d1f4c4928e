"""LoRA adapters on the MoE blocks (recover/adapters.py, `moe_kd` with `recover.adapter: lora`): on every family
the adapted model starts at the model, gradients reach every factor, merging gives the adapted model's logits
exactly and leaves the stock module tree; a recipe run writes a stock checkpoint of the pruned shapes whose
logits, loaded by transformers alone, equal the adapted model's; bad settings are refused in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from moeprune.models import MoEAdapter
from moeprune.pipeline.recipe import Recipe
from moeprune.pipeline.run import run_recipe
from moeprune.recover.adapters import Adapters, adapter_targets, attach_adapters, lowrank_numel
from moeprune.testing import TINY, save_tiny, tiny_model
from cli_checks import one_error_line
from recover.common import calib_file, reap_recipe

TESTS = Path(__file__).resolve().parents[1]


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_adapters_start_at_the_model_train_every_factor_and_merge_exactly(model_type):
    model = tiny_model(model_type)
    names_before = [n for n, _ in model.named_parameters()]
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    base = _logits(model, ids)
    lora = attach_adapters(model, rank=4, seed=0)
    assert torch.equal(_logits(model, ids), base)  # B = 0: training starts at the pruned model
    params = lora.trainable_parameters()
    factors = {k: p for k, (_, path, p) in params.items() if path.endswith((".lora_A", ".lora_B"))}
    assert factors and all(p.dtype == torch.float32 for p in factors.values())
    assert "experts.gate_up_proj" in lora.adapted_paths() or "experts.gate_up_proj" not in dict(
        MoEAdapter(model).layers[0].block.named_parameters())
    for _, _, p in params.values():
        p.requires_grad_(True)
    with torch.no_grad():
        for k, p in factors.items():
            if k.endswith(".lora_B"):
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(k)))
    loss = model(ids).logits.float().pow(2).mean()
    grads = dict(zip(params, torch.autograd.grad(loss, [p for _, _, p in params.values()], allow_unused=True)))
    assert all(grads[k] is not None and grads[k].abs().sum() > 0 for k in factors), model_type
    adapted = _logits(model, ids)
    assert not torch.equal(adapted, base)
    merged = lora.merge()
    assert set(merged) == {layer.index for layer in MoEAdapter(model).layers}
    assert [n for n, _ in model.named_parameters()] == names_before  # the stock module tree again
    assert torch.equal(_logits(model, ids), adapted)


def test_targets_routers_full_experts_low_rank_only_where_smaller():
    model = tiny_model("qwen2_moe")  # hidden 64, 8 experts of width 32, a shared expert of 48 and its gate
    adapter = MoEAdapter(model)
    targets = {t.path: t for t in adapter_targets(adapter, adapter.layers[0], rank=4)}
    assert not targets["gate.weight"].lowrank and not targets["shared_expert_gate.weight"].lowrank
    assert targets["experts.gate_up_proj"].lowrank and targets["experts.gate_up_proj"].per_expert
    assert targets["shared_expert.up_proj.weight"].lowrank and not targets["shared_expert.up_proj.weight"].per_expert
    assert lowrank_numel((8, 64, 32), 4) == 8 * 4 * (64 + 32)
    big = {t.path: t for t in adapter_targets(adapter, adapter.layers[0], rank=40)}  # 40 * (64 + 64) > 64 * 64
    assert not big["experts.gate_up_proj"].lowrank and not big["experts.down_proj"].lowrank


def test_base_tensor_is_the_one_read_of_the_frozen_weights():
    model = tiny_model("mixtral")
    ids = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(2))
    lora = attach_adapters(model, rank=2, seed=0)
    base = _logits(model, ids)
    module = lora.wrapped[0].module
    resident = {n: getattr(module.base, n).detach().clone() for n in module.names}
    module.base_source = lambda name: resident[name] * 0  # e.g. a streaming trainer's copy from disk
    assert not torch.equal(_logits(model, ids), base)
    module.base_source = lambda name: resident[name]
    assert torch.equal(_logits(model, ids), base)
    lora.detach()
    assert torch.equal(_logits(model, ids), base)


@pytest.mark.parametrize("model_type", ["qwen2_moe", "gpt_oss"])
def test_lora_run_writes_a_stock_checkpoint_with_the_adapted_logits(tmp_path, monkeypatch, model_type):
    """qwen2_moe: shared expert and its gate; gpt_oss: transposed experts with biases. The output loads in a
    process that never imports moeprune, has the pruned shapes, and its logits equal the adapted model's."""
    monkeypatch.setenv("MOEPRUNE_CACHE", str(tmp_path / "cache"))
    model, calib = save_tiny(tmp_path / "m", model_type), calib_file(tmp_path / "calib.txt")
    ids = [[5 + (7 * i + j) % 100 for j in range(10)] for i in range(2)]
    seen = {}
    merge = Adapters.merge

    def spy(self):
        seen["logits"] = _logits(self.adapter.model, torch.tensor(ids))
        return merge(self)

    monkeypatch.setattr(Adapters, "merge", spy)
    quiet = dict(progress=False, log=lambda *_: None)
    run_recipe(reap_recipe(model, calib), out_dir=tmp_path / "plain", **quiet)
    report = run_recipe(reap_recipe(model, calib, recover={"method": "moe_kd", "adapter": "lora", "rank": 4,
                                                            "steps": 20, "lr": 1e-2, "tokens": 200, "top_k": 1000}),
                        out_dir=tmp_path / "lora", **quiet)
    rec = report["recovery"]
    assert rec["method"] == "moe_kd" and rec["adapter"]["rank"] == 4 and rec["adapter"]["alpha"] == 8.0
    assert rec["kl_after"] < rec["kl_before"]
    assert json.loads((tmp_path / "lora" / "moeprune.json").read_text())["recovery"] == rec
    plain, lora = load_file(tmp_path / "plain" / "model.safetensors"), load_file(tmp_path / "lora" / "model.safetensors")
    assert plain.keys() == lora.keys() and all(plain[k].shape == lora[k].shape for k in plain)
    changed = {k for k in plain if not torch.equal(plain[k], lora[k])}
    assert changed and all(".mlp." in k for k in changed), changed
    assert any(".experts." in k for k in changed)
    (tmp_path / "jobs.json").write_text(json.dumps([{"model_dir": str(tmp_path / "lora"), "input_ids": ids,
                                                     "out": str(tmp_path / "lora.st")}]))
    proc = subprocess.run([sys.executable, str(TESTS / "stock_loader.py"), str(tmp_path / "jobs.json")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert torch.equal(load_file(tmp_path / "lora.st")["logits"], seen["logits"])


def test_recipe_fields_defaults_and_one_line_refusals(tmp_path):
    r = Recipe.model_validate({"model": "demo", "ratio": 0.5, "recover": {"method": "moe_kd", "adapter": "lora"}})
    assert (r.recover.rank, r.recover.alpha, r.recover.lr, r.recover.steps) == (16, None, 1e-3, 400)
    assert Recipe.model_validate({"model": "demo", "ratio": 0.5, "recover": {"method": "moe_kd"}}).recover.adapter == "none"
    from moeprune.cli import _register_commands, cli

    _register_commands()
    base = ["run", "recipes/general-50.yaml", "-o", str(tmp_path / "o")]
    cases = [(["recover.method=router_kd", "recover.adapter=lora"], ("recover", "adapter lora applies to method moe_kd")),
             (["recover.method=moe_kd_block", "recover.adapter=lora"], ("moe_kd_block has no adapter variant",)),
             (["recover.rank=8"], ("rank applies to adapter: lora",)),
             (["recover.adapter=lora", "recover.rank=0"], ("recover.rank",)),
             (["recover.adapter=lora", "recover.alpha=-1"], ("recover.alpha",)),
             (["recover.adapter=qlora"], ("recover.adapter",)),
             (["recover.adapter=lora", "execution=layerwise", "max_memory=50MB"],  # streamed, still over budget
              ("recover: moe_kd+lora r16 needs about", "layer-wise (streamed)", "over the 0.05 GB budget"))]
    for sets, parts in cases:
        args = base + [a for s in sets for a in ("--set", s)]
        one_error_line(CliRunner().invoke(cli, args), *parts)
    assert not (tmp_path / "o").exists()
