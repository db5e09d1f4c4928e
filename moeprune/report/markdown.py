"""`report.md`: the human-readable companion of report.json, with PNG plots under `plots/`.

Every section is optional: a report without eval, timings, calibration or compression data renders
the sections it has and skips the rest.
"""

from __future__ import annotations

import math
from pathlib import Path

import yaml

from moeprune.units import human_bytes

from moeprune.report.plots import plot_kept_map, plot_saliency, plot_usage_heatmap

__all__ = ["write_report_md", "human_bytes", "render_report_md", "recovery_line"]

_DASH = "—"
_MAX_LAYER_LINES = 16  # kept-expert lines before the list collapses to a summary


def _num(x, fmt: str = "{:.3f}") -> str:
    if x is None or isinstance(x, bool) or not isinstance(x, (int, float)):
        return _DASH if x is None else str(x)
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return fmt.format(x)


def _ids(v) -> str:
    """[0, 2, 5] -> '0 2 5'; merge clusters [[0, 3], [1]] -> '0+3 1'."""
    return " ".join("+".join(map(str, c)) if isinstance(c, (list, tuple)) else str(c) for c in v)


def _by_layer(d: dict) -> list[tuple[int, list]]:
    return sorted(((int(k), v) for k, v in (d or {}).items()), key=lambda kv: kv[0])


def _summary(report: dict) -> list[str]:
    comp, model = report.get("compression") or {}, report.get("model") or {}
    lines = ["# moeprune report", ""]
    name = f"**{model.get('architecture', '?')}** `{model.get('path', '?')}`"
    if not comp:
        return lines + [f"{name}: no compression recorded.", ""]
    ratio = f", ratio {comp['ratio']}" if comp.get("ratio") is not None else ""
    size = ""
    if comp.get("bytes_before") is not None and comp.get("bytes_after") is not None:
        before, after = comp["bytes_before"], comp["bytes_after"]
        saved = f" ({100 * (1 - after / before):.1f}% smaller)" if before else ""
        size = f", {human_bytes(before)} → {human_bytes(after)}{saved}"
    lines += [f"{name} — **{comp.get('method', '?')}**{ratio}: {comp.get('experts_before', '?')} → "
              f"{comp.get('experts_after', '?')} experts per MoE layer{size}.", ""]
    facts = [("model type", model.get("model_type")), ("allocation", comp.get("allocation")),
             ("parameters", _pair(comp, "params", lambda n: f"{n:,}")),
             ("expert weights", _pair(comp, "expert_bytes", human_bytes))]
    lines += [f"- {k}: {v}" for k, v in facts if v is not None]
    return lines + [""]


def _pair(comp: dict, key: str, fmt) -> str | None:
    a, b = comp.get(f"{key}_before"), comp.get(f"{key}_after")
    return None if a is None or b is None else f"{fmt(a)} → {fmt(b)}"


def _retained(ev: dict, task: str, b: dict, c: dict) -> str:
    r = (ev.get("retained") or {}).get(task)
    if r is None and isinstance(b.get("score"), (int, float)) and isinstance(c.get("score"), (int, float)) \
            and b["score"]:
        r = c["score"] / b["score"]
    return _DASH if r is None else f"{100 * r:.1f}%"


def _eval_table(report: dict) -> list[str]:
    ev = report.get("eval") or {}
    base, comp = ev.get("base") or {}, ev.get("compressed") or {}
    tasks = list(dict.fromkeys([*base, *comp, *(ev.get("retained") or {})]))
    if not tasks:
        return []
    lines = ["## Evaluation", "", "| task | metric | n | base | compressed | retained |",
             "|---|---|---:|---:|---:|---:|"]
    for t in tasks:
        b, c = base.get(t) or {}, comp.get(t) or {}
        ns = list(dict.fromkeys(str(x["n"]) for x in (b, c) if x.get("n") is not None))
        n = "/".join(ns) or _DASH  # "100", or "100/80" when base and compressed differ
        metric = c.get("metric") or b.get("metric") or ""
        if (c or b).get("higher_is_better") is False:
            metric += " (lower is better)"
        lines.append(f"| {t} | {metric} | {n} | {_num(b.get('score'))} | {_num(c.get('score'))} | "
                     f"{_retained(ev, t, b, c)} |")
    return lines + [""]


def _runs(items: list[tuple[int, list]]) -> list[str]:
    """'layer 3: 0 2' per layer, with consecutive layers holding the same list grouped: 'layers 0–7: 0 2'."""
    runs: list[list] = []  # [first, last, value]
    for i, v in items:
        if runs and runs[-1][2] == v and runs[-1][1] + 1 == i:
            runs[-1][1] = i
        else:
            runs.append([i, i, v])
    return [f"layer {a}: {_ids(v)}" if a == b else f"layers {a}–{b}: {_ids(v)}" for a, b, v in runs]


