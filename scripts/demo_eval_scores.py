#!/usr/bin/env python
"""Score a shipped model (demo, or --model study) with moeprune's evaluation stage and record it in its card.

Writes moeprune/assets/demo-moe/eval_scores.json (study: assets/study-moe/) ("full": every held-out
row; "ci_check": the first N rows, which tests/test_demo_eval.py and tests/test_study_model.py re-run)
and the "Evaluation" section of MODEL_CARD.md (between the `<!-- eval:start -->` /
`<!-- eval:end -->` markers), with trivial baselines.

    python scripts/demo_eval_scores.py
    python scripts/demo_eval_scores.py --model study
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys

TASKS = ["demo_arith", "demo_json", "demo_program", "demo_code", "demo_prose"]
START, END = "<!-- eval:start -->", "<!-- eval:end -->"


def _baseline(task) -> str:
    """Accuracy of always answering the most common answer (generative tasks)."""
    from moeprune.evaluate import resolve_task

    rows = resolve_task(task).select(None)
    answers = collections.Counter(r["answer"] for r in rows if "answer" in r)
    if not answers:
        return "—"
    return f"{answers.most_common(1)[0][1] / sum(answers.values()):.3f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ci-limit", type=int, default=50)
    ap.add_argument("--model", choices=["demo", "study"], default="demo", help="which shipped model")
    args = ap.parse_args(argv)
    from moeprune.evaluate import evaluate
    from moeprune.checkpoint.model_dir import SHIPPED_MODELS, load_model, load_tokenizer

    model_dir = SHIPPED_MODELS[args.model]
    model, tok = load_model(args.model, device="cpu"), load_tokenizer(args.model)
    full = evaluate(model, tok, TASKS, batch_size=32, progress=False)
    gen = [t for t in TASKS if full[t]["metric"] != "perplexity"]
    ci = evaluate(model, tok, gen, limit=args.ci_limit, batch_size=32, progress=False)
    record = {"full": {"tasks": full}, "ci_check": {"limit": args.ci_limit,
                                                    "scores": {t: r["score"] for t, r in ci.items()}}}
    (model_dir / "eval_scores.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [START, "## Evaluation (moeprune eval, greedy decoding, all held-out rows)", "",
             "| task | metric | n | score | trivial baseline |", "|---|---|---|---|---|"]
    for t in TASKS:
        r = full[t]
        base = _baseline(t) if t in gen else "—"
        lines.append(f"| {t} | {r['metric']} | {r['n']} | {r['score']:.3f} | {base} |")
    lines += ["", "Trivial baseline = always answering the most common held-out answer. Perplexity is per token "
              f"(lower is better). Reproduce: `python scripts/demo_eval_scores.py --model {args.model}` or "
              f"`moeprune eval {args.model} --tasks " + ",".join(TASKS) + "`.", END]
    card_path = model_dir / "MODEL_CARD.md"
    card = card_path.read_text() if card_path.exists() else f"# {model_dir.name}\n"
    block = "\n".join(lines)
    if START in card:
        card = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _m: block, card, flags=re.S)
    else:
        card = card.rstrip() + "\n\n" + block + "\n"
    card_path.write_text(card)
    print(json.dumps({t: round(full[t]["score"], 4) for t in TASKS}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
