"""Fast checks of the shipped demo MoE model and its small eval/calibration data files."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

ASSETS = Path(__file__).resolve().parents[1] / "moeprune" / "assets"
MODEL = ASSETS / "demo-moe"
CORPUS = ASSETS / "demo-corpus"
GENERATIVE = ["arith", "json", "program"]
TEXT = ["code", "prose"]
DOMAINS = GENERATIVE + TEXT

PAD_NEURONS = 16  # routed experts trained 112 wide, shipped 128 wide (scripts/pad_demo_experts.py)

needs_model = pytest.mark.skipif(not (MODEL / "config.json").exists(),
                                 reason="demo model not shipped yet")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(MODEL)


@needs_model
def test_model_loads_with_expected_architecture():
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(MODEL)
    cfg = model.config
    assert cfg.model_type == "qwen2_moe"
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    assert cfg.num_experts == 16 and cfg.num_experts_per_tok == 2 and cfg.norm_topk_prob
    assert cfg.shared_expert_intermediate_size > 0  # one always-on shared expert per layer
    n = sum(p.numel() for p in model.parameters())
    padding = PAD_NEURONS * 3 * cfg.hidden_size * cfg.num_experts * cfg.num_hidden_layers  # always zero
    assert 1e6 < n - padding < 8e6
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[0, 5, 6, 7]]), output_router_logits=True)
    assert len(out.router_logits) == cfg.num_hidden_layers
    assert out.router_logits[0].shape[-1] == 16


@needs_model
def test_model_folder_size_limit():
    size = sum(p.stat().st_size for p in MODEL.rglob("*") if p.is_file())
    # 16 MiB for the trained model and its files, plus 1.5 MiB of always-zero expert padding (bf16)
    assert size <= 17.5 * 1024 * 1024, f"demo-moe folder is {size / 2**20:.1f} MiB"
    for name in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "MODEL_CARD.md", "expert_usage.png"]:
        assert (MODEL / name).exists(), name


@needs_model
def test_tokenizer_special_tokens_and_digits(tok):
    assert tok.bos_token == "<s>" and tok.eos_token == "</s>" and tok.pad_token == "<pad>"
    pieces = tok.tokenize("Q: 12345+678=?")
    digits = [p for p in pieces if any(ch.isdigit() for ch in p)]
    assert digits == list("12345678")
    # a prompt ending in ": " tokenizes as a prefix of the full training text
    prompt, full = "Q: 37+485=?\nA: ", "Q: 37+485=?\nA: 7+5+0=12"
    p_ids = tok(prompt)["input_ids"]
    assert tok(full)["input_ids"][:len(p_ids)] == p_ids
    assert tok.decode(tok(full, add_special_tokens=False)["input_ids"]) == full


@pytest.mark.parametrize("domain", DOMAINS)
def test_data_files_fields(domain):
    ev = _rows(CORPUS / "eval" / f"{domain}.jsonl")
    cal = _rows(CORPUS / "calib" / f"{domain}.jsonl")
    assert len(cal) == 128 and all(set(r) == {"text"} and r["text"] for r in cal)
    if domain in GENERATIVE:
        assert len(ev) == 200
        assert all(set(r) == {"prompt", "answer"} for r in ev)
        assert all(r["answer"] and "\n" not in r["answer"] for r in ev)
        assert all(r["prompt"].endswith((": ", "\n")) for r in ev)
    else:
        assert len(ev) == 100
        assert all(set(r) == {"text"} and 0 < len(r["text"]) <= 1600 for r in ev)


@pytest.mark.parametrize("domain", DOMAINS)
def test_heldout_not_in_calib(domain):
    ev = _rows(CORPUS / "eval" / f"{domain}.jsonl")
    cal = "\n".join(r["text"] for r in _rows(CORPUS / "calib" / f"{domain}.jsonl"))
    for r in ev:
        key = r.get("prompt", r.get("text"))
        assert key not in cal


def test_shipped_data_small():
    size = sum(p.stat().st_size for p in CORPUS.rglob("*") if p.is_file())
    assert size < 2 * 1024 * 1024


@needs_model
def test_qkv_biases_stored_and_zero():
    # vLLM's Qwen2-MoE always loads q/k/v biases; the demo stores zero ones so it serves there unchanged
    from safetensors.torch import load_file
    cfg = json.loads((MODEL / "config.json").read_text())
    assert cfg["qkv_bias"] is True
    tensors = load_file(MODEL / "model.safetensors")
    biases = {k: t for k, t in tensors.items() if k.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias"))}
    assert len(biases) == 3 * cfg["num_hidden_layers"]
    assert all(not t.any() for t in biases.values())


@needs_model
def test_routed_expert_padding_is_zero():
    # the demo's routed experts were trained 112 wide and are stored 128 wide (a multiple of 32, which vLLM's
    # int4 MoE kernels need): the last 16 neurons of every expert are zero, so they add exactly 0 to its output
    from safetensors.torch import load_file
    cfg = json.loads((MODEL / "config.json").read_text())
    width = cfg["moe_intermediate_size"]
    assert width % 32 == 0
    tensors = load_file(MODEL / "model.safetensors")
    experts = {k: t for k, t in tensors.items() if ".mlp.experts." in k}
    assert len(experts) == 3 * cfg["num_experts"] * cfg["num_hidden_layers"]
    trained = width - PAD_NEURONS
    for key, t in experts.items():
        neurons = t.T if key.endswith("down_proj.weight") else t  # (width, hidden)
        assert neurons.shape == (width, cfg["hidden_size"]), key
        assert not neurons[trained:].any(), key
        assert neurons[:trained].abs().sum(-1).min() > 0, key  # every trained neuron is really there
