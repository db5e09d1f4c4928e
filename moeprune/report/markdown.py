"""`report.md`: the human-readable companion of report.json, with plots."""

from __future__ import annotations

from pathlib import Path

import yaml

from moeprune.report.plots import plot_kept_map, plot_saliency, plot_usage_heatmap

__all__ = ["write_report_md", "human_bytes"]


def human_bytes(n: float | None) -> str:
    if n is None:
        return "—"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def _summary(report: dict) -> list[str]:
    comp, model = report.get("compression", {}), report.get("model", {})
    lines = ["# moeprune report", ""]
    if comp:
        ratio = f", ratio {comp['ratio']}" if comp.get("ratio") is not None else ""
        saved = ""
        if comp.get("bytes_before"):
            saved = f" ({100 * (1 - comp['bytes_after'] / comp['bytes_before']):.1f}% smaller)"
        lines += [f"**{model.get('architecture', '?')}** `{model.get('path', '?')}` — **{comp.get('method')}**{ratio}: "
                  f"{comp.get('experts_before')} → {comp.get('experts_after')} experts per MoE layer, "
                  f"{human_bytes(comp.get('bytes_before'))} → {human_bytes(comp.get('bytes_after'))}{saved}.", ""]
    return lines


def _eval_table(report: dict) -> list[str]:
    ev = report.get("eval") or {}
    base, comp, kept = ev.get("base") or {}, ev.get("compressed") or {}, ev.get("retained") or {}
    tasks = list(dict.fromkeys([*base, *comp]))
    if not tasks:
        return []
    lines = ["## Evaluation", "", "| task | metric | n | base | compressed | retained |", "|---|---|---|---|---|---|"]
    for t in tasks:
        b, c = base.get(t, {}), comp.get(t, {})
        fmt = lambda r: f"{r['score']:.3f}" if "score" in r else "—"  # noqa: E731
        ret = f"{100 * kept[t]:.1f}%" if t in kept else "—"
        lines.append(f"| {t} | {(c or b).get('metric', '')} | {(c or b).get('n', '')} | {fmt(b)} | {fmt(c)} | {ret} |")
    return lines + [""]


def _layers(report: dict) -> list[str]:
    comp = report.get("compression") or {}
    kept = comp.get("kept") or {}
    if not kept:
        return []
    lines = ["## Experts kept", ""]
    items = sorted(kept.items(), key=lambda kv: int(kv[0]))
    shown = items if len(items) <= 16 else items[:8] + items[-4:]
    lines += [f"- layer {i}: {' '.join(map(str, v))}" for i, v in shown]
    if len(shown) < len(items):
        lines.append(f"- … {len(items) - len(shown)} more layers in report.json (`compression.kept`)")
    for key, title in (("merged", "Merged clusters (first member represents)"),
                       ("protected", "Protected super experts"), ("never_routed", "Never routed during calibration")):
        val = comp.get(key) or {}
        if val:
            lines += ["", f"**{title}:** " + "; ".join(f"layer {i}: {v}" for i, v in sorted(val.items(),
                                                                                            key=lambda kv: int(kv[0])))]
    return lines + [""]


def _calibration(report: dict) -> list[str]:
    cal = report.get("calibration") or {}
    if not cal:
        return []
    spec = cal.get("spec", {})
    sources = ", ".join(f"{s['name']}" + (f":{s['count']}" if s.get("count") else "") for s in spec.get("sources", []))
    note = " (the built-in mixed set)" if cal.get("used_default") else ""
    return ["## Calibration", "", f"- sources: {sources or '—'}{note}", f"- tokens: {cal.get('num_tokens', '—')}",
            f"- max length {spec.get('max_length', '—')}, packed: {spec.get('pack', '—')}, seed {spec.get('seed', '—')}",
            f"- observations reused from cache: {(report.get('observations') or {}).get('reused', False)}", ""]


def _timings(report: dict) -> list[str]:
    t = report.get("timings") or {}
    if not t:
        return []
    return ["## Timings", "", "| stage | seconds |", "|---|---|", *[f"| {k} | {v:.2f} |" for k, v in t.items()], ""]


def write_report_md(out_dir: str | Path, report: dict, *, observations=None, selection=None) -> Path:
    """Write `out_dir/report.md` and its plots under `out_dir/plots/`."""
    out = Path(out_dir)
    lines = _summary(report) + _eval_table(report) + _layers(report) + _calibration(report) + _timings(report)
    plots = []
    if observations is not None:
        plots.append(("Expert usage", plot_usage_heatmap(observations, out / "plots" / "usage.png")))
    if selection is not None:
        plots.append(("Scores", plot_saliency(selection, out / "plots" / "saliency.png")))
        plots.append(("Kept and dropped", plot_kept_map(selection, out / "plots" / "kept.png")))
    if plots:
        lines += ["## Plots", ""] + [f"### {title}\n\n![{title}]({p.relative_to(out).as_posix()})\n" for title, p in plots]
    if report.get("recipe"):
        lines += ["## Recipe", "", "```yaml", yaml.safe_dump(report["recipe"], sort_keys=False).rstrip(), "```", ""]
    lines.append(f"_Written by moeprune {report.get('moeprune_version', '')}._")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
