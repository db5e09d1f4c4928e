"""Pruning every architecture, saving, and reloading in a process that never imports moeprune."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from moeprune.compress import prune_experts
from moeprune.checkpoint.writer import save_compressed
from moeprune.models import ARCHS, MoEAdapter
from moeprune.score.reconstruct import masked_routing
from moeprune.testing import TINY, tiny_model

HERE = Path(__file__).resolve().parent.parent
# non-contiguous, different per layer, two per group of four (valid for group-limited routers)
KEEPS = ([0, 2, 5, 7], [1, 3, 4, 6], [0, 3, 5, 6])


def _plan(adapter):
    return {layer.index: KEEPS[i % len(KEEPS)] for i, layer in enumerate(adapter.layers)}


@pytest.fixture(scope="module")
def roundtrip(tmp_path_factory):
    """Prune every architecture once; reload all outputs in one stock-transformers child process."""
    root = tmp_path_factory.mktemp("roundtrip")
    ids = torch.randint(3, 128, (2, 11))
    cases, jobs = {}, []
    for model_type in TINY:
        src, out = root / f"{model_type}-src", root / f"{model_type}-out"
        tiny_model(model_type).save_pretrained(src)
        original = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        pruned = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        plan = prune_experts(pruned, _plan(MoEAdapter(pruned)))
        save_compressed(pruned, out, source_dir=src, provenance={"kept": plan})
        cases[model_type] = dict(src=src, out=out, original=original, plan=plan)
        jobs.append({"model_dir": str(out), "input_ids": ids.tolist(), "out": str(root / f"{model_type}.st")})
    (root / "jobs.json").write_text(json.dumps(jobs))
    proc = subprocess.run([sys.executable, str(HERE / "stock_loader.py"), str(root / "jobs.json")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for model_type in TINY:
        cases[model_type]["reloaded"] = load_file(root / f"{model_type}.st")
    return ids, cases


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_kept_tensors_equal_original(roundtrip, model_type):
    _, cases = roundtrip
    case = cases[model_type]
    adapter = MoEAdapter(case["original"])
    params = dict(case["original"].state_dict())
    reloaded = case["reloaded"]
    sliced = set()
    for layer in adapter.layers:
        kept = torch.tensor(case["plan"][layer.index])
        prefix = f"{adapter.spec.layers}.{layer.index}.{adapter.spec.block}."
        names = [(f"{adapter.spec.experts}.{n}", 0) for n in adapter.spec.layout.tensors]
        for rel, dim in names + list(adapter.spec.router_tensors):
            name = prefix + rel
            assert name in params, name
            torch.testing.assert_close(reloaded[f"param.{name}"], params[name].index_select(dim, kept),
                                       rtol=0, atol=0)
            sliced.add(name)
    for name, value in params.items():
        if name not in sliced:  # everything else (attention, norms, shared experts) is untouched
            torch.testing.assert_close(reloaded[f"param.{name}"], value, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("model_type", sorted(t for t in TINY if ARCHS[t].gate is not None))
def test_logits_equal_reference_routing(roundtrip, model_type):
    ids, cases = roundtrip
    case = cases[model_type]
    adapter = MoEAdapter(case["original"])
    with masked_routing(adapter, case["plan"]), torch.no_grad():
        want = case["original"](ids).logits
    torch.testing.assert_close(case["reloaded"]["logits"], want, rtol=1e-4, atol=1e-5)


def test_reference_differs_from_unmasked_model(roundtrip):
    """Guard against a vacuous reference: without the mask the original model's logits differ."""
    ids, cases = roundtrip
    case = cases["deepseek_v3"]
    with torch.no_grad():
        unmasked = case["original"](ids).logits
    assert (case["reloaded"]["logits"] - unmasked).abs().max() > 1e-3


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_reloaded_config_and_generation(roundtrip, model_type):
    _, cases = roundtrip
    case = cases[model_type]
    cfg = json.loads((case["out"] / "config.json").read_text())
    spec = ARCHS[model_type]
    counts = [cfg[k] for k in spec.num_experts_keys if k in cfg]
    assert counts and set(counts) == {4}
    gen = case["reloaded"]["generated"]
    assert gen.shape[1] > 11  # generate produced new tokens
    prov = json.loads((case["out"] / "moeprune.json").read_text())
    assert prov["kept"] == {str(k): v for k, v in case["plan"].items()}


def test_source_folder_untouched(roundtrip):
    _, cases = roundtrip
    case = cases["mixtral"]
    src_cfg = json.loads((case["src"] / "config.json").read_text())
    assert src_cfg["num_local_experts"] == 8
    assert not (case["src"] / "moeprune.json").exists()
