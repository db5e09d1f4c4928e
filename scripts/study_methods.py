#!/usr/bin/env python
"""Study: generative scores of the demo model after compression, every method side by side.

One calibration pass (all statistics any method needs) is shared by every method; each method then
compresses a fresh copy of the model at each ratio and the copy is evaluated on the same tasks.

    python scripts/study_methods.py                      # full study (both tables), ~tens of minutes
    python scripts/study_methods.py --quick              # small limits, for a smoke run
    python scripts/study_methods.py --only domain        # per-domain calibration, 4 methods x ratios

Table 1 (`methods`): methods x ratios on the mixed calibration set, score and retained fraction.
Table 3 (`quant`): bytes and quality of pruned only, quantized only, pruned + quantized and pruned +
importance-aware mixed precision.
Table 2 (`domain`): for each generative domain, REAP, EAN, frequency and random at each ratio,
calibrated on that domain alone and scored on that domain's task — the "calibrate on what you care
about" setting.
Prints the tables and a final JSON line; --out writes the JSON to a file as well.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import torch

DEFAULT_METHODS = "frequency,soft_frequency,ean,reap,reap_prob,random,hc_smoe,hc_smoe:weighted,m_smoe,reconstruct"
DOMAIN_TASKS = {"arith": "demo_arith", "json": "demo_json", "program": "demo_program"}


def _recipe(model: str, method: str, ratio: float, calib: str, router: str = "dominant"):
    from moeprune.pipeline import Recipe

    return Recipe.model_validate({"model": model, "method": method, "ratio": ratio, "seed": 0,
                                  "calibration": {"spec": calib, "max_length": 256, "batch_size": 8},
                                  "merge": {"router": router, "all_means_tokens": 128}})


def _evaluate(model, tok, tasks, limit):
    from moeprune.evaluate import evaluate

    res = evaluate(model, tok, tasks, limit=limit, batch_size=32, progress=False)
    return {t: r["score"] for t, r in res.items()}


def _compress(model, obs, recipe, calib):
    from moeprune.pipeline.methods import compress_model

    m = copy.deepcopy(model)
    compress_model(m, obs, recipe, calibration=calib)
    return m


def methods_table(model, tok, args) -> list[dict]:
    from moeprune.observe import observe
    from moeprune.observe.calibration import load_calibration, parse_calibration_spec

    spec = parse_calibration_spec(args.calib, max_length=256)
    calib = load_calibration(spec, tok, batch_size=8)
    obs = observe(model, calib, collect=("all_means", "router_gram"), all_means_tokens=128, progress=False)
    tasks = args.tasks.split(",")
    base = _evaluate(model, tok, tasks, args.limit)
    rows = [{"method": "base", "ratio": 0.0, **base}]
    _print_row(rows[-1], tasks, base)
    for ratio in [float(r) for r in args.ratios.split(",")]:
        for entry in args.methods.split(","):
            method, _, router = entry.partition(":")
            start = time.perf_counter()
            m = _compress(model, obs, _recipe("demo", method, ratio, args.calib, router or "dominant"), calib)
            scores = _evaluate(m, tok, tasks, args.limit)
            rows.append({"method": entry, "ratio": ratio, **scores, "seconds": round(time.perf_counter() - start, 1)})
            _print_row(rows[-1], tasks, base)
    return rows


def domain_table(model, tok, args) -> list[dict]:
    """Per generative domain: calibrate on that domain alone, compress with each of --domain-methods at
    each ratio, score on that domain's task. One observation pass per domain serves every row."""
    from moeprune.observe import observe
    from moeprune.observe.calibration import load_calibration, parse_calibration_spec

    methods = args.domain_methods.split(",")
    ratios = [float(r) for r in args.ratios.split(",")]
    print(f"{'domain':<10}{'base':>8}" + "".join(f"{m + '@' + format(r, 'g'):>18}" for r in ratios for m in methods))
    rows = []
    for domain, task in DOMAIN_TASKS.items():
        base = _evaluate(model, tok, [task], args.limit)[task]
        calib = load_calibration(parse_calibration_spec(f"demo/{domain}", max_length=256), tok, batch_size=8)
        obs = observe(model, calib, progress=False)
        row = {"domain": domain, "task": task, "base": base, "scores": {}}
        for ratio in ratios:
            for method in methods:
                m = _compress(model, obs, _recipe("demo", method, ratio, f"demo/{domain}"), calib)
                score = _evaluate(m, tok, [task], args.limit)[task]
                row["scores"][f"{method}@{ratio:g}"] = {"score": score,
                                                        "retained": round(score / base, 4) if base else None}
        rows.append(row)
        print(f"{domain:<10}{base:>8.3f}" + "".join(
            f"{v['score']:>9.3f} ({v['retained'] or 0:>4.0%})" for v in row["scores"].values()), flush=True)
    return rows


