"""GPTQ: the solver against a direct reference, RTN equivalences and fallbacks, held-out error below RTN,
the CLI's checkpoint reloaded by stock transformers in a process that never imports moeprune."""

import copy
import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

import moeprune.commands  # noqa: F401
from moeprune.cli import cli
from moeprune.compress.gptq import GPTQOptions, gptq_solve
from moeprune.compress.gptq_eval import heldout_grams, layer_means, output_errors
from moeprune.compress.quantize import quantize_model
from moeprune.compress.rtn import expert_views, fake_quantize, group_scale
from moeprune.compress.quantize_plan import CHANNEL
from moeprune.errors import MoePruneError
from moeprune.models import MoEAdapter
from moeprune.testing import save_tiny, tiny_model

pytest.importorskip("compressed_tensors")


# ------------------------------------------------------------------------------------------- reference
def _reference(w, h, *, bits, group_size, damp, act_order):
    """GPTQ written the long way: one column at a time, the inverse Hessian of the remaining columns kept
    explicitly and downdated after each column (no Cholesky, no blocks). Same rounding rule as the solver:
    scale = group amax / qmax (from the group's current weights when its first column comes up; from the
    original weights with act-order or one scale per row), codes in [-qmax, qmax], the element that set a
    group's scale gets +-qmax."""
    w = w.double().clone()
    out, n = w.shape
    qmax = 2 ** (bits - 1) - 1
    gs = n if group_size == CHANNEL else group_size
    h = h.double().clone()
    h[torch.arange(n), torch.arange(n)] += damp * h.diagonal().mean()
    hinv = torch.linalg.inv(h)
    order = torch.argsort(h.diagonal(), descending=True, stable=True).tolist() if act_order else list(range(n))
    static = act_order or group_size == CHANNEL
    scale, forced, sign = {}, {}, {}

    def set_group(g, values):
        amax, idx = values.abs().max(dim=1)
        scale[g] = (amax / qmax).clamp(min=1e-12)
        forced[g] = idx + g * gs
        sign[g] = torch.sign(values[torch.arange(out), idx])

    if static:
        for g in range(n // gs):
            set_group(g, w[:, g * gs:(g + 1) * gs].clone())
    q = torch.zeros_like(w)
    remaining = list(order)
    for c in order:
        g = c // gs
        if not static and c % gs == 0:
            set_group(g, w[:, c:c + gs].clone())
        s = scale[g]
        code = torch.clamp(torch.round(w[:, c] / s), -qmax, qmax)
        code = torch.where(forced[g] == c, sign[g] * qmax, code)
        q[:, c] = code
        err = (w[:, c] - code * s) / hinv[c, c]
        remaining.remove(c)
        for j in remaining:
            w[:, j] -= err * hinv[c, j]
        hinv = hinv - torch.outer(hinv[:, c], hinv[c, :]) / hinv[c, c]
    scales = torch.stack([scale[g] for g in range(n // gs)], dim=1)
    return q, (q.reshape(out, -1, gs) * scales.unsqueeze(-1)).reshape(out, n)


def _problem(out=6, n=8, rows=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n, generator=g, dtype=torch.float64)
    x = torch.randn(rows, n, generator=g, dtype=torch.float64) @ torch.randn(n, n, generator=g, dtype=torch.float64)
    return w, 2 * x.T @ x / rows


@pytest.mark.parametrize("group_size,act_order,block", [
    (CHANNEL, False, 128), (4, False, 128),  # one block: the plain column-by-column arithmetic
    (4, False, 4), (2, False, 2), (CHANNEL, False, 3),  # blocks: errors reach later blocks through the factor
    (CHANNEL, True, 128), (4, True, 3), (2, True, 5),  # act-order
])
def test_solver_matches_direct_reference(group_size, act_order, block):
    w, h = _problem()
    codes, ref = _reference(w, h, bits=4, group_size=group_size, damp=0.01, act_order=act_order)
    res = gptq_solve(w, h, bits=4, group_size=group_size, damp=0.01, act_order=act_order, block_size=block)
    assert torch.equal(res.codes.double(), codes)
    assert torch.allclose(res.weight, ref, atol=1e-12, rtol=0)
    assert not torch.equal(codes, torch.round(w / (w.abs().amax(1, keepdim=True) / 7)))  # not plain RTN


def test_stacked_entries_are_solved_independently():
    (w0, h0), (w1, h1) = _problem(seed=1), _problem(seed=2)
    both = gptq_solve(torch.stack([w0, w1]), torch.stack([h0, h1]), bits=4, group_size=4, act_order=True)
    one = gptq_solve(w1, h1, bits=4, group_size=4, act_order=True)
    assert torch.equal(both.weight[1], one.weight) and torch.equal(both.codes[1], one.codes)


@pytest.mark.parametrize("bits,group_size", [(4, 32), (4, CHANNEL), (8, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_identity_hessian_is_rtn(bits, group_size, dtype):
    w = torch.randn(16, 128).to(dtype)
    res = gptq_solve(w, torch.eye(128), bits=bits, group_size=group_size)
    assert torch.equal(res.weight, fake_quantize(w, bits=bits, group_size=group_size))


@pytest.mark.parametrize("bits,group_size,act_order", [(4, 32, False), (4, 32, True), (4, CHANNEL, False),
                                                       (8, 64, False)])
def test_codes_and_scales_are_what_the_writer_stores(bits, group_size, act_order):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

    from moeprune.compress.quantize import _scheme

    g = torch.Generator().manual_seed(3)
    w = torch.randn(32, 128, generator=g)
    x = torch.randn(500, 128, generator=g) @ torch.randn(128, 128, generator=g) * 0.3
    res = gptq_solve(w, 2 * x.T @ x, bits=bits, group_size=group_size, act_order=act_order)
    assert res.codes.abs().max() == 2 ** (bits - 1) - 1
    scale = group_scale(res.weight, bits=bits, group_size=group_size).to(w.dtype)  # what the writer computes
    assert torch.equal(scale, res.scales)
    scheme = _scheme(bits, None if group_size == CHANNEL else group_size)
    packed = PackedQuantizationCompressor.compress({"weight": res.weight, "weight_scale": scale}, scheme)
    back = PackedQuantizationCompressor.decompress(dict(packed), scheme)["weight"]
    assert torch.equal(back.to(w.dtype), res.weight)  # the stored checkpoint dequantizes to the GPTQ weights
    gs = 128 if group_size == CHANNEL else group_size
    codes = torch.round(res.weight.reshape(32, -1, gs) / scale.unsqueeze(-1)).reshape(32, 128)
    assert torch.equal(codes.to(torch.int8), res.codes)


def test_singular_hessian_and_dead_inputs_do_not_give_nan():
    w = torch.randn(8, 32)
    h = torch.zeros(32, 32)
    h[:4, :4] = 1.0  # rank 1, most inputs never seen
    res = gptq_solve(w, h, bits=4, group_size=32)
    assert torch.isfinite(res.weight).all()
    res = gptq_solve(w, torch.full((32, 32), float("nan")), bits=4, group_size=32)
    assert res.fallback == [0] and torch.equal(res.weight, fake_quantize(w, bits=4, group_size=32))


def test_bad_solver_input_is_one_line_error():
    with pytest.raises(MoePruneError, match="does not divide"):
        gptq_solve(torch.randn(4, 48), torch.eye(48), bits=4, group_size=32)
    with pytest.raises(MoePruneError, match="Hessian shape"):
        gptq_solve(torch.randn(4, 32), torch.eye(16), bits=4, group_size=32)
    with pytest.raises(MoePruneError, match="dampening"):
        GPTQOptions(damp=0)
    with pytest.raises(MoePruneError, match="block size"):
        GPTQOptions(block_size=0)
    model = tiny_model("qwen3_moe")
    with pytest.raises(MoePruneError, match="needs calibration"):
        quantize_model(model, bits=4, method="gptq")
    with pytest.raises(MoePruneError, match="not supported"):
        quantize_model(model, bits=4, method="awq")


# ------------------------------------------------------------------------------------------- models
def _batches(n, length, seed, vocab=128, constant=None):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.full((4, length), constant) if constant is not None else torch.randint(3, vocab, (4, length),
                                                                                             generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


def test_unreached_experts_fall_back_to_rtn():
    # one token repeated: every position of a layer has the same hidden state, so top-2 of 8 experts see all
    # the calibration tokens and 6 none
    base = tiny_model("qwen3_moe").eval()
    model = copy.deepcopy(base)
    result = quantize_model(model, bits=4, group_size=32, method="gptq", calibration=_batches(2, 16, 0, constant=7))
    layers = result.method_details["layers"]
    adapter, base_adapter = MoEAdapter(model), MoEAdapter(base)
    for layer, base_layer in zip(adapter.layers, base_adapter.layers):
        rtn = layers[str(layer.index)]["rtn_experts"]
        assert len(rtn) == 6 and layers[str(layer.index)]["gptq_experts"] == 2
        for view, base_view in zip(expert_views(adapter, layer), expert_views(base_adapter, base_layer)):
            assert torch.isfinite(view).all()
            for j in range(8):
                same = torch.equal(view[j], fake_quantize(base_view[j], bits=4, group_size=32))
                assert same == (j in rtn), (layer.index, j)
    with torch.no_grad():
        assert torch.isfinite(model(_batches(1, 8, 5)[0]["input_ids"]).logits).all()


SLOW = pytest.mark.slow


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss", pytest.param("deepseek_v3", marks=SLOW),
                                        pytest.param("qwen3_next", marks=SLOW), pytest.param("jamba", marks=SLOW)])
def test_families_route_every_unpadded_token_into_the_expert_hessians(model_type):
    # gpt_oss: transposed experts with biases; deepseek_v3: a dense first layer and shared experts;
    # qwen3_next: linear attention; jamba: mamba layers
    base = tiny_model(model_type).eval()
    model = copy.deepcopy(base)
    calib = _batches(2, 16, 0)
    calib[1]["attention_mask"][1, 10:] = 0  # 6 padding tokens stay out of every Hessian
    result = quantize_model(model, bits=4, group_size=16, method="gptq", calibration=calib,
                            gptq=GPTQOptions(min_tokens=1))
    top_k = MoEAdapter(base).top_k
    adapter = MoEAdapter(model)
    for layer in adapter.layers:
        record = result.method_details["layers"][str(layer.index)]
        assert record["expert_rows"] == (2 * 4 * 16 - 6) * top_k
        assert record["gptq_experts"] + len(record["rtn_experts"]) == layer.num_experts
        for view in expert_views(adapter, layer):
            assert torch.isfinite(view).all()
    with torch.no_grad():
        assert torch.isfinite(model(calib[0]["input_ids"]).logits).all()


def test_thin_experts_fall_back_below_min_tokens():
    model = tiny_model("qwen3_moe").eval()
    result = quantize_model(model, bits=4, group_size=32, method="gptq", calibration=_batches(1, 8, 0),
                            gptq=GPTQOptions(min_tokens=10**6))
    assert all(r["gptq_experts"] == 0 and len(r["rtn_experts"]) == 8 for r in result.method_details["layers"].values())
    assert result.method == "gptq" and result.to_dict()["method"] == "gptq"


@pytest.mark.parametrize("bits,group_size", [(4, 32), pytest.param(4, CHANNEL, marks=SLOW),
                                             pytest.param(8, 32, marks=SLOW)])
def test_heldout_output_error_is_below_rtn(bits, group_size):
    base = tiny_model("qwen3_moe").eval()
    calib, heldout = _batches(6, 32, 0), _batches(3, 32, 1)  # disjoint random tokens
    gptq, rtn = copy.deepcopy(base), copy.deepcopy(base)
    quantize_model(gptq, bits=bits, group_size=group_size, method="gptq", calibration=calib)
    quantize_model(rtn, bits=bits, group_size=group_size)
    grams = heldout_grams(base, heldout)
    assert max(output_errors(base, base, grams).values()) == 0.0
    e_gptq, e_rtn = output_errors(base, gptq, grams), output_errors(base, rtn, grams)
    assert all(v > 0 for v in e_rtn.values())
    prefix = MoEAdapter(base).spec.layers
    g_layers, r_layers = layer_means(e_gptq, prefix), layer_means(e_rtn, prefix)
    ratios = [g_layers[i] / r_layers[i] for i in g_layers]
    assert len(ratios) == 2 and max(ratios) < 0.9, ratios
    experts = [n for n in e_gptq if n.endswith("experts.down_proj")]
    assert sum(e_gptq[n] for n in experts) < sum(e_rtn[n] for n in experts)


def test_sequential_inputs_come_from_quantized_layers(monkeypatch):
    # layer 1's Hessians must see layer 0's quantized output: quantizing with layer 0 left exact gives others
    import moeprune.compress.gptq as gptq_mod

    base = tiny_model("qwen3_moe").eval()
    calib = _batches(2, 16, 0)
    a = copy.deepcopy(base)
    quantize_model(a, bits=4, group_size=32, method="gptq", calibration=calib)
    seen = []
    real = gptq_mod._run_layer

    def spy(layer, index, batch):
        out = real(layer, index, batch)
        seen.append((index, batch["hidden"].clone()))
        return out

    monkeypatch.setattr(gptq_mod, "_run_layer", spy)
    b = copy.deepcopy(base)
    quantize_model(b, bits=4, group_size=32, method="gptq", calibration=calib)
    layer1_inputs = [h for i, h in seen if i == 1]
    with torch.no_grad():  # layer 1's inputs are what the quantized layer 0 outputs (not the base model's)
        hs = {}
        handle = b.model.layers[1].register_forward_pre_hook(lambda m, args: hs.setdefault("x", args[0]))
        b(calib[0]["input_ids"])
        handle.remove()
    assert torch.allclose(layer1_inputs[0], hs["x"], atol=1e-5)
    with torch.no_grad():
        hs.clear()
        handle = base.model.layers[1].register_forward_pre_hook(lambda m, args: hs.setdefault("x", args[0]))
        base(calib[0]["input_ids"])
        handle.remove()
    assert not torch.allclose(layer1_inputs[0], hs["x"], atol=1e-5)


# ------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("gptq") / "src", "qwen3_moe")


@pytest.mark.parametrize("args,needle", [
    (["--method", "awq"], "is not a quantization method"),
    (["--method", "gptq", "--damp", "0"], "--damp must be positive"),
    (["--method", "gptq", "--damp", "2"], "--damp must be in (0, 1]"),
    (["--method", "gptq", "--damp", "x"], "--damp must be a number"),
    (["--method", "gptq", "--block-size", "0"], "--block-size must be positive"),
    (["--method", "gptq", "--min-expert-tokens", "-1"], "--min-expert-tokens must be an integer >= 0"),
    (["--act-order"], "--act-order applies to --method gptq only"),
    (["--calib", "demo:8"], "--calib applies to --method gptq only"),
    (["--method", "gptq", "--bits", "8", "--mixed-budget", "12", "--observations", "x"], "uniform quantization"),
    (["--method", "gptq", "--calib", "no/such/file.jsonl"], "no/such/file.jsonl"),
    (["--method", "gptq", "--dtype", "bfloat16"], "own dtype"),
])
def test_cli_bad_options_are_one_line_errors(tiny_dir, tmp_path, args, needle):
    result = CliRunner().invoke(cli, ["quantize", str(tiny_dir), "-o", str(tmp_path / "out"), *args])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and needle in errors[0] and "Traceback" not in result.output, result.output
    assert not (tmp_path / "out").exists()


CHILD = """
import json, sys
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
ids = torch.tensor(json.loads(sys.argv[2]))
with torch.no_grad():
    logits = model(ids).logits
assert "moeprune" not in sys.modules
print(json.dumps(logits.tolist()))
"""


def test_cli_gptq_checkpoint_reloads_in_stock_transformers(tiny_dir, tmp_path):
    from moeprune.checkpoint.model_dir import load_model, load_tokenizer
    from moeprune.observe.calibration import load_calibration, parse_calibration_spec

    out = tmp_path / "q"
    args = ["--method", "gptq", "--calib", "demo:1", "--max-length", "32", "--batch-size", "8", "--group-size", "32",
            "--act-order"]
    result = CliRunner().invoke(cli, ["quantize", str(tiny_dir), "-o", str(out), *args])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "moeprune.json").read_text())["quantization"]
    assert record["method"] == "gptq" and record["method_details"]["options"]["act_order"] is True
    # the same run in memory (deterministic) gives the logits the reloaded checkpoint must give
    model = load_model(tiny_dir).eval()
    spec = parse_calibration_spec("demo:1", max_length=32)
    calib = load_calibration(spec, load_tokenizer(tiny_dir), batch_size=8)
    quantize_model(model, bits=4, group_size=32, method="gptq", calibration=calib.batches,
                   gptq=GPTQOptions(act_order=True))
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
        unquantized = load_model(tiny_dir).eval()(ids).logits
    proc = subprocess.run([sys.executable, "-c", CHILD, str(out), json.dumps(ids.tolist())], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.tensor(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert (got - expected).abs().max() < 1e-4
    assert (got - unquantized).abs().max() > 1e-3  # the reload is quantized, not the source
