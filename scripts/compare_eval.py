"""Compare two `moeprune eval -o` reports of the same rows (e.g. --backend hf against --backend vllm).

    python scripts/compare_eval.py HF.json VLLM.json [--points 2] [--ppl-rel 0.01] [--markdown]

Generative scores (0..1) must agree within `--points` percentage points, perplexities within `--ppl-rel`
relative; prints one line per task with both wall times and exits 1 when a task is outside its tolerance.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def compare(a: dict, b: dict, *, points: float, ppl_rel: float) -> tuple[list[str], bool]:
    lines, ok = [], True
    for task, ra in a["tasks"].items():
        rb = b["tasks"].get(task)
        if rb is None:
            lines.append(f"{task}: missing in the second report")
            ok = False
            continue
        if ra["n"] != rb["n"]:
            lines.append(f"{task}: {ra['n']} rows against {rb['n']}: not the same rows")
            ok = False
            continue
        sa, sb = ra["score"], rb["score"]
        if ra["metric"] == "perplexity":
            diff = abs(sb - sa) / sa
            good = diff <= ppl_rel
            shown = f"{sa:.3f} vs {sb:.3f} ({100 * diff:.2f}% apart, tolerance {100 * ppl_rel:g}%)"
        else:
            diff = abs(sb - sa) * 100
            good = diff <= points
            shown = f"{sa:.3f} vs {sb:.3f} ({diff:.1f} points apart, tolerance {points:g})"
        ok &= good
        lines.append(f"{task:<14} {ra['metric']:<12} {shown}  n={ra['n']}  "
                     f"{ra['seconds']:.1f}s vs {rb['seconds']:.1f}s  {'ok' if good else 'OUTSIDE'}")
    lines.append(f"total wall time {a['total_seconds']:.1f}s vs {b['total_seconds']:.1f}s")
    return lines, ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("first", type=Path)
    ap.add_argument("second", type=Path)
    ap.add_argument("--points", type=float, default=2.0)
    ap.add_argument("--ppl-rel", type=float, default=0.01)
    args = ap.parse_args()
    a, b = (json.loads(p.read_text()) for p in (args.first, args.second))
    lines, ok = compare(a, b, points=args.points, ppl_rel=args.ppl_rel)
    print("\n".join(lines))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
