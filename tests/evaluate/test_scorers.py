"""Scorers and filters on hand-made right and wrong outputs."""

from __future__ import annotations

import math

import pytest

from moeprune.evaluate.scorers import (FILTERS, SCORERS, ExactMatch, NumericMatch, Perplexity, extract_number,
                                       normalize_text)


def test_normalize_text_strips_collapses_and_optionally_casefolds():
    assert normalize_text("  a \t b\n\nc  ") == "a b c"
    assert normalize_text("Hello World", ignore_case=True) == "hello world"
    assert normalize_text("Hello") != normalize_text("hello")


def test_exact_match_right_and_wrong():
    rows = [{"prompt": "p", "answer": '{"a": 1}'}] * 3
    result = ExactMatch().score(['  {"a":  1} ', '{"a": 2}', '{"A": 1}'], rows)
    assert result.per_sample == [1.0, 0.0, 0.0]
    assert result.score == pytest.approx(1 / 3)
    assert ExactMatch(ignore_case=True).score(['{"A": 1}'], rows[:1]).score == 1.0


def test_first_line_filter_and_registry():
    assert FILTERS.get("first_line")("up\nQ: next") == "up"
    assert FILTERS.get("first_line")("no newline") == "no newline"
    assert SCORERS.get("exact_match") is ExactMatch


@pytest.mark.parametrize("text, expected", [
    ("435", 435.0),
    ("The answer is -17.", -17.0),
    ("x = -4", -4.0),
    ("1,234 apples", 1234.0),
    ("costs 1,234,567.50 total", 1234567.5),
    ("3.25", 3.25),
    ("5-3 = 2", 2.0),
    ("first 12 then 7", 7.0),
    ("12\n#### 1,200\nthen 99", 1200.0),
    ("#### -8", -8.0),
    ("#### 5\n#### 6", 5.0),
    ("abc123", None),
    ("no numbers here", None),
    ("1, 2, 3", 3.0),
])
def test_extract_number_edge_cases(text, expected):
    assert extract_number(text) == expected


def test_numeric_match_right_and_wrong():
    rows = [{"prompt": "Q: 2*600=?\nA: ", "answer": "1200"}] * 5
    outputs = ["1200", "1,200", "12\n#### 1200", "1201", "no idea"]
    assert NumericMatch().score(outputs, rows).per_sample == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert NumericMatch().score(["-3.0"], [{"answer": "-3"}]).score == 1.0


def test_perplexity_aggregates_tokens_not_texts():
    outputs = [(2.0, 1), (6.0, 3)]  # per-token NLL 2.0 and 2.0 -> ppl e^2
    result = Perplexity().score(outputs, [{"text": "a"}, {"text": "b"}])
    assert result.score == pytest.approx(math.exp(8.0 / 4))
    assert result.per_sample == pytest.approx([math.exp(2.0), math.exp(2.0)])
    assert Perplexity.higher_is_better is False and Perplexity.request == "nll"


def test_scorer_options_are_validated():
    with pytest.raises(Exception):
        ExactMatch(ignroe_case=True)
