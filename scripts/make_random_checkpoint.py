"""Write a random Mixtral-shaped checkpoint of about a requested size, one decoder layer per shard.

The model is never built: each shard's tensors (hub per-expert names, as `save_pretrained` writes them)
are generated, saved and freed before the next, so memory stays at one layer whatever the size.

    python scripts/make_random_checkpoint.py --size-gb 6 -o /tmp/rand-6gb   (hidden 1024, 8 experts, ~41 layers)
    python scripts/make_random_checkpoint.py --quick -o /tmp/rand-quick
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

__all__ = ["make_checkpoint", "layer_tensors", "shape_for_size"]

_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def shape_for_size(*, size_bytes: int, hidden: int, inter: int, experts: int, vocab: int, dtype: str) -> dict:
    """A Mixtral config whose checkpoint is about `size_bytes`: layers chosen to fill the size."""
    heads, kv_heads = hidden // 64, max(1, hidden // 256)
    per_layer = 2 * hidden * hidden + 2 * hidden * kv_heads * 64 + experts * 3 * hidden * inter + experts * hidden + 2 * hidden
    outer = 2 * vocab * hidden + hidden
    layers = max(1, round((size_bytes / _BYTES[dtype] - outer) / per_layer))
    return dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv_heads, head_dim=64, num_local_experts=experts, num_experts_per_tok=2,
                vocab_size=vocab, max_position_embeddings=4096, tie_word_embeddings=False)


def layer_tensors(i: int, cfg: dict, dtype, gen) -> dict:
    """Decoder layer i in the hub per-expert layout (Mixtral names)."""
    import torch

    h, inter, kv = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_key_value_heads"] * cfg["head_dim"]

    def rnd(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).to(dtype)

    p = f"model.layers.{i}."
    out = {p + "input_layernorm.weight": torch.ones(h, dtype=dtype),
           p + "post_attention_layernorm.weight": torch.ones(h, dtype=dtype),
           p + "self_attn.q_proj.weight": rnd(h, h), p + "self_attn.k_proj.weight": rnd(kv, h),
           p + "self_attn.v_proj.weight": rnd(kv, h), p + "self_attn.o_proj.weight": rnd(h, h),
           p + "block_sparse_moe.gate.weight": rnd(cfg["num_local_experts"], h)}
    for j in range(cfg["num_local_experts"]):
        e = f"{p}block_sparse_moe.experts.{j}."
        out.update({e + "w1.weight": rnd(inter, h), e + "w2.weight": rnd(h, inter), e + "w3.weight": rnd(inter, h)})
    return out


def make_checkpoint(out: Path, *, size_gb: float, hidden: int = 1024, inter: int = 2816, experts: int = 8,
                    vocab: int = 32000, dtype: str = "bfloat16", seed: int = 0) -> dict:
    import torch
    from safetensors.torch import save_file
    from transformers import MixtralConfig

    out.mkdir(parents=True, exist_ok=False)
    cfg = shape_for_size(size_bytes=int(size_gb * 1e9), hidden=hidden, inter=inter, experts=experts, vocab=vocab,
                         dtype=dtype)
    tdtype, gen = getattr(torch, dtype), torch.Generator().manual_seed(seed)
    n = cfg["num_hidden_layers"] + 1
    weight_map, total = {}, 0
    for s in range(n):
        if s < n - 1:
            tensors = layer_tensors(s, cfg, tdtype, gen)
        else:
            tensors = {"model.embed_tokens.weight": (torch.randn(vocab, hidden, generator=gen) * 0.02).to(tdtype),
                       "lm_head.weight": (torch.randn(vocab, hidden, generator=gen) * 0.02).to(tdtype),
                       "model.norm.weight": torch.ones(hidden, dtype=tdtype)}
        name = f"model-{s + 1:05d}-of-{n:05d}.safetensors"
        save_file(tensors, out / name, metadata={"format": "pt"})
        total += sum(t.nbytes for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    MixtralConfig(**cfg, dtype=dtype).save_pretrained(out)
    return {"path": str(out), "bytes": total, "layers": cfg["num_hidden_layers"], "experts": experts,
            "shards": n, "dtype": dtype}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", required=True, type=Path)
    ap.add_argument("--size-gb", type=float, default=4.5)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=2816)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(_BYTES))
    ap.add_argument("--quick", action="store_true", help="A 0.2 GB checkpoint (hidden 512, 6 layers).")
    args = ap.parse_args(argv)
    if args.quick:
        args.size_gb, args.hidden, args.inter, args.vocab = 0.2, 512, 1408, 8000
    start = time.perf_counter()
    info = make_checkpoint(args.output, size_gb=args.size_gb, hidden=args.hidden, inter=args.inter,
                           experts=args.experts, vocab=args.vocab, dtype=args.dtype)
    info["seconds"] = round(time.perf_counter() - start, 2)
    print(f"{'path':<10}{info['path']}\n{'bytes':<10}{info['bytes'] / 1e9:.3f} GB\n{'layers':<10}{info['layers']}"
          f"\n{'shards':<10}{info['shards']}\n{'seconds':<10}{info['seconds']}")
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())


QUICK = dict(size_gb=0.2, hidden=512, inter=1408, vocab=8000)


def source_checkpoint(model_dir: Path | None, work: Path, *, quick: bool, size_gb: float) -> Path:
    """The checkpoint a benchmark runs on: `model_dir` when given, else one generated under `work`."""
    if model_dir is not None:
        return model_dir
    src = work / "src"
    make_checkpoint(src, **(QUICK if quick else dict(size_gb=size_gb)))
    return src
