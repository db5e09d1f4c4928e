"""A canonical view of one expert's weights, whatever the fused layout.

Every layout in the table is a SwiGLU-style expert: gate (I, H), up (I, H), down (H, I), with optional
biases. Merging and neuron alignment work on this view and write the result back in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeprune.models import MoEAdapter, MoELayer

__all__ = ["ExpertWeights", "read_expert", "write_expert"]


@dataclass
class ExpertWeights:
    gate: torch.Tensor  # (I, H)
    up: torch.Tensor  # (I, H)
    down: torch.Tensor  # (H, I)
    gate_bias: torch.Tensor | None = None  # (I,)
    up_bias: torch.Tensor | None = None  # (I,)
    down_bias: torch.Tensor | None = None  # (H,)

    def permuted(self, perm: torch.Tensor) -> "ExpertWeights":
        """Reorder the intermediate neurons: gate/up rows and down columns move together."""
        pick = lambda t: None if t is None else t[perm]  # noqa: E731
        return ExpertWeights(self.gate[perm], self.up[perm], self.down[:, perm], pick(self.gate_bias),
                             pick(self.up_bias), self.down_bias)

    def fields(self) -> dict[str, torch.Tensor | None]:
        return dict(gate=self.gate, up=self.up, down=self.down, gate_bias=self.gate_bias, up_bias=self.up_bias,
                    down_bias=self.down_bias)


def _split(rows: torch.Tensor, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if interleaved:
        return rows[0::2], rows[1::2]
    half = rows.shape[0] // 2
    return rows[:half], rows[half:]


def _join(gate: torch.Tensor, up: torch.Tensor, interleaved: bool) -> torch.Tensor:
    if interleaved:
        out = torch.empty((2 * gate.shape[0], *gate.shape[1:]), dtype=gate.dtype)
        out[0::2], out[1::2] = gate, up
        return out
    return torch.cat([gate, up])


def read_expert(adapter: MoEAdapter, layer: MoELayer, j: int) -> ExpertWeights:
    """Expert j of a layer as float64 tensors in the canonical (gate, up, down) form."""
    lay, ex = adapter.spec.layout, layer.experts
    gu = getattr(ex, lay.gate_up)[j].detach().double()
    dn = getattr(ex, lay.down)[j].detach().double()
    if lay.transposed:
        gu, dn = gu.T, dn.T  # -> (2I, H), (H, I)
    gate, up = _split(gu, lay.interleaved)
    w = ExpertWeights(gate.clone(), up.clone(), dn.clone())
    if lay.biases:
        gb, ub = _split(getattr(ex, lay.biases[0])[j].detach().double(), lay.interleaved)
        w.gate_bias, w.up_bias = gb.clone(), ub.clone()
        w.down_bias = getattr(ex, lay.biases[1])[j].detach().double().clone()
    return w


def write_expert(adapter: MoEAdapter, layer: MoELayer, j: int, w: ExpertWeights) -> None:
    """Write canonical weights into slot j of the fused tensors (in place, keeping their dtype)."""
    lay, ex = adapter.spec.layout, layer.experts
    gu = _join(w.gate, w.up, lay.interleaved)
    dn = w.down
    if lay.transposed:
        gu, dn = gu.T, dn.T
    with torch.no_grad():
        target = getattr(ex, lay.gate_up)
        target[j].copy_(gu.to(target.dtype))
        target = getattr(ex, lay.down)
        target[j].copy_(dn.to(target.dtype))
        if lay.biases:
            target = getattr(ex, lay.biases[0])
            target[j].copy_(_join(w.gate_bias, w.up_bias, lay.interleaved).to(target.dtype))
            target = getattr(ex, lay.biases[1])
            target[j].copy_(w.down_bias.to(target.dtype))
