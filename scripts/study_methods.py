#!/usr/bin/env python
"""Study: generative scores of a shipped model (--model demo | study) after compression, every method side by side.

One calibration pass (all statistics any method needs) is shared by every method; each method then
compresses a fresh copy of the model at each ratio and the copy is evaluated on the same tasks.

    python scripts/study_methods.py                      # full study (both tables), ~tens of minutes
    python scripts/study_methods.py --quick              # small limits, for a smoke run
    python scripts/study_methods.py --only domain        # per-domain calibration, 4 methods x ratios
    python scripts/study_methods.py --model study --recovery-study --limit 30   # docs/study.md (issue 15)

`--recovery-study` uses RECOVERY_METHODS in both tables: an entry `method+kd` compresses with the method,
then trains only the routers by router KD (moeprune.recover, the recipe's `recover:` defaults; the
teacher targets are computed once per calibration set); `+moe` trains every MoE-block weight instead
(moe_kd), `+kdb` / `+moeb` are the block-output variants (router_kd_block, moe_kd_block). Rows are written to --out as they finish.

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
import math
import sys
import time
from pathlib import Path

import torch

DEFAULT_METHODS = "frequency,soft_frequency,ean,reap,reap_prob,random,hc_smoe,hc_smoe:weighted,m_smoe,reconstruct"
# the issue-15 study: each pruning method with and without router-KD recovery, and the three merges
RECOVERY_METHODS = ("frequency,frequency+kd,ean,ean+kd,reap,reap+kd,reap_prob,reap_prob+kd,"
                    "hc_smoe,m_smoe,ream")
DOMAIN_TASKS = {"arith": "demo_arith", "json": "demo_json", "program": "demo_program"}
GENERATIVE = tuple(DOMAIN_TASKS.values())


RECOVER_SUFFIXES = {"kd": "router_kd", "kdb": "router_kd_block", "moe": "moe_kd", "moeb": "moe_kd_block"}


def _parse_entry(entry: str) -> tuple[str, str, str | None]:
    """`method[:router][+kd|+kdb|+moe|+moeb]` -> (method, merge router, recovery method or None)."""
    head, _, suffix = entry.partition("+")
    if suffix and suffix not in RECOVER_SUFFIXES:
        raise SystemExit(f"Error: {entry}: unknown recovery suffix +{suffix}; use one of "
                         + ", ".join(f"+{k} ({v})" for k, v in RECOVER_SUFFIXES.items()))
    method, _, router = head.partition(":")
    return method, router or "dominant", RECOVER_SUFFIXES.get(suffix)


def _calib_config(args, spec: str | None = None) -> dict:
    """The recipe's calibration section for `spec` (default --calib), as --calib-length / --unpacked say."""
    return {"spec": spec or args.calib, "max_length": args.calib_length, "batch_size": 8, "pack": not args.unpacked}


def _calibration(tok, args, spec: str | None = None):
    """The calibration batches of _calib_config(args, spec), drawn as `moeprune run` draws them."""
    from moeprune.observe.calibration import load_calibration
    from moeprune.pipeline.recipe import calibration_spec

    c = _calib_config(args, spec)
    return load_calibration(calibration_spec(_recipe(args.model, "frequency", 0.5, c)), tok, batch_size=c["batch_size"])


def _recipe(model: str, method: str, ratio: float, calib: dict, router: str = "dominant", recover: dict | None = None):
    from moeprune.pipeline import Recipe

    data = {"model": model, "method": method, "ratio": ratio, "seed": 0, "calibration": calib,
            "merge": {"router": router, "all_means_tokens": 128}}
    return Recipe.model_validate({**data, "recover": recover} if recover else data)


def _evaluate(model, tok, tasks, limit):
    from moeprune.evaluate import evaluate

    res = evaluate(model, tok, tasks, limit=limit, batch_size=32, progress=False)
    return {t: r["score"] for t, r in res.items()}, {t: r["n"] for t, r in res.items()}


def _compress(model, obs, recipe, calib):
    """A compressed copy of `model` and the Decision (its details hold a block-recovery record)."""
    from moeprune.execution.memory import compress_model

    m = copy.deepcopy(model)
    decision = compress_model(m, obs, recipe, calibration=calib)
    return m, decision


