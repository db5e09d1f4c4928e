"""Tiny random-weight configs for every architecture in the table (2-3 layers, hidden 64, 8 experts)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

_COMMON = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=128,
               pad_token_id=0, bos_token_id=1, eos_token_id=2)
_DEEPSEEK_ATTN = dict(kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                      head_dim=8, num_key_value_heads=4)
_V3 = dict(n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
           moe_intermediate_size=32, first_k_dense_replace=1, num_hidden_layers=3, norm_topk_prob=True,
           routed_scaling_factor=2.5)

# model_type -> overrides on top of _COMMON (chosen so every routing branch is exercised)
TINY: dict[str, dict] = {
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2),
    "minimax": dict(num_local_experts=8, num_experts_per_tok=2, layer_types=["full_attention"] * 2),
    "qwen2_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48, norm_topk_prob=True),
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True),
    "qwen3_next": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=48, norm_topk_prob=True,
                       layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2,
                       linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16),
    "qwen3_5_moe_text": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                             shared_expert_intermediate_size=48,
                             layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2,
                             linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2, norm_topk_prob=False),
    "deepseek_v2": dict(_DEEPSEEK_ATTN, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                        moe_intermediate_size=32, first_k_dense_replace=1, num_hidden_layers=3,
                        topk_method="group_limited_greedy", n_group=2, topk_group=1, routed_scaling_factor=1.5),
    "deepseek_v3": dict(_DEEPSEEK_ATTN, **_V3),
    "glm4_moe": dict(_V3, partial_rotary_factor=0.5),
    "glm4_moe_lite": dict(_DEEPSEEK_ATTN, **_V3),
    "exaone_moe": dict({k: v for k, v in _V3.items() if k not in ("n_routed_experts", "n_shared_experts")},
                       num_experts=8, num_shared_experts=1, layer_types=["full_attention"] * 3),
    "gpt_oss": dict(num_local_experts=8, num_experts_per_tok=2, layer_types=["full_attention"] * 2),
    "llama4_text": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size_mlp=64,
                        moe_layers=[1], interleave_moe_layer_step=2, no_rope_layers=[1, 1],
                        layer_types=["full_attention"] * 2),
    "ernie4_5_moe": dict(moe_num_experts=8, moe_k=2, moe_intermediate_size=32, moe_num_shared_experts=1,
                         moe_layer_start_index=1, moe_layer_end_index=2, num_hidden_layers=3),
    "granitemoe": dict(num_local_experts=8, num_experts_per_tok=2),
    "granitemoeshared": dict(num_local_experts=8, num_experts_per_tok=2, shared_intermediate_size=48),
    "granitemoe_swa": dict(num_local_experts=8, num_experts_per_tok=2),
    "cohere2_moe": dict(num_experts=8, num_experts_per_tok=2, expert_selection_fn="sigmoid", norm_topk_prob=True,
                        layer_types=["full_attention"] * 2),
    "jamba": dict(num_experts=8, num_experts_per_tok=2, attn_layer_period=1, attn_layer_offset=0,
                  expert_layer_period=1, expert_layer_offset=0, mamba_d_state=4, mamba_d_conv=2, mamba_expand=1,
                  use_mamba_kernels=False),
    "afmoe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, num_shared_experts=1,
                  num_dense_layers=1, num_hidden_layers=3, route_scale=1.5,
                  layer_types=["full_attention"] * 3),
    "phimoe": dict(num_local_experts=8, num_experts_per_tok=2, router_jitter_noise=0.0),
}


def tiny_config(model_type: str, overrides: dict | None = None):
    return CONFIG_MAPPING[model_type](**{**_COMMON, **TINY[model_type], **(overrides or {})})


def tiny_model(model_type: str, seed: int = 0, overrides: dict | None = None):
    """A tiny random model whose router tensors are non-trivial (biases nonzero where they exist)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, overrides))
    model.eval()
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if "correction_bias" in name or name.endswith("expert_bias") or name.endswith("router.bias") \
                    or name.endswith("proj_bias"):
                p.copy_(torch.randn_like(p.float()).to(p.dtype) * 0.05)
            elif name.endswith(("gate.weight", "router.weight", "router.gate.weight")) and p.dim() == 2:
                p.normal_(0, 0.5)
    return model


def tiny_tokenizer(*, with_pad: bool = True):
    """A character-level tokenizer built offline (one token per printable ASCII character).

    Without a pad token (`with_pad=False`) callers must fall back to EOS for padding."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"] if with_pad else ["<unk>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials + list(string.printable))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    pad = {"pad_token": "<pad>"} if with_pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   model_max_length=256, **pad)


def save_tiny(path, model_type: str = "mixtral", seed: int = 0):
    """Save a tiny model with a tokenizer (vocab 128 covers the character tokenizer)."""
    tiny_model(model_type, seed).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
