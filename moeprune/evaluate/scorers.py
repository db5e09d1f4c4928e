"""Scorers turn model outputs into a task score; filters clean a completion before scoring.

A scorer is a pydantic model (its fields are the options a task YAML may set under ``scorer:``)
registered in :data:`SCORERS`. It declares which model request it needs (``generate`` for a
completion per row, ``nll`` for summed token negative log-likelihoods), which JSONL fields each
row must have, and whether a higher score is better.

Example (task YAML)::

    scorer: {name: exact_match, ignore_case: true}
    filters: [first_line]
"""

from __future__ import annotations

import math
import os
import re
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field

from moeprune.errors import MoePruneError
from moeprune.evaluate.sandbox import run_tests
from moeprune.registry import Registry

__all__ = [
    "Scorer", "ScoreResult", "SCORERS", "FILTERS", "ExactMatch", "NumericMatch", "CodeExec", "Perplexity",
    "normalize_text", "extract_number", "build_program",
]


@dataclass
class ScoreResult:
    """The task score plus one value per row (1.0/0.0 for matches, per-text perplexity, ...)."""

    score: float
    per_sample: list[float]
    details: list[str] = field(default_factory=list)


class Scorer(BaseModel, ABC):
    """Base class: subclasses set the class variables and implement :meth:`score`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    request: ClassVar[Literal["generate", "nll"]] = "generate"
    required_fields: ClassVar[tuple[str, ...]] = ("prompt", "answer")
    higher_is_better: ClassVar[bool] = True

    @abstractmethod
    def score(self, outputs: Sequence[Any], rows: Sequence[dict]) -> ScoreResult:
        """Score ``outputs`` (completions, or ``(nll, n_tokens)`` pairs) against the data ``rows``."""


SCORERS: Registry[type[Scorer]] = Registry("scorer", base=Scorer)
FILTERS: Registry[Callable[[str], str]] = Registry("filter")


@FILTERS.register("first_line")
def first_line(text: str) -> str:
    """Everything before the first newline."""
    return text.split("\n", 1)[0]


@FILTERS.register("strip")
def strip(text: str) -> str:
    return text.strip()


def normalize_text(text: str, *, ignore_case: bool = False) -> str:
    """Strip, collapse runs of whitespace to one space, and optionally case-fold."""
    text = " ".join(text.split())
    return text.casefold() if ignore_case else text


class _PerSample(Scorer):
    """A generative scorer that scores each completion on its own; the task score is the mean."""

    @abstractmethod
    def score_one(self, completion: str, row: dict) -> float: ...

    def score(self, outputs: Sequence[str], rows: Sequence[dict]) -> ScoreResult:
        values = [self.score_one(out, row) for out, row in zip(outputs, rows, strict=True)]
        return ScoreResult(score=sum(values) / len(values) if values else 0.0, per_sample=values)


@SCORERS.register("exact_match")
class ExactMatch(_PerSample):
    """1.0 when ``normalize(completion) == normalize(answer)``; task score = mean."""

    ignore_case: bool = False

    def score_one(self, completion: str, row: dict) -> float:
        norm = lambda s: normalize_text(str(s), ignore_case=self.ignore_case)  # noqa: E731
        return float(norm(completion) == norm(row["answer"]))


_HASH_ANSWER = re.compile(r"####\s*(-?[\d,]*\.?\d+)")
# A number not glued to a word: optional minus, digits with optional thousands commas, decimals.
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?!\w)")


def _to_float(token: str) -> float | None:
    try:
        return float(token.replace(",", ""))
    except ValueError:
        return None


def extract_number(text: str) -> float | None:
    """The answer number in ``text``: the first ``#### N`` if there is one, else the last number."""
    hashed = _HASH_ANSWER.search(text)
    if hashed:
        return _to_float(hashed.group(1))
    found = _NUMBER.findall(text)
    return _to_float(found[-1]) if found else None


@SCORERS.register("numeric_match")
class NumericMatch(_PerSample):
    """1.0 when the number extracted from the completion equals the answer's number."""

    tolerance: float = Field(default=1e-6, ge=0)

    def score_one(self, completion: str, row: dict) -> float:
        gold = extract_number(str(row["answer"]))
        got = extract_number(completion)
        if gold is None or got is None:
            return 0.0
        return float(math.isclose(got, gold, rel_tol=self.tolerance, abs_tol=self.tolerance))


def build_program(completion: str, row: dict) -> str:
    """The code task as one file: prompt + completion, the tests, then ``check(entry_point)``.

    For reading and for running outside the sandbox; :class:`CodeExec` does not run this file but
    runs ``prompt + completion`` and the tests in two separate sandboxes (:func:`run_tests`).
    """
    return f"{row['prompt']}{completion}\n\n{row['test']}\n\ncheck({row['entry_point']})\n"


@SCORERS.register("code_exec")
class CodeExec(Scorer):
    """pass@1 with greedy decoding: 1.0 when the task's tests pass against the completion.

    Each completion runs in :func:`moeprune.evaluate.sandbox.run_tests`, never in this process:
    ``prompt + completion`` in one sandbox, the tests in another that calls the program's functions
    over a pipe. Raises :class:`MoePruneError` when this machine cannot confine code (nothing runs).
    """

    required_fields: ClassVar[tuple[str, ...]] = ("prompt", "test", "entry_point")

    timeout: float = Field(default=10.0, gt=0, le=600)
    memory_mb: int = Field(default=1024, ge=64)
    workers: int = Field(default_factory=lambda: max(1, min(4, os.cpu_count() or 1)), ge=1)

    def _run(self, completion: str, row: dict):
        return run_tests(f"{row['prompt']}{completion}", row["test"], row["entry_point"], prompt=row["prompt"],
                         timeout=self.timeout, memory_mb=self.memory_mb)

    def score(self, outputs: Sequence[str], rows: Sequence[dict]) -> ScoreResult:
        pairs = list(zip(outputs, rows, strict=True))
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            results = list(pool.map(lambda pair: self._run(*pair), pairs))
        refused = next((r for r in results if r.status == "refused"), None)
        if refused is not None:
            raise MoePruneError(f"code_exec: generated code was not run: {refused.detail}")
        values = [float(r.passed) for r in results]
        details = [r.status if not r.detail else f"{r.status}: {r.detail}" for r in results]
        return ScoreResult(score=sum(values) / len(values) if values else 0.0, per_sample=values,
                           details=details)


@SCORERS.register("perplexity")
class Perplexity(Scorer):
    """``ppl = exp(sum of token NLL / number of predicted tokens)`` over all texts (lower is better).

    Per-sample values are each text's own perplexity.
    """

    request: ClassVar[Literal["generate", "nll"]] = "nll"
    required_fields: ClassVar[tuple[str, ...]] = ("text",)
    higher_is_better: ClassVar[bool] = False

    def score(self, outputs: Sequence[tuple[float, int]], rows: Sequence[dict]) -> ScoreResult:
        total_nll = sum(nll for nll, _ in outputs)
        total_tokens = sum(n for _, n in outputs)
        per_sample = [math.exp(nll / n) if n else float("nan") for nll, n in outputs]
        score = math.exp(total_nll / total_tokens) if total_tokens else float("nan")
        return ScoreResult(score=score, per_sample=per_sample)
