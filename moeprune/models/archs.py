"""The architecture table: one `ArchSpec` per MoE family in stock transformers.

Entries share pieces by reference (`_SOFTMAX_TOPK`, `_DEEPSEEK_V3_GATE`, ...). Adding a family that
follows an existing pattern is one entry here; the tests build a tiny random model for every entry and
check that the gate rule reproduces the model's router exactly and that surgery round-trips.
"""

from __future__ import annotations

from dataclasses import replace

from moeprune.models.spec import ArchSpec, ExpertLayout, GateSpec

__all__ = ["ARCHS"]

# softmax over all experts, top-k, renormalised over the k (Mixtral)
_SOFTMAX_TOPK_RENORM = GateSpec(score="softmax", renormalize=True)
# softmax, top-k, renormalised only when config.norm_topk_prob (Qwen-MoE, OLMoE)
_SOFTMAX_TOPK_OPT = GateSpec(score="softmax", renormalize="norm_topk_prob")
# top-k over raw logits, then softmax over the k chosen logits (GPT-OSS, Granite-MoE)
_TOPK_THEN_SOFTMAX = GateSpec(score="softmax", select_on="logits")
# sigmoid scores + selection-only correction bias + group-limited top-k (DeepSeek-V3 family)
_DEEPSEEK_V3_GATE = GateSpec(
    score="sigmoid",
    renormalize="norm_topk_prob",
    correction_bias="gate.e_score_correction_bias",
    group="top2sum",
    scaling_key="routed_scaling_factor",
    renorm_eps=1e-20,
)
_DEEPSEEK_V3_TENSORS = (("gate.weight", 0), ("gate.e_score_correction_bias", 0))

_MIXTRAL = ArchSpec(name="Mixtral", model_types=("mixtral",), num_experts_keys=("num_local_experts",),
                    gate=_SOFTMAX_TOPK_RENORM)
_QWEN2_MOE = ArchSpec(name="Qwen2-MoE", model_types=("qwen2_moe",), num_experts_keys=("num_experts",),
                      shared=("shared_expert", "shared_expert_gate"), shared_gate="shared_expert_gate",
                      gate=_SOFTMAX_TOPK_OPT)
_DEEPSEEK_V3 = ArchSpec(name="DeepSeek-V3", model_types=("deepseek_v3",), num_experts_keys=("n_routed_experts",),
                        router_tensors=_DEEPSEEK_V3_TENSORS, shared=("shared_experts",), gate=_DEEPSEEK_V3_GATE)
_GRANITE_MOE = ArchSpec(name="Granite-MoE", model_types=("granitemoe",), num_experts_keys=("num_local_experts",),
                        block="block_sparse_moe", router="router", router_tensors=(("router.weight", 0),),
                        gate=_TOPK_THEN_SOFTMAX)

_SPECS: tuple[ArchSpec, ...] = (
    _MIXTRAL,
    replace(_MIXTRAL, name="MiniMax", model_types=("minimax",)),
    _QWEN2_MOE,
    replace(_QWEN2_MOE, name="Qwen3-Next", model_types=("qwen3_next",)),
    replace(_QWEN2_MOE, name="Qwen3.5-MoE", model_types=("qwen3_5_moe_text",), gate=_SOFTMAX_TOPK_RENORM),
    ArchSpec(name="Qwen3-MoE", model_types=("qwen3_moe",), num_experts_keys=("num_experts", "num_local_experts"),
             gate=_SOFTMAX_TOPK_OPT),
    ArchSpec(name="OLMoE", model_types=("olmoe",), num_experts_keys=("num_experts",), gate=_SOFTMAX_TOPK_OPT),
    ArchSpec(name="DeepSeek-V2", model_types=("deepseek_v2",), num_experts_keys=("n_routed_experts",),
             shared=("shared_experts",),
             gate=GateSpec(score="softmax", renormalize=False, group="max",
                           group_when=("topk_method", "group_limited_greedy"), scaling_key="routed_scaling_factor")),
    _DEEPSEEK_V3,
    replace(_DEEPSEEK_V3, name="GLM-4-MoE", model_types=("glm4_moe",)),
    replace(_DEEPSEEK_V3, name="GLM-4-MoE-Lite", model_types=("glm4_moe_lite",)),
    replace(_DEEPSEEK_V3, name="EXAONE-MoE", model_types=("exaone_moe",), num_experts_keys=("num_experts",)),
    ArchSpec(name="GPT-OSS", model_types=("gpt_oss",), num_experts_keys=("num_local_experts",), router="router",
             router_tensors=(("router.weight", 0), ("router.bias", 0)), logit_bias="router.bias",
             gate=_TOPK_THEN_SOFTMAX,
             layout=ExpertLayout(transposed=True, interleaved=True, biases=("gate_up_proj_bias", "down_proj_bias"))),
    ArchSpec(name="Llama-4 (text)", model_types=("llama4_text",), num_experts_keys=("num_local_experts",),
             block="feed_forward", router="router", router_tensors=(("router.weight", 0),),
             shared=("shared_expert",), experts_call="dense_prescaled",
             gate=GateSpec(score="sigmoid", select_on="logits"), layout=ExpertLayout(transposed=True)),
    ArchSpec(name="ERNIE-4.5-MoE", model_types=("ernie4_5_moe",), num_experts_keys=("moe_num_experts",),
             top_k_key="moe_k", shared=("shared_experts",),
             router_tensors=(("gate.weight", 0), ("gate.moe_statics.e_score_correction_bias", 1)),
             gate=GateSpec(score="softmax", renormalize=True,
                           correction_bias="gate.moe_statics.e_score_correction_bias")),
    _GRANITE_MOE,
    replace(_GRANITE_MOE, name="Granite-MoE-Shared", model_types=("granitemoeshared",), shared=("shared_mlp",)),
    replace(_GRANITE_MOE, name="Granite-MoE-SWA", model_types=("granitemoe_swa",)),
    ArchSpec(name="Cohere2-MoE", model_types=("cohere2_moe",), num_experts_keys=("num_experts",),
             gate=GateSpec(score="softmax", score_key="expert_selection_fn", select_on="logits",
                           renormalize="norm_topk_prob")),
    ArchSpec(name="Jamba", model_types=("jamba",), num_experts_keys=("num_experts",), block="feed_forward",
             router="router", router_tensors=(("router.weight", 0),), gate=GateSpec(score="softmax")),
    ArchSpec(name="AFMoE", model_types=("afmoe",), num_experts_keys=("num_experts",), router="router",
             router_tensors=(("router.gate.weight", 0), ("expert_bias", 0)), shared=("shared_experts",),
             gate=GateSpec(score="sigmoid", renormalize=True, correction_bias="expert_bias",
                           scaling_key="route_scale", renorm_eps=1e-20)),
    ArchSpec(name="PhiMoE", model_types=("phimoe",), num_experts_keys=("num_local_experts",), router="router",
             router_tensors=(("router.weight", 0),), gate=None),
)

ARCHS: dict[str, ArchSpec] = {}
for _spec in _SPECS:
    for _model_type in _spec.model_types:
        if _model_type in ARCHS:
            raise RuntimeError(f"model type {_model_type!r} is listed twice in the architecture table")
        ARCHS[_model_type] = _spec
