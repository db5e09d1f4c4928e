import struct

import pytest
import torch

from moeprune.observe.stats import LayerStats, Observations
from moeprune.report import human_bytes, plot_kept_map, plot_saliency, plot_usage_heatmap, write_report_md
from moeprune.score.select import Selection

PNG = b"\x89PNG\r\n\x1a\n"
NEG_INF = float("-inf")


def _observations(num_layers: int = 3, num_experts: int = 8) -> Observations:
    g = torch.Generator().manual_seed(0)
    layers = {}
    for i in range(num_layers):
        count = torch.randint(1, 50, (num_experts,), generator=g).double()
        count[2] = 0  # expert 2 is never routed
        layers[i] = LayerStats(num_experts=num_experts, hidden_size=4, count=count, gate_sum=count / 2,
                               norm_sum=count, reap_sum=count / 3, max_abs=torch.ones(num_experts, dtype=torch.float64))
    return Observations(layers=layers, meta={"num_tokens": 4321})


def _selection(num_layers: int = 3, num_experts: int = 8) -> Selection:
    keep = num_experts // 2
    scores, kept, dropped = {}, {}, {}
    for i in range(num_layers):
        row = [float((7 * j + 3 * i) % num_experts) + 0.5 for j in range(num_experts)]
        row[2] = NEG_INF
        scores[i] = row
        kept[i] = sorted(sorted(range(num_experts), key=lambda j: -row[j])[:keep])
        dropped[i] = [j for j in range(num_experts) if j not in kept[i]]
    if num_experts == 8:  # a fixed layer 0 (protected expert 5 kept) for the text checks
        kept[0], dropped[0] = [0, 1, 3, 5], [2, 4, 6, 7]
    return Selection(method="reap", allocation="uniform", kept=kept, dropped=dropped, protected={0: [5]},
                     never_routed={i: [2] for i in range(num_layers)}, scores=scores)


def _report(sel: Selection) -> dict:
    return {
        "moeprune_version": "9.9.9",
        "model": {"path": "/m/demo", "architecture": "Mixtral", "model_type": "mixtral"},
        "recipe": {"model": "demo", "method": "reap", "ratio": 0.5, "eval": {"tasks": ["demo_arith"]}},
        "calibration": {"spec": {"sources": [], "max_length": 256, "pack": True, "seed": 0}, "num_tokens": 4321,
                        "used_default": True},
        "observations": {"reused": False, "num_tokens": 4321, "fingerprint": "abcdef0123456789"},
        "compression": {"method": "reap", "ratio": 0.5, "allocation": "uniform", "experts_before": 8,
                        "experts_after": 4, "bytes_before": 12_000_000, "bytes_after": 7_000_000,
                        "kept": {str(k): v for k, v in sel.kept.items()},
                        "dropped": {str(k): v for k, v in sel.dropped.items()}, "protected": {"0": [5]},
                        "never_routed": {str(k): v for k, v in sel.never_routed.items()}},
        "eval": {"base": {"demo_arith": {"score": 0.625, "n": 100, "metric": "numeric_match", "seconds": 3.2,
                                         "higher_is_better": True}},
                 "compressed": {"demo_arith": {"score": 0.6, "n": 100, "metric": "numeric_match", "seconds": 3.0,
                                               "higher_is_better": True}},
                 "retained": {"demo_arith": 0.96}},
        "timings": {"load": 1.25, "observe": 1.5, "total": 9.25},
    }


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data.startswith(PNG), path
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_report_renders_numbers_and_links(tmp_path):
    obs, sel = _observations(), _selection()
    path = write_report_md(tmp_path, _report(sel), observations=obs, selection=sel)
    assert path == tmp_path / "report.md"
    text = path.read_text(encoding="utf-8")
    for needle in ("0.625", "0.600", "96.0%", "| demo_arith | numeric_match | 100 |", "8 → 4", "12.00 MB",
                   "7.00 MB", "41.7% smaller", "`/m/demo`", "**reap**", "ratio 0.5",
                   "- layer 0: 0 1 3 5", f"- layer 1: {' '.join(map(str, sel.kept[1]))}",
                   "**Protected super experts:** layer 0: 5",
                   "**Never routed during calibration:** layers 0–2: 2",
                   "tokens: 4321", "sources: the built-in calibration set", "collected in this run",
                   "| observe | 1.50 |", "| **total** | **9.25** |",
                   "](plots/usage.png)", "](plots/saliency.png)", "](plots/kept.png)",
                   "```yaml\nmodel: demo\nmethod: reap\nratio: 0.5\neval:\n  tasks:\n  - demo_arith\n```",
                   "moeprune 9.9.9"):
        assert needle in text, needle
    # sections in the documented order
    order = [text.index(h) for h in ("## Evaluation", "## Experts kept", "## Calibration", "## Timings",
                                     "## Plots", "## Recipe")]
    assert order == sorted(order)
    for name in ("usage", "saliency", "kept"):
        png = tmp_path / "plots" / f"{name}.png"
        w, h = _png_size(png)
        assert w > 200 and h > 100
        assert 1000 < png.stat().st_size < 150_000


