"""The shipped demo model reproduces the scores recorded in its card (eval_scores.json)."""

import json

import pytest

from moeprune.checkpoint.model_dir import DEMO_MODEL_DIR

SCORES = DEMO_MODEL_DIR / "eval_scores.json"


@pytest.fixture(scope="module")
def recorded():
    if not SCORES.is_file():
        pytest.fail(f"{SCORES} is missing: run `moeprune eval demo ... -o` as MODEL_CARD.md describes")
    return json.loads(SCORES.read_text())


def test_card_scores_reproduce(recorded):
    from moeprune.evaluate import evaluate
    from moeprune.checkpoint.model_dir import load_model, load_tokenizer

    check = recorded["ci_check"]
    model, tok = load_model("demo", device="cpu"), load_tokenizer("demo")
    got = evaluate(model, tok, list(check["scores"]), limit=check["limit"], batch_size=32, progress=False)
    for task, want in check["scores"].items():
        assert got[task]["n"] == check["limit"]
        assert got[task]["score"] == pytest.approx(want, abs=0.021), task  # greedy decoding: at most one flip


def test_card_states_the_recorded_numbers(recorded):
    card = (DEMO_MODEL_DIR / "MODEL_CARD.md").read_text()
    for task, res in recorded["full"]["tasks"].items():
        assert f"{res['score']:.3f}" in card, task
