"""JSON that every parser reads: NaN and +-Infinity become ``null`` (``json.dumps`` would write bare
``NaN``/``Infinity``, which strict parsers such as JavaScript's and ``jq`` refuse)."""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["dumps", "finite_or_none"]


def finite_or_none(obj: Any) -> Any:
    """A copy of ``obj`` (dicts, lists, tuples, floats) with every non-finite float replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` with non-finite floats written as ``null``; never emits ``NaN``."""
    return json.dumps(finite_or_none(obj), allow_nan=False, **kwargs)
