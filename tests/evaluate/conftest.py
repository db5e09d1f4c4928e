"""Fixtures for the evaluation tests: a tiny random Mixtral and a character-level tokenizer, built offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moeprune.testing import tiny_tokenizer as _char_tokenizer

__all__: list[str] = []

def build_tokenizer():
    """One token per character; no pad token (the evaluator must fall back to EOS)."""
    return _char_tokenizer(with_pad=False)


def build_model(vocab_size: int):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=256, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    model = MixtralForCausalLM(config)
    with torch.no_grad():  # larger logits make greedy choices stable and outputs varied
        model.lm_head.weight.mul_(20.0)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-moe")
    tok = build_tokenizer()
    model = build_model(len(tok))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture()
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture()
def make_jsonl():
    return write_jsonl
