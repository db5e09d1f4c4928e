"""In-memory and layer-wise execution give the same observations, decisions and output files.

Every method on tiny random models of four families (hub per-expert layout, shared experts, dense first
layer + group routing + correction bias, fused on-disk experts with biases), one float32 pass per
executor; the shipped bf16 demo model for REAP and HC-SMoE in its own dtype.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from moeprune.pipeline.recipe import Recipe
from moeprune.pipeline.run import run_recipe
from moeprune.testing import save_tiny

METHODS = ["reap", "reap_prob", "frequency", "ean", "reconstruct", "hc_smoe", "m_smoe", "ream"]
RESULT_FILES_SKIPPED = {"report.json", "report.md"}  # they record the execution mode and timings


def _files(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.is_file() and p.name not in RESULT_FILES_SKIPPED}


def _recipe(model, calib, method, execution, **kw) -> Recipe:
    ratio = kw.pop("ratio", 0.5)
    return Recipe.model_validate({
        "model": str(model), "method": method, "ratio": ratio, "execution": execution,
        "calibration": {"spec": str(calib), "max_length": 32, "batch_size": 2},
        "merge": {"all_means_tokens": None}, "reconstruct": {"budget": 200, "max_tokens": 64}, **kw})


def _run(model, calib, method, execution, out, **kw) -> dict:
    return run_recipe(_recipe(model, calib, method, execution, **kw), out_dir=out, progress=False,
                      log=lambda *_: None, save_observations=True)


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n\n".join(f"{i} + {i * 3} = {i * 4}. The cat sat on mat {i}; x = [{i}, {i + 1}]."
                                for i in range(12)))
    return path


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_memory_and_layerwise_write_identical_outputs(tmp_path, monkeypatch, calib, model_type):
    monkeypatch.setenv("MOEPRUNE_CACHE", str(tmp_path / "cache"))
    model = save_tiny(tmp_path / "m", model_type)
    ratio = 0.5
    for method in METHODS:
        outs = {}
        for execution in ("memory", "layerwise"):
            out = tmp_path / f"{method}-{execution}"
            report = _run(model, calib, method, execution, out, ratio=ratio)
            assert report["execution"] == execution
            outs[execution] = (out, report)
        (mem, rm), (lay, rl) = outs["memory"], outs["layerwise"]
        assert rm["compression"]["kept"] == rl["compression"]["kept"], method
        assert rm["compression"].get("merged") == rl["compression"].get("merged"), method
        assert _files(mem) == _files(lay), method
        if method == "reap":  # observations of the two executors agree to float32 rounding
            from moeprune.observe import Observations

            a, b = Observations.load(mem / "observations"), Observations.load(lay / "observations")
            for i, stats in a.layers.items():
                for name, t in stats.tensors().items():
                    torch.testing.assert_close(b.layers[i].tensors()[name], t, rtol=1e-5, atol=1e-6)


def test_demo_model_keeps_bf16_and_layerwise_matches(tmp_path, monkeypatch):
    """Default options on the shipped bf16 demo: bf16 output, fewer bytes than the input, both executors
    identical (REAP and HC-SMoE)."""
    from safetensors import safe_open

    from moeprune.checkpoint import files_bytes
    from moeprune.checkpoint.model_dir import DEMO_MODEL_DIR

    monkeypatch.setenv("MOEPRUNE_CACHE", str(tmp_path / "cache"))
    for method in ("reap", "hc_smoe"):
        files = {}
        for execution in ("memory", "layerwise"):
            out = tmp_path / f"{method}-{execution}"
            recipe = Recipe.model_validate({"model": "demo", "method": method, "ratio": 0.5, "execution": execution,
                                            "calibration": {"spec": "demo:4", "max_length": 48, "batch_size": 4},
                                            "merge": {"all_means_tokens": 64}})
            report = run_recipe(recipe, out_dir=out, progress=False, log=lambda *_: None)
            assert report["dtype"] == {"compute": "bfloat16", "source": "bfloat16", "output": "bfloat16"}
            assert report["compression"]["bytes_after"] == files_bytes(out) < files_bytes(DEMO_MODEL_DIR)
            assert report["compression"]["bytes_before"] == files_bytes(DEMO_MODEL_DIR)
            with safe_open(out / "model.safetensors", framework="pt") as f:
                assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
            files[execution] = _files(out)
        assert files["memory"] == files["layerwise"], method


def test_layerwise_evaluation_equals_memory(tmp_path, monkeypatch, calib):
    """Perplexity (and a generative task) of the source and of the output, float32, both executors."""
    import json

    monkeypatch.setenv("MOEPRUNE_CACHE", str(tmp_path / "cache"))
    model = save_tiny(tmp_path / "m", "qwen2_moe")
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": f"The cat {i} sat on the mat and said {i * 7}."}) + "\n"
                             for i in range(6)))
    (tmp_path / "ppl.yaml").write_text(f"name: ppl\ndata: {texts}\nscorer: perplexity\n")
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(4)))
    (tmp_path / "qa.yaml").write_text(f"name: qa\ndata: {qa}\nscorer: exact_match\n"
                                      "generation: {max_new_tokens: 4, stop: ['\\n']}\n")
    ev = {"tasks": [str(tmp_path / "ppl.yaml"), str(tmp_path / "qa.yaml")], "batch_size": 4}
    reports = {x: _run(model, calib, "reap", x, tmp_path / x, eval=ev) for x in ("memory", "layerwise")}
    for side in ("base", "compressed"):
        a, b = reports["memory"]["eval"][side], reports["layerwise"]["eval"][side]
        assert abs(a["ppl"]["score"] - b["ppl"]["score"]) <= 1e-4 * a["ppl"]["score"], side
        assert a["qa"]["score"] == b["qa"]["score"], side
    assert reports["memory"]["eval"]["base"]["ppl"]["score"] != reports["memory"]["eval"]["compressed"]["ppl"]["score"]


@pytest.mark.parametrize("model_type,quant", [("qwen2_moe", "gptq"), ("deepseek_v3", "gptq"), ("mixtral", "rtn")])
def test_prune_recover_quantize_identical_in_both_executors(tmp_path, monkeypatch, calib, model_type, quant):
    """One run: REAP 50%, block recovery, then uniform int4 quantization (GPTQ with every layer's Hessians from
    the calibration batches, or round to nearest); the layer-wise executor quantizes one decoder layer read
    from disk at a time and writes the same files byte for byte, and both evaluate the same quantized model."""
    import json

    from safetensors import safe_open

    pytest.importorskip("compressed_tensors")
    monkeypatch.setenv("MOEPRUNE_CACHE", str(tmp_path / "cache"))
    model = save_tiny(tmp_path / "m", model_type)
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": f"The cat {i} sat on the mat and said {i * 7}."}) + "\n"
                             for i in range(4)))
    (tmp_path / "ppl.yaml").write_text(f"name: ppl\ndata: {texts}\nscorer: perplexity\n")
    kw = {"recover": {"method": "moe_kd_block", "steps": 3, "batch_tokens": 32},
          "quantize": {"method": quant, "bits": 4, "group_size": 16, "min_expert_tokens": 4},
          "eval": {"tasks": [str(tmp_path / "ppl.yaml")], "batch_size": 4, "base": False}}
    outs, reports = {}, {}
    for execution in ("memory", "layerwise"):
        outs[execution] = tmp_path / execution
        reports[execution] = _run(model, calib, "reap", execution, outs[execution], **kw)
    mem, lay = reports["memory"], reports["layerwise"]
    assert _files(outs["memory"]) == _files(outs["layerwise"])
    packed = [k for f in outs["layerwise"].glob("*.safetensors") for k in safe_open(f, "pt").keys()
              if k.endswith("weight_packed")]
    assert any(".experts.0." in k for k in packed) and any("self_attn" in k for k in packed)
    record = json.loads((outs["layerwise"] / "moeprune.json").read_text())["quantization"]
    assert record["method"] == quant and record["bits"] == 4
    if quant == "gptq":  # every kept expert went through GPTQ or its documented RTN fallback, per layer
        layers = mem["quantization"]["method_details"]["layers"]
        assert layers.keys() == lay["quantization"]["method_details"]["layers"].keys()
        assert all(r["gptq_experts"] + len(r.get("rtn_experts", [])) >= r["gptq_experts"] > 0
                   for r in layers.values() if "gptq_experts" in r)
    a, b = mem["eval"]["quantized"]["ppl"]["score"], lay["eval"]["quantized"]["ppl"]["score"]
    assert abs(a - b) <= 1e-4 * a
    assert a != mem["eval"]["compressed"]["ppl"]["score"]  # quantization changed the model
