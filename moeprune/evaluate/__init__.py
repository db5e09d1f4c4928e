"""Evaluation: tasks as YAML data, scorers in a registry, the code sandbox and the model backends.

Typical use::

    from moeprune.evaluate import evaluate
    results = evaluate(model, tokenizer, ["demo_arith", "demo_prose"], limit=50)
    results["demo_arith"]["score"]

See ``docs/evaluation.md`` for the task format, the scorers and the sandbox.
"""

from moeprune.evaluate.backend import Backend, HFBackend, truncate_at_stop
from moeprune.evaluate.config import GenerationSettings, TaskConfig, load_task_config
from moeprune.evaluate.runner import LM_EVAL_PREFIX, evaluate, resolve_tasks, run_task
from moeprune.evaluate.scorers import FILTERS, SCORERS, ScoreResult, Scorer
from moeprune.evaluate.tasks import TASKS, Task, resolve_task

__all__ = [
    "Backend", "HFBackend", "truncate_at_stop",
    "GenerationSettings", "TaskConfig", "load_task_config",
    "LM_EVAL_PREFIX", "evaluate", "resolve_tasks", "run_task",
    "FILTERS", "SCORERS", "ScoreResult", "Scorer",
    "TASKS", "Task", "resolve_task",
]
