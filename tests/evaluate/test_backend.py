"""Greedy batched generation, stop strings and token NLL on a tiny random Mixtral."""

from __future__ import annotations

import pytest
import torch

from moeprune.evaluate.backend import HFBackend, _StopOnStrings, truncate_at_stop

PROMPTS = ["Q: 1+1=?\nA: ", "hello", "def f(x):\n    return", "x", "{\"name\": \"Pia\", "]


@pytest.mark.parametrize("text, stop, expected", [
    ("12\n#### 12\n\nQ: next", ["\n\n"], "12\n#### 12"),
    ("abc", ["\n"], "abc"),
    ("a\nb\n\nc", ["\n\n", "\n"], "a"),
    ("xyz", [], "xyz"),
    ("stop at start", ["stop"], ""),
])
def test_truncate_at_stop(text, stop, expected):
    assert truncate_at_stop(text, stop) == expected


def test_left_padded_batched_generation_equals_unbatched(tiny_model, tiny_tokenizer):
    single = HFBackend(tiny_model, tiny_tokenizer, batch_size=1, progress=False)
    batched = HFBackend(tiny_model, tiny_tokenizer, batch_size=3, progress=False)
    one = single.generate(PROMPTS, max_new_tokens=8)
    many = batched.generate(PROMPTS, max_new_tokens=8)
    assert many == one
    assert len(set(one)) > 1  # the random model does not answer everything the same way


def test_generation_is_deterministic_and_sets_pad_from_eos(tiny_model, tiny_tokenizer):
    assert tiny_tokenizer.pad_token is None
    backend = HFBackend(tiny_model, tiny_tokenizer, batch_size=4, progress=False)
    assert tiny_tokenizer.pad_token == tiny_tokenizer.eos_token
    assert backend.generate(PROMPTS, max_new_tokens=6) == backend.generate(PROMPTS, max_new_tokens=6)
    assert tiny_tokenizer.padding_side == "right"  # restored after generation


def test_stop_strings_cut_completions_and_end_generation_early(tiny_model, tiny_tokenizer):
    backend = HFBackend(tiny_model, tiny_tokenizer, batch_size=4, progress=False)
    free = backend.generate(PROMPTS, max_new_tokens=12)
    # Use the second character each completion produced as its stop string.
    stops = sorted({text[1] for text in free if len(text) > 2})
    stopped = backend.generate(PROMPTS, max_new_tokens=12, stop=stops)
    for full, cut in zip(free, stopped):
        assert cut == truncate_at_stop(full, stops)
        assert not any(s in cut for s in stops)


def test_stop_criterion_marks_rows_done_once_their_new_text_has_a_stop(tiny_tokenizer):
    prompt = tiny_tokenizer(["ab", "cd"])["input_ids"]  # two tokens each
    new = tiny_tokenizer(["x\ny", "xyz"], add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + n for p, n in zip(prompt, new)])  # (2, 5)
    done = _StopOnStrings(tiny_tokenizer, ["\n"], prompt_len=2)(ids, None)
    assert done.tolist() == [True, False]
    # the prompt itself never counts
    assert _StopOnStrings(tiny_tokenizer, ["a"], prompt_len=2)(ids, None).tolist() == [False, False]


def test_generate_calls_model_with_greedy_settings(tiny_model, tiny_tokenizer, monkeypatch):
    seen = {}
    original = tiny_model.generate

    def spy(**kwargs):
        seen.update(kwargs)
        return original(**kwargs)

    monkeypatch.setattr(tiny_model, "generate", spy)
    HFBackend(tiny_model, tiny_tokenizer, progress=False).generate(["ab"], max_new_tokens=3, stop=["\n"])
    assert seen["do_sample"] is False and seen["max_new_tokens"] == 3
    assert seen["pad_token_id"] == tiny_tokenizer.eos_token_id
    assert len(seen["stopping_criteria"]) == 1


def _hand_nll(model, tokenizer, text: str) -> tuple[float, int]:
    ids = torch.tensor([tokenizer(text)["input_ids"]])  # (1, L)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]  # (L, V)
    logp = torch.log_softmax(logits.double(), dim=-1)
    nll = -sum(float(logp[t - 1, ids[0, t]]) for t in range(1, ids.shape[1]))
    return nll, ids.shape[1] - 1


def test_token_nll_matches_a_hand_computation_with_padding(tiny_model, tiny_tokenizer):
    texts = ["short", "a much longer text that needs padding partners", "mid length!"]
    backend = HFBackend(tiny_model, tiny_tokenizer, batch_size=3, progress=False)
    got = backend.token_nll(texts)
    for text, (nll, n) in zip(texts, got):
        want_nll, want_n = _hand_nll(tiny_model, tiny_tokenizer, text)
        assert n == want_n
        assert nll == pytest.approx(want_nll, rel=1e-4)


def test_token_nll_of_a_one_token_text_counts_nothing(tiny_model, tiny_tokenizer):
    backend = HFBackend(tiny_model, tiny_tokenizer, progress=False)
    assert backend.token_nll(["x"]) == [(0.0, 0)]
