#!/usr/bin/env python
"""Benchmark: data-parallel calibration, 1 process vs N processes (torchrun) on the same batches.

The parent observes the batches in one process, then launches `torchrun --standalone --nproc-per-node N`
on itself (`--worker`), where each rank observes its share and the statistics are all-reduced; rank 0
saves them. It prints the wall time of each observation pass (model load and process start excluded) and
checks that every statistic of the N-process run equals the 1-process run (allclose, rtol 1e-6).

    python scripts/bench_distributed.py --quick                       # check that it runs
    python scripts/bench_distributed.py --model qwen3-16x4 --nproc 2 --execution layerwise
    python scripts/bench_distributed.py --model /models/OLMoE-1B-7B --dtype bfloat16 --nproc 4

On one machine with N GPUs each rank uses its own GPU; on CPU the ranks share the cores (set
OMP_NUM_THREADS so that N x threads <= cores). Run it alone: other processes distort the timings.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def model_folder(spec: str, dtype: str, where: Path) -> Path:
    """A folder holding the model (random models are generated and saved once, for every process)."""
    from bench_observe import RANDOM, random_qwen3_moe

    from moeprune.checkpoint.model_dir import resolve_model_dir

    if spec not in RANDOM:
        return resolve_model_dir(spec)
    path = where / spec
    random_qwen3_moe(*RANDOM[spec]).to(getattr(torch, dtype)).save_pretrained(path)
    return path


def batches(args, vocab: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(3, vocab, (args.batch_size, args.seq_len), generator=g)}
            for _ in range(args.batches)]


def observe_once(folder: Path, args):
    """(Observations, seconds of the observation pass) in this process (one rank under torchrun)."""
    from moeprune.checkpoint.model_dir import load_config, load_model

    data = batches(args, load_config(folder).vocab_size)
    if args.execution == "layerwise":
        from moeprune.execution.layers import observe_layerwise

        start = time.perf_counter()
        return observe_layerwise(folder, data, dtype=args.dtype, progress=False), time.perf_counter() - start
    from moeprune.observe import observe

    model = load_model(folder, dtype=args.dtype)
    start = time.perf_counter()
    return observe(model, data, progress=False), time.perf_counter() - start


def worker(args) -> int:
    from moeprune import distributed

    ctx = distributed.context()
    obs, seconds = observe_once(Path(args.folder), args)
    if ctx.is_main:
        obs.save(Path(args.out))
        (Path(args.out) / "seconds.json").write_text(json.dumps({"seconds": seconds}))
    distributed.finish()
    return 0


def compare(a, b) -> float:
    """Largest relative difference over every statistic; raises when a tensor differs beyond rtol 1e-6."""
    worst = 0.0
    assert a.num_tokens == b.num_tokens, (a.num_tokens, b.num_tokens)
    for i in a.layers:
        for name, t in a.layers[i].tensors().items():
            u = b.layers[i].tensors()[name]
            torch.testing.assert_close(u, t, rtol=1e-6, atol=1e-9, msg=f"layer {i} {name}")
            worst = max(worst, float(((u - t).abs() / t.abs().clamp(min=1e-12)).max()))
    return worst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo", help="demo, qwen3-16x4, qwen3-64x8 or a model folder")
    ap.add_argument("--execution", default="memory", choices=["memory", "layerwise"])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--quick", action="store_true", help="small sizes: checks that it runs, measures nothing")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.batches, args.batch_size, args.seq_len = 4, 2, 32
    if args.worker:
        return worker(args)
    from moeprune.observe import Observations

    with tempfile.TemporaryDirectory(prefix="moeprune-bench-dist-") as tmp:
        tmp = Path(tmp)
        folder = model_folder(args.model, args.dtype, tmp)
        one, t_one = observe_once(folder, args)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
               __file__, "--worker", "--folder", str(folder), "--out", str(tmp / "multi"),
               "--execution", args.execution, "--dtype", args.dtype, "--batches", str(args.batches),
               "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, os.cpu_count() // args.nproc)))}
        subprocess.run(cmd, check=True, env=env)
        multi = Observations.load(tmp / "multi")
        t_multi = json.loads((tmp / "multi" / "seconds.json").read_text())["seconds"]
        worst = compare(one, multi)
    tokens = args.batches * args.batch_size * args.seq_len
    print(f"{'processes':<10}{'observe s':>10}{'tokens/s':>10}")
    print(f"{1:<10}{t_one:>10.3f}{tokens / t_one:>10.0f}")
    print(f"{args.nproc:<10}{t_multi:>10.3f}{tokens / t_multi:>10.0f}")
    print(f"statistics equal (rtol 1e-6): largest relative difference {worst:.2e}")
    print(json.dumps({"bench": "distributed", "model": args.model, "execution": args.execution, "nproc": args.nproc,
                      "tokens": tokens, "one_s": round(t_one, 4), "multi_s": round(t_multi, 4),
                      "speedup": round(t_one / t_multi, 3), "max_rel_diff": worst}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