def _kept_lines(kept: list[tuple[int, list]]) -> list[str]:
    """One line per layer (or run of identical layers); first and last layers plus a summary when long."""
    lines = [f"- {x}" for x in _runs(kept)]
    if len(lines) <= _MAX_LAYER_LINES:
        return lines
    sizes = sorted({len(v) for _, v in kept})
    per = str(sizes[0]) if len(sizes) == 1 else f"{sizes[0]}–{sizes[-1]}"
    head, tail = lines[:6], lines[-4:]
    return [f"{len(kept)} MoE layers, {per} experts kept per layer; first and last layers shown, the full "
            "list is `compression.kept` in report.json.", "", *head, f"- … {len(lines) - 10} more", *tail]


def _experts(report: dict) -> list[str]:
    comp = report.get("compression") or {}
    kept = _by_layer(comp.get("kept"))
    lines = ["## Experts kept", "", *_kept_lines(kept), ""] if kept else []
    for key, title in (("merged", "Merged clusters (first member represents)"),
                       ("protected", "Protected super experts"),
                       ("never_routed", "Never routed during calibration")):
        items = [(i, v) for i, v in _by_layer(comp.get(key)) if v]
        if items:
            lines += [f"**{title}:** " + "; ".join(_runs(items)), ""]
        elif key != "merged" and kept:
            lines += [f"**{title}:** none", ""]
    return lines


def _sources(spec: dict) -> str:
    out = []
    for s in spec.get("sources") or []:
        if isinstance(s, dict):
            out.append(f"`{s.get('name')}`" + (f":{s['count']}" if s.get("count") else ""))
        else:
            out.append(f"`{s}`")
    return ", ".join(out)


def _calibration(report: dict) -> list[str]:
    cal, obs = report.get("calibration") or {}, report.get("observations") or {}
    if not cal and not obs:
        return []
    spec = cal.get("spec") or {}
    sources = _sources(spec)
    if cal.get("used_default"):
        sources = f"{sources} (the built-in calibration set)" if sources else "the built-in calibration set"
    lines = ["## Calibration", "", f"- sources: {sources or _DASH}",
             f"- tokens: {cal.get('num_tokens', obs.get('num_tokens', _DASH))}"
             + (f" in {cal['num_sequences']} sequences" if cal.get("num_sequences") else "")]
    opts = [f"{k} {spec[k]}" for k in ("max_length", "pack", "seed", "chat_template") if k in spec]
    if opts:
        lines.append("- " + ", ".join(opts))
    if cal.get("source_counts"):
        lines.append("- rows drawn: " + ", ".join(f"`{k}` {v}" for k, v in cal["source_counts"].items()))
    if obs:
        reused = "reused from a cache" if obs.get("reused") else "collected in this run"
        fp = f" (model fingerprint `{obs['fingerprint']}`)" if obs.get("fingerprint") else ""
        lines.append(f"- observations: {reused}{fp}")
    return lines + [""]


def _timings(report: dict) -> list[str]:
    t = {k: v for k, v in (report.get("timings") or {}).items() if isinstance(v, (int, float))}
    if not t:
        return []
    total = t.get("total") or sum(t.values())
    lines = ["## Timings", "", "| stage | seconds | share |", "|---|---:|---:|"]
    for k, v in t.items():
        if k != "total":
            lines.append(f"| {k} | {v:.2f} | {100 * v / total:.0f}% |" if total else f"| {k} | {v:.2f} | |")
    if "total" in t:
        lines.append(f"| **total** | **{t['total']:.2f}** | |")
    return lines + [""]


def _plots(out: Path, observations, selection) -> list[str]:
    made = []
    if observations is not None and observations.layers:
        made.append(("Expert usage", plot_usage_heatmap(observations, out / "plots" / "usage.png")))
    if selection is not None and selection.scores:
        made.append((f"{selection.method} scores", plot_saliency(selection, out / "plots" / "saliency.png")))
    if selection is not None and selection.kept:
        made.append(("Kept and dropped experts", plot_kept_map(selection, out / "plots" / "kept.png")))
    if not made:
        return []
    lines = ["## Plots", ""]
    for title, p in made:
        lines += [f"### {title}", "", f"![{title}]({p.relative_to(out).as_posix()})", ""]
    return lines


def _recipe(report: dict) -> list[str]:
    if not report.get("recipe"):
        return []
    text = yaml.safe_dump(report["recipe"], sort_keys=False, allow_unicode=True).rstrip()
    return ["## Recipe", "", "```yaml", text, "```", ""]


