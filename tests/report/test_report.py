import torch

from moeprune.observe.stats import LayerStats, Observations
from moeprune.report import write_report_md
from moeprune.score.select import Selection

PNG = b"\x89PNG\r\n\x1a\n"


def _inputs():
    layers = {}
    for i in range(3):
        count = torch.tensor([10.0, 5, 0, 7, 3, 9, 1, 4])
        layers[i] = LayerStats(num_experts=8, hidden_size=4, count=count, gate_sum=count / 2, norm_sum=count,
                               reap_sum=count / 3, max_abs=torch.ones(8, dtype=torch.float64))
    obs = Observations(layers=layers, meta={})
    kept = {i: [0, 1, 3, 5] for i in range(3)}
    sel = Selection(method="reap", allocation="uniform", kept=kept,
                    dropped={i: [2, 4, 6, 7] for i in range(3)}, protected={0: [5]}, never_routed={0: [2]},
                    scores={i: [1.0, .5, float("-inf"), .7, .3, .9, .1, .4] for i in range(3)})
    report = {
        "moeprune_version": "9.9.9",
        "model": {"path": "/m/demo", "architecture": "Mixtral", "model_type": "mixtral"},
        "recipe": {"model": "demo", "method": "reap", "ratio": 0.5},
        "calibration": {"spec": {"sources": [{"name": "demo", "count": None}], "max_length": 256}, "num_tokens": 4321,
                        "used_default": True},
        "compression": {"method": "reap", "ratio": 0.5, "experts_before": 8, "experts_after": 4,
                        "bytes_before": 12_000_000, "bytes_after": 7_000_000,
                        "kept": {str(k): v for k, v in kept.items()}, "protected": {"0": [5]},
                        "never_routed": {"0": [2]}},
        "eval": {"base": {"demo_arith": {"score": 0.625, "n": 100, "metric": "numeric_match"}},
                 "compressed": {"demo_arith": {"score": 0.6, "n": 100, "metric": "numeric_match"}},
                 "retained": {"demo_arith": 0.96}},
        "timings": {"observe": 1.5, "total": 9.25},
    }
    return obs, sel, report


def test_report_renders_numbers_and_plots(tmp_path):
    obs, sel, report = _inputs()
    path = write_report_md(tmp_path, report, observations=obs, selection=sel)
    text = path.read_text()
    for needle in ("0.625", "0.600", "96.0%", "8 → 4", "12.00 MB", "7.00 MB", "41.7% smaller", "layer 0: 0 1 3 5",
                   "4321", "built-in mixed set", "plots/usage.png", "plots/saliency.png", "plots/kept.png",
                   "Protected super experts:** layer 0: [5]", "method: reap", "9.9.9"):
        assert needle in text, needle
    for name in ("usage", "saliency", "kept"):
        data = (tmp_path / "plots" / f"{name}.png").read_bytes()
        assert data.startswith(PNG) and 1000 < len(data) < 400_000


def test_report_without_eval_or_plots(tmp_path):
    _, _, report = _inputs()
    del report["eval"], report["timings"]
    text = write_report_md(tmp_path, report).read_text()
    assert "## Evaluation" not in text and "## Plots" not in text and "reap" in text
    assert not (tmp_path / "plots").exists()
