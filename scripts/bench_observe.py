#!/usr/bin/env python
"""Benchmark: observation time / bare forward time over the same tokens (target <= 1.15).

For each model and device, runs the same calibration batches through the model, alternating: once bare
(`model(...)`, the model's own experts implementation) and once through `observe` (all core
statistics, accumulated on the device). Reports the median of each, their ratio and tokens/s.

Models ("suite", the default, is the first three):
    demo          the shipped demo model (Qwen2-MoE, 16 experts, top-2)
    qwen3-16x4    a random Qwen3-MoE-shaped model, 16 experts, top-4
    qwen3-64x8    a random Qwen3-MoE-shaped model, 64 experts, top-8
    PATH          a model folder

    python scripts/bench_observe.py                      # the suite, 16 x 256 tokens, CPU (+ CUDA rows)
    python scripts/bench_observe.py --quick              # small sizes, to check that it runs
    python scripts/bench_observe.py --models /models/OLMoE-1B-7B --dtype bfloat16 --devices cuda

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

SUITE = ("demo", "qwen3-16x4", "qwen3-64x8")
RANDOM = {"qwen3-16x4": (16, 4), "qwen3-64x8": (64, 8)}


def random_qwen3_moe(experts: int, top_k: int, *, layers: int = 4, seed: int = 0):
    """A random Qwen3-MoE-shaped causal LM (hidden 256, expert width 128)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(vocab_size=4096, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                         num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4, head_dim=32,
                         num_experts=experts, num_experts_per_tok=top_k, norm_topk_prob=True)
    torch.manual_seed(seed)
    return Qwen3MoeForCausalLM(cfg).eval()


def load(spec: str, dtype: str, device: str):
    if spec in RANDOM:
        model = random_qwen3_moe(*RANDOM[spec]).to(getattr(torch, dtype))
    else:
        from moeprune.checkpoint.model_dir import load_model

        model = load_model(spec, dtype=dtype, device="cpu")
    return model.to(device).eval()


def _timed(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench(spec: str, device: str, args) -> dict:
    from moeprune.models import MoEAdapter
    from moeprune.observe import observe

    model = load(spec, args.dtype, device)
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(3, model.config.vocab_size, (args.batch_size, args.seq_len), generator=g)}
               for _ in range(args.batches)]
    tokens = args.batches * args.batch_size * args.seq_len

    def bare():
        with torch.no_grad():
            for b in batches:
                model(input_ids=b["input_ids"].to(device), use_cache=False)

    def observed():
        observe(model, batches, progress=False)

    bare(), observed()  # warm-up
    t_bare, t_obs = [], []
    for _ in range(args.repeats):
        t_bare.append(_timed(bare, device))
        t_obs.append(_timed(observed, device))
    mb, mo = statistics.median(t_bare), statistics.median(t_obs)
    adapter = MoEAdapter(model)
    return {"bench": "observe", "model": spec, "device": device, "dtype": args.dtype,
            "experts": adapter.num_experts, "top_k": adapter.top_k, "tokens": tokens, "bare_s": round(mb, 4),
            "observe_s": round(mo, 4), "ratio": round(mo / mb, 4), "target": 1.15,
            "observe_tokens_per_s": round(tokens / mo, 1), "repeats": args.repeats}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="suite", help="comma-separated: suite, demo, qwen3-16x4, qwen3-64x8, PATH")
    ap.add_argument("--devices", default="auto", help="comma-separated: cpu, cuda (auto: cpu, plus cuda if present)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="small sizes: checks that it runs, measures nothing")
    args = ap.parse_args(argv)
    if args.quick:
        args.batches, args.batch_size, args.seq_len, args.repeats = 1, 2, 32, 1
    models = [m for part in args.models.split(",") for m in (SUITE if part == "suite" else (part,))]
    devices = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])] if args.devices == "auto" \
        else args.devices.split(",")
    print(f"threads={torch.get_num_threads()} machine={platform.machine()} python={platform.python_version()} "
          f"torch={torch.__version__}" + (f" gpu={torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    print(f"{'model':<14}{'device':<7}{'E/k':>7}{'tokens':>8}{'bare s':>9}{'observe s':>11}{'ratio':>8}")
    for device in devices:
        for spec in models:
            r = bench(spec, device, args)
            print(f"{spec:<14}{device:<7}{r['experts']:>4}/{r['top_k']:<2}{r['tokens']:>8}{r['bare_s']:>9.3f}"
                  f"{r['observe_s']:>11.3f}{r['ratio']:>8.3f}")
            print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
