#!/usr/bin/env python
"""Benchmark: observation time / bare forward time over the same tokens (target <= 1.3).

Runs the same calibration batches through the model twice per repeat, alternating: once bare
(`model(...)`, the model's own experts implementation) and once with the moeprune collector attached
(all core statistics). Reports the median of each and their ratio, plus tokens/s.

    python scripts/bench_observe.py                 # the demo model, 16 x 256 tokens, 3 repeats
    python scripts/bench_observe.py --quick         # CI-sized
    python scripts/bench_observe.py --model /models/OLMoE-1B-7B --dtype bfloat16

Run it alone: another torch process on the same cores distorts both timings.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

from moeprune.models import MoEAdapter


def _random_mixtral(experts: int, top_k: int):
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=4, num_local_experts=experts,
                        num_experts_per_tok=top_k)
    torch.manual_seed(0)
    return MixtralForCausalLM(cfg).eval()


def _load(model_spec: str, dtype: str, experts: int, top_k: int):
    if model_spec == "random":
        return _random_mixtral(experts, top_k)
    from moeprune.io import load_model

    return load_model(model_spec, dtype=dtype, device="cpu")


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo", help="model folder, 'demo', or 'random' (a generated Mixtral)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--experts", type=int, default=8, help="experts per layer of the 'random' model")
    ap.add_argument("--top-k", type=int, default=2, help="top-k of the 'random' model")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="small sizes for CI")
    args = ap.parse_args(argv)
    if args.quick:
        args.batches, args.batch_size, args.seq_len, args.repeats = 2, 2, 64, 2

    from moeprune.observe import observe

    model = _load(args.model, args.dtype, args.experts, args.top_k)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(3, vocab, (args.batch_size, args.seq_len), generator=g)}
               for _ in range(args.batches)]
    tokens = args.batches * args.batch_size * args.seq_len

    def bare():
        with torch.no_grad():
            for b in batches:
                model(input_ids=b["input_ids"], use_cache=False)

    def observed():
        observe(model, batches, progress=False)

    bare(), observed()  # warm-up
    t_bare, t_obs = [], []
    for _ in range(args.repeats):
        t_bare.append(_time(bare))
        t_obs.append(_time(observed))
    mb, mo = statistics.median(t_bare), statistics.median(t_obs)
    ratio = mo / mb
    rows = [("bare forward", mb, tokens / mb), ("observe (all core stats)", mo, tokens / mo)]
    print(f"model={args.model} type={model.config.model_type} tokens={tokens} threads={torch.get_num_threads()} "
          f"machine={platform.machine()} python={platform.python_version()} torch={torch.__version__}")
    print(f"{'pass':<28}{'median s':>10}{'tokens/s':>12}")
    for name, sec, tps in rows:
        print(f"{name:<28}{sec:>10.3f}{tps:>12.0f}")
    print(f"ratio observe/bare = {ratio:.3f} (target <= 1.3)")
    print(json.dumps({"bench": "observe", "model": args.model, "experts": MoEAdapter(model).num_experts, "tokens": tokens, "bare_s": round(mb, 4),
                      "observe_s": round(mo, 4), "ratio": round(ratio, 4), "target": 1.3,
                      "observe_tokens_per_s": round(tokens / mo, 1), "repeats": args.repeats}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
