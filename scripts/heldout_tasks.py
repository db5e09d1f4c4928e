#!/usr/bin/env python
"""Evaluation tasks on demo-corpus rows that no shipped task uses: held-out rows START..STOP of the
arith, json and program generators (scripts/build_corpus.py rebuilds the same held-out split from its
seed; the shipped tasks are its first 200 rows, and no held-out prompt is ever a training or calibration
prompt). For checking a setting chosen on the shipped rows against rows that played no part in choosing.

    python scripts/heldout_tasks.py --start 200 --stop 400 -o out/fresh
    moeprune eval OUT --tasks out/fresh/fresh_arith.yaml,out/fresh/fresh_json.yaml,out/fresh/fresh_program.yaml
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

import build_corpus as bc

TASKS = Path(__file__).resolve().parents[1] / "moeprune" / "evaluate" / "tasks"
SHIPPED = Path(__file__).resolve().parents[1] / "moeprune" / "assets" / "demo-corpus" / "eval"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--start", type=int, default=200)
    ap.add_argument("--stop", type=int, default=400)
    ap.add_argument("--seed", type=int, default=1234, help="the corpus seed (build_corpus.py's default)")
    ap.add_argument("-o", "--out", required=True)
    a = ap.parse_args(argv)
    if not 0 <= a.start < a.stop <= 2000:
        raise SystemExit("Error: --start/--stop: need 0 <= start < stop <= 2000 (the held-out split's size)")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for d in bc.GENERATIVE:
        held = bc.build_generative(d, 0, 2000, 0, a.seed)["heldout"]
        shipped = [json.loads(line) for line in (SHIPPED / f"{d}.jsonl").read_text().splitlines()]
        if [{"prompt": p, "answer": ans} for p, _, ans in held[:len(shipped)]] != shipped:
            raise SystemExit(f"Error: the rebuilt {d} held-out split does not start with the shipped eval rows; "
                             "check --seed")
        rows = [{"prompt": p, "answer": ans} for p, _, ans in held[a.start:a.stop]]
        (out / f"fresh_{d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        task = yaml.safe_load((TASKS / f"demo_{'arith' if d == 'arith' else d}.yaml").read_text())
        if "include" in task:
            base = yaml.safe_load((TASKS / task.pop("include")).read_text())
            task = {**base, **task, "generation": {**base.get("generation", {}), **task.get("generation", {})}}
        task.update(name=f"fresh_{d}", data=str((out / f"fresh_{d}.jsonl").resolve()),
                    description=f"demo_{d} on held-out rows {a.start}-{a.stop - 1} (scripts/heldout_tasks.py)")
        (out / f"fresh_{d}.yaml").write_text(yaml.safe_dump(task, sort_keys=False))
        print(f"{d}: {len(rows)} rows -> {out / f'fresh_{d}.yaml'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
