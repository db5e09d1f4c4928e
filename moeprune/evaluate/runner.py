"""``evaluate()``: run tasks on a loaded model and return one result dict per task."""

from __future__ import annotations

import time
from typing import Any, Sequence

from moeprune.errors import MoePruneError
from moeprune.evaluate.backend import Backend, HFBackend
from moeprune.evaluate.tasks import Task, resolve_task

__all__ = ["LM_EVAL_PREFIX", "evaluate", "resolve_tasks", "run_task"]

LM_EVAL_PREFIX = "lm_eval:"


def resolve_tasks(specs: Sequence[str | Task]) -> list[Task | str]:
    """Validate every task before any model work: names, YAMLs, scorers and data files.

    ``lm_eval:<name>`` specs are passed through as strings (checked by lm-eval itself).
    Duplicate task names are an error.
    """
    resolved: list[Task | str] = []
    seen: set[str] = set()
    for spec in specs:
        if isinstance(spec, str):
            spec = spec.strip()
            if not spec:
                continue
            item: Task | str = spec if spec.startswith(LM_EVAL_PREFIX) else resolve_task(spec)
        else:
            item = spec
        name = item if isinstance(item, str) else item.name
        if name in seen:
            raise MoePruneError(f"task {name!r} is listed twice")
        seen.add(name)
        resolved.append(item)
    if not resolved:
        raise MoePruneError("no tasks given; pass e.g. --tasks demo_arith,demo_prose")
    return resolved


def _sample_records(task: Task, rows: list[dict], outputs: list, scored, raw: list[str] | None) -> list[dict]:
    records = []
    for i, (row, value) in enumerate(zip(rows, scored.per_sample)):
        if task.scorer.request == "nll":
            nll, n_tokens = outputs[i]
            rec: dict[str, Any] = {"text": row["text"], "tokens": n_tokens, "nll": nll, "score": value}
        else:
            rec = {"prompt": row["prompt"], "completion": raw[i], "filtered": outputs[i], "score": value}
            if "answer" in row:
                rec["answer"] = row["answer"]
        if scored.details:
            rec["detail"] = scored.details[i]
        records.append(rec)
    return records


def run_task(backend: Backend, task: Task, *, limit: int | None = None, samples: bool = False) -> dict[str, Any]:
    """Run one task: the backend request its scorer needs, then the scorer.

    Returns ``{"score", "metric", "n", "seconds", "higher_is_better"}`` (+ ``"samples"``).
    """
    start = time.perf_counter()
    rows = task.select(limit)
    raw: list[str] | None = None
    if task.scorer.request == "nll":
        outputs: list = backend.token_nll([row["text"] for row in rows], desc=task.name)
    else:
        gen = task.config.generation
        raw = backend.generate([task.prompt_for(row) for row in rows], max_new_tokens=gen.max_new_tokens,
                               stop=gen.stop, desc=task.name)
        outputs = [task.apply_filters(text) for text in raw]
    scored = task.scorer.score(outputs, rows)
    result: dict[str, Any] = {
        "score": float(scored.score),
        "metric": task.config.scorer.name,
        "n": len(rows),
        "seconds": round(time.perf_counter() - start, 3),
        "higher_is_better": task.scorer.higher_is_better,
    }
    if samples:
        result["samples"] = _sample_records(task, rows, outputs, scored, raw)
    return result


def evaluate(model, tokenizer, tasks: Sequence[str | Task] | str, *, limit: int | None = None, batch_size: int = 16,
             progress: bool = True, samples: bool = False, backend: Backend | None = None) -> dict[str, dict[str, Any]]:
    """Score ``model`` on ``tasks`` (names, YAML/JSONL paths, loaded Tasks, or ``lm_eval:<task>``;
    a single comma-separated string is split).

    Args:
        model: a loaded transformers causal LM (in eval mode, on its device).
        tokenizer: its tokenizer; gets ``pad_token = eos_token`` if it has no pad token.
        limit: score only the first ``limit`` rows of each task (deterministic subset).
        batch_size: rows per forward/generate call.
        progress: show a tqdm bar per task (only when stderr is a terminal).
        samples: add ``"samples"`` (per-row prompt, completion, answer, score) to each result.
        backend: answers the requests instead of an ``HFBackend`` over ``model`` (e.g. the layer-wise
            backend of a model larger than memory); ``model`` may then be None (lm-eval tasks use
            ``backend.model``).

    Returns:
        ``{task_name: {"score": float, "metric": str, "n": int, "seconds": float,
        "higher_is_better": bool}}``: moeprune tasks in the order given, then ``lm_eval:`` tasks.
    """
    if limit is not None and limit < 1:
        raise MoePruneError(f"--limit must be >= 1, got {limit}")
    if isinstance(tasks, str):  # "a,b" as on the command line
        tasks = tasks.split(",")
    resolved = resolve_tasks(tasks)
    if backend is None:
        backend = HFBackend(model, tokenizer, batch_size=batch_size, progress=progress)
    results: dict[str, dict[str, Any]] = {}
    lm_eval_names = [t[len(LM_EVAL_PREFIX):] for t in resolved if isinstance(t, str)]
    for task in resolved:
        if not isinstance(task, str):
            results[task.name] = run_task(backend, task, limit=limit, samples=samples)
    if lm_eval_names:
        from moeprune.evaluate.lm_eval_bridge import run_lm_eval

        engine = backend if hasattr(backend, "continuation_logprobs") else None
        lm_model = None if engine is not None else (backend.model if model is None else model)
        lm_results = run_lm_eval(lm_model, tokenizer, lm_eval_names, limit=limit, batch_size=batch_size,
                                 backend=engine)
        for name, res in lm_results.items():
            results[LM_EVAL_PREFIX + name] = res
    return results