def _sizes(report: dict) -> list[str]:
    """Bytes and quality of each stage (base, compressed, compressed+quantized)."""
    stages = (report.get("sizes") or {}).get("stages") or {}
    if len(stages) < 2:
        return []
    tasks = list(dict.fromkeys(t for row in stages.values() for t in row.get("scores", {})))
    base_bytes = stages.get("base", {}).get("bytes") or 0
    lines = ["## Bytes and quality", "", "| stage | weight bytes | vs base | " + " | ".join(tasks) + " |",
             "|---|---|---|" + "---|" * len(tasks)]
    for name, row in stages.items():
        rel = f"{100 * row['bytes'] / base_bytes:.1f}%" if base_bytes else "—"
        cells = [_num(row.get("scores", {}).get(t)) for t in tasks]
        lines.append(f"| {name} | {human_bytes(row['bytes'])} | {rel} | " + " | ".join(cells) + " |")
    q = report.get("quantization")
    if q:
        lines += ["", f"Quantization: {q.get('format')}, {q.get('bits')}-bit"
                  + (f", group size {q['group_size']}" if q.get("group_size") else "")
                  + (", one scale per output row" if q.get("strategy") == "channel" else "")
                  + (f", per-layer bits {q['layer_bits']}" if q.get("layer_bits") else "") + "."]
        if q.get("serves_in"):
            lines += ["", f"Serves in: {q['serves_in']}."]
    return lines + [""]


def recovery_line(rec: dict) -> str:
    """One line on what recovery did (logit KD: KL; block KD: block error; the gate-scale choice)."""
    if rec["method"] in ("router_kd", "moe_kd"):
        kl = (f"{rec['kl_before']:.4g} -> {rec['kl_after']:.4g}" if rec["kl_before"] is not None else "n/a")
        line = f"{rec['method']}: {rec['steps']} steps; KL to the original {kl} on {rec['eval_tokens']} {rec['eval_on']}"
        gen = rec.get("generated")
        if gen:
            line += (f"; trained on {rec['train_tokens']} tokens, {gen['tokens']} of them the original model's own "
                     f"continuations ({gen['rows']} rows)" if gen["rows"] else f"; no text generated: {gen['note']}")
    elif rec["method"] in ("router_kd_block", "moe_kd_block"):
        line = (f"{rec['method']}: {rec['steps']} steps per MoE layer; block-output error (relative, mean over layers) "
                f"{rec['error_before']:.4g} -> {rec['error_after']:.4g} on {rec['eval_tokens']} {rec['eval_on']}")
    else:
        line = f"recover: no training; block-output error {rec['error_before']:.4g} on {rec['eval_tokens']} {rec['eval_on']}"
    gs = rec.get("gate_scale")
    if gs and gs["mode"] != "keep":
        line += (f"; gate scale: {gs['key']} = {gs['chosen']} (source {gs['source']})" if gs["applicable"]
                 else f"; gate scale {gs['note']}")
    return line


def _recovery(report: dict) -> list[str]:
    rec = report.get("recovery")
    if not rec:
        return []
    lines = ["## Recovery", "", recovery_line(rec) + "."]
    if rec.get("layers"):
        lines += ["", "| MoE layer | block error before | after |", "|---|---:|---:|"]
        lines += [f"| {i} | {_num(v['error_before'], '{:.4g}')} | {_num(v.get('error_after'), '{:.4g}')} |"
                  for i, v in rec["layers"].items()]
    return lines + [""]


def render_report_md(report: dict, *, plot_lines: list[str] | None = None) -> str:
    """The markdown text of a report dict (no files written); `plot_lines` go before the recipe."""
    lines = (_summary(report) + _eval_table(report) + _sizes(report) + _recovery(report) + _experts(report)
             + _calibration(report) + _timings(report) + (plot_lines or []) + _recipe(report))
    if report.get("moeprune_version"):
        lines.append(f"_Written by moeprune {report['moeprune_version']}._")
    text = "\n".join(lines)
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    return text.rstrip() + "\n"


def write_report_md(out_dir: str | Path, report: dict, *, observations=None, selection=None) -> Path:
    """Write `out_dir/report.md`, and its plots under `out_dir/plots/` for the inputs that are given.

    Args:
        out_dir: the run's output folder (created if missing).
        report: the report dict, as written to report.json.
        observations: `moeprune.observe.stats.Observations`; None skips the usage heatmap.
        selection: `moeprune.score.select.Selection`; None skips the score and kept-map plots.
    Returns:
        the path of report.md.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = render_report_md(report, plot_lines=_plots(out, observations, selection))
    path = out / "report.md"
    path.write_text(text, encoding="utf-8")
    return path
