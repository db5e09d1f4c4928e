"""Formatting helpers shared by the CLI, reports and model cards."""

from __future__ import annotations

__all__ = ["human_bytes"]


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
