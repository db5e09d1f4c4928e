"""Architecture facts as data: where the experts live and how the router turns logits into gates.

One frozen `ArchSpec` per MoE family. Algorithms read these fields; they never branch on a model name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = ["GateSpec", "ExpertLayout", "ArchSpec"]


@dataclass(frozen=True)
class GateSpec:
    """How the router maps logits z (T, E) to the gates the model multiplies expert outputs by.

    Attributes:
        score: "softmax" or "sigmoid", the function applied to the router logits.
        select_on: "scores": top-k over score(z) (plus `correction_bias` when set, used for choice only);
            "logits": top-k over the raw logits, and `score` is then applied to the k chosen logits only
            (softmax over the k values, or sigmoid per value).
        renormalize: True/False, or the name of a boolean config attribute (e.g. "norm_topk_prob"):
            divide the k gates by their sum.
        score_key: config attribute that, when set, names the score function instead of `score`.
        correction_bias: dotted path, relative to the MoE block, of a bias added to the scores for
            expert *choice* only (DeepSeek-V3 style `e_score_correction_bias`), or None.
        group: None, or how a group of experts is scored for group-limited routing:
            "max" (best expert of the group) or "top2sum" (sum of the two best).
        group_when: (config attribute, value) that must hold for group-limited routing to apply, or None
            when `group` applies whenever set.
        group_keys: config attributes holding (number of groups, groups kept per token).
        scaling_key: config attribute of a factor multiplied into the gates after normalisation.
        renorm_eps: added to the denominator when renormalising (as the model does), or 0.
    """

    score: Literal["softmax", "sigmoid"] = "softmax"
    select_on: Literal["scores", "logits"] = "scores"
    renormalize: bool | str = False
    score_key: str | None = None
    correction_bias: str | None = None
    group: Literal["max", "top2sum"] | None = None
    group_when: tuple[str, str] | None = None
    group_keys: tuple[str, str] = ("n_group", "topk_group")
    scaling_key: str | None = None
    renorm_eps: float = 0.0


@dataclass(frozen=True)
class ExpertLayout:
    """How the fused expert tensors are laid out (all have the expert index as dim 0).

    Attributes:
        gate_up: name of the fused gate+up tensor on the experts module.
        down: name of the down-projection tensor.
        transposed: weights stored (E, in, out) instead of (E, out, in).
        interleaved: gate and up alternate along the output dim (gate = even, up = odd) instead of
            gate first then up.
        biases: names of per-expert bias tensors (E, out), in the same order as (gate_up, down).
    """

    gate_up: str = "gate_up_proj"
    down: str = "down_proj"
    transposed: bool = False
    interleaved: bool = False
    biases: tuple[str, ...] = ()

    @property
    def tensors(self) -> tuple[str, ...]:
        """Every per-expert tensor of the experts module (sliced together by surgery)."""
        return (self.gate_up, self.down, *self.biases)


@dataclass(frozen=True)
class ArchSpec:
    """Where the MoE parts of one architecture family live and how they behave.

    Attributes:
        name: display name.
        model_types: `config.model_type` values this spec covers.
        layers: dotted path from the causal-LM model to the list of decoder layers.
        block: attribute of a decoder layer holding the MoE block (dense layers lack `experts`).
        router: attribute of the block holding the router module.
        experts: attribute of the block holding the fused experts module.
        router_tensors: (dotted path relative to the block, dim indexed by expert) for every router
            tensor with one entry per expert: weight rows, bias, correction bias.
        logit_bias: dotted path (relative to the block) of a bias added to the router logits, or None.
        shared: attributes of the block that are shared experts or their gates (never touched).
        shared_gate: attribute of the block holding the shared expert's gate (a Linear with one output),
            or None; quantization keeps it in the source dtype, like the router.
        num_experts_keys: config attributes that hold the routed-expert count (all set on rewrite).
        top_k_key: config attribute holding top-k.
        count_attrs: module attributes (on block, router, experts) caching the expert count.
        experts_call: "indexed": `experts(hidden (T,H), top_k_index (T,k), top_k_weights (T,k))` returns
            the gated sum; "dense_prescaled": every expert sees every token with its input already
            multiplied by a dense (T,E) score matrix that is zero off the top-k.
        gate: the routing rule; None when the router is model-specific and cannot be re-simulated.
        layout: the fused expert tensor layout.
    """

    name: str
    model_types: tuple[str, ...]
    num_experts_keys: tuple[str, ...]
    top_k_key: str = "num_experts_per_tok"
    layers: str = "model.layers"
    block: str = "mlp"
    router: str = "gate"
    experts: str = "experts"
    router_tensors: tuple[tuple[str, int], ...] = (("gate.weight", 0),)
    logit_bias: str | None = None
    shared: tuple[str, ...] = ()
    shared_gate: str | None = None
    count_attrs: tuple[str, ...] = ("num_experts",)
    experts_call: Literal["indexed", "dense_prescaled"] = "indexed"
    gate: GateSpec | None = field(default_factory=GateSpec)
    layout: ExpertLayout = field(default_factory=ExpertLayout)
