"""One interface to the MoE layers of any supported model, driven by the architecture table."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moeprune.errors import MoePruneError
from moeprune.models.archs import ARCHS
from moeprune.models.spec import ArchSpec

__all__ = ["MoELayer", "MoEAdapter", "get_arch_spec", "supported_model_types"]


def supported_model_types() -> list[str]:
    return sorted(ARCHS)


def get_arch_spec(config) -> ArchSpec:
    """The table entry for a config, or a one-line error listing what is supported."""
    model_type = getattr(config, "model_type", None)
    spec = ARCHS.get(model_type)
    if spec is None:
        raise MoePruneError(
            f"model type {model_type!r} is not a supported MoE architecture; supported: "
            + ", ".join(supported_model_types())
        )
    return spec


def _get_path(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass
class MoELayer:
    """One MoE block: its decoder-layer index and its parts."""

    index: int
    block: nn.Module
    router: nn.Module
    experts: nn.Module

    @property
    def num_experts(self) -> int:
        return int(self.experts.down_proj.shape[0]) if hasattr(self.experts, "down_proj") else 0


class MoEAdapter:
    """Reads a loaded causal LM through its `ArchSpec`: layers, routing, per-expert forward."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        self.spec = get_arch_spec(self.config)
        self.layers = self._find_layers()
        if not self.layers:
            raise MoePruneError(f"model of type {self.config.model_type!r} has no MoE layers to work on")

    # ------------------------------------------------------------------ discovery
    def _find_layers(self) -> list[MoELayer]:
        spec = self.spec
        found = []
        for i, layer in enumerate(_get_path(self.model, spec.layers)):
            block = getattr(layer, spec.block, None)
            experts = getattr(block, spec.experts, None) if block is not None else None
            if experts is None or not hasattr(experts, spec.layout.down):
                continue
            found.append(MoELayer(index=i, block=block, router=getattr(block, spec.router), experts=experts))
        return found

    @property
    def layer_indices(self) -> list[int]:
        return [layer.index for layer in self.layers]

    def layer(self, index: int) -> MoELayer:
        for layer in self.layers:
            if layer.index == index:
                return layer
        raise KeyError(index)

    @property
    def num_experts(self) -> int:
        return self.layers[0].num_experts

    @property
    def top_k(self) -> int:
        return int(getattr(self.config, self.spec.top_k_key))

    def config_value(self, key: str | None, default=None):
        return default if key is None else getattr(self.config, key, default)

    # ------------------------------------------------------------------ tensors
    def tensor(self, layer: MoELayer, path: str) -> torch.Tensor:
        return _get_path(layer.block, path)

    def expert_param_names(self) -> tuple[str, ...]:
        return self.spec.layout.tensors

    # ------------------------------------------------------------------ routing
    def router_logits(self, layer: MoELayer, hidden: torch.Tensor) -> torch.Tensor:
        """Router logits (T, E) in float32 for hidden states (T, H)."""
        weight = self.tensor(layer, self.spec.router_tensors[0][0])
        bias = self.tensor(layer, self.spec.logit_bias) if self.spec.logit_bias else None
        return F.linear(hidden.float(), weight.float(), None if bias is None else bias.float())

    def router_probabilities(self, logits: torch.Tensor) -> torch.Tensor | None:
        """The router's probability of every expert (T, E) given its logits (T, E): its score function
        before top-k renormalisation and scaling; None for routers without a table rule (PhiMoE)."""
        if self.spec.gate is None:
            return None
        from moeprune.models.routing import router_probabilities

        return router_probabilities(logits, gate=self.spec.gate, config=self.config)

    def route(self, layer: MoELayer, logits: torch.Tensor, keep_mask: torch.Tensor | None = None):
        """Gates (T, k) and expert indices (T, k) exactly as the model's router computes them.

        `keep_mask` (E,) bool removes experts from the choice (their logits act as -inf).
        """
        gate = self.spec.gate
        if gate is None:
            raise MoePruneError(
                f"{self.spec.name} uses a model-specific router that moeprune cannot re-simulate; "
                "use a method that reads the model's own gates (frequency, soft frequency, EAN, REAP)"
            )
        from moeprune.models.routing import route_logits

        bias = self.tensor(layer, gate.correction_bias) if gate.correction_bias else None
        return route_logits(logits, gate=gate, config=self.config, top_k=self.top_k,
                            correction_bias=bias, keep_mask=keep_mask)

    # ------------------------------------------------------------------ experts
    def expert_forward(self, layer: MoELayer, j: int, x: torch.Tensor) -> torch.Tensor:
        """Expert j's output before gating, f_j(x), for inputs x (T, H) -> (T, H)."""
        experts, lay = layer.experts, self.spec.layout
        w1, w2 = getattr(experts, lay.gate_up)[j], getattr(experts, lay.down)[j]
        h = x @ w1 if lay.transposed else x @ w1.transpose(0, 1)  # (T, 2I)
        if lay.biases:
            h = h + getattr(experts, lay.biases[0])[j]
        if hasattr(experts, "_apply_gate"):
            h = experts._apply_gate(h)  # (T, I)
        else:
            g, u = h.chunk(2, dim=-1)
            h = experts.act_fn(g) * u
        y = h @ w2 if lay.transposed else h @ w2.transpose(0, 1)  # (T, H)
        if lay.biases:
            y = y + getattr(experts, lay.biases[1])[j]
        if getattr(experts, "has_post_expert_norm", False):
            y = experts.post_expert_norm(y)
        return y