def _weight_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def quant_table(model, tok, args) -> list[dict]:
    """Bytes and quality: pruned only, quantized only, pruned + quantized, pruned + mixed precision.

    Bytes are those of the weights in the dtype of the run (float32 for unquantized tensors), counted
    the same way for every row, as the quantizer counts them (state-dict tensors)."""
    from moeprune.compress.quantize import MixedBudget, quantize_model
    from moeprune.observe import observe
    from moeprune.observe.calibration import load_calibration, parse_calibration_spec
    from moeprune.score import score_layer

    tasks = args.tasks.split(",")
    calib = load_calibration(parse_calibration_spec(args.calib, max_length=256), tok, batch_size=8)
    obs = observe(model, calib, progress=False)
    rows = [{"setting": "base (fp32)", "bytes": _weight_bytes(model), **_evaluate(model, tok, tasks, args.limit)}]
    pruned = _compress(model, obs, _recipe("demo", "reap", 0.5, args.calib), calib)
    rows.append({"setting": "REAP 50%", "bytes": _weight_bytes(pruned), **_evaluate(pruned, tok, tasks, args.limit)})
    from moeprune.models import MoEAdapter

    kept = {i: list(range(MoEAdapter(pruned).num_experts)) for i in obs.layers}
    for label, source, kw in (
            ("int8 g16", model, dict(bits=8, group_size=16)),
            ("int4 g16", model, dict(bits=4, group_size=16)),
            ("REAP 50% + int8 g16", pruned, dict(bits=8, group_size=16)),
            ("REAP 50% + int4 g16", pruned, dict(bits=4, group_size=16)),
            ("REAP 50% + mixed (avg 12 bits)", pruned, dict(bits=8, mixed=MixedBudget(avg_bits=12.0)))):
        m = copy.deepcopy(source)
        if "mixed" in kw:
            kw["importance"] = {i: float(score_layer("reap", obs.layers[i]).clamp(min=0).sum()) for i in kept}
        res = quantize_model(m, **kw)
        rows.append({"setting": label, "bytes": res.bytes_after, **_evaluate(m, tok, tasks, args.limit)})
    for r in rows:
        print(f"{r['setting']:<32}{r['bytes'] / 1e6:>8.2f} MB" + "".join(f"{r[t]:>10.3f}" for t in tasks), flush=True)
    return rows


def _print_row(row, tasks, base):
    cells = []
    for t in tasks:
        b = base.get(t) or 0
        ret = f"({row[t] / b:.0%})" if b and row["method"] != "base" else ""
        cells.append(f"{row[t]:.3f}{ret:>7}")
    print(f"{row['method']:<20}{row['ratio']:<6}" + "".join(f"{c:>16}" for c in cells), flush=True)


def _cell(score, base, higher_is_better=True):
    text = f"{score:.3f}" if higher_is_better else f"{score:.1f}"
    return f"{text} ({score / base:.0%})" if base else text


def to_markdown(result: dict) -> str:
    """The study's tables as markdown (compressed / base in parentheses)."""
    out = []
    if "methods" in result:
        rows = result["methods"]
        tasks = [k for k in rows[0] if k not in ("method", "ratio", "seconds")]
        base = rows[0]
        out += ["| method | drop | " + " | ".join(tasks) + " |", "|---|---|" + "---|" * len(tasks)]
        for r in rows:
            label = "—" if r["method"] == "base" else f"{r['ratio']:.0%}"
            cells = [_cell(r[t], None if r is base else base[t], "prose" not in t and "code" not in t)
                     for t in tasks]
            out.append(f"| {r['method']} | {label} | " + " | ".join(cells) + " |")
        out.append("")
    if "domain" in result:
        rows = result["domain"]
        keys = list(rows[0]["scores"])
        out += ["| domain (task) | base | " + " | ".join(k.replace("@", " ") for k in keys) + " |",
                "|---|---|" + "---|" * len(keys)]
        for r in rows:
            out.append(f"| {r['domain']} ({r['task']}) | {r['base']:.3f} | "
                       + " | ".join(_cell(r["scores"][k]["score"], r["base"]) for k in keys) + " |")
        out.append("")
    if "quant" in result:
        rows = result["quant"]
        tasks = [k for k in rows[0] if k not in ("setting", "bytes")]
        out += ["| setting | bytes | " + " | ".join(tasks) + " |", "|---|---|" + "---|" * len(tasks)]
        for r in rows:
            out.append(f"| {r['setting']} | {r['bytes'] / 1e6:.2f} MB | "
                       + " | ".join(f"{r[t]:.3f}" if r[t] < 10 else f"{r[t]:.1f}" for t in tasks) + " |")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--methods", default=DEFAULT_METHODS)
    ap.add_argument("--ratios", default="0.25,0.5")
    ap.add_argument("--tasks", default="demo_arith,demo_json,demo_program,demo_prose")
    ap.add_argument("--calib", default="demo")
    ap.add_argument("--domain-methods", default="reap,reap_prob,ean,frequency,random",
                    help="methods of the per-domain table")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--only", choices=["methods", "domain", "quant"], default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--markdown", default=None, help="also write the tables as markdown to this file")
    args = ap.parse_args(argv)
    if args.quick:
        args.limit, args.ratios, args.methods = 10, "0.5", "reap,frequency,hc_smoe"
    from moeprune.io import load_model, load_tokenizer

    torch.manual_seed(0)
    model, tok = load_model(args.model, device="cpu"), load_tokenizer(args.model)
    result = {"model": args.model, "limit": args.limit, "calib": args.calib}
    if args.only in (None, "methods"):
        print(f"{'method':<20}{'ratio':<6}" + "".join(f"{t:>16}" for t in args.tasks.split(",")))
        result["methods"] = methods_table(model, tok, args)
    if args.only in (None, "domain"):
        result["domain"] = domain_table(model, tok, args)
    if args.only in (None, "quant"):
        result["quant"] = quant_table(model, tok, args)
    line = json.dumps({"study": "methods", **result})
    if args.out:
        with open(args.out, "w") as f:
            f.write(json.dumps(result, indent=2) + "\n")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(to_markdown(result))
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
