"""Layer-wise perplexity == the loaded model's; generation goes through the offloaded model."""

from __future__ import annotations

import pytest
import torch
from moeprune.testing import tiny_model, tiny_tokenizer

from moeprune.evaluate import HFBackend, evaluate
from moeprune.checkpoint.model_dir import load_model
from moeprune.execution.layerwise_eval import LayerwiseBackend

_TEXTS = [f"The cat {i} sat on the mat and said {i * 7}." * (1 + i % 3) for i in range(7)] + ["x"]


@pytest.mark.parametrize(("model_type", "tied"), [("mixtral", False), ("deepseek_v3", False), ("qwen2_moe", True)])
def test_token_nll_equals_the_loaded_model(tmp_path, model_type, tied):
    overrides = {"tie_word_embeddings": True} if tied else None
    tiny_model(model_type, overrides=overrides).save_pretrained(tmp_path / "m", max_shard_size="100KB")
    tok = tiny_tokenizer()
    want = HFBackend(load_model(tmp_path / "m", dtype="float32", device="cpu"), tok, batch_size=3).token_nll(_TEXTS)
    # batches of 3 (several batches, right padding); a 1 KB budget spills the hidden states to disk
    lw = LayerwiseBackend(tmp_path / "m", tok, dtype="float32", device=torch.device("cpu"), max_memory=2048,
                          batch_size=3, progress=False)
    got = lw.token_nll(_TEXTS)
    assert [n for _, n in got] == [n for _, n in want] and got[-1] == (0.0, 0)  # a 1-token text scores nothing
    for (a, _), (b, _) in zip(got, want):
        assert a == pytest.approx(b, rel=1e-5)
    assert lw._offloaded is None  # perplexity never builds the offloaded model


def test_tasks_through_the_backend(tmp_path):
    tiny_model("mixtral").save_pretrained(tmp_path / "m")
    tok, tasks = tiny_tokenizer(), ["demo_prose", "demo_json"]
    want = evaluate(load_model(tmp_path / "m", dtype="float32", device="cpu"), tok, tasks, limit=3, progress=False)
    lw = LayerwiseBackend(tmp_path / "m", tok, device="cpu", max_memory="1GB", progress=False)
    got = evaluate(None, tok, tasks, limit=3, progress=False, backend=lw)
    assert got["demo_prose"]["score"] == pytest.approx(want["demo_prose"]["score"], rel=1e-5)
    assert got["demo_json"]["score"] == want["demo_json"]["score"]
    assert lw._offloaded is not None  # generation ran on the offloaded model
