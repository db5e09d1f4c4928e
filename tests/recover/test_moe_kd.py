"""MoE-block KD (moe_kd, moe_kd_block): trains every weight of the MoE blocks (router, surviving experts,
shared experts) and nothing else, lowers the distance to the original, writes a stock checkpoint whose
layer-wise and in-memory files are identical, and reloads outside moeprune."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from moeprune.pipeline.recipe import Recipe, RecoverConfig
from moeprune.pipeline.run import run_recipe
from recover.common import calib_file as _calib
from recover.common import reap_recipe as _recipe
from moeprune.testing import save_tiny

TESTS = Path(__file__).resolve().parents[1]
SKIPPED = {"report.json", "report.md"}  # they record the execution mode and timings


def _quiet(recipe, out):
    return run_recipe(recipe, out_dir=out, progress=False, log=lambda *_: None)


def _changed(a_dir: Path, b_dir: Path) -> set[str]:
    a, b = load_file(a_dir / "model.safetensors"), load_file(b_dir / "model.safetensors")
    assert a.keys() == b.keys()
    return {k for k in a if not torch.equal(a[k], b[k])}


def _files(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.is_file() and p.name not in SKIPPED}


def test_defaults_depend_on_what_is_trained_and_explicit_values_win():
    assert (RecoverConfig(method="router_kd").steps, RecoverConfig(method="router_kd").lr) == (100, 1e-3)
    assert (RecoverConfig(method="moe_kd").steps, RecoverConfig(method="moe_kd").lr) == (400, 3e-4)
    assert (RecoverConfig(method="moe_kd_block").steps, RecoverConfig(method="moe_kd_block").lr) == (400, 3e-4)
    assert (RecoverConfig(method="router_kd").tokens, RecoverConfig(method="moe_kd_block").tokens) == (16384, 131072)
    cfg = RecoverConfig(method="moe_kd", steps=7, lr=0.5)
    assert (cfg.steps, cfg.lr, cfg.trains, cfg.per_block, cfg.logit_kd) == (7, 0.5, "moe", False, True)
    assert RecoverConfig(method="moe_kd_block").per_block and not RecoverConfig(method="moe_kd_block").logit_kd


def test_moe_kd_trains_the_moe_blocks_only_and_reloads_stock(tmp_path, monkeypatch):
    """qwen2_moe has a shared expert and its gate: both train, with the router and the routed experts;
    attention, norms and embeddings stay byte for byte; the output loads in a process that never imports
    moeprune and is closer to the original than plain pruning on text calibration never saw."""
    monkeypatch.setenv("MOEPRUNE_CACHE", str(tmp_path / "cache"))
    model, calib = save_tiny(tmp_path / "m", "qwen2_moe"), _calib(tmp_path / "calib.txt")
    _quiet(_recipe(model, calib), tmp_path / "plain")
    report = _quiet(_recipe(model, calib, recover={"method": "moe_kd", "steps": 30, "lr": 1e-3, "tokens": 200,
                                                   "top_k": 1000}), tmp_path / "kd")
    rec = report["recovery"]
    assert rec["method"] == "moe_kd" and rec["kl_after"] < rec["kl_before"]
    assert {"gate.weight", "shared_expert_gate.weight", "experts.gate_up_proj", "experts.down_proj"} <= set(
        rec["trained"]), rec["trained"]
    assert json.loads((tmp_path / "kd" / "moeprune.json").read_text())["recovery"] == rec
    changed = _changed(tmp_path / "plain", tmp_path / "kd")
    assert changed and all(".mlp." in k for k in changed), changed
    assert any(".mlp.experts." in k for k in changed) and any(".mlp.shared_expert." in k for k in changed)
    assert any(k.endswith(".mlp.gate.weight") for k in changed)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    rows = [tok(f"{i} + {i * 3} = {i * 4}. The cat sat on mat {i}; x = [{i}, {i + 1}].")["input_ids"]
            for i in (40, 57, 83)]
    ids = [r[:min(map(len, rows))] for r in rows]
    jobs = [{"model_dir": str(f), "input_ids": ids, "out": str(tmp_path / f"{k}.st")}
            for k, f in (("base", model), ("plain", tmp_path / "plain"), ("kd", tmp_path / "kd"))]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    proc = subprocess.run([sys.executable, str(TESTS / "stock_loader.py"), str(tmp_path / "jobs.json")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = {k: load_file(tmp_path / f"{k}.st")["logits"].double() for k in ("base", "plain", "kd")}

    def kl(student):
        t, s = F.log_softmax(out["base"], -1), F.log_softmax(student, -1)
        return float((t.exp() * (t - s)).sum(-1).mean())

    assert kl(out["kd"]) < kl(out["plain"]), (kl(out["kd"]), kl(out["plain"]))


@pytest.mark.parametrize("model_type,method", [("mixtral", "reap"), ("qwen2_moe", "hc_smoe")])
def test_moe_kd_block_layerwise_equals_memory(tmp_path, monkeypatch, model_type, method):
    monkeypatch.setenv("MOEPRUNE_CACHE", str(tmp_path / "cache"))
    model, calib = save_tiny(tmp_path / "m", model_type), _calib(tmp_path / "calib.txt")
    recover = {"method": "moe_kd_block", "steps": 15, "lr": 1e-3, "batch_tokens": 64}
    extra = {"method": method, "merge": {"all_means_tokens": None}}
    mem = _quiet(_recipe(model, calib, recover=recover, **extra), tmp_path / "mem")
    lay = _quiet(_recipe(model, calib, recover=recover, execution="layerwise", **extra), tmp_path / "lay")
    assert (mem["execution"], lay["execution"]) == ("memory", "layerwise")
    assert _files(tmp_path / "mem") == _files(tmp_path / "lay") and mem["recovery"] == lay["recovery"]
    rec = mem["recovery"]
    assert rec["method"] == "moe_kd_block" and "experts.down_proj" in rec["trained"]
    for i, layer in rec["layers"].items():
        assert layer["error_after"] < layer["error_before"], (i, layer)
    _quiet(_recipe(model, calib, **extra), tmp_path / "plain")
    changed = _changed(tmp_path / "plain", tmp_path / "mem")
    block = ".mlp." if model_type == "qwen2_moe" else ".block_sparse_moe."  # the MoE block's name on disk
    assert changed and all(block in k for k in changed), changed
    assert any(f"{block}experts." in k for k in changed)
    # the in-memory model after recovery (what evaluation sees) is the written checkpoint
    from transformers import AutoModelForCausalLM

    from moeprune.checkpoint.model_dir import load_tokenizer
    from moeprune.observe import observe
    from moeprune.observe.calibration import load_calibration
    from moeprune.execution.memory import compress_model
    from moeprune.pipeline.recipe import calibration_spec

    recipe = _recipe(model, calib, recover=recover, **extra)
    loaded = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    cal = load_calibration(calibration_spec(recipe), load_tokenizer(model), batch_size=2)
    from moeprune.methods import get_method

    obs = observe(loaded, cal, collect=tuple(get_method(method).needs), progress=False)
    decision = compress_model(loaded, obs, recipe, calibration=cal)
    assert decision.details["recovery"] == rec
    want = AutoModelForCausalLM.from_pretrained(tmp_path / "mem", dtype=torch.float32).state_dict()
    assert all(torch.equal(t, want[k]) for k, t in loaded.state_dict().items())


def test_prune_cli_moe_kd_block_and_moe_kd_layerwise_and_over_budget_refused(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from moeprune.cli import cli
    from moeprune.commands import surgery  # noqa: F401

    monkeypatch.setenv("MOEPRUNE_CACHE", str(tmp_path / "cache"))
    model, calib = save_tiny(tmp_path / "m", "mixtral"), _calib(tmp_path / "calib.txt")
    common = ["prune", model, "--method", "reap", "--ratio", 0.5, "--calib", calib, "--max-length", 32,
              "--batch-size", 4, "--recover-steps", 3, "--recover-batch-tokens", 32, "--execution", "layerwise"]
    res = CliRunner().invoke(cli, [str(a) for a in [*common, "--recover", "moe_kd_block", "-o", tmp_path / "o"]])
    assert res.exit_code == 0, res.output
    assert "moe_kd_block: 3 steps per MoE layer; block-output error" in res.output
    rec = json.loads((tmp_path / "o" / "moeprune.json").read_text())["recovery"]
    assert rec["steps"] == 3 and rec["lr"] == 3e-4  # the moe_* default learning rate
    res = CliRunner().invoke(cli, [str(a) for a in [*common, "--recover", "moe_kd", "-o", tmp_path / "p"]])
    assert res.exit_code == 0, res.output  # streamed (execution/streamkd.py)
    assert json.loads((tmp_path / "p" / "moeprune.json").read_text())["recovery"]["method"] == "moe_kd"
    res = CliRunner().invoke(cli, [str(a) for a in [*common, "--recover", "moe_kd", "--max-memory", "1MB", "-o",
                                                    tmp_path / "q"]])
    assert res.exit_code == 2 and "Error: recover: moe_kd needs about" in res.output
    assert "layer-wise (streamed)" in res.output and not (tmp_path / "q").exists()


def test_recipe_accepts_moe_kd_and_rejects_unknown_methods():
    r = Recipe.model_validate({"model": "demo", "ratio": 0.5, "recover": {"method": "moe_kd"}})
    assert r.recover.trains == "moe" and r.recover.steps == 400
    with pytest.raises(Exception, match="moe_kd"):
        Recipe.model_validate({"model": "demo", "ratio": 0.5, "recover": {"method": "moe_kdd"}})