def test_report_without_optional_sections(tmp_path):
    report = _report(_selection())
    for key in ("eval", "timings", "calibration", "observations", "recipe"):
        del report[key]
    text = write_report_md(tmp_path, report).read_text(encoding="utf-8")
    assert "8 → 4" in text and "- layer 0: 0 1 3 5" in text
    for absent in ("## Evaluation", "## Timings", "## Calibration", "## Plots", "## Recipe"):
        assert absent not in text, absent
    assert not (tmp_path / "plots").exists()


def test_report_with_empty_eval_and_bare_dict(tmp_path):
    report = _report(_selection())
    report["eval"] = {"base": {}, "compressed": {}, "retained": {}}
    assert "## Evaluation" not in write_report_md(tmp_path / "a", report).read_text(encoding="utf-8")
    text = write_report_md(tmp_path / "b", {}).read_text(encoding="utf-8")
    assert text.startswith("# moeprune report")


def test_eval_table_handles_missing_side_and_computes_retained(tmp_path):
    report = _report(_selection())
    report["eval"] = {"base": {"a": {"score": 0.5, "n": 10, "metric": "exact"}, "b": {"score": 0.25, "n": 4}},
                      "compressed": {"a": {"score": 0.25, "n": 10, "metric": "exact"}}}
    text = write_report_md(tmp_path, report).read_text(encoding="utf-8")
    assert "| a | exact | 10 | 0.500 | 0.250 | 50.0% |" in text
    assert "| b |  | 4 | 0.250 | — | — |" in text


def test_many_layers_collapse_to_summary(tmp_path):
    sel = _selection(num_layers=40, num_experts=16)
    report = _report(sel)
    text = write_report_md(tmp_path, report).read_text(encoding="utf-8")
    section = text[text.index("## Experts kept"):text.index("**Protected")]
    assert "40 MoE layers, 8 experts kept per layer" in section
    assert "`compression.kept` in report.json" in section and "- layer 39:" in section
    assert section.count("\n- ") <= 12


def test_identical_consecutive_layers_are_grouped(tmp_path):
    report = _report(_selection())
    report["compression"]["kept"] = {str(i): [0, 1, 2, 3] for i in range(5)}
    text = write_report_md(tmp_path, report).read_text(encoding="utf-8")
    assert "- layers 0–4: 0 1 2 3" in text


def test_plots_are_deterministic_and_small_at_scale(tmp_path):
    obs, sel = _observations(64, 128), _selection(64, 128)
    for fn, arg in ((plot_usage_heatmap, obs), (plot_saliency, sel), (plot_kept_map, sel)):
        a = fn(arg, tmp_path / "a" / f"{fn.__name__}.png")
        b = fn(arg, tmp_path / "b" / f"{fn.__name__}.png")
        assert a.read_bytes() == b.read_bytes(), fn.__name__
        assert a.stat().st_size < 150_000, (fn.__name__, a.stat().st_size)
        w, h = _png_size(a)
        assert w <= 2000 and h <= 1600


@pytest.mark.parametrize("n, want", [(None, "—"), (999, "999 B"), (1_500, "1.50 KB"), (2_340_000_000, "2.34 GB")])
def test_human_bytes(n, want):
    assert human_bytes(n) == want
