"""The two executors of a plan: whole model in memory (memory.py) or one decoder layer at a time (layerwise.py)."""

from moeprune.execution.base import Executor
from moeprune.execution.layerwise import LayerwiseExecutor
from moeprune.execution.memory import MemoryExecutor, compress_model

__all__ = ["Executor", "MemoryExecutor", "LayerwiseExecutor", "make_executor", "compress_model"]


def make_executor(plan, **kw) -> Executor:
    return {"memory": MemoryExecutor, "layerwise": LayerwiseExecutor}[plan.execution](plan, **kw)
