"""Sizes: parsing the ones users write (max_memory, max_shard_size) and formatting bytes for the CLI, reports
and model cards."""

from __future__ import annotations

import re

from moeprune.errors import MoePruneError

__all__ = ["human_bytes", "parse_memory", "DTYPE_BYTES"]

# bytes per element of the compute dtypes a plan may choose
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30, "TIB": 2**40}


def human_bytes(n: float | None) -> str:
    """Decimal units: 1234567 -> '1.23 MB'; anything that is not a number -> '—'."""
    if isinstance(n, bool) or not isinstance(n, (int, float)):
        return "—"
    n = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def parse_memory(value, *, field_name: str = "max_memory") -> int | None:
    """Bytes from an int or a string such as "24GB", "500MiB" (accelerate's convention)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise MoePruneError(f"{field_name}: expected a size such as 24GB or 500MiB, got {value!r}")
    if isinstance(value, (int, float)):
        n = int(value)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
        if m is None or m.group(2).upper() not in _UNITS:
            raise MoePruneError(f"{field_name}: {value!r} is not a size such as 24GB, 500MiB or 1073741824")
        n = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if n <= 0:
        raise MoePruneError(f"{field_name}: must be positive, got {value!r}")
    return n
