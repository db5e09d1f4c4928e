"""Write tiny random models of every architecture in the table, shaped so vLLM's CPU kernels accept them.

    python scripts/make_tiny_models.py OUT_DIR [MODEL_TYPE ...]     (default: every family)

The configs are moeprune/testing.py's (2-3 layers, 8 experts, every routing branch exercised) with the
widths vLLM's CPU build needs: attention head_dim 32 (its CPU attention refuses 16), hidden 128 and
expert widths multiples of 32. Weights are random (seeded), routers non-trivial, so a greedy decode
exercises every part of the network. Used by the CI engine check (scripts/ci_vllm_stage.sh).
"""

from __future__ import annotations

import sys
from pathlib import Path

from moeprune.testing import TINY, tiny_model, tiny_tokenizer

# wider than the unit tests' models: vLLM CPU attention needs head_dim >= 32
VLLM_SHAPE = dict(hidden_size=128, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32)
_WIDTH_KEYS = ("moe_intermediate_size", "shared_expert_intermediate_size", "shared_intermediate_size",
               "intermediate_size_mlp")


def vllm_overrides(model_type: str) -> dict:
    """Overrides on top of moeprune/testing.py's config for `model_type`."""
    base = TINY[model_type]
    out = dict(VLLM_SHAPE)
    out.update({k: 64 for k in _WIDTH_KEYS if k in base})
    if "v_head_dim" in base:  # multi-head latent attention (DeepSeek family)
        out.update(v_head_dim=32, qk_nope_head_dim=16, qk_rope_head_dim=16, head_dim=16, kv_lora_rank=32)
    if "linear_key_head_dim" in base:
        out.update(linear_key_head_dim=32, linear_value_head_dim=32)
    return out


def save(out_dir: Path, model_type: str) -> Path:
    path = out_dir / model_type
    tiny_model(model_type, overrides=vllm_overrides(model_type)).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def main(argv: list[str]) -> int:
    out_dir = Path(argv[0])
    types = argv[1:] or sorted(TINY)
    for model_type in types:
        print(save(out_dir, model_type))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