class Recovery:
    """Logit KD (router_kd, moe_kd; moeprune.recover, the recipe's `recover:` defaults unless overridden)
    after compression, as the pipeline runs it (moeprune.recover.generate.kd_training_batches). The original
    model's targets (and, with --recover-generate, its own continuations) are computed once per KD method and
    shared by every compression method."""

    def __init__(self, model, tok, calib, args):
        self.model, self.tok, self.calib, self.args = model, tok, calib, args
        self.prepared: dict = {}

    def _config(self, method: str):
        from moeprune.pipeline.recipe import RecoverConfig

        a = self.args  # None: the method's default
        return RecoverConfig(method=method, steps=a.recover_steps, lr=a.recover_lr, tokens=a.recover_tokens,
                             generate=a.recover_generate)

    def _prepare(self, method: str, cfg):
        from moeprune.recover.generate import kd_training_batches
        from moeprune.recover.router_kd import split_batches, teacher_targets

        if method not in self.prepared:
            train, held = split_batches(self.calib.batches, tokens=cfg.tokens)
            train, generated = kd_training_batches(self.model, self.tok, train, cfg, max_length=self.calib.spec.max_length,
                                                   batch_size=8, seed=0, progress=False)
            targets = (teacher_targets(self.model, train, top_k=cfg.top_k), teacher_targets(self.model, held, top_k=cfg.top_k))
            self.prepared[method] = (train, held, targets, generated)
        return self.prepared[method]

    def fit(self, model, method: str) -> dict:
        from moeprune.recover import RouterKD

        cfg = self._config(method)
        train, held, (train_t, held_t), generated = self._prepare(method, cfg)
        kd = RouterKD(steps=cfg.steps, lr=cfg.lr, top_k=cfg.top_k, seed=0, train=train, held=held, trains=cfg.trains,
                      train_targets=train_t, held_targets=held_t, generated=generated)
        rec = kd.fit(model, progress=False)
        return {k: rec[k] for k in ("method", "steps", "lr", "top_k", "train_tokens", "eval_tokens", "kl_before",
                                    "kl_after", "generated") if k in rec}


def _collect(entries) -> tuple[str, ...]:
    from moeprune.methods import get_method

    return tuple(sorted({n for e in entries for n in get_method(_parse_entry(e)[0]).needs}))


def _recover_dict(method: str, args) -> dict:
    return {"method": method, "steps": args.recover_steps, "lr": args.recover_lr,  # None: the method's default
            "tokens": args.recover_tokens}


def _run_entry(model, tok, obs, calib, entry, ratio, args, tasks, recovery) -> dict:
    method, router, recover = _parse_entry(entry)
    start = time.perf_counter()
    block = recover is not None and recover.endswith("_block")
    recipe = _recipe(args.model, method, ratio, _calib_config(args), router, _recover_dict(recover, args) if block else None)
    m, decision = _compress(model, obs, recipe, calib)
    row = {"method": entry, "ratio": ratio}
    if block:
        row["recovery"] = {k: v for k, v in decision.details["recovery"].items() if k not in ("layers", "gate_scale")}
    elif recover:
        row["recovery"] = recovery().fit(m, recover)
    scores, n = _evaluate(m, tok, tasks, args.limit)
    return {**row, **scores, "n": n, "seconds": round(time.perf_counter() - start, 1)}


def _save(result, args) -> None:
    if args.out:  # after every row, so an interrupted study keeps what it measured
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


def methods_table(model, tok, args, result) -> list[dict]:
    from moeprune.observe import observe

    entries = args.methods.split(",")
    calib = _calibration(tok, args)
    obs = observe(model, calib, collect=_collect(entries), all_means_tokens=128, progress=False)
    recovery = _lazy(lambda: Recovery(model, tok, calib, args))
    tasks = args.tasks.split(",")
    base, n = _evaluate(model, tok, tasks, args.limit)
    rows = result.setdefault("methods", [])
    rows.append({"method": "base", "ratio": 0.0, **base, "n": n})
    _print_row(rows[-1], tasks, base)
    for ratio in [float(r) for r in args.ratios.split(",")]:
        for entry in entries:
            rows.append(_run_entry(model, tok, obs, calib, entry, ratio, args, tasks, recovery))
            _print_row(rows[-1], tasks, base)
            _save(result, args)
    return rows


