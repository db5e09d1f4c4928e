"""Recovery training that diverges stops with one line naming the value to change: a non-finite loss at
the step it appears, and non-finite trained tensors before anything is written (a NaN model is never saved)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from moeprune.errors import MoePruneError

__all__ = ["check_loss", "check_trained"]


def _what(value: float) -> str:
    return "NaN" if math.isnan(value) else ("+Inf" if value > 0 else "-Inf")


def check_loss(loss: float, *, step: int, lr: float, layer: int | None = None) -> None:
    """Raise when the training loss of `step` (1-based) is NaN or infinite."""
    if math.isfinite(loss):
        return
    where = f" in MoE layer {layer}" if layer is not None else ""
    raise MoePruneError(f"recover: the training loss became {_what(loss)} at step {step}{where}; lower recover.lr "
                        f"(now {lr:g})")


def check_trained(named: Iterable[tuple[str, torch.Tensor]], *, lr: float, steps: int | None = None) -> None:
    """Raise naming the first trained tensor that holds NaN or Inf (checked in the dtype it is written in)."""
    for name, t in named:
        if not t.is_floating_point() or t.device.type == "meta":
            continue
        finite = torch.isfinite(t.detach())
        if not bool(finite.all()):
            bad = int((~finite).sum())
            after = f" after {steps} steps" if steps is not None else ""
            raise MoePruneError(f"recover: training left {bad} NaN/Inf value(s) in {name}{after}, and nothing was "
                                f"written; lower recover.lr (now {lr:g})")
