"""Optional bridge to lm-evaluation-harness for tasks named ``lm_eval:<task>`` in ``--tasks``.

The already-loaded model is wrapped in lm-eval's ``HFLM`` (no second load), and lm-eval's result
dict is reduced to moeprune's per-task contract. lm-eval is an optional dependency:
``pip install 'lm-eval'``. Its tasks may need datasets from a hub, which offline machines lack.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

from moeprune.errors import MoePruneError

__all__ = ["run_lm_eval", "summarize_lm_eval"]

_INSTALL_HINT = "lm-eval is not installed: pip install 'lm-eval'"


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise MoePruneError(_INSTALL_HINT) from None
    return lm_eval, HFLM


def _pick_metric(task_results: dict[str, Any]) -> tuple[str, float] | None:
    """The first numeric, non-stderr entry (``"acc,none"`` -> ``("acc", value)``)."""
    for key, value in task_results.items():
        if key == "alias" or "_stderr" in key or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        return key, float(value)
    return None


def summarize_lm_eval(output: dict[str, Any], *, seconds: float) -> dict[str, dict[str, Any]]:
    """Reduce ``lm_eval.simple_evaluate`` output to ``{task: {score, metric, n, seconds, higher_is_better}}``.

    ``seconds`` (the whole lm-eval run) is shared equally among its tasks.
    """
    results = output.get("results", {})
    per_task = seconds / max(1, len(results))
    summary: dict[str, dict[str, Any]] = {}
    for task, task_results in results.items():
        picked = _pick_metric(task_results)
        if picked is None:
            continue
        key, value = picked
        metric = key.split(",", 1)[0]
        hib = output.get("higher_is_better", {}).get(task, {}).get(metric, True)
        n_info = output.get("n-samples", {}).get(task, {})
        summary[task] = {
            "score": value,
            "metric": f"lm_eval:{key}",
            "n": int(n_info.get("effective", n_info.get("original", 0))),
            "seconds": round(per_task, 3),
            "higher_is_better": bool(hib),
        }
    return summary


def run_lm_eval(model, tokenizer, tasks: Sequence[str], *, limit: int | None = None,
                batch_size: int = 16) -> dict[str, dict[str, Any]]:
    """Run lm-eval ``tasks`` on an already-loaded HF ``model``; raise MoePruneError if lm-eval is missing."""
    lm_eval, HFLM = _import_lm_eval()
    start = time.perf_counter()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    output = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit)
    if not output:
        raise MoePruneError(f"lm-eval returned no results for tasks {', '.join(tasks)}")
    return summarize_lm_eval(output, seconds=time.perf_counter() - start)
