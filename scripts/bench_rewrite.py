"""Streaming prune+save time divided by a plain file copy of the same checkpoint (target <= 3).

Generates a random Mixtral-shaped checkpoint (or takes --model-dir), warms the page cache, then
alternates: copy the folder (shutil.copyfile per file + os.sync) and `prune_checkpoint` keeping half the
experts (+ os.sync), --repeats times each; reports medians. Python imports are excluded from both.

    python scripts/bench_rewrite.py --size-gb 5             # full size (run on an otherwise idle CPU)
    python scripts/bench_rewrite.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

__all__ = ["copy_folder", "half_plan", "main"]


def copy_folder(src: Path, dst: Path) -> int:
    dst.mkdir(parents=True)
    total = 0
    for f in sorted(src.iterdir()):
        if f.is_file():
            shutil.copyfile(f, dst / f.name)
            total += f.stat().st_size
    os.sync()
    return total


def half_plan(model_dir: Path) -> dict[int, list[int]]:
    from moeprune.checkpoint.model_dir import meta_model
    from moeprune.models import MoEAdapter

    adapter = MoEAdapter(meta_model(model_dir))
    return {layer.index: list(range(0, layer.num_experts, 2)) for layer in adapter.layers}


def _warm(src: Path) -> None:
    for f in src.iterdir():
        with open(f, "rb") as h:
            while h.read(64 << 20):
                pass


def run(src: Path, work: Path, repeats: int) -> dict:
    from moeprune.checkpoint.rewrite import prune_checkpoint

    plan = half_plan(src)
    _warm(src)
    copies, prunes, res = [], [], None
    for r in range(repeats):
        t = time.perf_counter()
        size = copy_folder(src, work / f"copy{r}")
        copies.append(time.perf_counter() - t)
        t = time.perf_counter()
        res = prune_checkpoint(src, work / f"pruned{r}", plan)
        os.sync()
        prunes.append(time.perf_counter() - t)
        shutil.rmtree(work / f"copy{r}")
        shutil.rmtree(work / f"pruned{r}")
    copy_s, prune_s = statistics.median(copies), statistics.median(prunes)
    return {"checkpoint_bytes": size, "pruned_bytes": res.bytes_after, "repeats": repeats, "copy_s": round(copy_s, 3),
            "prune_stream_s": round(prune_s, 3), "ratio": round(prune_s / copy_s, 3), "target": 3.0,
            "pass": prune_s / copy_s <= 3.0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, default=None, help="Existing checkpoint (default: generate one).")
    ap.add_argument("--size-gb", type=float, default=5.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None, help="Where copies and outputs go (same disk as input).")
    ap.add_argument("--quick", action="store_true", help="0.2 GB checkpoint, 2 repeats.")
    args = ap.parse_args(argv)
    from make_random_checkpoint import source_checkpoint

    with tempfile.TemporaryDirectory(prefix="bench-rewrite-", dir=args.workdir) as tmp:
        work = Path(tmp)
        src = source_checkpoint(args.model_dir, work, quick=args.quick, size_gb=args.size_gb)
        out = run(src, work, 2 if args.quick else args.repeats)
    out["quick"] = args.quick
    out["cpus"] = os.cpu_count()
    print(f"{'checkpoint':<18}{out['checkpoint_bytes'] / 1e9:.3f} GB\n{'pruned output':<18}"
          f"{out['pruned_bytes'] / 1e9:.3f} GB (half the experts)\n{'plain copy':<18}{out['copy_s']:.3f} s\n"
          f"{'streaming prune':<18}{out['prune_stream_s']:.3f} s\n{'ratio':<18}{out['ratio']:.3f}  (target <= 3)")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
