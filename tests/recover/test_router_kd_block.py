"""router_kd_block: per-layer block-output router KD. The layer-wise run writes the same files as the in-memory
run; only router tensors change; the held-back block error drops; the output reloads in stock transformers;
training is deterministic and touches the router parameters only."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moeprune.models import MoEAdapter
from moeprune.pipeline.recipe import Recipe
from moeprune.pipeline.run import run_recipe
from moeprune.recover.block import block_outputs, fit_block, layer_router_parameters, relative_error
from recover.common import calib_file as _calib
from moeprune.testing import save_tiny, tiny_model

TESTS = Path(__file__).resolve().parents[1]
SKIPPED = {"report.json", "report.md"}  # they record the execution mode and timings


def _run(model, calib, out, *, method="reap", execution="memory", recover=None):
    data = {"model": str(model), "method": method, "ratio": 0.5, "dtype": "float32", "execution": execution,
            "calibration": {"spec": str(calib), "max_length": 32, "batch_size": 2},
            "merge": {"all_means_tokens": None}}
    if recover is not None:
        data["recover"] = recover
    return run_recipe(Recipe.model_validate(data), out_dir=out, progress=False, log=lambda *_: None)


def _files(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.is_file() and p.name not in SKIPPED}


BLOCK = {"method": "router_kd_block", "steps": 15, "lr": 0.01, "batch_tokens": 64}


@pytest.mark.parametrize("model_type,method,gate_scale", [("qwen2_moe", "reap", "auto"),
                                                          ("gpt_oss", "hc_smoe", "keep")])
def test_layerwise_equals_memory_and_only_router_tensors_change(tmp_path, monkeypatch, model_type, method,
                                                                 gate_scale):
    monkeypatch.setenv("MOEPRUNE_CACHE", str(tmp_path / "cache"))
    # a relative calibration path: the rows' shuffle is seeded by the source's name, so the same rows in the
    # same order in every run, whatever the temporary folder is called
    monkeypatch.chdir(tmp_path)
    model, calib = save_tiny(tmp_path / "m", model_type), _calib(Path("calib.txt"))
    recover = {**BLOCK, "gate_scale": gate_scale}
    mem = _run(model, calib, tmp_path / "mem", method=method, recover=recover)
    lay = _run(model, calib, tmp_path / "lay", method=method, execution="layerwise", recover=recover)
    assert lay["execution"] == "layerwise" and mem["execution"] == "memory"
    assert _files(tmp_path / "mem") == _files(tmp_path / "lay")  # identical router tensors, config, record
    assert mem["recovery"] == lay["recovery"]
    rec = mem["recovery"]
    assert rec["method"] == "router_kd_block" and rec["eval_on"] == "held-back calibration tokens"
    for i, layer in rec["layers"].items():
        assert layer["error_after"] < layer["error_before"], (i, layer)
    assert json.loads((tmp_path / "mem" / "moeprune.json").read_text())["recovery"] == rec
    # against the same compression without recovery: only router tensors differ (and the chosen gate flag)
    _run(model, calib, tmp_path / "plain", method=method)
    a, b = load_file(tmp_path / "plain" / "model.safetensors"), load_file(tmp_path / "mem" / "model.safetensors")
    assert a.keys() == b.keys()
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    router = (".mlp.gate.weight",) if model_type == "qwen2_moe" else (".mlp.router.weight", ".mlp.router.bias")
    assert changed and all(k.endswith(router) for k in changed), changed
    assert len(changed) == 2 * len(router)  # every trained tensor of both MoE layers
    ca, cb = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("plain", "mem"))
    gs = rec["gate_scale"]
    if gate_scale == "auto":
        assert gs["applicable"] and set(gs["error"]) == {"true", "false"}
        assert gs["chosen"] == (min(gs["error"], key=gs["error"].get) == "true")
        assert cb.pop("norm_topk_prob") == gs["chosen"] and ca.pop("norm_topk_prob") is True
    else:
        assert gs == {"mode": "keep", "applicable": False}
    assert ca == cb


def test_block_kd_output_reloads_in_stock_transformers(tmp_path, monkeypatch):
    """The layer-wise output loads in a process that never imports moeprune and computes what the in-memory
    run's model computes (evaluation in memory uses that model)."""
    monkeypatch.setenv("MOEPRUNE_CACHE", str(tmp_path / "cache"))
    model, calib = save_tiny(tmp_path / "m", "olmoe"), _calib(tmp_path / "calib.txt")
    _run(model, calib, tmp_path / "lay", execution="layerwise", recover={**BLOCK, "gate_scale": "renormalize"})
    assert json.loads((tmp_path / "lay" / "config.json").read_text())["norm_topk_prob"] is True  # source: False
    ids = [[5, 9, 14, 20, 33, 41, 7, 8]]
    job = [{"model_dir": str(tmp_path / "lay"), "input_ids": ids, "out": str(tmp_path / "lay.st")}]
    (tmp_path / "jobs.json").write_text(json.dumps(job))
    proc = subprocess.run([sys.executable, str(TESTS / "stock_loader.py"), str(tmp_path / "jobs.json")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    stock = load_file(tmp_path / "lay.st")
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "lay", dtype=torch.float32).eval()
    assert ref.config.norm_topk_prob is True and ref.model.layers[0].mlp.gate.norm_topk_prob is True
    with torch.no_grad():
        torch.testing.assert_close(stock["logits"], ref(torch.tensor(ids)).logits)


def _perturbed_student(seed: int = 1):
    student = tiny_model("mixtral")
    adapter = MoEAdapter(student)
    with torch.no_grad():
        for layer in adapter.layers:
            for p in layer_router_parameters(adapter, layer).values():
                p.add_(0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
    return student, adapter


def test_fit_block_is_deterministic_trains_the_router_only_and_lowers_the_error():
    teacher = MoEAdapter(tiny_model("mixtral"))
    x = torch.randn(300, 64, generator=torch.Generator().manual_seed(0))
    target = block_outputs(teacher.layers[0].block, x)
    runs = []
    for _ in range(2):
        student, adapter = _perturbed_student()
        block = adapter.layers[0].block
        before_state = {k: v.clone() for k, v in block.state_dict().items()}
        params = layer_router_parameters(adapter, adapter.layers[0])
        err0 = relative_error(block, x, target)
        losses, trained = fit_block(block, params, x, target, steps=40, lr=0.02, batch_tokens=64, seed=5)
        assert trained == ["gate.weight"]
        assert relative_error(block, x, target) < err0
        moved = {k for k, v in block.state_dict().items() if not torch.equal(v, before_state[k])}
        assert moved == {"gate.weight"}
        assert all(p.requires_grad for p in student.parameters())  # flags restored
        runs.append((losses, block.gate.weight.detach().clone()))
    assert runs[0][0] == runs[1][0] and torch.equal(runs[0][1], runs[1][1])
    student, adapter = _perturbed_student()  # another seed, another order
    params = layer_router_parameters(adapter, adapter.layers[0])
    other, _ = fit_block(adapter.layers[0].block, params, x, target, steps=40, lr=0.02, batch_tokens=64, seed=6)
    assert other != runs[0][0]


def test_selection_only_biases_are_not_trained():
    """DeepSeek-V3's correction bias is a buffer; AFMoE's expert bias is a parameter that only selects
    experts: no gradient reaches it, so it is reported untrained and left as it is."""
    adapter = MoEAdapter(tiny_model("deepseek_v3"))
    layer = adapter.layers[0]
    assert set(layer_router_parameters(adapter, layer)) == {"gate.weight"}
    assert "gate.e_score_correction_bias" in dict(layer.block.named_buffers())
    adapter = MoEAdapter(tiny_model("afmoe"))
    layer = adapter.layers[0]
    params = layer_router_parameters(adapter, layer)
    assert set(params) == {"router.gate.weight", "expert_bias"}
    bias = params["expert_bias"].detach().clone()
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    target = block_outputs(layer.block, x) * 1.1
    _, trained = fit_block(layer.block, params, x, target, steps=3, lr=0.05, batch_tokens=32, seed=0)
    assert trained == ["router.gate.weight"] and torch.equal(params["expert_bias"], bias)


def test_compress_model_on_a_loaded_model_matches_the_written_checkpoint(tmp_path, monkeypatch):
    """Studies compress a loaded model with `compress_model`: with router_kd_block and gate_scale auto it
    leaves the model equal to the checkpoint `run_recipe` writes (weights and gate flag)."""
    from transformers import AutoModelForCausalLM

    from moeprune.checkpoint.model_dir import load_tokenizer
    from moeprune.observe import observe
    from moeprune.observe.calibration import load_calibration
    from moeprune.execution.memory import compress_model
    from moeprune.pipeline.recipe import calibration_spec

    monkeypatch.setenv("MOEPRUNE_CACHE", str(tmp_path / "cache"))
    model, calib = save_tiny(tmp_path / "m", "qwen2_moe"), _calib(tmp_path / "calib.txt")
    recover = {**BLOCK, "gate_scale": "auto"}
    report = _run(model, calib, tmp_path / "out", recover=recover)
    recipe = Recipe.model_validate({"model": str(model), "method": "reap", "ratio": 0.5, "dtype": "float32",
                                    "calibration": {"spec": str(calib), "max_length": 32, "batch_size": 2},
                                    "recover": recover})
    loaded = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    cal = load_calibration(calibration_spec(recipe), load_tokenizer(model), batch_size=2)
    decision = compress_model(loaded, observe(loaded, cal, progress=False), recipe, calibration=cal)
    assert decision.details["recovery"] == report["recovery"]
    written = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert loaded.config.norm_topk_prob == written.config.norm_topk_prob == report["recovery"]["gate_scale"]["chosen"]
    want = written.state_dict()
    assert all(torch.equal(t, want[k]) for k, t in loaded.state_dict().items())
    assert loaded.model.layers[0].mlp.gate.norm_topk_prob == written.model.layers[0].mlp.gate.norm_topk_prob


def test_merge_cli_runs_router_kd_block_layerwise(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from moeprune.cli import cli
    from moeprune.commands import surgery  # noqa: F401

    monkeypatch.setenv("MOEPRUNE_CACHE", str(tmp_path / "cache"))
    model, calib = save_tiny(tmp_path / "m", "mixtral"), _calib(tmp_path / "calib.txt")
    args = ["merge", model, "--method", "ream", "--keep-experts", 4, "--calib", calib, "--max-length", 32,
            "--batch-size", 4, "--recover", "router_kd_block", "--recover-steps", 3, "--recover-batch-tokens", 32,
            "-o", tmp_path / "out", "--execution", "layerwise"]
    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    assert "router_kd_block: 3 steps per MoE layer; block-output error" in res.output
    record = json.loads((tmp_path / "out" / "moeprune.json").read_text())
    assert record["method"] == "ream" and record["recovery"]["batch_tokens"] == 32
    assert "layer-wise" in res.output or "layerwise" in res.output
