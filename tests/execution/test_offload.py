"""Offloaded evaluation == the fully loaded model: logits, greedy generation and task perplexity."""

from __future__ import annotations

import pytest
import torch
from moeprune.testing import _COMMON, TINY, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from moeprune.errors import MoePruneError
from moeprune.evaluate import evaluate
from moeprune.checkpoint.model_dir import load_model
from moeprune.execution.offload import offloaded_model


def _ids() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 120, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = 0, 0  # left padding
    return ids, mask


def _save(tmp_path, model_type: str, **overrides):
    path = tmp_path / model_type
    if overrides:
        torch.manual_seed(0)
        cfg = CONFIG_MAPPING[model_type](**{**_COMMON, **TINY[model_type], **overrides})
        model = AutoModelForCausalLM.from_config(cfg).eval()
    else:
        model = tiny_model(model_type)
    model.save_pretrained(path, max_shard_size="100KB")
    tiny_tokenizer().save_pretrained(path)
    return path


def _streamed(model) -> list[str]:
    return [n for n, m in model.named_modules() if hasattr(m, "_hf_hook")]


@pytest.mark.parametrize("model_type", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_logits_and_generation_equal_the_loaded_model(tmp_path, model_type):
    src = _save(tmp_path, model_type)
    files = {f.name: f.read_bytes() for f in src.iterdir()}
    ref = load_model(src, dtype="float32", device="cpu")
    off = offloaded_model(src, dtype="float32", device="cpu")
    layers = len(ref.get_decoder().layers)
    assert len(_streamed(off)) == layers + 1  # every decoder layer and the (untied) head
    ids, mask = _ids()
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).logits
        got = off(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # weights are freed after each call: only the resident part holds memory
    assert all(p.device.type == "meta" for p in off.get_decoder().layers.parameters())
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(off.generate(input_ids=ids, attention_mask=mask, **kw),
                       ref.generate(input_ids=ids, attention_mask=mask, **kw))
    assert {f.name: f.read_bytes() for f in src.iterdir()} == files  # the input is untouched


def test_tied_head_and_resident_layers(tmp_path):
    src = _save(tmp_path, "qwen2_moe", tie_word_embeddings=True, num_hidden_layers=3)
    ref = load_model(src, dtype="float32", device="cpu")
    layer = sum(p.numel() * 4 for p in ref.get_decoder().layers[0].parameters())
    resident = sum(p.numel() * 4 for p in ref.get_input_embeddings().parameters()) + 4 * 64
    # half the budget holds the resident part, the streaming room (3 layers) and exactly one resident layer
    off = offloaded_model(src, dtype="float32", device="cpu", max_memory=2 * (resident + 4 * layer) + 8)
    assert _streamed(off) == ["model.layers.1", "model.layers.2"]  # tied head: resident with the embedding
    assert off.get_output_embeddings().weight is off.get_input_embeddings().weight
    ids, mask = _ids()
    with torch.no_grad():
        torch.testing.assert_close(off(input_ids=ids, attention_mask=mask).logits,
                                   ref(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=1e-6)


def test_task_perplexity_and_generation_scores_equal(tmp_path):
    src = _save(tmp_path, "mixtral")
    tok = tiny_tokenizer()
    tasks = ["demo_prose", "demo_json"]
    want = evaluate(load_model(src, dtype="float32", device="cpu"), tok, tasks, limit=3, progress=False)
    got = evaluate(offloaded_model(src, dtype="float32", device="cpu"), tok, tasks, limit=3, progress=False)
    assert got["demo_prose"]["metric"] == want["demo_prose"]["metric"]
    assert got["demo_prose"]["score"] == pytest.approx(want["demo_prose"]["score"], rel=1e-4)
    assert got["demo_json"]["score"] == want["demo_json"]["score"]


def test_dtype_auto_and_bad_dtype(tmp_path):
    src = _save(tmp_path, "mixtral")
    assert offloaded_model(src, device="cpu").dtype == torch.float32  # the checkpoint's own
    with pytest.raises(MoePruneError, match="dtype: 'int8' is not a floating dtype"):
        offloaded_model(src, dtype="int8", device="cpu")


def test_bad_max_memory_is_one_line(tmp_path):
    src = _save(tmp_path, "mixtral")
    with pytest.raises(MoePruneError, match="max_memory: 'lots' is not a size"):
        offloaded_model(src, device="cpu", max_memory="lots")
