"""Shared by the recovery tests: a small calibration file and a REAP-50% float32 recipe on it."""

from __future__ import annotations

from pathlib import Path

from moeprune.pipeline.recipe import Recipe


def calib_file(path: Path) -> Path:
    """24 short mixed texts (arithmetic, prose, code-like) written to `path`."""
    path.write_text("\n\n".join(f"{i} + {i * 3} = {i * 4}. The cat sat on mat {i}; x = [{i}, {i + 1}]."
                                for i in range(24)))
    return path


def reap_recipe(model, calib, **kw) -> Recipe:
    """REAP dropping half the experts of `model`, float32, calibrated on `calib` in 32-token batches of 2."""
    return Recipe.model_validate({"model": str(model), "method": "reap", "ratio": 0.5, "dtype": "float32",
                                  "calibration": {"spec": str(calib), "max_length": 32, "batch_size": 2}, **kw})
