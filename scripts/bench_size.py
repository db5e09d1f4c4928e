"""Pruned checkpoint size vs the prediction non-expert + kept/E x expert bytes (target: within 2%).

Expert bytes are the routed-expert tensors (as classified from transformers' conversion table); router
rows count as non-expert in the prediction (they shrink too, which is why the measured size is a hair
below it). Runs the streaming rewrite at several keep counts on a generated Mixtral-shaped checkpoint
(or --model-dir), and on tiny random models of other families (shared experts, dense first layers).

    python scripts/bench_size.py --model-dir /tmp/rand-5gb
    python scripts/bench_size.py --quick
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

__all__ = ["measure", "main"]


def measure(src: Path, out: Path, keep_n: int) -> dict:
    from moeprune.checkpoint.model_dir import meta_model
    from moeprune.checkpoint.rewrite import prune_checkpoint
    from moeprune.checkpoint.names import CheckpointNames
    from moeprune.checkpoint.safetensors_io import Checkpoint

    names = CheckpointNames(meta_model(src))
    ckpt = Checkpoint(src)
    expert = sum(t.nbytes for t in ckpt.tensors.values() if names.role(t.name).kind in ("expert", "fused"))
    e = names.adapter.num_experts
    kept = list(range(0, e, e // keep_n)) if e % keep_n == 0 else list(range(keep_n))  # spread over groups
    plan = {layer.index: kept for layer in names.adapter.layers}
    res = prune_checkpoint(src, out, plan)
    predicted = ckpt.total_bytes - expert + expert * keep_n / e
    actual = Checkpoint(out).total_bytes
    files = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    return {"model_type": names.adapter.config.model_type, "experts": e, "kept": keep_n,
            "before": ckpt.total_bytes, "expert_share": round(expert / ckpt.total_bytes, 4), "predicted": int(predicted),
            "actual": actual, "file_bytes": files, "rel_error": round((actual - predicted) / predicted, 6),
            "reported": res.bytes_after}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, default=None, help="Existing checkpoint (default: generate one).")
    ap.add_argument("--size-gb", type=float, default=5.0)
    ap.add_argument("--quick", action="store_true", help="0.2 GB generated checkpoint.")
    args = ap.parse_args(argv)
    from make_random_checkpoint import source_checkpoint
    from moeprune.testing import tiny_model

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-size-") as tmp:
        work = Path(tmp)
        src = source_checkpoint(args.model_dir, work, quick=args.quick, size_gb=args.size_gb)
        for k in (7, 6, 4, 2):
            rows.append(measure(src, work / f"out{k}", k))
        for model_type in ("qwen2_moe", "deepseek_v3", "olmoe", "gpt_oss"):
            tiny_model(model_type).save_pretrained(work / model_type)
            rows.append(measure(work / model_type, work / f"{model_type}-out", 4))
    worst = max(abs(r["rel_error"]) for r in rows)
    print(f"{'model':<14}{'kept/E':>8}{'expert share':>14}{'before MB':>12}{'predicted MB':>14}{'actual MB':>12}"
          f"{'error':>10}")
    for r in rows:
        print(f"{r['model_type']:<14}{r['kept']:>5}/{r['experts']:<2}{r['expert_share']:>14.3f}{r['before'] / 1e6:>12.2f}"
              f"{r['predicted'] / 1e6:>14.2f}{r['actual'] / 1e6:>12.2f}{100 * r['rel_error']:>9.3f}%")
    print(json.dumps({"rows": rows, "worst_abs_rel_error": worst, "target": 0.02, "pass": worst <= 0.02,
                      "quick": args.quick}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