def _lazy(make):
    """A callable returning make()'s value, computed on first call (KD targets only when needed)."""
    box = []
    return lambda: box[0] if box else (box.append(make()) or box[0])


def domain_table(model, tok, args, result) -> list[dict]:
    """Per generative domain: calibrate on that domain alone, compress with each of --domain-methods at
    each ratio, score on that domain's task. One observation pass per domain serves every row."""
    from moeprune.observe import observe

    entries = args.domain_methods.split(",")
    ratios = [float(r) for r in args.ratios.split(",")]
    rows = result.setdefault("domain", [])
    for domain, task in DOMAIN_TASKS.items():
        base, n = _evaluate(model, tok, [task], args.limit)
        calib = _calibration(tok, args, f"demo/{domain}")
        obs = observe(model, calib, collect=_collect(entries), all_means_tokens=128, progress=False)
        recovery = _lazy(lambda: Recovery(model, tok, calib, args))
        row = {"domain": domain, "task": task, "base": base[task], "n": n[task], "scores": {}}
        rows.append(row)
        for ratio in ratios:
            for entry in entries:
                sub = argparse.Namespace(**{**vars(args), "calib": f"demo/{domain}"})
                r = _run_entry(model, tok, obs, calib, entry, ratio, sub, [task], recovery)
                row["scores"][f"{entry}@{ratio:g}"] = {
                    "score": r[task], **({"recovery": r["recovery"]} if "recovery" in r else {}),
                    "retained": round(r[task] / row["base"], 4) if row["base"] else None}
                print(f"{domain:<10}{row['base']:>8.3f} {entry}@{ratio:g} {r[task]:.3f}", flush=True)
                _save(result, args)
    return rows


def _weight_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def quant_table(model, tok, args) -> list[dict]:
    """Bytes and quality: pruned only, quantized only, pruned + quantized, pruned + mixed precision.

    Bytes are those of the weights in the dtype of the run (float32 for unquantized tensors), counted
    the same way for every row, as the quantizer counts them (state-dict tensors)."""
    from moeprune.compress.quantize import MixedBudget, quantize_model
    from moeprune.observe import observe
    from moeprune.score import score_layer

    tasks = args.tasks.split(",")
    calib = _calibration(tok, args)
    obs = observe(model, calib, progress=False)
    rows = [{"setting": "base (fp32)", "bytes": _weight_bytes(model), **_evaluate(model, tok, tasks, args.limit)[0]}]
    pruned, _ = _compress(model, obs, _recipe(args.model, "reap", 0.5, _calib_config(args)), calib)
    rows.append({"setting": "REAP 50%", "bytes": _weight_bytes(pruned), **_evaluate(pruned, tok, tasks, args.limit)[0]})
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
        rows.append({"setting": label, "bytes": res.bytes_after, **_evaluate(m, tok, tasks, args.limit)[0]})
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


def _se(p: float, n: int) -> float:
    """Standard error of an accuracy p measured on n rows."""
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n else float("nan")


def _cell(score, base, higher_is_better=True, n=None):
    text = f"{score:.3f}" if higher_is_better else f"{score:.1f}"
    if n and higher_is_better:
        text += f" ±{_se(score, n):.2f}"
    return f"{text} ({score / base:.0%})" if base else text


def retained(row: dict, base: dict) -> tuple[float, float] | None:
    """Mean over the generative tasks of score / base, and its standard error (tasks independent)."""
    tasks = [t for t in GENERATIVE if t in row and base.get(t)]
    if not tasks:
        return None
    mean = sum(row[t] / base[t] for t in tasks) / len(tasks)
    se = math.sqrt(sum((_se(row[t], row["n"][t]) / base[t]) ** 2 for t in tasks)) / len(tasks)
    return mean, se


def _kl(rec: dict | None) -> str:
    """The recovery column: the method and its held-back KL (logit KD) or block error (block KD)."""
    if not rec:
        return "—"
    name = rec.get("method", "router_kd")
    if "kl_before" in rec:
        return f"{name}: KL {rec['kl_before']:.2f} → {rec['kl_after']:.2f}"
    return f"{name}: block error {rec['error_before']:.2f} → {rec['error_after']:.2f}"


def _methods_markdown(rows: list[dict]) -> list[str]:
    tasks = [k for k in rows[0] if k not in ("method", "ratio", "seconds", "n", "recovery")]
    base = rows[0]
    out = ["| method | drop | recovery | " + " | ".join(tasks) + " | generative retained (mean ± se) |",
           "|---|---|---|" + "---|" * (len(tasks) + 1)]
    for r in rows:
        label = "—" if r["method"] == "base" else f"{r['ratio']:.0%}"
        cells = [_cell(r[t], None if r is base else base[t], "prose" not in t and "code" not in t, r["n"][t])
                 for t in tasks]
        ret = retained(r, base) if r is not base else None
        cells.append(f"{ret[0]:.0%} ± {ret[1]:.0%}" if ret else "—")
        out.append(f"| {r['method'].partition('+')[0]} | {label} | {_kl(r.get('recovery'))} | "
                   + " | ".join(cells) + " |")
    return out + [""]


def _entry_label(key: str) -> str:
    """`reap+moe@0.5` -> `reap + moe_kd 0.5` (`+kd` stays `+ KD`, as the earlier tables read)."""
    entry, _, ratio = key.partition("@")
    head, _, suffix = entry.partition("+")
    label = head if not suffix else f"{head} + {'KD' if suffix == 'kd' else RECOVER_SUFFIXES[suffix]}"
    return f"{label} {ratio}".strip()


def to_markdown(result: dict) -> str:
    """The study's tables as markdown (compressed / base in parentheses, ± one standard error)."""
    out = []
    if "methods" in result:
        out += _methods_markdown(result["methods"])
    if "domain" in result:
        rows = result["domain"]
        keys = list(rows[0]["scores"])
        out += ["| domain (task) | base | " + " | ".join(_entry_label(k) for k in keys)
                + " |", "|---|---|" + "---|" * len(keys)]
        for r in rows:
            out.append(f"| {r['domain']} ({r['task']}) | {r['base']:.3f} ±{_se(r['base'], r['n']):.2f} | "
                       + " | ".join(_cell(r["scores"][k]["score"], r["base"]) if k in r["scores"] else "—"
                                    for k in keys) + " |")
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
    ap.add_argument("--calib-length", type=int, default=256, help="calibration tokens per sequence (default 256)")
    ap.add_argument("--unpacked", action="store_true",
                    help="one text per calibration row, cut to --calib-length (default: texts packed together)")
    ap.add_argument("--domain-methods", default="reap,reap_prob,ean,frequency,random",
                    help="methods of the per-domain table")
    ap.add_argument("--recovery-study", action="store_true",
                    help=f"both tables with the methods {RECOVERY_METHODS} ('+kd': then router KD, '+moe': MoE-block KD)")
    ap.add_argument("--recover-steps", type=int, default=None, help="recovery steps (default: the method's)")
    ap.add_argument("--recover-lr", type=float, default=None, help="recovery learning rate (default: the method's)")
    ap.add_argument("--recover-tokens", type=int, default=None,
                    help="tokens logit KD trains on (default: the method's)")
    ap.add_argument("--recover-generate", type=int, default=None, metavar="N",
                    help="logit KD also on N of the original model's continuations of each calibration row")
    ap.add_argument("--from-json", default=None, help="only render --markdown from a saved --out file")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--only", choices=["methods", "domain", "quant"], default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--markdown", default=None, help="also write the tables as markdown to this file")
    args = ap.parse_args(argv)
    if args.from_json:
        Path(args.markdown or "/dev/stdout").write_text(to_markdown(json.loads(Path(args.from_json).read_text())))
        return 0
    if args.recovery_study:
        args.methods = args.domain_methods = RECOVERY_METHODS
    if args.quick:
        args.limit, args.ratios, args.methods = 10, "0.5", "reap,frequency,hc_smoe"
    from moeprune.checkpoint.model_dir import load_model, load_tokenizer

    torch.manual_seed(0)
    model, tok = load_model(args.model, device="cpu"), load_tokenizer(args.model)
    result = {"model": args.model, "limit": args.limit, "calib": _calib_config(args), "ratios": args.ratios,
              "command": " ".join(sys.argv)}
    if args.only in (None, "methods"):
        print(f"{'method':<20}{'ratio':<6}" + "".join(f"{t:>16}" for t in args.tasks.split(",")))
        methods_table(model, tok, args, result)
    if args.only in (None, "domain"):
        domain_table(model, tok, args, result)
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
